"""What a cleansed slice is trained on: the LCM output, kept only where a set of rules trusts it.

The paper trains a cleansed slice on its LCM pseudo-label as a whole. The rules here (all off by default, which is
the paper's behaviour) mark the pixels of that pseudo-label that are not to be trusted as unsupervised
(``IGNORE_INDEX``), using what else the round knows of the slice: its manual label, the network's prediction and
confidence, and the manual labels of the slices next to it. :class:`~scripts.handlers.SelfCleansing` takes a
:class:`TargetRules` as its ``rules`` component (``train#cleansing#rules`` in the configs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from scripts.flags import as_flag
from scripts.ignore_index import IGNORE_INDEX
from scripts.repair import near_foreground, offset_repair, trusted_side

__all__ = ["TargetRules", "cleansed_targets", "leaves_out"]


@dataclass(frozen=True)
class TargetRules:
    """Which pixels of a cleansed slice's candidate label supervise training; all off is the paper's behaviour.

    Probabilities (``agreement_confidence``, ``confident_fill``, ``empty_fill``) are compared with the round's
    confidence maps, which hold the predicted class's probability quantised to 1/255.

    Args:
        agreement: keep the candidate only where it agrees with the manual label and mark the other pixels
            unsupervised (``IGNORE_INDEX``), so a slice judged noisy still teaches what its annotator and the
            network agree on, and its contested pixels teach nothing rather than a guess.
        agreement_confidence: with ``agreement``, an agreeing pixel is kept only where the network's probability
            for its predicted class reaches this value (``None``: every agreeing pixel); the uncertain rest, mostly
            along boundaries where network and annotator can be wrong together, carries no loss.
        confident_fill: with ``agreement``, a contested pixel still takes the candidate where the network's
            probability for its predicted class is at least this value (``None``: contested pixels stay
            unsupervised), so a missing structure the network is sure of is restored rather than left blank.
        empty_fill: with ``agreement``, on a slice whose manual label has no foreground at all (a slice the
            annotator may have missed), a pixel takes the candidate where the network's probability for it reaches
            this value (``None``: such a slice supervises only the background the network agrees on).
        neighbour_fill: with ``agreement``, a slice whose manual label is empty also takes the candidate's
            foreground where it agrees with the manual label of the previous or the next slice of its volume.
        ignore_empty: a slice whose manual label has no foreground carries no supervision at all, instead of the
            background the network agrees on.
        ignore_drawn: a slice whose manual label has foreground carries no supervision at all: contours judged
            wrong teach nothing, neither where the network agrees with them (which confirms the network's own
            boundary errors) nor elsewhere. Slices with an empty label keep their candidate.
        empty_margin: with ``agreement``, on a slice whose manual label is empty, the agreed background is kept only
            farther than this many pixels (chessboard distance) from the predicted foreground (``None``: all of it).
        repair_radius: with ``agreement``, each structure of the manual label is first moved onto the network's
            prediction by the dilation or erosion of at most this many pixels that fits it best
            (:func:`scripts.repair.offset_repair`), and the agreement test compares with that repaired label.
        trusted_side: with ``agreement``, a contested pixel also takes the manual label where that label is right
            whichever way its contour was offset (:func:`scripts.repair.trusted_side`): inside a structure drawn
            smaller than the prediction, and the background outside a structure drawn larger. Agreement alone never
            supervises a pixel the network gets wrong; this lets the annotator correct the network on the side of
            the contour that an over- or under-drawn outline cannot have got wrong.
        leave_out_separation: when GMM-1's separation on the losses (Ashman's D of its first fit, before any refit of
            the peel: ``gmm1_loss_separation``) in the run's first round reaches this value, every cleansed slice
            carries no supervision, for the rest of the run, whatever the other rules say (``None``: never). A first
            round whose losses split into two well separated populations says the labels hold a noisy population; one
            that does not says the filter's Noisy side is mostly the hard end of correct labels, which agreement targets
            keep and leaving out would lose. The first round is judged because its network has not yet been trained on
            any cleansed target. The caller gives the separation (:func:`cleansed_targets`).
    """

    agreement: bool = False
    agreement_confidence: float | None = None
    confident_fill: float | None = None
    empty_fill: float | None = None
    neighbour_fill: bool = False
    ignore_empty: bool = False
    ignore_drawn: bool = False
    empty_margin: int | None = None
    repair_radius: int | None = None
    trusted_side: bool = False
    leave_out_separation: float | None = None

    def __post_init__(self) -> None:
        for name in ("agreement", "neighbour_fill", "ignore_empty", "ignore_drawn", "trusted_side"):
            object.__setattr__(self, name, as_flag(getattr(self, name), f"rules#{name}"))
        if self.ignore_empty and self.empty_fill is not None:
            raise ValueError("ignore_empty and empty_fill exclude each other: a slice with an empty label is either "
                             "left out or filled")
        if self.repair_radius is not None and (not self.agreement or self.repair_radius < 0):
            raise ValueError(f"repair_radius ({self.repair_radius}) needs agreement=True and a radius >= 0")
        refining = [name for name in ("agreement_confidence", "confident_fill", "empty_fill", "neighbour_fill",
                                      "trusted_side")
                    if getattr(self, name) not in (None, False)]
        if refining and not self.agreement:
            raise ValueError(f"{', '.join(refining)} need agreement=True: they change which pixels the agreement "
                             "test keeps")
        if self.neighbour_fill and self.ignore_empty:
            raise ValueError("ignore_empty and neighbour_fill exclude each other")
        if self.ignore_drawn and self.ignore_empty:
            raise ValueError("ignore_drawn and ignore_empty together leave every cleansed slice out: use "
                             "the source scripts.sources.NoPseudoLabel for that")
        if self.empty_margin is not None and (not self.agreement or self.ignore_empty or self.empty_margin < 1):
            raise ValueError(f"empty_margin ({self.empty_margin}) needs agreement=True, ignore_empty=False and a "
                             "margin >= 1")
        if self.leave_out_separation is not None and not self.leave_out_separation > 0:
            raise ValueError(f"leave_out_separation is a separation (Ashman's D) > 0, got {self.leave_out_separation}")
        for name in ("agreement_confidence", "confident_fill", "empty_fill"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a probability, got {value}")


def _at_least(confidence: torch.Tensor, probability: float) -> torch.Tensor:
    return confidence >= round(255 * probability)


def leaves_out(rules: TargetRules, separation: float | None) -> bool:
    """Whether ``leave_out_separation`` leaves every cleansed slice out at this first-round separation."""
    return rules.leave_out_separation is not None and separation is not None and math.isfinite(separation) and \
        separation >= rules.leave_out_separation


def cleansed_targets(
    candidates: torch.Tensor,
    manual: torch.Tensor,
    rules: TargetRules,
    num_classes: int,
    prediction: torch.Tensor | None = None,
    confidence: torch.Tensor | None = None,
    neighbours: tuple[torch.Tensor, torch.Tensor] | None = None,
    separation: float | None = None,
) -> tuple[torch.Tensor, int | None]:
    """The training targets of the slices being cleansed.

    Args:
        candidates: (N, H, W) uint8 LCM output of those slices.
        manual: (N, H, W) their manual labels.
        rules: which pixels to trust.
        num_classes: classes including background.
        prediction: (N, H, W) the network's prediction; needed by ``repair_radius``, ``empty_margin`` and
            ``trusted_side``.
        confidence: (N, H, W) uint8, the predicted class's probability times 255; needed by the probability rules.
        neighbours: the manual labels of each slice's previous and next slice in its volume
            (:func:`scripts.repair.adjacent_labels`); needed by ``neighbour_fill``.
        separation: GMM-1's separation in the run's first round, read by ``leave_out_separation``; ``None`` (no
            round has fitted the mixture yet) applies the other rules.

    Returns:
        ``(targets, repaired)``: (N, H, W) uint8 targets, ``IGNORE_INDEX`` where unsupervised, and the number of
        structures ``repair_radius`` moved (``None`` without that rule).
    """
    if candidates.shape != manual.shape or candidates.ndim != 3:
        raise ValueError(f"candidates and manual labels must be (N, H, W) of one shape, got "
                         f"{tuple(candidates.shape)} and {tuple(manual.shape)}")
    if leaves_out(rules, separation):
        return torch.full_like(candidates, IGNORE_INDEX), None
    needs = {
        "prediction": prediction is None and (rules.repair_radius is not None or rules.empty_margin is not None
                                              or rules.trusted_side),
        "confidence": confidence is None and any(
            p is not None for p in (rules.agreement_confidence, rules.confident_fill, rules.empty_fill)),
        "neighbours": neighbours is None and rules.neighbour_fill,
    }
    missing = [name for name, missed in needs.items() if missed]
    if missing:
        raise ValueError(f"these target rules need {', '.join(missing)}: {rules}")
    targets = candidates.clone()
    repaired = None
    # slices whose manual label has no foreground: missed slices, or slices that truly show nothing
    empty = (manual.flatten(1).amax(1) == 0)[:, None, None]
    if rules.agreement:
        reference = manual
        if rules.repair_radius is not None:
            reference, offsets = offset_repair(manual, prediction, num_classes, rules.repair_radius)
            repaired = int((offsets != 0).sum())
        keep = targets == reference
        if rules.agreement_confidence is not None:
            keep &= _at_least(confidence, rules.agreement_confidence)
        if rules.confident_fill is not None:
            keep |= _at_least(confidence, rules.confident_fill)
        if rules.empty_fill is not None:
            keep |= empty & _at_least(confidence, rules.empty_fill)
        if rules.neighbour_fill:
            previous, following = neighbours
            keep |= empty & (targets != 0) & ((targets == previous) | (targets == following))
        if rules.trusted_side:
            trusted = trusted_side(manual, prediction, num_classes)
            targets[trusted] = manual[trusted].to(targets.dtype)
            keep |= trusted
        targets[~keep] = IGNORE_INDEX
        if rules.empty_margin is not None:
            targets[empty & near_foreground(prediction, rules.empty_margin) & (targets == 0)] = IGNORE_INDEX
    if rules.ignore_empty:
        targets[empty.flatten()] = IGNORE_INDEX
    if rules.ignore_drawn:
        targets[~empty.flatten()] = IGNORE_INDEX
    return targets, repaired
