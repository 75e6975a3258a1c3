"""Confident Learning for noisy-labelled segmentation (Zhang et al., MICCAI 2020): teachers predict the training
labels out of sample, Confident Learning (Northcutt et al., 2021) flags the pixels whose given label disagrees with
a confident prediction, and the segmentation network is trained with spatial label smoothing (SLSR) on them.

Within one bundle run (configs/methods/confident_learning.json):

1. first phase, before epoch 1 (:class:`ConfidentLearningPhase`): the training volumes are split into two halves;
   a teacher (a copy of the untrained network) is trained on each half for ``teacher_epochs`` epochs with the
   training loss and predicts the other half, so every slice gets out-of-sample probabilities;
2. per-class confident thresholds ``t_k`` = mean probability of class k over the pixels labelled k
   (:func:`confident_thresholds`); a pixel is a label issue when some class reaches its threshold, the most
   probable such class differs from the given label, and so does the arg-max (:func:`find_label_issues`, the
   confident joint's off-diagonal);
3. the corrected labels (the confident class on flagged pixels) go into the pseudo-label store, and training uses
   :class:`SLSRLoss`: on flagged pixels the target is ``(1 - ε)·onehot(given) + ε·onehot(corrected)``, elsewhere
   the given label. The maps are computed once (the original is one-shot as well).
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.data import DataLoader
from torch import nn
from torch.utils.data import Subset

from scripts.competitors import predict_slices
from scripts.network import unwrap
from scripts.store import PseudoLabelStore

__all__ = ["confident_thresholds", "find_label_issues", "slsr_targets", "soft_segmentation_loss", "SLSRLoss",
           "ConfidentLearningPhase", "split_volumes"]


def confident_thresholds(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-class thresholds (C,): the mean predicted probability of class k over the pixels labelled k;
    ``inf`` for a class no pixel carries (it can then never be a confident class).

    Args:
        probs: (N, C, H, W) out-of-sample class probabilities.
        labels: (N, H, W) given labels.
    """
    thresholds = torch.full((probs.shape[1],), float("inf"))
    for k in range(probs.shape[1]):
        mine = labels == k
        if mine.any():
            thresholds[k] = float(probs[:, k][mine].to(torch.float64).mean())
    return thresholds


def find_label_issues(probs: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel label-error map and corrected labels.

    A pixel's confident class is the most probable class among those whose probability reaches their threshold.
    It is a label issue when it has a confident class, that class is not its given label, and neither is its
    arg-max class.

    Returns:
        ``(issues, corrected)``: a (N, H, W) boolean map and the labels with each issue replaced by its confident
        class.
    """
    if thresholds is None:
        thresholds = confident_thresholds(probs, labels)
    probs = probs.float()
    above = probs >= thresholds.to(probs.device)[None, :, None, None]
    confident = torch.where(above, probs, torch.full_like(probs, -1.0)).argmax(1)
    labels_l = labels.long()
    issues = above.any(1) & (confident != labels_l) & (probs.argmax(1) != labels_l)
    corrected = torch.where(issues, confident, labels_l).to(labels.dtype)
    return issues, corrected


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
            self.logger.info("confident learning maps already in the store (resumed run): teachers not retrained")
            self.dataset.store = self.store
            return
        self.dataset.store = None  # the teachers learn from the given labels only
        halves = split_volumes(self.dataset, self.seed)
        manual = self.dataset.labels()
        probs = None
        for half, (train_ids, predict_ids) in enumerate(((halves[0], halves[1]), (halves[1], halves[0]))):
            if not train_ids or not predict_ids:
                raise ValueError("confident learning needs training slices in both halves (two or more volumes, "
                                 "or one volume with two or more slices)")
            teacher = self.train_teacher(train_ids, half)
            p = predict_slices([teacher], self.dataset, predict_ids, batch_size=2 * self.batch_size)
            if probs is None:  # half precision: a whole training set's probabilities must fit in memory
                probs = torch.zeros((len(manual), *p.shape[1:]), dtype=torch.float16)
            probs[predict_ids] = p.to(torch.float16)
            del teacher
        thresholds = confident_thresholds(probs, manual)
        issues = torch.zeros(manual.shape, dtype=torch.bool)
        corrected = manual.clone()
        for start in range(0, len(manual), 256):
            chunk = slice(start, start + 256)
            issues[chunk], corrected[chunk] = find_label_issues(probs[chunk], manual[chunk], thresholds)
        summary = {"epoch": 0, "flagged_pixel_fraction": float(issues.float().mean()),
                   "flagged_slices": int(issues.flatten(1).any(1).sum()),
                   **{f"threshold_{k}": float(t) for k, t in enumerate(thresholds.tolist())}}
        clean = self.dataset.clean_labels() if hasattr(self.dataset, "clean_labels") else None
        if clean is not None:
            wrong = manual != clean
            hit = (issues & wrong).sum().item()
            summary.update(flag_precision=hit / max(1, int(issues.sum())), flag_recall=hit / max(1, int(wrong.sum())),
                           pixel_error_manual=float(wrong.float().mean()),
                           pixel_error_corrected=float((corrected != clean).float().mean()))
        self.store.record_refinement(corrected.to(torch.uint8), issues.flatten(1).any(1), summary)
        self.dataset.store = self.store
        self.logger.info("confident learning: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                            for k, v in summary.items()))
