"""Per-sample segmentation losses and the hybrid loss of Eq. 7."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from scripts.flags import as_flag
from scripts.ignore_index import IGNORE_INDEX

__all__ = ["ALL_CLASS_BITS", "class_bits", "classes_from_bits", "SegmentationLoss", "HybridLoss", "probabilities",
           "IGNORE_INDEX"]

logger = logging.getLogger(__name__)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid for a single output channel (binary), softmax otherwise."""
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


class SegmentationLoss(nn.Module):
    """One loss value per sample, for training and for the label filter.

    ``kind="dice"`` is the soft Dice of Eq. 1 averaged over the foreground classes. Under it an all-background
    target against a confident prediction sits at a loss of about 1 with almost no gradient, so missing-label
    noise barely moves the network. ``kind="dicece"`` adds the pixel-mean cross-entropy, under which empty targets
    do pull the prediction towards background (the regime where noisy labels hurt, see docs/).

    Args:
        kind: ``"dice"`` or ``"dicece"``.
        ce_weight: weight of the cross-entropy term for ``"dicece"``.
        smooth_nr, smooth_dr: Dice smoothing terms; with the defaults a class absent from both label and
            prediction costs about 0.
        ignore_index: target value of pixels that carry no supervision (pseudo-labels mark contested pixels so);
            they are left out of both the Dice and the cross-entropy term.
        absent_agreement: a foreground class that neither the target nor the prediction's arg-max holds costs 0 in
            the Dice term, instead of the soft Dice's value near 1 (the summed small probabilities of a large slice
            outweigh the smoothing). For judging labels (the label filter), not for training: an empty label the
            network agrees with then scores as a match, and only one it contradicts scores as a miss. No gradient
            flows through the arg-max.
    """

    def __init__(self, kind: str = "dice", ce_weight: float = 1.0, smooth_nr: float = 1e-5,
                 smooth_dr: float = 1e-5, ignore_index: int = IGNORE_INDEX, absent_agreement: bool = False) -> None:
        super().__init__()
        if kind not in ("dice", "dicece"):
            raise ValueError(f"unknown loss kind '{kind}': use 'dice' or 'dicece'")
        self.kind, self.ce_weight, self.ignore_index = kind, ce_weight, ignore_index
        self.absent_agreement = as_flag(absent_agreement, "absent_agreement")
        self.binary_dice = DiceLoss(sigmoid=True, reduction="none", smooth_nr=smooth_nr, smooth_dr=smooth_dr)
        self.multi_dice = DiceLoss(softmax=True, to_onehot_y=True, include_background=False, reduction="none",
                                   smooth_nr=smooth_nr, smooth_dr=smooth_dr)
        # the same Dice on probabilities and one-hot targets that were zeroed where the target is ignored
        self.masked_dice = DiceLoss(include_background=False, reduction="none", smooth_nr=smooth_nr,
                                    smooth_dr=smooth_dr)
        self.masked_binary_dice = DiceLoss(reduction="none", smooth_nr=smooth_nr, smooth_dr=smooth_dr)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, absent_unknown: bool = False,
                present: torch.Tensor | None = None, dice_classes: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample loss of ``logits`` (B, C, ...) against the class map ``target`` (B, 1, ...).

        With ``absent_unknown`` a foreground class that a sample's target does not contain is not taken as absent
        but as unknown: its Dice term is left out and a background pixel may be that class too (its cross-entropy
        is ``-log`` of the summed probability of background and the absent classes). An erosion that wipes out a
        thin structure, or a missed slice, then no longer teaches background where the structure is; an all-
        background target costs nothing. ``present`` (B, C) bool says which classes each sample's whole slice
        holds (:func:`classes_from_bits`); without it, the classes of the target itself, which for a patch cut
        from a larger slice also calls the structures outside the patch unknown.

        ``dice_classes`` (B, C) bool, column 0 unused: the foreground classes whose Dice term counts for each
        sample; a class left out adds 0 and the others keep their weight. The cross-entropy term is unchanged.
        """
        if absent_unknown:
            if dice_classes is not None:
                raise ValueError("dice_classes and absent_unknown both choose Dice terms: give one")
            return self._absent_unknown(logits, target, present)
        binary = logits.shape[1] == 1
        ignored = target == self.ignore_index
        if not ignored.any():
            dice = (self.binary_dice if binary else self.multi_dice)(logits, target)
            valid = None
        else:
            valid = (~ignored).float()
            target = target.masked_fill(ignored, 0)
            probs = probabilities(logits)
            if binary:
                dice = self.masked_binary_dice(probs * valid, target * valid)
            else:
                onehot = F.one_hot(target[:, 0].long(), logits.shape[1]).movedim(-1, 1).to(probs.dtype)
                dice = self.masked_dice(probs * valid, onehot * valid)
        if self.absent_agreement:
            dice = dice.flatten(2).mean(2) * self._contested(logits, target, valid)
        if dice_classes is not None:
            # binary: the one Dice channel is the foreground, column 1
            dice = dice.flatten(2).mean(2) * dice_classes[:, 1:dice.shape[1] + 1].to(dice.dtype)
        loss = dice.flatten(1).mean(1)
        if self.kind == "dicece":
            if binary:
                ce = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
            else:
                ce = F.cross_entropy(logits, target[:, 0].long(), reduction="none")[:, None]
            if valid is None:
                ce = ce.flatten(1).mean(1)
            else:
                ce = (ce * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)
            loss = loss + self.ce_weight * ce
        return loss

    def _contested(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """(B, C') float: 0 for each Dice class that neither the (supervised) target nor the arg-max holds, else 1."""
        mask = torch.ones_like(target, dtype=torch.bool) if valid is None else valid.bool()
        if logits.shape[1] == 1:
            predicted = ((logits > 0) & mask).flatten(1).any(1, keepdim=True)
            drawn = ((target > 0) & mask).flatten(1).any(1, keepdim=True)
            return (predicted | drawn).to(logits.dtype)
        classes = torch.arange(1, logits.shape[1], device=logits.device).view(1, -1, *[1] * (target.ndim - 2))
        pred = logits.argmax(1, keepdim=True)
        predicted = ((pred == classes) & mask).flatten(2).any(2)
        drawn = ((target == classes) & mask).flatten(2).any(2)
        return (predicted | drawn).to(logits.dtype)

    def _absent_unknown(self, logits: torch.Tensor, target: torch.Tensor,
                        present: torch.Tensor | None = None) -> torch.Tensor:
        if logits.shape[1] == 1:
            # one foreground class: absent means an all-background target, which then says nothing
            if present is not None:
                labelled = present[:, 1]
            else:
                labelled = ((target > 0) & (target != self.ignore_index)).flatten(1).any(1)
            return self.forward(logits, target) * labelled.to(logits.dtype)
        num_classes = logits.shape[1]
        valid = target != self.ignore_index
        labels = target.masked_fill(~valid, 0)[:, 0].long()
        onehot = F.one_hot(labels, num_classes).movedim(-1, 1).to(logits.dtype) * valid
        present = (onehot.flatten(2).amax(2) > 0) if present is None else present[:, :num_classes].clone()  # (B, C)
        present[:, 0] = True
        probs = probabilities(logits)
        dice = self.masked_dice(probs * valid, onehot).flatten(2).mean(2)  # (B, C-1)
        # absent classes drop out, the others keep the weight they have without the option
        loss = (dice * present[:, 1:]).sum(1) / (num_classes - 1)
        if self.kind == "dicece":
            absent = ~present.view(*present.shape, *[1] * (onehot.ndim - 2))
            # ignored pixels allow every class: finite values (and gradients) that the mask below then drops
            allowed = onehot.bool() | ((labels == 0)[:, None] & absent) | ~valid
            log_probs = torch.log_softmax(logits, dim=1).masked_fill(~allowed, float("-inf"))
            ce = -torch.logsumexp(log_probs, dim=1, keepdim=True)
            ce = torch.where(valid, ce, torch.zeros_like(ce))
            ce = ce.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)
            loss = loss + self.ce_weight * ce
        return loss


# every class known: the bits of a slice taken as truly empty (no class present, none unknown)
ALL_CLASS_BITS = (1 << 24) - 1


def class_bits(label: torch.Tensor) -> int:
    """The foreground classes a label map holds, as bits: bit ``c - 1`` is set when class ``c`` is present
    (``IGNORE_INDEX`` is not a class). ``0`` is an empty label. Up to 24 classes, so that the value travels exactly
    in a float32 target channel (:class:`scripts.engine.HybridPrepareBatch`)."""
    values = torch.unique(label[(label > 0) & (label != IGNORE_INDEX)]).tolist()
    if values and max(values) > 24:
        raise ValueError(f"class_bits covers classes 1 to 24, the label holds class {int(max(values))}")
    return sum(1 << (int(v) - 1) for v in values)


def classes_from_bits(bits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B,) values of :func:`class_bits` to (B, num_classes) bool, column 0 (background) always True."""
    bits = bits.round().long().reshape(-1, 1)
    shifts = torch.arange(num_classes - 1, device=bits.device)
    present = (bits >> shifts) & 1
    return torch.cat([torch.ones_like(bits, dtype=torch.bool), present.bool()], dim=1)


class HybridLoss(nn.Module):
    """``λ1·L(ŷ, y) + λ2·L(ŷ, y')`` (Eq. 7), one value per sample.

    The target carries the manual label in channel 0 and, when pseudo-labels are in use, the pseudo-label in
    channel 1 and optionally the classes of the whole manual slice in channel 2 (see
    :class:`scripts.engine.HybridPrepareBatch`). The weights are set each epoch by
    :class:`scripts.handlers.HybridLossSchedule`; with a single-channel target the loss is the plain ``L(ŷ, y)``.

    Args:
        loss: the per-sample loss ``L``.
        ignore_empty_manual: a sample whose manual slice has no foreground adds nothing to the manual term. A missed
            slice looks exactly like that, and under a loss where empty targets carry gradient it pulls the whole
            warm-up towards background; a truly empty slice gets its supervision back through Y' once the filter
            has called it Clean. Applies only with a pseudo-label channel, i.e. under self-cleansing. Whether the
            slice is empty is read from a third target channel, the slice flag of
            ``HybridPrepareBatch(slice_flags=True)``; without it, from the patch's manual label, which also leaves
            out the background patches of labelled slices.
        absent_unknown_manual: the manual term treats a class missing from a sample's manual label as unknown
            rather than absent (``SegmentationLoss(absent_unknown=True)``), which extends ``ignore_empty_manual``
            from missed slices to structures an erosion or a careless annotator wiped out. The classes are those of
            the whole slice when the third target channel carries them, as for ``ignore_empty_manual``. A truly
            absent class gets its supervision back, as above, through Y' once the slice is called Clean. Needs a
            :class:`SegmentationLoss`; only with a pseudo-label channel.
        cleansed_absent_unknown: in the pseudo term of a cleansed slice (one whose Y' is not its manual label), a
            foreground class that Y' does not hold has no Dice term, unless the manual slice states it absent (a
            slice taken as truly empty): Y' was drawn by the network and trimmed by the target rules, so a class
            missing from it is a class nobody vouches for, not one known to be absent. Under per-sample soft Dice
            an absent class costs about 1 until its summed probability over the whole patch falls below the
            smoothing term; with about half of the cleansed slices missed (all background) that pushes the network
            towards suppressing the classes around their contested pixels, and a long run loses them. Cross-entropy
            is unchanged: it still teaches background where network and annotator agree on it. ``"auto"`` turns
            the rule on for a loss without a cross-entropy term (``kind="dice"``), where the Dice term alone says
            "absent", and off for Dice + CE, where it measured level (see docs/experiments.md); the decision is
            logged. Reads the fourth target channel (the ``pseudo_known`` key of
            :class:`scripts.data.SliceDataset`, stacked by ``HybridPrepareBatch(slice_flags=True)``); needs a
            :class:`SegmentationLoss`.
    """

    def __init__(self, loss: nn.Module | None = None, ignore_empty_manual: bool = False,
                 absent_unknown_manual: bool = False, cleansed_absent_unknown: bool | str = False) -> None:
        super().__init__()
        self.loss = loss if loss is not None else SegmentationLoss()
        ignore_empty_manual = as_flag(ignore_empty_manual, "ignore_empty_manual")
        absent_unknown_manual = as_flag(absent_unknown_manual, "absent_unknown_manual")
        if cleansed_absent_unknown == "auto":
            cleansed_absent_unknown = getattr(self.loss, "kind", None) == "dice"
            logger.info(f"cleansed_absent_unknown='auto': {'on' if cleansed_absent_unknown else 'off'} for a "
                        f"{type(self.loss).__name__}(kind={getattr(self.loss, 'kind', None)!r})")
        else:
            cleansed_absent_unknown = as_flag(cleansed_absent_unknown, "cleansed_absent_unknown (or 'auto')")
        for name, wanted in (("absent_unknown_manual", absent_unknown_manual),
                             ("cleansed_absent_unknown", cleansed_absent_unknown)):
            if wanted and not isinstance(self.loss, SegmentationLoss):
                raise TypeError(f"{name} needs a SegmentationLoss, got {type(self.loss).__name__}")
        self.ignore_empty_manual = ignore_empty_manual
        self.absent_unknown_manual = absent_unknown_manual
        self.cleansed_absent_unknown = cleansed_absent_unknown
        self.lambda1, self.lambda2 = 1.0, 0.0

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.shape[1] == 1:
            return self.loss(logits, target)
        manual, pseudo = target[:, :1], target[:, 1:2]
        total = torch.zeros(logits.shape[0], device=logits.device, dtype=logits.dtype)
        # a zero weight skips its term: no wasted backward through a branch that cannot contribute
        if self.lambda1 > 0:
            # the classes of the whole slice when the batch carries them, else those of the patch's own label
            bits = target[:, 2].flatten(1)[:, 0] if target.shape[1] > 2 else None
            if self.absent_unknown_manual:
                present = None if bits is None else classes_from_bits(bits, max(2, logits.shape[1]))
                term = self.loss(logits, manual, absent_unknown=True, present=present)
            else:
                term = self.loss(logits, manual)
            if self.ignore_empty_manual:
                labelled = bits > 0 if bits is not None else \
                    ((manual > 0) & (manual != IGNORE_INDEX)).flatten(1).any(1)
                term = term * labelled.to(term.dtype)
            total = total + self.lambda1 * term
        if self.lambda2 > 0:
            if self.cleansed_absent_unknown:
                if target.shape[1] < 4:
                    raise ValueError("HybridLoss(cleansed_absent_unknown=True) needs the classes Y' knows as a fourth "
                                     "target channel: use HybridPrepareBatch(slice_flags=True) with a SliceDataset")
                dice_classes = classes_from_bits(target[:, 3].flatten(1)[:, 0], max(2, logits.shape[1]))
                term = self.loss(logits, pseudo, dice_classes=dice_classes)
            else:
                term = self.loss(logits, pseudo)
            total = total + self.lambda2 * term
        return total
