"""Ignite handlers: the hybrid-loss schedule, the self-cleansing round (LFM + LCM) and what a user sees of it.

The math lives in :mod:`scripts.filtering`, :mod:`scripts.prototypes` and :mod:`scripts.schedule`; these classes
only decide when it runs, move tensors between the network, the data set and the store, and fire the bundle's
:class:`~scripts.engine.CleansingEvents` so that other handlers can watch a round.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
import random
import re
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
    filter_precision_recall,
    gmm_filter,
)
from scripts.losses import IGNORE_INDEX, HybridLoss, SegmentationLoss, probabilities
from scripts.metrics import cleansing_quality
from scripts.prototypes import cleanse_batch
from scripts.repair import adjacent_labels
from scripts.schedule import hybrid_weights
from scripts.store import PseudoLabelStore
from scripts.targets import TargetRules, cleansed_targets

__all__ = ["HybridLossSchedule", "SelfCleansing", "CleansingRound", "CleansingLogger"]


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return getattr(network, "module", network)


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
        net = _unwrap(self.network)
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
            true_noisy = (manual != clean).flatten(1).any(1)
            precision, recall = filter_precision_recall(~rnd.manual_filter.clean, true_noisy)
            rnd.summary.update(filter_precision=precision, filter_recall=recall)
            rnd.summary.update(cleansing_quality(manual, new, rnd.prediction, clean, self.num_classes))
        self.store.record_round(rnd.actions, new, rnd.manual_filter.clean_prob, rnd.pseudo_clean_prob,
                                rnd.summary)
        if idist.get_world_size() > 1:
            # every rank computed the same round from the same gathered inputs; copying rank 0's store (labels,
            # verdicts, history) makes that a guarantee rather than a consequence of deterministic GMM fits
            self.store.broadcast(src=0)


def _trim_csv(path: str | None, epoch: int) -> int:
    """Drop the rows of ``path`` written after ``epoch`` (atomically); returns how many were dropped.

    A run killed after a CSV row but before its checkpoint repeats that epoch when resumed; without the trim the
    file would hold the epoch twice. A fresh run (epoch 0) in an old output folder starts a fresh file.
    """

    if path is None or not os.path.exists(path):
        return 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    keep = [r for r in rows if r.get("epoch") not in (None, "") and int(float(r["epoch"])) <= epoch]
    if len(keep) == len(rows):
        return 0
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(keep)
    os.replace(tmp, path)
    return len(rows) - len(keep)


def _trim_on_start(engine: Engine, path: str | None, logger: logging.Logger) -> None:
    if idist.get_rank() == 0:
        dropped = _trim_csv(path, engine.state.epoch)
        if dropped:
            logger.info(f"{path}: dropped {dropped} row(s) after epoch {engine.state.epoch}, where this run starts")


def _append_csv(path: str, row: dict) -> None:
    """Append one row, writing the header when the file is new; a resumed run keeps adding to the same file."""

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row), extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


class CleansingLogger:
    """Log each round's Clean/Noisy counts and, when clean labels are known, how good the filter and Y' are;
    optionally as TensorBoard scalars too."""

    def __init__(self, summary_writer=None, log_dir: str | None = None, csv_file: str | None = None) -> None:
        self.writer = summary_writer
        self.log_dir = log_dir
        self.csv_file = csv_file
        self.logger = logging.getLogger(self.__class__.__name__)

    def attach(self, engine: Engine) -> None:
        if self.writer is None and self.log_dir is not None and idist.get_rank() == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self.log_dir)
        engine.add_event_handler(Events.STARTED, _trim_on_start, self.csv_file, self.logger)
        engine.add_event_handler(CleansingEvents.LABELS_CLEANSED, self)

    def __call__(self, engine: Engine) -> None:
        rnd: CleansingRound = engine.state.cleansing
        s = rnd.summary
        msg = (f"cleansing round {rnd.index} (epoch {rnd.epoch}): Y clean/noisy {s['manual_clean']}/{s['manual_noisy']}"
               f", Y' clean/noisy {s['pseudo_clean']}/{s['pseudo_noisy']}; kept manual {s['kept_manual']}, kept "
               f"pseudo {s['kept_pseudo']}, cleansed {s['cleansed']}")
        if s["manual_filter_status"] != "ok":
            msg += f"; GMM-1: {s['manual_filter_status']}"
        if "filter_precision" in s:
            msg += (f"; filter precision {s['filter_precision']:.3f} recall {s['filter_recall']:.3f}; Dice vs clean:"
                    f" Y {s['dice_manual_vs_clean']:.3f}, Y' {s['dice_pseudo_vs_clean']:.3f}, "
                    f"prediction {s['dice_pred_vs_clean']:.3f}")
        self.logger.info(msg)
        if self.csv_file is not None and idist.get_rank() == 0:
            _append_csv(self.csv_file, {"round": rnd.index, **s})
        if self.writer is not None:
            for key, value in s.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(f"cleansing/{key}", value, rnd.epoch)
            self.writer.flush()


class DiceReport:
    """Write per-volume, per-class Dice of an evaluator's metric to a CSV and log the per-class means.

    Reads the details MONAI's ``MeanDice`` keeps (``engine.state.metric_details``) and the source file names of
    the evaluated images, so a row names the volume it scores.
    """

    def __init__(self, metric_name: str, class_names: list[str], output_file: str, image_key: str = "image") -> None:
        self.metric_name, self.class_names, self.output_file = metric_name, list(class_names), output_file
        self.image_key = image_key
        self.names: list[str] = []
        self.logger = logging.getLogger(self.__class__.__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.names.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._names)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _names(self, engine: Engine) -> None:
        for item in engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]:
            meta = getattr(item[self.image_key], "meta", {})
            name = meta.get("filename_or_obj", f"volume_{len(self.names)}")
            self.names.extend(name if isinstance(name, (list, tuple)) else [name])

    def __call__(self, engine: Engine) -> None:

        details = engine.state.metric_details.get(self.metric_name)
        if details is None:
            raise RuntimeError(f"metric '{self.metric_name}' kept no per-volume details (save_details=False?)")
        scores = torch.as_tensor(details).float().cpu()
        if scores.shape[1] != len(self.class_names):
            raise ValueError(f"{scores.shape[1]} classes scored, but class_names has {len(self.class_names)}")
        if idist.get_rank() != 0:
            return
        os.makedirs(os.path.dirname(self.output_file) or ".", exist_ok=True)
        tmp = f"{self.output_file}.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["volume", *self.class_names, "mean"])
            for name, row in zip(self.names, scores):
                writer.writerow([name, *(f"{v:.4f}" for v in row.tolist()), f"{row.nanmean().item():.4f}"])
        os.replace(tmp, self.output_file)
        means = scores.nanmean(0)
        text = ", ".join(f"{n} {m:.4f}" for n, m in zip(self.class_names, means.tolist()))
        self.logger.info(f"Dice over {scores.shape[0]} volumes: {text}, mean {means.nanmean().item():.4f}")
        self.logger.info(f"per-volume Dice written to {self.output_file}")
        engine.state.class_dice = dict(zip(self.class_names, means.tolist()))


def _randomizables(transform) -> list:
    """Every MONAI ``Randomizable`` in a (nested) transform chain, in a fixed order."""
    from monai.transforms import Randomizable

    found = [transform] if isinstance(transform, Randomizable) else []
    for t in getattr(transform, "transforms", None) or ():
        found += _randomizables(t)
    return found


class RandomStates:
    """The random generators of this process as a checkpointable object, so a resumed run draws the same
    augmentations and shuffles as an uninterrupted one.

    Besides the global torch, NumPy and Python generators this holds the private generator of each random MONAI
    transform in ``transform``: with ``num_workers=0`` those generators are seeded once and then run on across
    epochs, so a resumed run would otherwise repeat the first epoch's flips.
    """

    def __init__(self, transform=None) -> None:
        self.transforms = _randomizables(transform) if transform is not None else []

    def state_dict(self) -> dict:
        import numpy as np

        return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "transforms": [t.R.get_state() for t in self.transforms]}

    def load_state_dict(self, state: dict) -> None:
        import numpy as np

        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        saved = state.get("transforms", [])
        if len(saved) != len(self.transforms):
            raise ValueError(f"the checkpoint holds {len(saved)} random transform states, this run has "
                             f"{len(self.transforms)} random transforms: was it made with other training transforms?")
        for t, r in zip(self.transforms, saved):
            t.R.set_state(r)


class BestModelState:
    """The evaluator's best metric so far and the key-metric saver's record of the B-model, as one checkpointable
    object: without it a resumed run forgets the best score and its next validation replaces ``model.pt``
    whatever its Dice."""

    def __init__(self, evaluator: Engine, saver=None) -> None:
        self.evaluator, self.saver = evaluator, saver

    def _checkpoint(self):
        # MONAI's CheckpointSaver restores its key-metric record (load_state_dict) but does not expose it for
        # saving; the record is the Ignite Checkpoint it wraps
        return getattr(self.saver, "_key_metric_checkpoint", None)

    def state_dict(self) -> dict:
        state = {"best_metric": self.evaluator.state.best_metric,
                 "best_metric_epoch": self.evaluator.state.best_metric_epoch}
        if self._checkpoint() is not None:
            state["saved"] = self._checkpoint().state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        if "saved" in state and self._checkpoint() is not None:
            self.saver.load_state_dict(state["saved"])


class TrainingState:
    """Checkpoint the whole training state (the trainer itself included) every ``interval`` epochs, and resume
    from the latest such checkpoint in ``save_dir`` when ``resume`` is set.

    The trainer cannot be named in the config's own ``save_dict`` (it would reference itself), so it is added
    here when the handler is attached. Files are written by Ignite's ``DiskSaver`` with ``atomic=True``: a write
    goes to a temporary file that is renamed into place, so a kill at any moment leaves the previous checkpoint
    readable. Given the ``evaluator`` (and the ``CheckpointSaver`` that keeps the B-model), the best validation
    score and the saver's record travel in the checkpoint too, so a resumed run replaces ``model.pt`` only with
    a better model, as the uninterrupted run would; given the training ``transform``, its random transforms'
    generators too (see :class:`RandomStates`).
    """

    def __init__(self, save_dir: str, save_dict: dict, interval: int = 1, n_saved: int = 1, resume: bool = False,
                 prefix: str = "state", evaluator: Engine | None = None, best_model_saver=None,
                 transform=None) -> None:
        self.save_dir, self.save_dict, self.interval = save_dir, dict(save_dict), int(interval)
        self.transform = transform
        if evaluator is not None:
            self.save_dict["best_model"] = BestModelState(evaluator, best_model_saver)
        self.n_saved, self.resume, self.prefix = n_saved, resume, prefix
        self.logger = logging.getLogger(self.__class__.__name__)

    def latest(self) -> str | None:

        files = glob.glob(os.path.join(self.save_dir, f"{self.prefix}_*.pt"))

        def epoch(path):
            m = re.search(r"_(\d+)\.pt$", path)
            return int(m.group(1)) if m else -1

        return max(files, key=epoch) if files else None

    def attach(self, engine: Engine) -> None:
        from ignite.handlers import Checkpoint, DiskSaver

        objects = {**self.save_dict, "trainer": engine, "rng": RandomStates(self.transform)}
        path = None
        if self.resume:
            path = self.latest()
            if path is None:
                self.logger.info(f"no {self.prefix}_*.pt in {self.save_dir}: starting from scratch")
            else:
                max_epochs = engine.state.max_epochs
                Checkpoint.load_objects(objects, torch.load(path, map_location="cpu", weights_only=False))
                # the checkpoint carries the old run's max_epochs; the run being resumed decides how far to go
                if max_epochs is not None and engine.state.epoch >= max_epochs:
                    raise ValueError(f"{path} is at epoch {engine.state.epoch}, the run asks for {max_epochs} "
                                     f"epochs: nothing to resume (raise --epochs to train further)")
                engine.state.max_epochs = max_epochs
                self.logger.info(f"resumed from {path} at epoch {engine.state.epoch}")
        if idist.get_rank() == 0:
            saver = DiskSaver(self.save_dir, require_empty=False, atomic=True)
            checkpoint = Checkpoint(objects, saver, filename_prefix=self.prefix, n_saved=self.n_saved,
                                    global_step_transform=lambda e, _: e.state.epoch)
            if path is not None:
                # the resumed file is this run's newest checkpoint: it is rotated out like any other
                checkpoint.load_state_dict({"_saved": [(engine.state.epoch, os.path.basename(path))]})
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), checkpoint)


class MetricsHistory:
    """One line per epoch on the console and in a CSV: the mean training loss, the evaluator's metrics and the λ
    weights, so a run's curves can be read without TensorBoard. Attach to the trainer after
    ``ValidationHandler``."""

    def __init__(self, evaluator: Engine, output_file: str, output_key: str = "loss") -> None:
        self.evaluator, self.output_file, self.output_key = evaluator, output_file, output_key
        self.losses: list[float] = []
        self.logger = logging.getLogger(self.__class__.__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, _trim_on_start, self.output_file, self.logger)
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.losses.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        item = output[0] if isinstance(output, list) else output
        value = item[self.output_key]
        self.losses.append(float(value.detach() if torch.is_tensor(value) else value))

    def __call__(self, engine: Engine) -> None:
        metrics = getattr(self.evaluator.state, "metrics", None) or {}
        row = {"epoch": engine.state.epoch, "train_loss": sum(self.losses) / max(1, len(self.losses)),
               "lambda1": getattr(engine.state, "lambda1", 1.0), "lambda2": getattr(engine.state, "lambda2", 0.0)}
        row.update({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        text = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "lambda1", "lambda2"))
        self.logger.info(f"epoch {engine.state.epoch}/{engine.state.max_epochs}: {text}")
        if idist.get_rank() == 0:
            _append_csv(self.output_file, row)


class CleansingImages:
    """Write pictures of each cleansing round to ``output_dir`` as PNG (and to TensorBoard when a writer is given):
    the GMM fits over the loss histograms, grid representation maps of a few cleansed samples (Fig. 3 of the
    paper) and those samples' labels before and after cleansing (Fig. 7).

    Args:
        cleansing: the :class:`SelfCleansing` handler whose rounds are drawn (its network, data and store).
        output_dir: folder for ``round_XX_*.png``.
        n_examples: cleansed samples shown per round (the first ones in id order: the same slices every round
            while they stay cleansed, so rounds can be compared).
        every: draw every n-th round only.
    """

    def __init__(self, cleansing: SelfCleansing, output_dir: str, n_examples: int = 4, every: int = 1,
                 class_names: list[str] | None = None, summary_writer=None) -> None:
        self.cleansing, self.output_dir, self.n_examples, self.every = cleansing, output_dir, n_examples, every
        self.class_names = class_names
        self.writer = summary_writer

    def attach(self, engine: Engine) -> None:
        if not self.cleansing.enabled or idist.get_rank() != 0:
            return
        engine.add_event_handler(CleansingEvents.LABELS_CLEANSED, self)

    def _emit(self, name: str, rgb, epoch: int) -> None:

        from scripts.figures import save_png

        os.makedirs(self.output_dir, exist_ok=True)
        save_png(rgb, os.path.join(self.output_dir, f"{name}.png"))
        if self.writer is not None:
            self.writer.add_image(name.split("_", 2)[-1], rgb, epoch, dataformats="HWC")

    @torch.no_grad()
    def _degree_maps(self, image: torch.Tensor, prediction: torch.Tensor) -> list[torch.Tensor]:
        from scripts.prototypes import _effective_grid, grid_features, representation_degree

        net = _unwrap(self.cleansing.network)
        was_training = net.training
        net.eval()
        device = next(net.parameters()).device
        _, feats = net.forward_features(image[None].to(device))
        net.train(was_training)
        feats = feats[0].float().cpu()
        h, w = prediction.shape
        g = _effective_grid(self.cleansing.lcm["grid"], h, w)
        maps = []
        for c in range(1, self.cleansing.num_classes):
            region = prediction == c
            cells, inside = grid_features(feats, region, g)
            degree = representation_degree(cells, inside)
            if inside.any():
                d = degree[inside]
                degree = torch.where(inside, (degree - d.min()) / (d.max() - d.min()).clamp_min(1e-12), degree)
            maps.append(degree.reshape(g, g))
        return maps

    def __call__(self, engine: Engine) -> None:
        from scripts.figures import gmm_figure, pseudo_label_figure, representation_figure

        rnd: CleansingRound = engine.state.cleansing
        if (rnd.index - 1) % self.every:
            return
        tag = f"round_{rnd.index:02d}"
        ds = self.cleansing.dataset
        clean = ds.clean_labels() if hasattr(ds, "clean_labels") else None
        manual = ds.labels()
        true_noisy = (manual != clean).flatten(1).any(1) if clean is not None else None
        self._emit(f"{tag}_gmm_manual", gmm_figure(rnd.manual_loss, rnd.manual_filter, "GMM-1 on L(ŷ, y)",
                                                    true_noisy), rnd.epoch)
        ids = torch.nonzero(rnd.actions == CLEANSE).flatten()[: self.n_examples]
        if len(ids) == 0:
            return
        images = torch.stack([ds.data[i]["image"][0] for i in ids.tolist()])
        names = self.class_names or [f"class {c}" for c in range(1, self.cleansing.num_classes)]
        first = int(ids[0])
        self._emit(f"{tag}_representation", representation_figure(
            images[0], self._degree_maps(ds.data[first]["image"], rnd.prediction[first].long()), names), rnd.epoch)
        rows = {}
        if clean is not None:
            rows["clean"] = clean[ids]
        rows.update({"manual": manual[ids], "prediction": rnd.prediction[ids], "pseudo (LCM)": rnd.candidates[ids]})
        self._emit(f"{tag}_pseudo_labels", pseudo_label_figure(images, rows), rnd.epoch)


class TrainingProgress:
    """A progress bar over each epoch's iterations showing the running loss (Ignite's ``ProgressBar``, attached
    with an output transform, which a handler list cannot pass on its own)."""

    def __init__(self, output_key: str = "loss", persist: bool = False) -> None:
        self.output_key, self.persist = output_key, persist

    def attach(self, engine: Engine) -> None:
        from ignite.handlers import ProgressBar

        if idist.get_rank() != 0:
            return
        key = self.output_key

        def loss_of(output):
            item = output[0] if isinstance(output, list) else output
            return {key: float(item[key].detach())}

        ProgressBar(persist=self.persist).attach(engine, output_transform=loss_of)
