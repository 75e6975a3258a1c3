"""Superpixel-guided iterative learning (Li, Gao and He, MICCAI 2021): JoCoR's two networks, with SLIC superpixels
guiding both which pixels are trusted and how labels are refined.

* Selection: each pixel's joint loss is replaced by the mean joint loss of its superpixel before the small-loss
  selection, so a superpixel is kept or dropped as a whole (pixels of one superpixel share intensity and, mostly,
  the true class).
* Refinement: once the selection's loss gap has stopped growing (the original's automatic E-step), the two
  networks' averaged probabilities are averaged again over each superpixel of each training slice; where that
  mean's top class differs from the manual label with at least ``conf_thres``, the pixel may take that class, but
  no more of each class's pixels change than the forget rate (the original's correction ratio). The refined
  labels live in the bundle's pseudo-label store (checkpointed, augmented with the image) and are what the
  networks learn from.

The math is in :func:`slic_segments`, :func:`superpixel_mean`, :func:`superpixel_votes`, :func:`budgeted_changes`
and :func:`refine_labels`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.engines import PrepareBatch
from skimage.segmentation import slic

from scripts.competitors import predict_slices
from scripts.engine import HybridPrepareBatch
from scripts.flags import as_flag
from scripts.jocor import JoCoRLoss
from scripts.store import PseudoLabelStore

__all__ = ["slic_segments", "segment_count", "batch_segments", "superpixel_mean", "superpixel_votes",
           "budgeted_changes", "refine_labels", "SuperpixelPrepareBatch", "SuperpixelJoCoRLoss", "SuperpixelRefinement"]


def slic_segments(image, n_segments: int = 100, compactness: float = 0.1) -> torch.Tensor:
    """SLIC superpixels of one 2D image (H, W) as an int64 tensor of ids 0..S-1 (connected segments).

    The image is min-max scaled to [0, 1] first, so ``compactness`` means the same for any intensity range
    (scikit-image's 2D grey-level SLIC; about 0.1 balances intensity and distance at this scale).
    """
    img = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"expected one 2D image, got shape {img.shape}")
    lo, hi = img.min(), img.max()
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    seg = slic(img, n_segments=n_segments, compactness=compactness, channel_axis=None, start_label=0,
               enforce_connectivity=True)
    return torch.as_tensor(seg, dtype=torch.int64)


def segment_count(shape, pixels_per_segment: float) -> int:
    """How many superpixels SLIC is asked for on an image of ``shape`` (H, W): its area over the target size."""
    return max(1, int(round(shape[0] * shape[1] / pixels_per_segment)))


def batch_segments(images: torch.Tensor, pixels_per_segment: float = 80.0, compactness: float = 0.1
                   ) -> torch.Tensor:
    """:func:`slic_segments` of each (1, H, W) image of a batch: (B, 1, H, W) int64."""
    n = segment_count(images.shape[-2:], pixels_per_segment)
    return torch.stack([slic_segments(im[0], n, compactness) for im in images])[:, None]


def superpixel_mean(values: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Replace every value by the mean over its superpixel, per image.

    Args:
        values: (B, H, W) or (B, C, H, W) float.
        segments: (B, H, W) integer superpixel ids (any non-negative ids; per image).
    Returns:
        the same shape as ``values``.
    """
    squeeze = values.dim() == 3
    v = values[:, None] if squeeze else values
    b, c = v.shape[:2]
    seg = segments.long().reshape(b, -1)
    n_seg = int(seg.max()) + 1 if seg.numel() else 1
    ids = seg + torch.arange(b, device=seg.device)[:, None] * n_seg  # one id range per image
    flat_ids = ids.reshape(-1)
    flat = v.movedim(1, -1).reshape(-1, c).to(torch.float64)
    sums = torch.zeros(b * n_seg, c, dtype=torch.float64, device=v.device).index_add_(0, flat_ids, flat)
    counts = torch.zeros(b * n_seg, dtype=torch.float64, device=v.device).index_add_(
        0, flat_ids, torch.ones_like(flat_ids, dtype=torch.float64))
    means = sums / counts.clamp_min(1)[:, None]
    out = means[flat_ids].reshape(b, -1, c).movedim(-1, 1).reshape(v.shape).to(values.dtype)
    return out[:, 0] if squeeze else out


def superpixel_votes(label: torch.Tensor, probs: torch.Tensor, segments: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the superpixel-mean probabilities say about each pixel's label.

    Args:
        label: (B, H, W) given class indices.
        probs: (B, C, H, W) class probabilities.
        segments: (B, H, W) superpixel ids.
    Returns:
        ``(top, confidence, support)``, each (B, H, W): the top class of the pixel's superpixel-mean probability,
        that mean's value for the top class, and its value for the given class.
    """
    mean = superpixel_mean(probs.float(), segments)
    confidence, top = mean.max(1)
    support = mean.gather(1, label.long().clamp(0, mean.shape[1] - 1)[:, None])[:, 0]
    return top, confidence, support


def budgeted_changes(label: torch.Tensor, top: torch.Tensor, confidence: torch.Tensor, support: torch.Tensor,
                     conf_thres: float = 0.5, change_rates=None) -> torch.Tensor:
    """Which pixels a refinement relabels to ``top`` (boolean, the shape of ``label``).

    A pixel is a candidate where its superpixel's top class differs from the given one with a mean probability of
    at least ``conf_thres``. With ``change_rates`` = ``(background, foreground)``, at most that share of the pixels
    given each class change (background for class 0, foreground for every other class, counted over everything
    passed at once): the candidates whose superpixel gives the given class the least support go first. This is
    the original's bound, which corrects no more pixels than the noise rate it assumes; without it, a network that
    has not yet learned a thin structure relabels all of it as background.
    """
    candidate = (confidence >= conf_thres) & (top != label)
    if change_rates is None:
        return candidate
    rates = (float(change_rates[0]), float(change_rates[1]))
    change = torch.zeros_like(candidate)
    flat_label, flat_cand, flat_support = label.reshape(-1), candidate.reshape(-1), support.reshape(-1)
    flat_change = change.view(-1)
    for c in torch.unique(flat_label).tolist():
        given = flat_label == c
        budget = int(rates[0 if c == 0 else 1] * int(given.sum()))
        idx = torch.nonzero(given & flat_cand).flatten()
        if budget <= 0 or idx.numel() == 0:
            continue
        order = torch.argsort(flat_support[idx], stable=True)
        flat_change[idx[order[:budget]]] = True
    return change


def refine_labels(label: torch.Tensor, probs: torch.Tensor, segments: torch.Tensor, conf_thres: float = 0.5,
                  change_rates=None) -> torch.Tensor:
    """Superpixel-wise label refinement (:func:`superpixel_votes` then :func:`budgeted_changes`).

    Args:
        label: (B, H, W) given class indices.
        probs: (B, C, H, W) class probabilities.
        segments: (B, H, W) superpixel ids.
        conf_thres: a superpixel can relabel its pixels when the top class of its mean probability reaches this.
        change_rates: ``None`` (every candidate changes) or ``(background, foreground)`` shares of the pixels given
            each class that may change at most.
    Returns:
        (B, H, W): the changed pixels take their superpixel's top class; the others keep ``label``.
    """
    top, confidence, support = superpixel_votes(label, probs, segments)
    change = budgeted_changes(label, top, confidence, support, conf_thres, change_rates)
    return torch.where(change, top.to(label.dtype), label)


class SuperpixelPrepareBatch(PrepareBatch):
    """``(image, [label, refined label, superpixels])``: the batch's SLIC superpixels, computed on the augmented
    images, travel as the last target channel."""

    def __init__(self, pixels_per_segment: float = 80.0, compactness: float = 0.1) -> None:
        self.pixels_per_segment, self.compactness = float(pixels_per_segment), float(compactness)

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        image, target = HybridPrepareBatch()(batchdata, device, non_blocking, **kwargs)
        seg = batch_segments(image.cpu(), self.pixels_per_segment, self.compactness).to(device=target.device,
                                                                                dtype=target.dtype)
        return image, torch.cat([target, seg], 1)


class SuperpixelJoCoRLoss(JoCoRLoss):
    """JoCoR's objective on the refined labels, with the small-loss selection ranking superpixel-mean losses.

    The target is ``[label, refined, superpixels]`` (or ``[label, superpixels]`` before a store is attached).
    """

    def label(self, target: torch.Tensor) -> torch.Tensor:
        return target[:, 1 if target.shape[1] >= 3 else 0].round().long()

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # the refinement's trigger (SuperpixelRefinement): the largest epoch loss gap so far and the epochs since
        # it was set; a buffer, so a resumed run waits exactly as long as the interrupted one would have
        self.register_buffer("gap_trigger", torch.tensor([-float("inf"), 0.0], dtype=torch.float64))

    @property
    def stale_epochs(self) -> int:
        return int(self.gap_trigger[1])

    def track_loss_gap(self) -> float | None:
        """Read the last epoch's loss gap (:meth:`take_loss_gap`) and count the epochs without a new maximum."""
        gap = self.take_loss_gap()
        if gap is not None:
            if gap > float(self.gap_trigger[0]):
                self.gap_trigger.copy_(torch.tensor([gap, 0.0], dtype=torch.float64))
            else:
                self.gap_trigger[1] += 1
        return gap

    def selection_scores(self, pixel_loss: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return superpixel_mean(pixel_loss, target[:, -1].long())


class SuperpixelRefinement:
    """Refine the manual labels of all training slices with superpixel votes and write them to the pseudo-label
    store the training batches read.

    When (as in the original's automatic E-step): from the end of epoch ``start_epoch`` on, once the loss gap of
    the JoCoR selection (mean joint loss of the dropped pixels minus that of the selected ones, per epoch) has not
    set a new maximum for ``patience`` epochs; with ``patience`` 0, at ``start_epoch`` itself. The gap stops growing
    when the networks have fitted what they trust, which is when their votes are worth taking. After the first
    refinement, again every ``interval`` epochs, or never (``interval`` ``None``, the original). A refinement runs
    as the next epoch starts, so a resumed run repeats it from the restored networks.

    How much: at most the current forget rate of each given class's pixels change (``budget``, the original's
    correction ratio, :func:`budgeted_changes`); where a superpixel is not confident (``conf_thres``) nothing
    changes. Refinement always starts from the manual labels.

    Superpixels of the un-augmented slices are computed once and cached (they depend on the image only).

    Args:
        networks: the two networks whose averaged probabilities are used.
        dataset: the training ``SliceDataset``; the store is attached to it.
        store: the bundle's ``PseudoLabelStore`` (checkpointed by the bundle's training state); until the first
            refinement it holds a copy of the manual labels.
        loss: the method's :class:`SuperpixelJoCoRLoss`: its forget rates bound the changes, its loss gap (and
            the trigger state it checkpoints) decides when. Needed for ``patience`` > 0 or ``budget``.
    """

    def __init__(self, networks: list, dataset, store: PseudoLabelStore, start_epoch: int,
                 interval: int | None = None, patience: int = 0, loss: SuperpixelJoCoRLoss | None = None,
                 budget: bool = True, conf_thres: float = 0.5, pixels_per_segment: float = 80.0,
                 compactness: float = 0.1, batch_size: int = 32, enabled: bool = True) -> None:
        if start_epoch < 0 or patience < 0 or (interval is not None and interval < 1):
            raise ValueError(f"need start_epoch >= 0, patience >= 0 and interval None or >= 1, got {start_epoch}, "
                             f"{patience} and {interval}")
        if (patience > 0 or budget) and not isinstance(loss, SuperpixelJoCoRLoss):
            raise ValueError("SuperpixelRefinement needs the method's SuperpixelJoCoRLoss (loss=...) for a patience "
                             "or a budget: it reads the loss gap and the forget rates there")
        self.networks, self.dataset, self.store, self.loss = list(networks), dataset, store, loss
        self.start_epoch, self.patience = int(start_epoch), int(patience)
        self.interval = None if interval is None else int(interval)
        self.budget, self.conf_thres = as_flag(budget, "refine_budget"), float(conf_thres)
        self.pixels_per_segment, self.compactness = float(pixels_per_segment), float(compactness)
        self.batch_size = int(batch_size)
        self.enabled = enabled
        self._segments: torch.Tensor | None = None
        self.logger = logging.getLogger(self.__class__.__name__)

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        self.store.ensure(self.dataset.labels())
        if not self.store.has_pseudo.all():
            # until the first refinement the networks learn from the manual labels
            self.store.labels.copy_(self.dataset.labels())
        self.dataset.store = self.store
        # at the start of the next epoch rather than at the end of this one: the bundle's training state is saved
        # at the end of an epoch by a handler attached earlier, and a resumed run then redoes the refinement from
        # the restored networks instead of losing it
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)

    def _epoch_started(self, engine: Engine) -> None:
        done = engine.state.epoch - 1  # epochs completed
        if done < 1:
            return
        if self.patience > 0:
            gap = self.loss.track_loss_gap()
            if gap is not None:
                self.logger.info(f"epoch {done}: loss gap {gap:.4f}, {self.loss.stale_epochs} epoch(s) without a new "
                                 "maximum")
        if self.due(done):
            self(engine)

    def due(self, done: int) -> bool:
        """Whether a refinement is due after ``done`` completed epochs."""
        refined_at = [int(r["epoch"]) for r in self.store.rounds if "refined_slices" in r]
        if refined_at:
            return self.interval is not None and (done - refined_at[-1]) % self.interval == 0 and done > refined_at[-1]
        return done >= self.start_epoch and (self.patience == 0 or self.loss.stale_epochs >= self.patience)

    def segments(self) -> torch.Tensor:
        if self._segments is None:
            n = segment_count(self.dataset.data[0]["image"].shape[-2:], self.pixels_per_segment)
            self._segments = torch.stack([slic_segments(s["image"][0], n, self.compactness).to(torch.int32)
                                          for s in self.dataset.data])
        return self._segments

    def __call__(self, engine: Engine) -> None:
        manual = self.dataset.labels()
        segments = self.segments()
        top = torch.empty_like(manual)
        confidence = torch.empty(manual.shape, dtype=torch.float32)
        support = torch.empty(manual.shape, dtype=torch.float32)
        for start in range(0, len(manual), self.batch_size):
            ids = list(range(start, min(start + self.batch_size, len(manual))))
            probs = predict_slices(self.networks, self.dataset, ids, self.batch_size)
            t, c, sup = superpixel_votes(manual[ids], probs, segments[ids])
            top[ids], confidence[ids], support[ids] = t.to(top.dtype), c, sup  # labels are stored as bytes
        # one budget over the whole training set, as the original's refinement pass over all slices at once
        rates = tuple(self.loss.forget_rate) if self.budget else None
        change = budgeted_changes(manual, top, confidence, support, self.conf_thres, rates)
        refined = torch.where(change, top, manual)
        changed = change.flatten(1).any(1)
        summary = {"epoch": engine.state.epoch - 1, "refined_slices": int(changed.sum()),
                   "refined_pixel_fraction": float(change.float().mean())}
        if rates is not None:
            summary["change_rate_bg"], summary["change_rate_fg"] = rates
        clean = self.dataset.clean_labels() if hasattr(self.dataset, "clean_labels") else None
        if clean is not None:
            summary["pixel_error_manual"] = float((manual != clean).float().mean())
            summary["pixel_error_refined"] = float((refined != clean).float().mean())
        self.store.record_refinement(refined, changed, summary)
        self.logger.info("superpixel refinement: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else
                                                              f"{k} {v}" for k, v in summary.items()))
