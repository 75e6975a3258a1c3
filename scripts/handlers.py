"""Ignite handlers of the method: the hybrid-loss schedule and the self-cleansing round (LFM + LCM).

The math lives in :mod:`scripts.filtering`, :mod:`scripts.prototypes`, :mod:`scripts.targets` and
:mod:`scripts.schedule`; these classes only decide when it runs, move tensors between the network, the data set
and the store, and fire the bundle's :class:`~scripts.engine.CleansingEvents` so that other handlers can watch a
round. What a user sees of a run is in :mod:`scripts.reporting`, resuming one in :mod:`scripts.checkpointing`.
"""

from __future__ import annotations

import importlib
import logging
import math
import warnings
from dataclasses import dataclass, field, replace

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from scripts.contours import contour_offset
from scripts.engine import CleansingEvents
from scripts.filtering import CLEANSE, KEEP_MANUAL, FilterResult, LabelFilter, refit_used
from scripts.flags import as_flag
from scripts.losses import HybridLoss, probabilities
from scripts.metrics import cleansing_quality
from scripts.noise import CLEAN, ORACLES, oracle_labels
from scripts.repair import adjacent_labels
from scripts.schedule import hybrid_weights
from scripts.slice_pass import SlicePass, eval_mode
from scripts.sources import GridPrototypes, PseudoLabelSource
from scripts.store import PseudoLabelStore
from scripts.targets import TargetRules, cleansed_targets, leaves_out

__all__ = ["HybridLossSchedule", "SelfCleansing", "OracleCleansing", "CleansingRound"]

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
    contour_offset: torch.Tensor | None = None
    manual_filter: FilterResult | None = None
    pseudo_filter: FilterResult | None = None
    actions: torch.Tensor | None = None
    pseudo_clean_prob: torch.Tensor | None = None
    summary: dict = field(default_factory=dict)


class SelfCleansing:
    """The cleansing round of Sec. 2.2–2.3, run every ``interval`` epochs from the end of epoch ``start_epoch``.

    A round is made of four parts, each a component the config builds: the ``slice_pass`` runs the network in eval
    mode over the whole training set without augmentation (losses against Y and Y', prediction, features); the
    ``label_filter`` fits GMM-1 and GMM-2 on those losses and applies the cascade; the ``source`` proposes a
    candidate label for each slice to cleanse; the ``rules`` decide which of its pixels supervise training. The
    new Y' and the verdicts go into the store, and :class:`~scripts.engine.CleansingEvents` fire between the parts
    so that other handlers can watch.

    Args:
        network: the segmentation network; it (or its ``module``) must have ``forward_features``.
        dataset: the training :class:`~scripts.data.SliceDataset`; the store is attached to it so training
            batches carry the pseudo-label through the same augmentation as image and label.
        store: the :class:`~scripts.store.PseudoLabelStore`.
        num_classes: classes including background (2 for a binary task).
        start_epoch: E1, the warm-up length; the first round runs at the end of this epoch.
        interval: k, epochs between rounds.
        source: a :mod:`scripts.sources` object (default: the paper's :class:`~scripts.sources.GridPrototypes`).
        rules: a :class:`~scripts.targets.TargetRules` (default: none, the paper's whole pseudo-label).
        label_filter: a :class:`~scripts.filtering.LabelFilter` (default: the paper's).
        slice_pass: a :class:`~scripts.slice_pass.SlicePass` (default: 8 slices a batch, no flips).
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
        source: PseudoLabelSource | None = None,
        rules: TargetRules | None = None,
        label_filter: LabelFilter | None = None,
        slice_pass: SlicePass | None = None,
        enabled: bool = True,
        **renamed,
    ) -> None:
        if renamed:
            raise TypeError(_renamed_message(renamed))
        if interval < 1 or start_epoch < 0:
            raise ValueError(f"need interval >= 1 and start_epoch >= 0, got {interval} and {start_epoch}")
        self.network, self.dataset, self.store = network, dataset, store
        self.num_classes, self.start_epoch, self.interval = int(num_classes), int(start_epoch), int(interval)
        self.source = source if source is not None else GridPrototypes()
        self.rules = rules if rules is not None else TargetRules()
        self.label_filter = label_filter if label_filter is not None else LabelFilter()
        self.slice_pass = slice_pass if slice_pass is not None else SlicePass()
        self.enabled = as_flag(enabled, "cleansing#enabled")
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
        """Losses, predictions and candidate labels for every sample; each rank takes a share, then all share all."""
        n = len(self.dataset.data)
        shape = tuple(self.store.labels.shape[1:])
        manual_loss, pseudo_loss = torch.zeros(n), torch.zeros(n)
        prediction = torch.zeros((n, *shape), dtype=torch.uint8)
        candidates = torch.zeros((n, *shape), dtype=torch.uint8)
        # the predicted class's probability, quantised to 1/255: enough for a threshold, 4x smaller than float
        confidence = torch.zeros((n, *shape), dtype=torch.uint8)
        mine = list(range(idist.get_rank(), n, idist.get_world_size()))
        loss = self.label_filter.loss
        with eval_mode(self.network) as (net,):
            device = next(net.parameters()).device
            for ids, image in self.slice_pass.batches(self.dataset, mine, device):
                label = torch.stack([self.dataset.data[i]["label"] for i in ids]).to(device).float()
                pseudo = self.store.labels[ids][:, None].to(device).float()
                logits, features = self.slice_pass.forward(net, image, features=True)
                manual_loss[ids] = loss(logits, label).cpu()
                pseudo_loss[ids] = loss(logits, pseudo).cpu()
                # max(1).indices: the same first-maximum index as argmax(1), which reduces far slower on CPU
                pred = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.max(1).indices
                prediction[ids] = pred.to(torch.uint8).cpu()
                probs = probabilities(logits)
                top = torch.where(logits[:, 0] > 0, probs[:, 0], 1 - probs[:, 0]) if logits.shape[1] == 1 else \
                    probs.max(1).values
                confidence[ids] = (top * 255).round().to(torch.uint8).cpu()
                candidates[ids] = self.source.candidates(features, pred, self.num_classes).cpu()
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
        step = getattr(self.dataset, "slice_step", 1)
        if step != 1:  # the kept slices beside a slice lie `step` slices away: their contours are not its neighbours'
            raise ValueError(f"neighbour_fill takes the adjacent slices of a volume as neighbours, but the data set "
                             f"keeps every {step}th slice (train_slice_step {step}); use it with train_slice_step 1")
        return [v["n_slices"] for v in info]

    @staticmethod
    def _first_separation(summaries) -> float | None:
        """GMM-1's separation on the losses (its first fit, before any refit of the peel) in the first of these
        round summaries that fitted it, or ``None``. ``leave_out_separation`` was chosen on loss separations; a
        refit judges other samples, or another statistic (contour offsets, which separate less), and would move
        the decision with the filter's options. Summaries without the key (runs written before bundle version
        0.13.0) give the separation of the fit they used, as those runs decided."""
        for summary in summaries:
            d = summary.get("gmm1_loss_separation", summary.get("gmm1_separation"))
            if d is not None and math.isfinite(d):
                return float(d)
        return None

    def _leave_out_separation(self, rnd: CleansingRound) -> float | None:
        """The separation ``rules#leave_out_separation`` judges: that of the first round that fitted GMM-1 (this
        one if none before); the decision is logged, and recorded in every round's summary."""
        separation = self._first_separation(self.store.rounds)
        decided_now = separation is None
        if decided_now:
            separation = self._first_separation([rnd.summary])
        left_out = leaves_out(self.rules, separation)
        if decided_now and separation is not None:
            threshold = self.rules.leave_out_separation
            self.logger.info(f"round at epoch {rnd.epoch}: GMM-1's separation on the losses {separation:.2f} " + (
                f">= {threshold}: flagged slices carry no loss for the rest of the run" if left_out
                else f"< {threshold}: flagged slices keep their targets"))
        rnd.summary.update(flagged_left_out=left_out)
        return separation

    def filter(self, rnd: CleansingRound) -> None:
        """The label filter's verdicts on the round's losses (and, for a filter whose refit judges them, on the
        contour offsets between the prediction and the manual labels)."""
        if getattr(self.label_filter, "refit_statistic", "loss") == "contour_offset":
            rnd.contour_offset = contour_offset(rnd.prediction, self.dataset.labels(), self.num_classes)
        # slices the data set knows to be right (SliceDataset.trusted) are not judged by their loss
        # the store's round history is checkpointed, so a resumed run knows whether the peel's refit was used
        verdicts = self.label_filter(rnd.manual_loss, rnd.pseudo_loss, self.store.has_pseudo.clone(),
                                     trusted=getattr(self.dataset, "trusted", None),
                                     peeled_before=refit_used(self.store.rounds), contour_offset=rnd.contour_offset)
        rnd.manual_filter, rnd.pseudo_filter = verdicts.manual, verdicts.pseudo
        rnd.actions, rnd.pseudo_clean_prob = verdicts.actions, verdicts.pseudo_clean_prob
        rnd.summary.update(epoch=rnd.epoch, **verdicts.summary())

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
        separation = self._leave_out_separation(rnd) if self.rules.leave_out_separation is not None else None
        new[redo], repaired = cleansed_targets(rnd.candidates[redo], manual[redo], self.rules, self.num_classes,
                                               prediction=rnd.prediction[redo], confidence=rnd.confidence[redo],
                                               neighbours=neighbours, separation=separation)
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


class OracleCleansing(SelfCleansing):
    """A reference, not a method: rounds whose verdicts and targets come from the simulated noise's true flags.

    Every round runs as :class:`SelfCleansing` does (the pass over the slices and the label filter, whose fit is
    still logged), then calls exactly the slices the noise touched Noisy and cleanses them with the reference label
    set :func:`scripts.noise.oracle_labels` builds (``fix_boundary``: a missed slice carries no loss, a
    boundary-noise slice its clean label). Where ``train#dataset#oracle`` gives those labels from the first epoch,
    this gives them from the end of the warm-up, so a run measures what a perfect filter with a perfect repair
    would reach *after* training on the noisy labels as the method does: the reference for a cleansing round on
    the same schedule. Only for data with simulated noise.

    With ``oracle=None`` only the verdicts are the true flags, and the cleansed slices get the source's candidates
    trimmed by the ``rules``, as the method's: a perfect filter with the method's own repair.

    Args:
        oracle: the reference set, one of :data:`scripts.noise.ORACLES`, or ``None`` (see above).
        rules: with a reference set, must leave the candidates as they are (the default ``TargetRules()``): the
            reference is the target.
    """

    def __init__(self, *args, oracle: str | None = "fix_boundary", **kwargs) -> None:
        if oracle is not None and oracle not in ORACLES:
            raise ValueError(f"unknown oracle '{oracle}': use one of {list(ORACLES)} or None")
        super().__init__(*args, **kwargs)
        if oracle is not None and self.rules != TargetRules():
            raise ValueError(f"OracleCleansing trains on the reference labels as they are; got rules {self.rules}")
        self.oracle = oracle

    def attach(self, engine: Engine) -> None:
        if self.enabled and getattr(self.dataset, "noise_flags", None) is None:
            raise ValueError("OracleCleansing needs simulated label noise (label_noise): its verdicts are the true "
                             "noise flags")
        super().attach(engine)

    def filter(self, rnd: CleansingRound) -> None:
        super().filter(rnd)
        flags = torch.as_tensor(self.dataset.noise_flags)
        noisy = flags != CLEAN
        rnd.manual_filter = replace(rnd.manual_filter, clean=~noisy)
        rnd.actions = torch.where(noisy, CLEANSE, KEEP_MANUAL).to(rnd.actions.dtype)
        if self.oracle is not None:
            rnd.candidates = oracle_labels(self.dataset.labels(), self.dataset.clean_labels(), flags, self.oracle)
        n_noisy = int(noisy.sum())
        n_clean = len(noisy) - n_noisy
        rnd.summary.update(manual_clean=n_clean, manual_noisy=n_noisy, kept_manual=n_clean, kept_pseudo=0,
                           cleansed=n_noisy, oracle=self.oracle)


# keyword arguments of SelfCleansing up to bundle version 0.6.0, and where each one went
_RENAMED = {
    "pseudo_source": "source (a component: scripts.sources.GridPrototypes, AveragedPrototype, Prediction or "
                     "NoPseudoLabel, for 'grid', 'avg', 'pred' and 'none')",
    **{k: f"source#{k} (an argument of scripts.sources.GridPrototypes)"
       for k in ("grid", "sigma", "mu", "component_fraction", "hole_fraction")},
    **{k: f"rules#{k} (scripts.targets.TargetRules)"
       for k in ("agreement", "agreement_confidence", "confident_fill", "empty_fill", "neighbour_fill",
                 "ignore_empty", "ignore_drawn", "empty_margin", "repair_radius")},
    "use_filter": "label_filter#enabled (scripts.filtering.LabelFilter)",
    "filter_loss": "label_filter#loss (scripts.filtering.LabelFilter)",
    **{k: f"label_filter#{k} (scripts.filtering.LabelFilter)" for k in ("unlabelled_as_noisy", "refresh", "seed")},
    **{k: f"slice_pass#{k} (scripts.slice_pass.SlicePass)" for k in ("batch_size", "flip_average")},
    "device": "nothing: the round runs on the network's device",
}


def _renamed_message(given: dict) -> str:
    lines = [f"train#cleansing#{k} is now train#cleansing#{_RENAMED[k]}" if k in _RENAMED
             else f"train#cleansing#{k} is not an argument of SelfCleansing" for k in sorted(given)]
    return "SelfCleansing takes its parts as components since bundle version 0.7.0:\n  " + "\n  ".join(lines)
