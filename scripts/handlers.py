"""Ignite handlers of the method: the hybrid-loss schedule and the self-cleansing round (LFM + LCM).

The math lives in :mod:`scripts.filtering`, :mod:`scripts.prototypes`, :mod:`scripts.targets` and
:mod:`scripts.schedule`; these classes only decide when it runs, move tensors between the network, the data set
and the store, and fire the bundle's :class:`~scripts.engine.CleansingEvents` so that other handlers can watch a
round. What a user sees of a run is in :mod:`scripts.reporting`, resuming one in :mod:`scripts.checkpointing`.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from dataclasses import dataclass, field

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from scripts.engine import CleansingEvents
from scripts.filtering import (
    CLEANSE,
    KEEP_MANUAL,
    KEEP_PSEUDO,
    FilterResult,
    cascade,
    gmm_filter,
)
from scripts.losses import IGNORE_INDEX, HybridLoss, SegmentationLoss, probabilities
from scripts.metrics import cleansing_quality
from scripts.network import unwrap
from scripts.prototypes import cleanse_batch
from scripts.repair import adjacent_labels
from scripts.schedule import hybrid_weights
from scripts.store import PseudoLabelStore
from scripts.targets import TargetRules, cleansed_targets

__all__ = ["HybridLossSchedule", "SelfCleansing", "CleansingRound"]

# handlers that lived here up to bundle version 0.5.0; configs written for it still name them here
_MOVED = {
    **dict.fromkeys(["CleansingLogger", "CleansingImages", "DiceReport", "MetricsHistory", "TrainingProgress"],
                    "scripts.reporting"),
    **dict.fromkeys(["RandomStates", "BestModelState", "TrainingState"], "scripts.checkpointing"),
}


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(f"scripts.handlers.{name} is now {_MOVED[name]}.{name}; the old name will be removed",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class HybridLossSchedule:
    """Set λ1, λ2 of a :class:`HybridLoss` at the start of each epoch from Eq. 8 (``e1``, ``e2`` in epochs)."""

    def __init__(self, loss: HybridLoss, e1: int, e2: int, lambda1_floor: float = 0.0) -> None:
        self.loss, self.e1, self.e2, self.lambda1_floor = loss, int(e1), int(e2), float(lambda1_floor)
        hybrid_weights(0, self.e1, self.e2, self.lambda1_floor)  # validates the arguments now, not mid-run

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        lam1, lam2 = hybrid_weights(engine.state.epoch - 1, self.e1, self.e2, self.lambda1_floor)
        self.loss.lambda1, self.loss.lambda2 = lam1, lam2
        engine.state.lambda1, engine.state.lambda2 = lam1, lam2


@dataclass
class CleansingRound:
    """Everything one round computed; lives on ``engine.state.cleansing`` while its events fire."""

    epoch: int
    index: int
    manual_loss: torch.Tensor | None = None
    pseudo_loss: torch.Tensor | None = None
    prediction: torch.Tensor | None = None
    candidates: torch.Tensor | None = None
    confidence: torch.Tensor | None = None
    manual_filter: FilterResult | None = None
    pseudo_filter: FilterResult | None = None
    actions: torch.Tensor | None = None
    pseudo_clean_prob: torch.Tensor | None = None
    summary: dict = field(default_factory=dict)


class SelfCleansing:
    """The cleansing round of Sec. 2.2–2.3, run every ``interval`` epochs from the end of epoch ``start_epoch``.

    A round runs the network in eval mode over the whole training set without augmentation (Eq. 1 losses against
    Y and Y', the prediction, the feature map), fits GMM-1 on the manual losses and GMM-2 on the pseudo losses,
    applies the cascade, and replaces Y' of the samples to cleanse with the LCM output, kept where the target rules
    (:mod:`scripts.targets`) trust it.

    Args:
        network: the segmentation network; it (or its ``module``) must have ``forward_features``.
        dataset: the training :class:`~scripts.data.SliceDataset`; the store is attached to it so training
            batches carry the pseudo-label through the same augmentation as image and label.
        store: the :class:`~scripts.store.PseudoLabelStore`.
        num_classes: classes including background (2 for a binary task).
        start_epoch: E1, the warm-up length; the first round runs at the end of this epoch.
        interval: k, epochs between rounds.
        filter_loss: the per-sample loss the GMMs see (default: soft Dice, Eq. 1).
        use_filter: ``False`` cleanses every sample each round (Table 4, "LCM" without LFM).
        pseudo_source: ``"grid"`` (representative grid prototypes, the paper), ``"avg"`` (one averaged
            prototype), ``"pred"`` (the network's prediction), Table 4's three variants; or ``"none"``: a sample
            to cleanse gets no pseudo-label at all and teaches nothing (the filter alone, no LCM).
        unlabelled_as_noisy: a sample that has no pseudo-label yet counts as pseudo-Noisy instead of being judged
            by GMM-2. With the paper's all-zero start every pseudo loss is equal and GMM-2 calls all of them Clean,
            so a manual-Noisy sample would keep an empty target forever.
        refresh: re-cleanse every manual-Noisy sample each round, ignoring GMM-2, so early pseudo-labels made by a
            weak network do not freeze.
        agreement: keep a cleansed slice's pseudo-label only where it agrees with the manual label and mark the
            other pixels unsupervised (``IGNORE_INDEX``), so a slice judged noisy still teaches what its
            annotator and the network agree on, and its contested pixels teach nothing rather than a guess.
        confident_fill: with ``agreement``, a contested pixel still takes the LCM label when the network's
            probability for its predicted class is at least this value (``None``: contested pixels stay
            unsupervised), so a missing structure the network is sure of is restored rather than left blank.
        agreement_confidence: with ``agreement``, an agreeing pixel is kept only where the network's probability
            for its predicted class reaches this value (``None``: every agreeing pixel); the uncertain rest, mostly
            along boundaries where boundary noise lives and where network and annotator can be wrong together,
            carries no loss.
        empty_fill: with ``agreement``, on a cleansed slice whose manual label has no foreground at all (a slice the
            annotator may have missed), a pixel takes the LCM label where the network's probability for it reaches
            this value (``None``: such a slice supervises only the background the network agrees on).
        neighbour_fill: with ``agreement``, a cleansed slice whose manual label is empty also takes the LCM's
            foreground where it agrees with the manual label of the previous or the next slice of its volume: a
            slice missed inside a labelled stack learns what the network and an adjacent contour agree on, rather
            than the network's prediction alone.
        ignore_empty: a cleansed slice whose manual label has no foreground carries no supervision at all, instead
            of the background the network agrees on: where the network misses part of a structure, a missed
            slice would otherwise teach background there.
        ignore_drawn: a cleansed slice whose manual label has foreground carries no supervision at all: contours
            judged wrong teach nothing, neither where the network agrees with them (which confirms the network's own
            boundary errors) nor elsewhere. Slices with an empty label keep their pseudo-label.
        empty_margin: with ``agreement``, on a cleansed slice whose manual label is empty, the background the network
            agrees on is kept only farther than this many pixels (chessboard distance) from its predicted foreground:
            a missed slice still teaches background away from the structures, but not where the network may have
            cut a structure short (``None``: all agreed background).
        repair_radius: with ``agreement``, each structure of the manual label is first moved onto the network's
            prediction by the dilation or erosion of at most this many pixels that fits it best
            (:func:`scripts.repair.offset_repair`), and the agreement test compares the LCM output with that
            repaired label: a contour drawn too wide or too tight then still supervises its ring, with the
            annotator's shape at the network's size (``None``: the manual label as drawn).
        flip_average: the round's prediction, losses and features are the mean over the slice and its three flips
            (left-right, up-down, both), each mapped back: a steadier prediction for the filter and the agreement
            test, at four forward passes per slice instead of one. Leave it off where a flip changes what a label
            means (left and right structures with separate labels).
        grid, sigma, mu, component_fraction, hole_fraction: LCM parameters (K, σ, μ, post-processing).
        batch_size: slices per forward pass during the round. On a 2-core CPU the pass ran faster at 4-8 slices
            than at 32 (see docs/README.md, Speed); train.json uses 8.
        seed: seed of the GMM fits.
        enabled: ``False`` makes :meth:`attach` a no-op (the Baseline), so configs can switch cleansing off
            without changing the handler list.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        dataset,
        store: PseudoLabelStore,
        num_classes: int,
        start_epoch: int,
        interval: int = 5,
        filter_loss: torch.nn.Module | None = None,
        use_filter: bool = True,
        pseudo_source: str = "grid",
        unlabelled_as_noisy: bool = True,
        refresh: bool = False,
        agreement: bool = False,
        confident_fill: float | None = None,
        agreement_confidence: float | None = None,
        empty_fill: float | None = None,
        neighbour_fill: bool = False,
        ignore_empty: bool = False,
        ignore_drawn: bool = False,
        empty_margin: int | None = None,
        repair_radius: int | None = None,
        flip_average: bool = False,
        grid: int = 64,
        sigma: float = 0.7,
        mu: float = 0.7,
        component_fraction: float = 0.1,
        hole_fraction: float = 0.1,
        batch_size: int = 32,
        seed: int = 0,
        device: torch.device | str | None = None,
        enabled: bool = True,
    ) -> None:
        if pseudo_source not in ("grid", "avg", "pred", "none"):
            raise ValueError(f"unknown pseudo_source '{pseudo_source}': use 'grid', 'avg', 'pred' or 'none'")
        if interval < 1 or start_epoch < 0:
            raise ValueError(f"need interval >= 1 and start_epoch >= 0, got {interval} and {start_epoch}")
        self.rules = TargetRules(
            agreement=agreement, agreement_confidence=agreement_confidence, confident_fill=confident_fill,
            empty_fill=empty_fill, neighbour_fill=neighbour_fill, ignore_empty=ignore_empty, ignore_drawn=ignore_drawn,
            empty_margin=empty_margin, repair_radius=repair_radius,
        )
        self.network, self.dataset, self.store = network, dataset, store
        self.num_classes, self.start_epoch, self.interval = int(num_classes), int(start_epoch), int(interval)
        self.filter_loss = filter_loss if filter_loss is not None else SegmentationLoss("dice")
        self.use_filter, self.pseudo_source = use_filter, pseudo_source
        self.unlabelled_as_noisy, self.refresh, self.flip_average = unlabelled_as_noisy, refresh, flip_average
        self.lcm = dict(grid=grid, sigma=sigma, mu=mu, min_fraction=component_fraction)
        self.hole_fraction = hole_fraction
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.enabled = enabled
        self.logger = logging.getLogger(self.__class__.__name__)

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        if self.rules.neighbour_fill:
            self._volume_sizes()  # a data set without volumes fails now, not after the warm-up
        engine.register_events(*CleansingEvents)
        self.store.ensure(self.dataset.labels())
        self.dataset.store = self.store
        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=self._due), self)

    def _due(self, engine: Engine, epoch: int) -> bool:
        return epoch >= self.start_epoch and (epoch - self.start_epoch) % self.interval == 0

    def __call__(self, engine: Engine) -> None:
        rnd = CleansingRound(epoch=engine.state.epoch, index=len(self.store.rounds) + 1)
        engine.state.cleansing = rnd
        engine.fire_event(CleansingEvents.ROUND_STARTED)
        self.collect(rnd)
        engine.fire_event(CleansingEvents.LOSSES_COLLECTED)
        self.filter(rnd)
        engine.fire_event(CleansingEvents.LABELS_FILTERED)
        self.cleanse(rnd)
        engine.fire_event(CleansingEvents.LABELS_CLEANSED)

    @torch.no_grad()
    def collect(self, rnd: CleansingRound) -> None:
        """Losses, predictions and LCM candidates for every sample; each rank takes a share, then all share all."""
        net = unwrap(self.network)
        was_training = net.training
        net.eval()
        device = self.device or next(net.parameters()).device
        samples = self.dataset.data
        n = len(samples)
        shape = tuple(self.store.labels.shape[1:])
        manual_loss, pseudo_loss = torch.zeros(n), torch.zeros(n)
        prediction = torch.zeros((n, *shape), dtype=torch.uint8)
        candidates = torch.zeros((n, *shape), dtype=torch.uint8)
        # the predicted class's probability, quantised to 1/255: enough for a threshold, 4x smaller than float
        confidence = torch.zeros((n, *shape), dtype=torch.uint8)
        mine = list(range(idist.get_rank(), n, idist.get_world_size()))
        for start in range(0, len(mine), self.batch_size):
            ids = mine[start : start + self.batch_size]
            image = torch.stack([samples[i]["image"] for i in ids]).to(device)
            label = torch.stack([samples[i]["label"] for i in ids]).to(device).float()
            pseudo = self.store.labels[ids][:, None].to(device).float()
            logits, features = self._forward(net, image)
            manual_loss[ids] = self.filter_loss(logits, label).cpu()
            pseudo_loss[ids] = self.filter_loss(logits, pseudo).cpu()
            # max(1).indices: the same first-maximum index as argmax(1), which reduces far slower on CPU
            pred = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.max(1).indices
            prediction[ids] = pred.to(torch.uint8).cpu()
            probs = probabilities(logits)
            top = torch.where(logits[:, 0] > 0, probs[:, 0], 1 - probs[:, 0]) if logits.shape[1] == 1 else \
                probs.max(1).values
            confidence[ids] = (top * 255).round().to(torch.uint8).cpu()
            if self.pseudo_source == "none":
                candidates[ids] = IGNORE_INDEX
            else:
                cand = cleanse_batch(features, pred, num_classes=self.num_classes, mode=self.pseudo_source,
                                     hole_fraction=self.hole_fraction, **self.lcm)
                candidates[ids] = cand.to(torch.uint8).cpu()
        net.train(was_training)
        if idist.get_world_size() > 1:
            # disjoint shares summed = the whole set on every rank
            manual_loss, pseudo_loss = idist.all_reduce(manual_loss), idist.all_reduce(pseudo_loss)
            prediction = idist.all_reduce(prediction.int()).to(torch.uint8)
            candidates = idist.all_reduce(candidates.int()).to(torch.uint8)
            confidence = idist.all_reduce(confidence.int()).to(torch.uint8)
        rnd.confidence = confidence
        rnd.manual_loss, rnd.pseudo_loss = manual_loss, pseudo_loss
        rnd.prediction, rnd.candidates = prediction, candidates

    def _volume_sizes(self) -> list[int]:
        info = getattr(self.dataset, "volume_info", None)
        if not info:
            raise ValueError("neighbour_fill needs a data set that knows its volumes (volume_info), such as "
                             "SliceDataset")
        return [v["n_slices"] for v in info]

    def _forward(self, net: torch.nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = (t.float() for t in net.forward_features(image))
        if self.flip_average:
            for dims in ((-1,), (-2,), (-2, -1)):
                flipped_logits, flipped_features = net.forward_features(image.flip(dims))
                logits = logits + flipped_logits.float().flip(dims)
                features = features + flipped_features.float().flip(dims)
            logits, features = logits / 4, features / 4
        return logits, features

    def filter(self, rnd: CleansingRound) -> None:
        """GMM-1 on the manual losses, GMM-2 on the pseudo losses, then the cascade."""
        n = rnd.manual_loss.shape[0]
        rnd.manual_filter = gmm_filter(rnd.manual_loss, seed=self.seed)
        has = self.store.has_pseudo.clone()
        judged = has if self.unlabelled_as_noisy else torch.ones_like(has)
        pseudo_clean = torch.zeros(n, dtype=torch.bool)
        pseudo_prob = torch.zeros(n)
        if judged.any():
            rnd.pseudo_filter = gmm_filter(rnd.pseudo_loss[judged], seed=self.seed)
            pseudo_clean[judged] = rnd.pseudo_filter.clean
            pseudo_prob[judged] = rnd.pseudo_filter.clean_prob.float()
        actions = cascade(rnd.manual_filter.clean, pseudo_clean)
        if self.refresh:
            actions[~rnd.manual_filter.clean] = CLEANSE
        if not self.use_filter:
            actions[:] = CLEANSE
        rnd.actions = actions
        rnd.summary.update(
            epoch=rnd.epoch,
            manual_clean=int(rnd.manual_filter.clean.sum()),
            manual_noisy=int((~rnd.manual_filter.clean).sum()),
            pseudo_clean=int(pseudo_clean.sum()),
            pseudo_noisy=int(n - pseudo_clean.sum()),
            kept_manual=int((actions == KEEP_MANUAL).sum()),
            kept_pseudo=int((actions == KEEP_PSEUDO).sum()),
            cleansed=int((actions == CLEANSE).sum()),
            manual_filter_status=rnd.manual_filter.status,
            pseudo_filter_status=rnd.pseudo_filter.status if rnd.pseudo_filter is not None else "no_pseudo_labels",
        )
        rnd.pseudo_clean_prob = pseudo_prob

    def cleanse(self, rnd: CleansingRound) -> None:
        """Build the new Y' from the actions and write it, with the verdicts, into the store."""
        manual = self.dataset.labels()
        new = self.store.labels.clone()
        keep_manual, redo = rnd.actions == KEEP_MANUAL, rnd.actions == CLEANSE
        new[keep_manual] = manual[keep_manual]
        neighbours = None
        if self.rules.neighbour_fill:
            previous, following = adjacent_labels(manual, self._volume_sizes())
            neighbours = previous[redo], following[redo]
        new[redo], repaired = cleansed_targets(rnd.candidates[redo], manual[redo], self.rules, self.num_classes,
                                               prediction=rnd.prediction[redo], confidence=rnd.confidence[redo],
                                               neighbours=neighbours)
        if repaired is not None:
            rnd.summary.update(repaired_structures=repaired)
        clean = self.dataset.clean_labels() if hasattr(self.dataset, "clean_labels") else None
        if clean is not None:
            rnd.summary.update(cleansing_quality(manual, new, rnd.prediction, clean, self.num_classes,
                                                 flagged_noisy=~rnd.manual_filter.clean))
        self.store.record_round(rnd.actions, new, rnd.manual_filter.clean_prob, rnd.pseudo_clean_prob,
                                rnd.summary)
        if idist.get_world_size() > 1:
            # every rank computed the same round from the same gathered inputs; copying rank 0's store (labels,
            # verdicts, history) makes that a guarantee rather than a consequence of deterministic GMM fits
            self.store.broadcast(src=0)
