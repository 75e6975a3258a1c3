"""Confident Learning for noisy-labelled segmentation (Zhang et al., MICCAI 2020): teachers predict the training
labels out of sample, Confident Learning (Northcutt et al., 2021) flags the pixels whose given label disagrees with
a confident prediction, and the segmentation network is trained with spatial label smoothing (SLSR) on them.

Within one bundle run (configs/methods/confident_learning.json):

1. first phase, before epoch 1 (:class:`ConfidentLearningPhase`): the training volumes are split into two halves;
   a teacher (a copy of the untrained network) is trained on each half for ``teacher_epochs`` epochs with the
   training loss and predicts the other half, so every slice gets out-of-sample probabilities;
2. every pixel is one example of cleanlab's classification API: per-class confident thresholds ``t_k`` = mean
   probability of class k over the pixels labelled k (:func:`confident_thresholds`), and the label issues are the
   confident joint's off-diagonal (``filter_by="confident_learning"``) less the pixels whose arg-max is the given
   label (:func:`find_label_issues`);
3. the corrected labels (the class the confident joint counts a flagged pixel under) go into the pseudo-label
   store, and training uses :class:`SLSRLoss`: on flagged pixels the target is ``(1 - ε)·onehot(given) +
   ε·onehot(corrected)``, elsewhere the given label. The maps are computed once (the original is one-shot as well).

An outside peer (configs/methods/cleanlab.json, :class:`CleanlabSegmentationPhase`) shares step 1 and then follows
cleanlab's segmentation recipe instead: ``cleanlab.segmentation.filter.find_label_issues`` flags pixels, the
flagged pixels are set to ``IGNORE_INDEX`` in the store, and :class:`StoredLabelLoss` trains on those labels.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
import torch.nn.functional as F
from cleanlab.count import get_confident_thresholds
from cleanlab.filter import find_label_issues as cleanlab_label_issues
from cleanlab.segmentation.filter import find_label_issues as cleanlab_segmentation_issues
from cleanlab.segmentation.rank import get_label_quality_scores
from ignite.engine import Engine, Events
from monai.data import DataLoader
from torch import nn
from torch.utils.data import Subset

from scripts.competitors import predict_slices
from scripts.ignore_index import IGNORE_INDEX
from scripts.network import unwrap
from scripts.store import PseudoLabelStore

__all__ = ["pixel_table", "confident_thresholds", "find_label_issues", "segmentation_label_issues",
           "slice_quality_scores", "slsr_targets", "soft_segmentation_loss", "SLSRLoss", "StoredLabelLoss",
           "ConfidentLearningPhase", "CleanlabSegmentationPhase", "split_volumes"]

# cleanlab counts a class as confident when its probability reaches the threshold less this margin
# (cleanlab.count.compute_confident_joint); the correction must use the same rule as the flags
_CONFIDENT_MARGIN = 1e-6


def pixel_table(probs: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The pixels as cleanlab's classification examples: labels (N·H·W,) int64 and probabilities (N·H·W, C)
    float32, pixel-major.

    The probabilities are copied once, straight from (N, C, H, W) half precision into a float32 channel-last
    array; a training set (~700 slices of 128 x 128, 4 classes) takes about 180 MB.
    """
    num_classes = probs.shape[1]
    table = torch.empty((*labels.shape, num_classes), dtype=torch.float32)
    table.copy_(probs.movedim(1, -1))
    return labels.reshape(-1).long().numpy(), table.view(-1, num_classes).numpy()


def confident_thresholds(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-class thresholds (C,): cleanlab's mean predicted probability of class k over the pixels labelled k; a
    class no pixel carries gets a value above 1, so it can never be a confident class.

    Args:
        probs: (N, C, H, W) out-of-sample class probabilities.
        labels: (N, H, W) given labels.
    """
    return torch.from_numpy(np.asarray(get_confident_thresholds(*pixel_table(probs, labels)), dtype=np.float64))


def _label_issues(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Issues (M,) bool, corrected labels (M,) and thresholds (C,) of the pixel table."""
    # "confident_learning" is the confident joint's off-diagonal, the set Zhang et al. take as label errors;
    # cleanlab then drops the pixels whose arg-max is the given label. The prune_by_* filters would instead rank
    # the off-diagonal and keep only as many as the calibrated joint estimates (and only they use n_jobs, for a
    # process pool this training process has no use for).
    issues = cleanlab_label_issues(labels, probs, filter_by="confident_learning", n_jobs=1)
    thresholds = np.asarray(get_confident_thresholds(labels, probs), dtype=np.float64)
    flagged = np.flatnonzero(issues)
    # the class the confident joint counts a flagged pixel under: its one confident class, or with several the
    # arg-max over all classes; it is never the given label, so every flag changes the target
    p = probs[flagged]
    confident = p >= thresholds - _CONFIDENT_MARGIN
    guess = np.where(confident.sum(1) > 1, p.argmax(1), confident.argmax(1))
    corrected = labels.copy()
    corrected[flagged] = guess
    return issues, corrected, thresholds


def find_label_issues(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel label-error map and corrected labels, from cleanlab's confident joint over all pixels.

    A pixel is a label issue when the confident joint counts it off its diagonal (some class reaches its
    threshold, and the one counted is not the given label) and its arg-max is not the given label either.

    Returns:
        ``(issues, corrected)``: a (N, H, W) boolean map and the labels with each issue replaced by the class the
        confident joint counted it under.
    """
    issues, corrected, _ = _label_issues(*pixel_table(probs, labels))
    shape = labels.shape
    return (torch.from_numpy(issues).view(shape),
            torch.from_numpy(corrected).view(shape).to(labels.dtype))


def _segmentation_arrays(probs: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return labels.long().numpy(), probs.to(torch.float32).contiguous().numpy()


def segmentation_label_issues(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, H, W) label-issue map of ``cleanlab.segmentation.filter.find_label_issues``: pixels ranked by their
    self-confidence, as many flagged as cleanlab estimates are wrong, less those whose arg-max is the label.

    Args:
        probs: (N, C, H, W) out-of-sample class probabilities.
        labels: (N, H, W) given labels.
    """
    labels_np, probs_np = _segmentation_arrays(probs, labels)
    # one process: cleanlab's pool hands its arrays over through module globals (its docs advise n_jobs=1 when
    # that fails), and the default would fork one worker per core out of a training process
    return torch.from_numpy(cleanlab_segmentation_issues(labels_np, probs_np, verbose=False, n_jobs=1))


def slice_quality_scores(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """cleanlab's label quality score of each slice (N,), in [0, 1], low for a likely wrong label: the softmin
    over the pixels of the probability given to the labelled class. Ranking slices by it is cleanlab's
    slice-level verdict, comparable with the slices any other method calls noisy."""
    image_scores, _ = get_label_quality_scores(*_segmentation_arrays(probs, labels), verbose=False)
    return torch.from_numpy(np.asarray(image_scores, dtype=np.float64))


def slsr_targets(label: torch.Tensor, corrected: torch.Tensor, num_classes: int, epsilon: float = 0.8
                 ) -> torch.Tensor:
    """Soft targets (B, C, H, W): one-hot of ``label``, except where ``corrected`` differs, which get
    ``(1 - ε)·onehot(label) + ε·onehot(corrected)``."""
    given = F.one_hot(label.long(), num_classes).movedim(-1, 1).float()
    fixed = F.one_hot(corrected.long(), num_classes).movedim(-1, 1).float()
    flagged = (label != corrected)[:, None]
    return torch.where(flagged, (1 - epsilon) * given + epsilon * fixed, given)


def soft_segmentation_loss(logits: torch.Tensor, soft: torch.Tensor, kind: str = "dice", ce_weight: float = 1.0,
                           smooth: float = 1e-5) -> torch.Tensor:
    """Per-sample soft Dice over the foreground classes (plus, for ``"dicece"``, the pixel-mean cross-entropy)
    against soft targets (B, C, H, W); a one-channel (sigmoid) output is read as two classes."""
    if logits.shape[1] == 1:
        logits = torch.cat([torch.zeros_like(logits), logits], 1)
    logp = F.log_softmax(logits.float(), 1)
    p = logp.exp()
    dims = tuple(range(2, p.dim()))
    inter = (p * soft).sum(dims)
    dice = 1 - (2 * inter + smooth) / (p.sum(dims) + soft.sum(dims) + smooth)
    loss = dice[:, 1:].mean(1)
    if kind == "dicece":
        loss = loss + ce_weight * (-(soft * logp).sum(1)).flatten(1).mean(1)
    elif kind != "dice":
        raise ValueError(f"unknown loss kind '{kind}': use 'dice' or 'dicece'")
    return loss


class SLSRLoss(nn.Module):
    """The training loss on ``[given label, corrected label]`` targets (the bundle's ``HybridPrepareBatch`` stacks
    the store's corrected labels as the second channel): :func:`soft_segmentation_loss` against
    :func:`slsr_targets`. With a one-channel target it is the plain loss on the given label."""

    def __init__(self, num_classes: int, kind: str = "dice", epsilon: float = 0.8, ce_weight: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must lie in [0, 1], got {epsilon}")
        self.num_classes = max(2, int(num_classes))
        self.kind, self.epsilon, self.ce_weight = kind, float(epsilon), float(ce_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        label = target[:, 0].round().long()
        corrected = target[:, 1].round().long() if target.shape[1] > 1 else label
        soft = slsr_targets(label, corrected, self.num_classes, self.epsilon).to(logits.device)
        return soft_segmentation_loss(logits, soft, self.kind, self.ce_weight)


class StoredLabelLoss(nn.Module):
    """``loss`` on the store's labels, the second target channel that ``HybridPrepareBatch`` stacks after the
    given label; with a one-channel target (no store attached yet) on the given label. The cleanlab peer stores
    its flagged pixels as ``IGNORE_INDEX``, which :class:`scripts.losses.SegmentationLoss` leaves out."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, target[:, 1:2] if target.shape[1] > 1 else target)


def split_volumes(dataset, seed: int = 0) -> tuple[list[int], list[int]]:
    """Two halves of the training slice ids, split by volume (slices of one volume stay together, so a teacher
    never saw a neighbour of a slice it predicts); with a single volume, its slices are halved."""
    info = getattr(dataset, "volume_info", None) or [{"first_id": 0, "n_slices": len(dataset.data)}]
    if len(info) == 1:
        ids = list(range(info[0]["first_id"], info[0]["first_id"] + info[0]["n_slices"]))
        return ids[::2], ids[1::2]
    order = torch.randperm(len(info), generator=torch.Generator().manual_seed(seed)).tolist()
    halves = ([], [])
    for rank, v in enumerate(order):
        halves[rank % 2].extend(range(info[v]["first_id"], info[v]["first_id"] + info[v]["n_slices"]))
    return sorted(halves[0]), sorted(halves[1])


class ConfidentLearningPhase:
    """The first phase of a Confident Learning run (see the module doc), at ``Events.STARTED``.

    It runs once: a resumed run whose store already holds a round skips it. The corrected labels are written to
    the bundle's pseudo-label store (checkpointed with the training state) and the store is attached to the
    training data set, so every batch carries them through the same augmentation as image and label.

    Args:
        network: the segmentation network; the teachers are copies of it taken before training.
        dataset: the training ``SliceDataset``.
        store: the bundle's ``PseudoLabelStore``.
        loss: the per-sample training loss the teachers minimise.
        teacher_epochs: epochs each teacher trains on its half.
        batch_size, learning_rate: the teachers' batch size and Adam learning rate.
        seed: seed of the split and of the teachers' shuffling.
    """

    name = "confident learning"

    def __init__(self, network: nn.Module, dataset, store: PseudoLabelStore, loss: nn.Module, teacher_epochs: int,
                 batch_size: int = 16, learning_rate: float = 1e-3, seed: int = 0, num_workers: int = 0,
                 enabled: bool = True) -> None:
        if teacher_epochs < 1:
            raise ValueError(f"teacher_epochs must be >= 1, got {teacher_epochs}")
        self.network, self.dataset, self.store, self.loss = network, dataset, store, loss
        self.teacher_epochs, self.batch_size, self.learning_rate = int(teacher_epochs), int(batch_size), learning_rate
        self.seed, self.num_workers, self.enabled = int(seed), int(num_workers), enabled
        self.logger = logging.getLogger(self.__class__.__name__)

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        self.store.ensure(self.dataset.labels())
        engine.add_event_handler(Events.STARTED, self)

    def train_teacher(self, ids: list[int], half: int) -> nn.Module:
        teacher = copy.deepcopy(unwrap(self.network)).train()
        device = next(teacher.parameters()).device
        optimizer = torch.optim.Adam(teacher.parameters(), lr=self.learning_rate)
        loader = DataLoader(Subset(self.dataset, ids), batch_size=self.batch_size, shuffle=True,
                            num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(self.seed + half))
        for epoch in range(self.teacher_epochs):
            total, n = 0.0, 0
            for batch in loader:
                image = torch.as_tensor(batch["image"]).to(device)
                label = torch.as_tensor(batch["label"]).to(device)
                loss = self.loss(teacher(image), label).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, n = total + float(loss.detach()), n + 1
            self.logger.info(f"teacher {half + 1}/2 epoch {epoch + 1}/{self.teacher_epochs}: loss {total / n:.4f}")
        return teacher.eval()

    def __call__(self, engine: Engine) -> None:
        if self.store.rounds:
            self.logger.info(f"{self.name} maps already in the store (resumed run): teachers not retrained")
            self.dataset.store = self.store
            return
        self.dataset.store = None  # the teachers learn from the given labels only
        manual = self.dataset.labels()
        probs = self.out_of_sample_probabilities(len(manual))
        labels, issues, summary = self.refine(probs, manual)
        del probs
        summary = {"epoch": 0, "flagged_pixel_fraction": float(issues.float().mean()),
                   "flagged_slices": int(issues.flatten(1).any(1).sum()), **summary}
        clean = self.dataset.clean_labels() if hasattr(self.dataset, "clean_labels") else None
        if clean is not None:
            wrong = manual != clean
            hit = (issues & wrong).sum().item()
            summary.update(flag_precision=hit / max(1, int(issues.sum())), flag_recall=hit / max(1, int(wrong.sum())),
                           pixel_error_manual=float(wrong.float().mean()), **self.noise_summary(labels, clean))
        self.store.record_refinement(labels.to(torch.uint8), issues.flatten(1).any(1), summary)
        self.dataset.store = self.store
        self.logger.info(f"{self.name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in summary.items()))

    def out_of_sample_probabilities(self, n_slices: int) -> torch.Tensor:
        """(N, C, H, W) half-precision probabilities of every slice, from the teacher that did not train on it."""
        halves = split_volumes(self.dataset, self.seed)
        probs = None
        for half, (train_ids, predict_ids) in enumerate(((halves[0], halves[1]), (halves[1], halves[0]))):
            if not train_ids or not predict_ids:
                raise ValueError(f"{self.name} needs training slices in both halves (two or more volumes, or one "
                                 "volume with two or more slices)")
            teacher = self.train_teacher(train_ids, half)
            p = predict_slices([teacher], self.dataset, predict_ids, batch_size=2 * self.batch_size)
            if probs is None:  # half precision: a whole training set's probabilities must fit in memory
                probs = torch.zeros((n_slices, *p.shape[1:]), dtype=torch.float16)
            probs[predict_ids] = p.to(torch.float16)
            del teacher
        return probs

    def refine(self, probs: torch.Tensor, manual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The store's new labels (N, H, W), the flagged pixels (N, H, W) and method-specific summary entries."""
        flat_labels, flat_probs = pixel_table(probs, manual)
        issues, corrected, thresholds = _label_issues(flat_labels, flat_probs)
        del flat_probs
        shape = manual.shape
        return (torch.from_numpy(corrected).view(shape), torch.from_numpy(issues).view(shape),
                {f"threshold_{k}": float(t) for k, t in enumerate(thresholds.tolist())})

    def noise_summary(self, labels: torch.Tensor, clean: torch.Tensor) -> dict:
        return {"pixel_error_corrected": float((labels != clean).float().mean())}


class CleanlabSegmentationPhase(ConfidentLearningPhase):
    """cleanlab's own segmentation recipe on the same out-of-sample probabilities (configs/methods/cleanlab.json):
    :func:`segmentation_label_issues` flags pixels, and the store gets the given labels with the flagged pixels
    set to ``IGNORE_INDEX``, so that :class:`StoredLabelLoss` trains on the rest only (cleanlab's advice: leave
    flagged pixels out of the loss). Arguments as :class:`ConfidentLearningPhase`."""

    name = "cleanlab segmentation"

    def refine(self, probs: torch.Tensor, manual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        issues = segmentation_label_issues(probs, manual)
        return manual.masked_fill(issues, IGNORE_INDEX), issues, {}

    def noise_summary(self, labels: torch.Tensor, clean: torch.Tensor) -> dict:
        # how wrong the pixels that still carry loss are, against the manual labels' error over all pixels
        kept = labels != IGNORE_INDEX
        return {"pixel_error_supervised": float((labels[kept] != clean[kept]).float().mean()) if kept.any() else 0.0}
