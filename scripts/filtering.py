"""Label filtering module (LFM, Sec. 2.2 of the paper): GMM on per-sample losses, cascade.

A two-component Gaussian mixture is fitted to the min-max normalised per-sample losses;
the component with the smaller mean is "Clean", and a sample is Clean when its
posterior for that component exceeds 0.5. The defaults are DivideMix's
(``max_iter=10, tol=1e-2, reg_covar=5e-4``).

Degenerate inputs get a defined answer instead of an exception, always "everything
Clean, nothing to cleanse this round", with a ``status`` to log:

* ``"too_few_samples"``: fewer than ``min_samples`` losses; two Gaussians cannot be
  fitted meaningfully to a handful of points.
* ``"constant_losses"``: the raw losses span less than ``const_tol``; min-max
  normalisation would only blow rounding noise up to [0, 1].
* ``"collapsed"``: the fit ran, but one component has weight < ``min_weight`` or the
  two means are closer than ``min_separation`` (normalised units): the losses are
  effectively one population and a split would be arbitrary. The fitted parameters
  are kept in the result for inspection.

All-Clean is the safe default for this method: a Clean manual label is kept as the
training target, so a round that cannot decide changes nothing. NaN or infinite
losses raise ``ValueError``; they point at a bug upstream and must not be silently
classified.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from scripts.flags import as_flag
from scripts.losses import SegmentationLoss

__all__ = [
    "KEEP_MANUAL",
    "KEEP_PSEUDO",
    "CLEANSE",
    "STATUS_OK",
    "STATUS_TOO_FEW",
    "STATUS_CONSTANT",
    "STATUS_COLLAPSED",
    "FilterResult",
    "normalise_losses",
    "gmm_filter",
    "saturated_pile",
    "gmm_filter_peeled",
    "cascade",
    "filter_precision_recall",
    "LabelFilter",
    "Verdicts",
    "refit_used",
]

KEEP_MANUAL = 0
KEEP_PSEUDO = 1
CLEANSE = 2

STATUS_OK = "ok"
STATUS_TOO_FEW = "too_few_samples"
STATUS_CONSTANT = "constant_losses"
STATUS_COLLAPSED = "collapsed"

logger = logging.getLogger(__name__)

# the share of GMM-1's Noisy calls that must lie in the saturated pile before the peel is tried (bundle version 0.9.0)
PILE_SHARE = 0.9
# the separation (Ashman's D) the peel's refit must reach to be used, per statistic it judges. On the losses 3.0
# (bundle version 0.9.0): early in training correct and wrong labels overlap in loss, and a refit at D 2.2 flagged
# many correct labels. On contour offsets 2.0 (0.12.1), the usual bound for two cleanly separated Gaussians: the
# offsets of correct labels stay small, and refits at D 2.4-3.0 kept precision 0.87-0.93 (docs/README.md)
REFIT_SEPARATION = {"loss": 3.0, "contour_offset": 2.0}
# what the peel's refit can judge the samples outside the pile by (LabelFilter.refit_statistic): those with a guard
REFIT_STATISTICS = tuple(REFIT_SEPARATION)


def _as_loss_vector(losses) -> torch.Tensor:
    t = torch.as_tensor(losses)
    if t.ndim != 1:
        raise ValueError(f"losses must be a 1D vector (N,), got shape {tuple(t.shape)}")
    t = t.detach().to(device="cpu", dtype=torch.float64)
    if t.numel() and not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).nonzero(as_tuple=True)[0]
        raise ValueError(
            f"losses contain {bad.numel()} NaN/inf value(s), first at index {int(bad[0])}; "
            "check the per-sample loss computation"
        )
    return t


def normalise_losses(losses: torch.Tensor) -> torch.Tensor:
    """Min-max normalise to [0, 1]; a constant (or empty) vector maps to zeros.

    "Constant" means a spread within a few ulps of the largest magnitude, where the
    division would only amplify rounding. Returns float64 on the CPU; raises
    ValueError for NaN/inf.
    """
    t = _as_loss_vector(losses)
    if t.numel() == 0:
        return t
    lo, hi = t.min(), t.max()
    spread = float(hi - lo)
    if spread <= 4 * np.finfo(np.float64).eps * max(1.0, float(t.abs().max())):
        return torch.zeros_like(t)
    return (t - lo) / spread


@dataclass
class FilterResult:
    """Outcome of :func:`gmm_filter`.

    ``means``, ``variances`` and ``weights`` are ``(clean, noisy)`` in normalised units
    when a mixture was fitted (also for ``"collapsed"``), and ``()`` otherwise. A loss
    ``x`` in the original units maps to ``(x - loss_min) / (loss_max - loss_min)``;
    :meth:`component_pdfs` gives the weighted densities for drawing the two Gaussians
    over a histogram.
    """

    clean: torch.Tensor
    clean_prob: torch.Tensor
    status: str
    means: tuple = ()
    weights: tuple = ()
    variances: tuple = ()
    loss_min: float = float("nan")
    loss_max: float = float("nan")
    converged: Optional[bool] = None
    n_iter: int = 0
    threshold: float = 0.5
    extra: dict = field(default_factory=dict)

    @property
    def noisy(self) -> torch.Tensor:
        return ~self.clean

    @property
    def n_clean(self) -> int:
        return int(self.clean.sum())

    @property
    def n_noisy(self) -> int:
        return int((~self.clean).sum())

    @property
    def fitted(self) -> bool:
        return len(self.means) == 2

    @property
    def separation(self) -> float:
        """Ashman's D of the two components, ``sqrt(2) |mean_noisy - mean_clean| / sqrt(var_clean + var_noisy)``;
        NaN when no mixture was fitted. Logged, not used: on ACDC a filter run on clean labels (which splits one
        skewed population) gave D 1.9 to 2.8 and one run on noisy labels 2.4 to 3.6, so D alone does not tell a
        forced split from a real one (docs/README.md)."""
        if not self.fitted:
            return float("nan")
        return math.sqrt(2.0) * abs(self.means[1] - self.means[0]) / math.sqrt(sum(self.variances))

    def summary(self) -> dict:
        """Flat dict of scalars for logging."""
        out = {
            "status": self.status,
            "n": int(self.clean.numel()),
            "n_clean": self.n_clean,
            "n_noisy": self.n_noisy,
            "loss_min": self.loss_min,
            "loss_max": self.loss_max,
        }
        if self.fitted:
            for name, (c, n) in (("mean", self.means), ("var", self.variances), ("weight", self.weights)):
                out[f"{name}_clean"] = float(c)
                out[f"{name}_noisy"] = float(n)
            out["converged"] = self.converged
            out["n_iter"] = self.n_iter
            out["separation"] = self.separation
        return out

    def component_pdfs(self, x) -> tuple[np.ndarray, np.ndarray]:
        """Weighted Gaussian densities (clean, noisy) at normalised losses ``x``."""
        if not self.fitted:
            raise ValueError(f"no mixture was fitted (status {self.status!r})")
        x = np.asarray(x, dtype=np.float64)
        pdfs = []
        for m, v, w in zip(self.means, self.variances, self.weights):
            pdfs.append(w * np.exp(-0.5 * (x - m) ** 2 / v) / math.sqrt(2 * math.pi * v))
        return pdfs[0], pdfs[1]


def _all_clean(n: int, status: str, lo: float, hi: float, **kw) -> FilterResult:
    return FilterResult(
        clean=torch.ones(n, dtype=torch.bool),
        clean_prob=torch.ones(n, dtype=torch.float64),
        status=status,
        loss_min=lo,
        loss_max=hi,
        **kw,
    )


def gmm_filter(
    losses: torch.Tensor,
    min_samples: int = 8,
    seed: int = 0,
    max_iter: int = 10,
    tol: float = 1e-2,
    reg_covar: float = 5e-4,
    min_separation: float = 0.05,
    min_weight: float = 0.01,
    const_tol: float = 1e-6,
    monotone: bool = True,
) -> FilterResult:
    """Split samples into Clean / Noisy with a two-component GMM on their losses.

    Args:
        losses: (N,) per-sample losses (any float dtype/device; read as float64 on CPU).
        min_samples: below this many samples, everything is Clean (``"too_few_samples"``).
        seed: ``random_state`` of the mixture; equal inputs and seed give equal output.
        max_iter, tol, reg_covar: passed to ``sklearn.mixture.GaussianMixture``.
        min_separation: means closer than this (normalised units) count as collapsed.
        min_weight: a component lighter than this counts as collapsed.
        const_tol: raw losses spanning less than this are constant.
        monotone: if True (default), losses at or below the clean mean are always Clean
            and losses at or above the noisy mean always Noisy. With unequal variances
            the wider Gaussian also wins far out on the *other* side, which would call
            a sample Noisy because its loss is unusually *low*; this only corrects those
            tails. Between the two means the decision is the plain posterior > 0.5 rule
            (DivideMix's), and ``clean_prob`` is always the raw posterior.

    Returns:
        :class:`FilterResult`; ``clean`` and ``clean_prob`` are CPU tensors.
    """
    raw = _as_loss_vector(losses)
    n = raw.numel()
    lo = float(raw.min()) if n else float("nan")
    hi = float(raw.max()) if n else float("nan")
    if n < max(min_samples, 2):
        return _all_clean(n, STATUS_TOO_FEW, lo, hi)
    if hi - lo < const_tol:
        return _all_clean(n, STATUS_CONSTANT, lo, hi)

    x = normalise_losses(raw).numpy().reshape(-1, 1)
    gmm = GaussianMixture(
        n_components=2, max_iter=max_iter, tol=tol, reg_covar=reg_covar, random_state=seed
    )
    with warnings.catch_warnings():
        # max_iter=10 routinely stops before sklearn's convergence test; that is the
        # intended DivideMix setting, so record the flag instead of warning every round.
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(x)
    means = gmm.means_.reshape(-1)
    variances = gmm.covariances_.reshape(-1)
    weights = gmm.weights_.reshape(-1)
    ci, ni = (0, 1) if means[0] <= means[1] else (1, 0)
    params = dict(
        means=(float(means[ci]), float(means[ni])),
        variances=(float(variances[ci]), float(variances[ni])),
        weights=(float(weights[ci]), float(weights[ni])),
        converged=bool(gmm.converged_),
        n_iter=int(gmm.n_iter_),
    )
    if weights.min() < min_weight or abs(means[ni] - means[ci]) < min_separation:
        return _all_clean(n, STATUS_COLLAPSED, lo, hi, **params)

    prob = gmm.predict_proba(x)[:, ci]
    clean = prob > 0.5
    if monotone:
        xs = x[:, 0]
        clean = np.where(xs <= means[ci], True, np.where(xs >= means[ni], False, clean))
    return FilterResult(
        clean=torch.from_numpy(np.asarray(clean, dtype=bool)),
        clean_prob=torch.from_numpy(prob.astype(np.float64)),
        status=STATUS_OK,
        loss_min=lo,
        loss_max=hi,
        **params,
    )


def saturated_pile(losses: torch.Tensor, tol: float = 0.01) -> torch.Tensor:
    """(N,) bool: the samples whose loss lies within ``tol`` of the largest, in normalised units (none for a
    constant vector)."""
    x = normalise_losses(losses)
    return x >= 1 - tol if x.numel() and float(x.max()) > 0 else torch.zeros(x.numel(), dtype=torch.bool)


def gmm_filter_peeled(losses: torch.Tensor, tol: float = 0.01, min_share: float = 0.05, pile_share: float = PILE_SHARE,
                      min_refit_separation: float | None = None, refit_on: torch.Tensor | None = None,
                      refit_name: str = "loss", **gmm_kwargs) -> FilterResult:
    """:func:`gmm_filter`, fitted again without the saturated losses when its Noisy side is only those.

    Samples whose prediction misses their label altogether (a missed slice, a structure drawn where there is none)
    all reach the largest loss the criterion gives and pile up there (:func:`saturated_pile`). When the pile is
    large, a two-component mixture may spend its Noisy component on it alone, and the merely wrong labels, between
    the pile and the correct ones, fall to the Clean side (ACDC, Dice + CE, collapse profile: recall 0.57, every
    Noisy call right). So when at least ``pile_share`` of the samples called Noisy lie in the pile and the pile holds
    at least ``min_share`` of all samples, the pile stays Noisy and the mixture is fitted to the other samples.
    That second fit is used only when it finds two well separated populations (Ashman's D at least
    ``min_refit_separation``): early in training, clean and wrong labels overlap in loss, and a forced split of the
    others flags many clean labels (ACDC at the CPU profile, soft Dice, first round: D 2.2, precision 0.80 against
    0.91 for the single fit; in the collapse regime D 3.8 to 4.3). Otherwise the first fit is returned unchanged.
    ``None`` takes the separation :data:`REFIT_SEPARATION` gives the statistic ``refit_name``.

    ``refit_on`` (N,), named ``refit_name``, replaces the losses in the second fit: the pile is still found on the
    losses, and the other samples are judged by that statistic (:func:`scripts.contours.contour_offset`: a label
    drawn too wide or too tight lies among the correct ones in loss, not in contour displacement).

    A refitted result gives its parameters in the normalised units of all the values it was fitted on (the losses,
    or ``refit_on``; ``extra["statistic"]`` names them), its weights scaled by the share of samples it saw, so
    figures draw it over the histogram of all of them; ``extra["saturated"]`` is the pile's size and
    ``extra["loss_separation"]`` the first fit's separation.
    """
    if min_refit_separation is None:
        if refit_name not in REFIT_SEPARATION:
            raise ValueError(f"no separation guard is set for a refit on {refit_name!r}: pass min_refit_separation "
                             f"(set for {sorted(REFIT_SEPARATION)})")
        min_refit_separation = REFIT_SEPARATION[refit_name]
    raw = _as_loss_vector(losses)
    values = raw if refit_on is None else _as_loss_vector(refit_on)
    if values.numel() != raw.numel():
        raise ValueError(f"refit_on ({refit_name}) must give one value per sample: {values.numel()} values for "
                         f"{raw.numel()} losses")
    first = gmm_filter(raw, **gmm_kwargs)
    pile = saturated_pile(raw, tol)
    flagged = first.noisy
    if (first.status != STATUS_OK or int(pile.sum()) < max(2.0, min_share * raw.numel())
            or int((pile & flagged).sum()) < pile_share * int(flagged.sum())):
        return first
    rest = gmm_filter(values[~pile], **gmm_kwargs)
    if rest.status != STATUS_OK or rest.separation < min_refit_separation:
        return first
    return spread_result(rest, ~pile, values, others_clean=False, saturated=int(pile.sum()), statistic=refit_name,
                         loss_separation=first.separation)


def spread_result(part: FilterResult, judged: torch.Tensor, losses: torch.Tensor, others_clean: bool,
                  **extra) -> FilterResult:
    """A result fitted on the ``judged`` samples of ``losses``, spread over all of them: every other sample is
    Clean (posterior 1) when ``others_clean``, else Noisy (posterior 0). The mixture's parameters move into the
    normalised units of all the losses and its weights are scaled by the judged share, so figures draw it over the
    histogram of all of them; ``extra`` goes into the result's ``extra``."""
    judged = torch.as_tensor(judged, dtype=torch.bool).reshape(-1)
    raw = _as_loss_vector(losses)
    n = raw.numel()
    clean = torch.full((n,), bool(others_clean), dtype=torch.bool)
    clean_prob = torch.full((n,), float(bool(others_clean)), dtype=torch.float64)
    clean[judged], clean_prob[judged] = part.clean, part.clean_prob
    lo, hi = (float(raw.min()), float(raw.max())) if n else (float("nan"), float("nan"))
    out = replace(part, clean=clean, clean_prob=clean_prob, loss_min=lo, loss_max=hi,
                  extra={**part.extra, **extra})
    if not part.fitted or not hi > lo:
        return out
    # the part's units, (x - part.loss_min) / its range, mapped onto those of all the losses
    scale, offset = (part.loss_max - part.loss_min) / (hi - lo), (part.loss_min - lo) / (hi - lo)
    share = float(judged.double().mean())
    return replace(out, means=tuple(m * scale + offset for m in part.means),
                   variances=tuple(v * scale ** 2 for v in part.variances),
                   weights=tuple(w * share for w in part.weights))


def cascade(
    manual_clean: torch.Tensor,
    pseudo_clean: torch.Tensor,
    has_pseudo: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Cascaded decision per sample (Sec. 2.2).

    manual Clean -> ``KEEP_MANUAL``; manual Noisy and pseudo Clean -> ``KEEP_PSEUDO``;
    both Noisy -> ``CLEANSE``. If ``has_pseudo`` is given, a sample without a
    pseudo-label yet counts as pseudo-Noisy whatever GMM-2 said: an all-zero initial
    pseudo-label is not a label worth keeping, and with every initial pseudo-loss equal
    GMM-2 would call them all Clean.

    Returns:
        (N,) int64 action codes on the device of ``manual_clean``.
    """
    manual = torch.as_tensor(manual_clean).to(torch.bool)
    pseudo = torch.as_tensor(pseudo_clean).to(device=manual.device, dtype=torch.bool)
    if manual.shape != pseudo.shape or manual.ndim != 1:
        raise ValueError(
            f"manual_clean and pseudo_clean must be (N,) of equal length, got "
            f"{tuple(manual.shape)} and {tuple(pseudo.shape)}"
        )
    if has_pseudo is not None:
        hp = torch.as_tensor(has_pseudo).to(device=manual.device, dtype=torch.bool)
        if hp.shape != manual.shape:
            raise ValueError(f"has_pseudo must have shape {tuple(manual.shape)}, got {tuple(hp.shape)}")
        pseudo = pseudo & hp
    action = torch.full(manual.shape, CLEANSE, dtype=torch.int64, device=manual.device)
    action[~manual & pseudo] = KEEP_PSEUDO
    action[manual] = KEEP_MANUAL
    return action


def filter_precision_recall(
    pred_noisy: torch.Tensor, true_noisy: torch.Tensor, zero_division: float = 1.0
) -> tuple[float, float]:
    """Precision and recall of the filter with "Noisy" as the positive class.

    0/0 cases return ``zero_division`` (default 1.0): precision when nothing was
    predicted Noisy (no false alarm was raised), recall when nothing is truly Noisy
    (nothing was missed). So a perfect filter on clean data scores (1, 1), and a filter
    that flags nothing on noisy data scores (1, 0), the recall exposing it. Pass
    ``float("nan")`` to make undefined values explicit instead.
    """
    pred = torch.as_tensor(pred_noisy).to(torch.bool).reshape(-1).cpu()
    true = torch.as_tensor(true_noisy).to(torch.bool).reshape(-1).cpu()
    if pred.shape != true.shape:
        raise ValueError(f"pred_noisy and true_noisy differ in size: {pred.numel()} vs {true.numel()}")
    tp = int((pred & true).sum())
    n_pred = int(pred.sum())
    n_true = int(true.sum())
    precision = tp / n_pred if n_pred else float(zero_division)
    recall = tp / n_true if n_true else float(zero_division)
    return precision, recall


def _mixture_summary(prefix: str, result: FilterResult) -> dict:
    """GMM parameters of one fit, in normalised loss units, for the round's log; NaN where nothing was fitted, so
    that every round writes the same columns."""
    nan = float("nan")
    means, variances, weights = (result.means, result.variances, result.weights) if result.fitted else \
        ((nan, nan), (nan, nan), (nan, nan))
    return {
        f"{prefix}_mean_clean": float(means[0]), f"{prefix}_mean_noisy": float(means[1]),
        f"{prefix}_sd_clean": math.sqrt(variances[0]), f"{prefix}_sd_noisy": math.sqrt(variances[1]),
        f"{prefix}_weight_noisy": float(weights[1]), f"{prefix}_separation": result.separation,
    }


@dataclass
class Verdicts:
    """One round's decisions: the two GMM fits, which pseudo-labels count as Clean, and an action per sample."""

    manual: FilterResult
    pseudo: FilterResult | None
    pseudo_clean: torch.Tensor
    pseudo_clean_prob: torch.Tensor
    actions: torch.Tensor

    def summary(self) -> dict:
        n, pseudo_clean = len(self.actions), int(self.pseudo_clean.sum())
        return dict(
            manual_clean=self.manual.n_clean,
            manual_noisy=self.manual.n_noisy,
            pseudo_clean=pseudo_clean,
            pseudo_noisy=n - pseudo_clean,
            kept_manual=int((self.actions == KEEP_MANUAL).sum()),
            kept_pseudo=int((self.actions == KEEP_PSEUDO).sum()),
            cleansed=int((self.actions == CLEANSE).sum()),
            manual_filter_status=self.manual.status,
            pseudo_filter_status=self.pseudo.status if self.pseudo is not None else "no_pseudo_labels",
            **_mixture_summary("gmm1", self.manual),
            gmm1_saturated=self.manual.extra.get("saturated", 0),
            gmm1_statistic=self.manual.extra.get("statistic", "loss"),
            gmm1_trusted=self.manual.extra.get("trusted", 0),
            # the first fit, on the losses, whichever fit decided: its separation does not depend on the refit
            gmm1_loss_separation=self.manual.extra.get("loss_separation", self.manual.separation),
        )


def refit_used(summaries) -> bool:
    """Whether any of these round summaries (:meth:`Verdicts.summary`) kept the peel's refit of GMM-1."""
    return any(summary.get("gmm1_saturated", 0) > 0 for summary in summaries)


def auto_pile_share(train_loss) -> float:
    """``peel_pile_share="auto"``: 0 when the training loss has a cross-entropy term, :data:`PILE_SHARE` otherwise
    (logged)."""
    if train_loss is None:
        raise ValueError("label_filter#peel_pile_share 'auto' decides from the training loss: pass it as "
                         "label_filter#train_loss (train.json: '@train_loss')")
    kind = getattr(train_loss, "kind", None)
    share = 0.0 if kind == "dicece" else PILE_SHARE
    logger.info(f"peel_pile_share='auto': {share} for a training loss {type(train_loss).__name__}(kind={kind!r})")
    return share


class LabelFilter:
    """The label filtering module of a round: GMM-1 on the losses against the manual labels, GMM-2 on the losses
    against the pseudo-labels, then the cascade (Sec. 2.2).

    Args:
        loss: the per-sample loss the mixtures see, called as ``loss(logits, target)`` and returning (B,); default
            the soft Dice of Eq. 1 (``scripts.losses.SegmentationLoss("dice")``).
        enabled: ``False`` cleanses every sample each round (Table 4's "LCM" without LFM).
        unlabelled_as_noisy: a sample that has no pseudo-label yet counts as pseudo-Noisy instead of being judged
            by GMM-2. With the paper's all-zero start every pseudo loss is equal and GMM-2 calls all of them Clean,
            so a manual-Noisy sample would keep an empty target forever.
        refresh: re-cleanse every manual-Noisy sample each round, ignoring GMM-2, so early pseudo-labels made by a
            weak network do not freeze.
        peel_saturated: when GMM-1 calls Noisy only the pile of saturated losses (labels the prediction misses
            altogether), the pile stays Noisy and GMM-1 is fitted again to the other samples, if they split into two
            well separated populations (:func:`gmm_filter_peeled`); the round's log gives the pile's size
            (``gmm1_saturated``, 0 when the first fit was kept).
        peel_pile_share: the share of GMM-1's Noisy calls that must lie in the pile for the peel to be tried
            (``pile_share`` of :func:`gmm_filter_peeled`); 0 tries it whenever the pile is large enough. ``"auto"``
            decides from ``train_loss`` and logs it: 0 for a loss with a cross-entropy term
            (``SegmentationLoss(kind="dicece")``), whose confident predictions pile up the missed labels while
            many wrong ones stay below (ACDC, collapse profile), 0.9 otherwise (under soft Dice, share 0 flagged
            more correct labels and cost 5 points at the CPU profile; docs/experiments.md).
        peel_keep: once a round of the run has used the refit of ``peel_saturated`` (the caller says so,
            ``peeled_before`` of :meth:`__call__`), later rounds use it whenever it fits, without its separation
            guard. The guard keeps a forced split out of the early rounds, where correct and wrong labels still
            overlap in loss; once a run has shown two separated populations besides the pile, a later round whose
            separation falls just below the guard measures the same populations, and falling back to the first fit
            would hand every merely wrong label back to its manual label (left atrium: recall 0.66-0.72 in the
            rounds with the refit, 0.52-0.56 after it).
        refit_statistic: what the peel's refit judges the samples outside the pile by: ``"loss"`` (the paper's
            statistic, as GMM-1's first fit) or ``"contour_offset"``, the mean displacement between the manual and
            the predicted contours (:func:`scripts.contours.contour_offset`, passed to :meth:`__call__`). Once the
            missed labels are peeled off, most wrong labels left are drawn too wide or too tight; against a
            reasonable prediction they are wrong on one side of the contour all the way round, and their loss
            overlaps with that of correct labels, whose errors fall on both sides (left atrium: recall 0.52-0.56
            with the loss; docs/README.md). Needs ``peel_saturated``.
        refit_separation: the separation (Ashman's D) the refit must reach to be used; ``None`` takes the one
            :data:`REFIT_SEPARATION` sets for ``refit_statistic`` (3.0 on the loss, 2.0 on contour offsets).
        train_loss: the training loss, read by ``peel_pile_share="auto"`` only.
        skip_trusted: samples whose manual label the caller marks as trusted (``trusted`` of :meth:`__call__`; the
            slices :class:`~scripts.data.SliceDataset` takes as truly empty, ``trusted_empty_run``) are Clean and
            stay out of both fits. Their loss says nothing about their label: against an empty label the soft Dice
            is near 1 whatever the network predicts, so on data with many truly empty slices they all fall to the
            Noisy side (left atrium: every one of them, precision 0.45). ``False`` judges them like the others.
        seed: ``random_state`` of both fits.
    """

    def __init__(self, loss=None, enabled: bool = True, unlabelled_as_noisy: bool = True, refresh: bool = False,
                 peel_saturated: bool = False, peel_pile_share: float | str = PILE_SHARE, skip_trusted: bool = True,
                 peel_keep: bool = False, refit_statistic: str = "loss", refit_separation: float | None = None,
                 train_loss=None, seed: int = 0) -> None:
        self.loss = loss if loss is not None else SegmentationLoss("dice")
        self.enabled, self.seed = as_flag(enabled, "label_filter#enabled"), int(seed)
        self.unlabelled_as_noisy = as_flag(unlabelled_as_noisy, "label_filter#unlabelled_as_noisy")
        self.refresh = as_flag(refresh, "label_filter#refresh")
        self.peel_saturated = as_flag(peel_saturated, "label_filter#peel_saturated")
        if peel_pile_share == "auto":
            peel_pile_share = auto_pile_share(train_loss)
        elif isinstance(peel_pile_share, str):
            raise ValueError(f"label_filter#peel_pile_share must be a number in [0, 1] or 'auto', got "
                             f"{peel_pile_share!r}")
        self.peel_pile_share = float(peel_pile_share)
        if not 0.0 <= self.peel_pile_share <= 1.0:
            raise ValueError(f"label_filter#peel_pile_share must lie in [0, 1], got {peel_pile_share!r}")
        self.skip_trusted = as_flag(skip_trusted, "label_filter#skip_trusted")
        self.peel_keep = as_flag(peel_keep, "label_filter#peel_keep")
        if self.peel_keep and not self.peel_saturated:
            raise ValueError("label_filter#peel_keep keeps the refit of peel_saturated: it needs peel_saturated=True")
        if refit_statistic not in REFIT_STATISTICS:
            raise ValueError(f"label_filter#refit_statistic must be one of {REFIT_STATISTICS}, got {refit_statistic!r}")
        if refit_statistic != "loss" and not self.peel_saturated:
            raise ValueError(f"label_filter#refit_statistic {refit_statistic!r} chooses what the refit of "
                             "peel_saturated judges: it needs peel_saturated=True")
        self.refit_statistic = refit_statistic
        if refit_separation is None:
            refit_separation = REFIT_SEPARATION[refit_statistic]
        try:
            separation = float(refit_separation) if not isinstance(refit_separation, bool) else math.nan
        except (TypeError, ValueError):
            separation = math.nan
        if not separation >= 0:
            raise ValueError(f"label_filter#refit_separation must be a separation (Ashman's D) >= 0 or None, got "
                             f"{refit_separation!r}")
        self.refit_separation = separation

    def __repr__(self) -> str:
        return (f"LabelFilter(enabled={self.enabled}, unlabelled_as_noisy={self.unlabelled_as_noisy}, "
                f"refresh={self.refresh}, peel_saturated={self.peel_saturated}, "
                f"peel_pile_share={self.peel_pile_share}, skip_trusted={self.skip_trusted}, "
                f"peel_keep={self.peel_keep}, refit_statistic={self.refit_statistic!r}, "
                f"refit_separation={self.refit_separation}, seed={self.seed})")

    def __call__(self, manual_loss: torch.Tensor, pseudo_loss: torch.Tensor, has_pseudo: torch.Tensor,
                 trusted: torch.Tensor | None = None, peeled_before: bool = False,
                 contour_offset: torch.Tensor | None = None) -> Verdicts:
        """Verdicts from the (N,) losses against manual and pseudo-labels; ``has_pseudo`` (N,) marks the samples
        that hold a pseudo-label already, ``trusted`` (N,) those whose manual label is known to be right
        (``skip_trusted``); ``peeled_before`` says that an earlier round of the run used the peel's refit
        (``peel_keep``); ``contour_offset`` (N,) is what the refit judges with ``refit_statistic="contour_offset"``."""
        n = manual_loss.shape[0]
        trusted = torch.zeros(n, dtype=torch.bool) if trusted is None or not self.skip_trusted else \
            torch.as_tensor(trusted, dtype=torch.bool).reshape(-1).cpu()
        if trusted.numel() != n:
            raise ValueError(f"trusted must mark each of the {n} samples, got {trusted.numel()} flags")
        refit_on = None
        if self.refit_statistic == "contour_offset":
            if contour_offset is None:
                raise ValueError("label_filter#refit_statistic 'contour_offset' judges the refit by the contour "
                                 "offset of each sample: pass contour_offset (scripts.contours.contour_offset)")
            refit_on = _as_loss_vector(contour_offset)
            if refit_on.numel() != n:
                raise ValueError(f"contour_offset must give one value for each of the {n} samples, got "
                                 f"{refit_on.numel()}")
        manual = self._fit_manual(_as_loss_vector(manual_loss)[~trusted], keep_refit=self.peel_keep and peeled_before,
                                  refit_on=None if refit_on is None else refit_on[~trusted])
        if trusted.any():
            # the parameters are in the units of what the fit saw, so they are spread over those values
            seen = refit_on if manual.extra.get("statistic", "loss") != "loss" else manual_loss
            manual = spread_result(manual, ~trusted, seen, others_clean=True, trusted=int(trusted.sum()))
        has = torch.as_tensor(has_pseudo, dtype=torch.bool).cpu()
        judged = (has if self.unlabelled_as_noisy else torch.ones_like(has)) & ~trusted
        pseudo, pseudo_clean, pseudo_prob = None, torch.zeros(n, dtype=torch.bool), torch.zeros(n)
        if judged.any():
            pseudo = gmm_filter(pseudo_loss[judged], seed=self.seed)
            pseudo_clean[judged] = pseudo.clean
            pseudo_prob[judged] = pseudo.clean_prob.float()
        actions = cascade(manual.clean, pseudo_clean)
        if self.refresh:
            actions[~manual.clean] = CLEANSE
        if not self.enabled:
            actions[:] = CLEANSE
        return Verdicts(manual, pseudo, pseudo_clean, pseudo_prob, actions)

    def _fit_manual(self, losses: torch.Tensor, keep_refit: bool = False,
                    refit_on: torch.Tensor | None = None) -> FilterResult:
        if self.peel_saturated:
            return gmm_filter_peeled(losses, pile_share=self.peel_pile_share, seed=self.seed,
                                     min_refit_separation=0.0 if keep_refit else self.refit_separation,
                                     refit_on=refit_on, refit_name=self.refit_statistic)
        return gmm_filter(losses, seed=self.seed)
