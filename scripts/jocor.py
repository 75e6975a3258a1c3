"""JoCoR (Wei et al., CVPR 2020) for segmentation: two networks trained together on the pixels whose joint loss is
small, as the pixel-level version of Li et al. (MICCAI 2021) runs it.

Per pixel, the joint loss is ``(1 - λ)(CE1 + CE2) + λ(KL(p1‖p2) + KL(p2‖p1))``; in each batch only the
``1 - forget_rate`` fraction of pixels with the smallest joint loss (background and foreground pixels separately)
enter the mean. The forget rate ramps linearly from 0 over ``num_gradual`` epochs.

The original recipes set the forget rate from the true noise rate. Here it is either a number the user chooses or
``"auto"``: the fraction of training pixels, background and foreground separately, whose given label disagrees
with the two networks' averaged prediction, measured over each epoch (no clean labels needed), capped at
``max_forget_rate``; the smallest value so far is used.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from torch import nn

from scripts.competitors import split_logits
from scripts.flags import as_flag
from scripts.ignore_index import IGNORE_INDEX

__all__ = ["joint_pixel_loss", "small_loss_mask", "class_balanced_weights", "JoCoRLoss", "ForgetRateSchedule",
           "forget_ramp"]


def _as_classes(logits: torch.Tensor) -> torch.Tensor:
    """A one-channel sigmoid output as two-class logits ``[0, z]`` (softmax gives ``[1 - σ(z), σ(z)]``)."""
    return torch.cat([torch.zeros_like(logits), logits], 1) if logits.shape[1] == 1 else logits


def _pixel_terms(logits1: torch.Tensor, logits2: torch.Tensor, target: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of the joint loss per pixel, (B, H, W) each: ``CE1 + CE2`` (0 on ignored pixels) and
    ``KL(p1‖p2) + KL(p2‖p1)``."""
    l1, l2 = _as_classes(logits1.float()), _as_classes(logits2.float())
    valid = target != IGNORE_INDEX
    t = torch.where(valid, target, torch.zeros_like(target)).long()
    ce = F.cross_entropy(l1, t, reduction="none") + F.cross_entropy(l2, t, reduction="none")
    logp1, logp2 = F.log_softmax(l1, 1), F.log_softmax(l2, 1)
    return ce * valid, ((logp1.exp() - logp2.exp()) * (logp1 - logp2)).sum(1)


def joint_pixel_loss(logits1: torch.Tensor, logits2: torch.Tensor, target: torch.Tensor,
                     co_lambda: float = 0.65) -> torch.Tensor:
    """JoCoR's joint loss per pixel, (B, H, W): ``(1 - λ)(CE1 + CE2) + λ(KL(p1‖p2) + KL(p2‖p1))``.

    ``target`` (B, H, W) holds class indices; pixels marked ``IGNORE_INDEX`` get a cross-entropy of 0 (they keep
    the agreement term, which needs no label).
    """
    ce, sym_kl = _pixel_terms(logits1, logits2, target)
    return (1 - co_lambda) * ce + co_lambda * sym_kl


def small_loss_mask(scores: torch.Tensor, label: torch.Tensor, forget_rate, valid: torch.Tensor | None = None,
                    per_class: bool = False) -> torch.Tensor:
    """Keep, among the valid pixels of each group, the ``round((1 - rate) · n)`` with the smallest scores.

    Args:
        scores: (B, H, W) selection scores (the joint loss, or its superpixel mean).
        label: (B, H, W) class indices; the groups are background (0) and foreground (> 0).
        forget_rate: one rate for both groups, or ``(background, foreground)``.
        valid: pixels that may be selected at all (default: all).
        per_class: every foreground class is a group of its own, at the foreground rate. The published recipes
            are binary, where foreground is one class; with several, one shared foreground group lets the hardest
            class (a thin structure whose pixels all have high loss early on) be forgotten as a whole.
    Returns:
        a boolean mask (B, H, W). Ties at the cut are broken by position, so the count is exact.
    """
    rates = (float(forget_rate),) * 2 if isinstance(forget_rate, (int, float)) else tuple(map(float, forget_rate))
    if any(not 0.0 <= r <= 1.0 for r in rates):
        raise ValueError(f"forget rates must lie in [0, 1], got {rates}")
    valid = torch.ones_like(label, dtype=torch.bool) if valid is None else valid
    keep = torch.zeros(label.numel(), dtype=torch.bool, device=label.device)
    flat_scores, flat_label, flat_valid = scores.reshape(-1), label.reshape(-1), valid.reshape(-1)
    groups = [(flat_label == 0, rates[0])]
    if per_class:
        groups += [(flat_label == c, rates[1]) for c in torch.unique(flat_label[flat_valid]).tolist() if c > 0]
    else:
        groups.append((flat_label > 0, rates[1]))
    for group, rate in groups:
        idx = torch.nonzero(group & flat_valid).flatten()
        n_keep = int(round((1.0 - rate) * idx.numel()))
        if n_keep == 0:
            continue
        order = torch.argsort(flat_scores[idx], stable=True)
        keep[idx[order[:n_keep]]] = True
    return keep.reshape(label.shape)


def class_balanced_weights(label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pixel weights (the shape of ``label``) that sum to one over the ``mask``ed pixels and give each class present
    among them the same total weight: a weighted sum is then the mean over classes of each class's mean."""
    kept = label.clamp_min(0).long() * mask  # every class index is valid for bincount; masked-out pixels get 0
    counts = torch.bincount(label[mask].long(), minlength=int(kept.max()) + 1).float()
    per_pixel = counts.gather(0, kept.flatten()).reshape(label.shape)
    present = int((counts > 0).sum())
    return torch.where(mask, 1.0 / (present * per_pixel).clamp_min(1), torch.zeros_like(per_pixel))


def forget_ramp(epoch: int, num_gradual: int) -> float:
    """Share of the full forget rate used in (1-based) ``epoch``: 0 in epoch 1, rising linearly to 1 at epoch
    ``num_gradual + 1`` (JoCoR's schedule)."""
    if num_gradual <= 0:
        return 1.0
    return min(1.0, (epoch - 1) / num_gradual)


class JoCoRLoss(nn.Module):
    """The JoCoR objective on the concatenated logits of :class:`scripts.competitors.TwinInferer`.

    Returns per-sample values whose batch mean is the mean joint loss over the selected pixels of the batch. The
    current forget rates (background, foreground) are set by :class:`ForgetRateSchedule`; the loss also counts,
    per group, how many labelled pixels disagree with the networks' averaged prediction (for ``"auto"``).

    Args:
        co_lambda: λ, the weight of the agreement (symmetric KL) term.
        label_channel: target channel holding the label to learn from.
        per_class: small-loss selection within each foreground class instead of over all foreground pixels
            (:func:`small_loss_mask`).
        supervised_loss: ``None`` for the published objective (cross-entropy in the joint loss). A per-sample
            segmentation loss (the Baseline's ``train_loss``) replaces the cross-entropy term by that loss of each
            network on the selected pixels (the others are ignored), ``(1 - λ)(L1 + L2) + λ · mean KL``; the
            selection still ranks the joint per-pixel loss, which is what JoCoR selects on.
        class_balanced: with the published objective, average the selected pixels' joint loss per class and then
            over the classes present in the batch, as the segmentation JoCoR of Li et al. does (its automatic class
            weights: foreground weighted by background over foreground count, which for two classes is the mean
            of the two class means). Without it, whole slices, where the heart is a few per cent of the pixels,
            hardly train the foreground at all.
    """

    def __init__(self, co_lambda: float = 0.65, label_channel: int = 0,
                 supervised_loss: nn.Module | None = None, per_class: bool = False,
                 class_balanced: bool = False) -> None:
        super().__init__()
        if not 0.0 <= co_lambda <= 1.0:
            raise ValueError(f"co_lambda must lie in [0, 1], got {co_lambda}")
        self.co_lambda, self.label_channel = float(co_lambda), int(label_channel)
        self.supervised_loss, self.per_class = supervised_loss, as_flag(per_class, "select_per_class")
        self.class_balanced = as_flag(class_balanced, "class_balanced")
        self.forget_rate = (0.0, 0.0)
        # the "auto" noise estimate (background, foreground) of ForgetRateSchedule; a buffer, so it is saved with
        # the loss's state_dict
        self.register_buffer("noise_estimate", torch.full((2,), -1.0, dtype=torch.float64))  # -1: none yet
        # summed joint loss and count of the selected and of the dropped pixels since the last read
        # (take_loss_gap): superpixel-guided learning waits for this gap to stop growing before it refines labels.
        # A buffer, so a resumed run reads what the interrupted epoch had summed.
        self.register_buffer("gap_sums", torch.zeros(4, dtype=torch.float64))
        self.reset_counts()
        self.last_mask: torch.Tensor | None = None

    def reset_counts(self) -> None:
        self.counts = torch.zeros(2, 2, dtype=torch.float64)  # [group][pixels, disagreeing]

    def take_loss_gap(self) -> float | None:
        """Mean joint loss of the dropped pixels minus that of the selected ones since the last call (``None``
        when nothing was selected), and start summing anew."""
        sel_sum, sel_n, drop_sum, drop_n = self.gap_sums.tolist()
        self.gap_sums.zero_()
        if sel_n == 0:
            return None
        return (drop_sum / drop_n if drop_n > 0 else 0.0) - sel_sum / sel_n

    def label(self, target: torch.Tensor) -> torch.Tensor:
        return target[:, self.label_channel].round().long()

    def selection_scores(self, pixel_loss: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """What the small-loss selection ranks: the pixel loss itself (subclasses smooth it)."""
        return pixel_loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits1, logits2 = split_logits(logits)
        label = self.label(target)
        ce, sym_kl = _pixel_terms(logits1, logits2, label)
        pixel = (1 - self.co_lambda) * ce + self.co_lambda * sym_kl
        valid = label != IGNORE_INDEX
        with torch.no_grad():
            mask = small_loss_mask(self.selection_scores(pixel.detach(), target), label, self.forget_rate, valid,
                                   self.per_class)
            probs = (torch.softmax(_as_classes(logits1.float()), 1) + torch.softmax(_as_classes(logits2.float()), 1))
            wrong = (probs.argmax(1) != label) & valid
            for g, group in enumerate((label == 0, (label > 0) & valid)):
                self.counts[g, 0] += float(group.sum())
                self.counts[g, 1] += float((wrong & group).sum())
            dropped = valid & ~mask
            joint = pixel.detach().double()
            self.gap_sums += torch.stack([(joint * mask).sum(), mask.sum(), (joint * dropped).sum(),
                                          dropped.sum()]).double().to(self.gap_sums.device)
        self.last_mask = mask
        b = pixel.shape[0]
        if self.supervised_loss is None:
            weight = class_balanced_weights(label, mask) if self.class_balanced else mask / mask.sum().clamp_min(1)
            return (pixel * weight).flatten(1).sum(1) * b
        # the agreement term over the selected pixels, as in the published loss; the supervised term is the given
        # loss of each network on the selected pixels only
        agreement = (sym_kl * mask).flatten(1).sum(1) * b / mask.sum().clamp_min(1)
        selected = label.masked_fill(~mask, IGNORE_INDEX)[:, None].to(logits1.dtype)
        supervised = self.supervised_loss(logits1, selected) + self.supervised_loss(logits2, selected)
        return (1 - self.co_lambda) * supervised + self.co_lambda * agreement


class ForgetRateSchedule:
    """Set the forget rates of a :class:`JoCoRLoss` at the start of every epoch: ``ramp(epoch) · rate``.

    Args:
        loss: the :class:`JoCoRLoss`.
        forget_rate: a number, ``[background, foreground]``, or ``"auto"``: per group, the smallest disagreement
            between the averaged prediction and the given labels over the epochs so far (the disagreement overstates
            the noise while the networks are still learning, so the estimate only goes down).
        num_gradual: epochs of the linear ramp (JoCoR: 10 of 200).
        max_forget_rate: cap of the ``"auto"`` estimate.

    The estimate is kept in the loss's ``noise_estimate`` buffer, so checkpointing the loss's ``state_dict`` lets a
    resumed run continue with the rate it had.
    """

    def __init__(self, loss: JoCoRLoss, forget_rate="auto", num_gradual: int = 10, max_forget_rate: float = 0.3):
        if isinstance(forget_rate, str) and forget_rate != "auto":
            raise ValueError(f"forget_rate must be a number, a [bg, fg] pair or 'auto', got '{forget_rate}'")
        self.loss, self.forget_rate = loss, forget_rate
        self.num_gradual, self.max_forget_rate = int(num_gradual), float(max_forget_rate)
        self.logger = logging.getLogger(self.__class__.__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._estimate)

    @property
    def estimate(self) -> tuple[float, float]:
        return tuple(max(0.0, float(v)) for v in self.loss.noise_estimate)

    def _estimate(self, engine: Engine) -> None:
        counts = self.loss.counts
        measured = torch.tensor([min(self.max_forget_rate, float(c[1] / c[0]) if c[0] > 0 else 0.0) for c in counts],
                                dtype=torch.float64)
        previous = self.loss.noise_estimate
        # disagreement overstates the noise while the networks are still learning: the estimate only goes down
        self.loss.noise_estimate.copy_(torch.where(previous < 0, measured, torch.minimum(previous, measured)))
        engine.state.noise_estimate = self.estimate

    def target(self) -> tuple[float, float]:
        if self.forget_rate == "auto":
            return self.estimate
        if isinstance(self.forget_rate, (int, float)):
            return (float(self.forget_rate),) * 2
        return tuple(float(r) for r in self.forget_rate)

    def __call__(self, engine: Engine) -> None:
        ramp = forget_ramp(engine.state.epoch, self.num_gradual)
        rates = tuple(ramp * r for r in self.target())
        self.loss.forget_rate = rates
        self.loss.reset_counts()
        engine.state.forget_rate = rates
        self.logger.info(f"epoch {engine.state.epoch}: forget rates bg {rates[0]:.4f}, fg {rates[1]:.4f}")
