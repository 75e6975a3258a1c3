"""Small label-map metrics used to report how well labels were repaired."""

from __future__ import annotations

import torch

from scripts.filtering import filter_precision_recall

__all__ = ["noisy_slices", "label_dice", "pooled_dice", "supervised_fraction", "wrong_fraction", "cleansing_quality"]


def noisy_slices(manual: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the slices whose manual label (N, H, W) differs from the clean one anywhere (simulated noise)."""
    return (manual != clean).flatten(1).any(1)


def label_dice(a: torch.Tensor, b: torch.Tensor, num_classes: int, ignore_index: int | None = 255) -> torch.Tensor:
    """Per-sample Dice between two (N, H, W) label maps, averaged over the foreground classes present in either.

    A sample where neither map has any foreground scores 1 (they agree that there is nothing). Pixels that
    ``a`` marks with ``ignore_index`` (unsupervised pixels of a pseudo-label) are left out.
    """
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.long().flatten(1), b.long().flatten(1)
    if ignore_index is not None:
        b = torch.where(a == ignore_index, a, b)
    total = torch.zeros(a.shape[0], dtype=torch.float64)
    count = torch.zeros(a.shape[0], dtype=torch.float64)
    for c in range(1, num_classes):
        ac, bc = a == c, b == c
        denom = (ac.sum(1) + bc.sum(1)).double()
        present = denom > 0
        dice = torch.where(present, 2 * (ac & bc).sum(1).double() / denom.clamp_min(1), torch.zeros_like(denom))
        total += dice
        count += present.double()
    return torch.where(count > 0, total / count.clamp_min(1), torch.ones_like(total))


def pooled_dice(a: torch.Tensor, b: torch.Tensor, num_classes: int, ignore_index: int | None = 255) -> float:
    """Dice of two stacks of label maps with every pixel of the stack pooled, averaged over the foreground classes
    present in either; pixels that ``a`` marks with ``ignore_index`` are left out.

    Per-sample Dice says 0 whenever one map of a sample has no foreground of a class and the other has a few pixels
    of it, which is what a pseudo-label of a slice that lost its mask looks like next to the clean label; pooled,
    those few pixels weigh what they are.
    """
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.long().flatten(), b.long().flatten()
    if ignore_index is not None:
        keep = a != ignore_index
        a, b = a[keep], b[keep]
    scores = []
    for c in range(1, num_classes):
        ac, bc = a == c, b == c
        denom = int(ac.sum() + bc.sum())
        if denom:
            scores.append(2 * int((ac & bc).sum()) / denom)
    return sum(scores) / len(scores) if scores else 1.0


def supervised_fraction(labels: torch.Tensor, ignore_index: int = 255) -> float:
    """The share of pixels of a stack of label maps that carry a label (are not ``ignore_index``)."""
    return float((labels != ignore_index).double().mean()) if labels.numel() else 1.0


def wrong_fraction(labels: torch.Tensor, clean: torch.Tensor, ignore_index: int = 255) -> float:
    """The share of the supervised pixels of ``labels`` (those not ``ignore_index``) whose class differs from
    ``clean``: how much of what a label set teaches is wrong, which Dice, dominated by large structures, hides."""
    if labels.shape != clean.shape:
        raise ValueError(f"label maps differ in shape: {tuple(labels.shape)} vs {tuple(clean.shape)}")
    supervised = labels != ignore_index
    count = int(supervised.sum())
    return int((supervised & (labels.long() != clean.long())).sum()) / count if count else 0.0


def cleansing_quality(manual: torch.Tensor, pseudo: torch.Tensor, prediction: torch.Tensor, clean: torch.Tensor,
                      num_classes: int, flagged_noisy: torch.Tensor | None = None) -> dict[str, float]:
    """How close a round's labels came to the clean ones, where simulated noise keeps them (the round's report).

    Dice against ``clean`` of the manual labels, the new pseudo-labels and the prediction, per slice and pooled,
    and the share of pixels the pseudo-labels supervise; the same again (``noisy_*``) on the slices whose manual
    label differs from the clean one, when there are any, with the share of the supervised pixels that carry a wrong
    class in the manual labels and in the pseudo-labels (``noisy_manual_wrong``, ``noisy_pseudo_wrong``). Given the
    slices the filter ``flagged_noisy``, the report starts with the filter's precision and recall against those
    truly noisy slices.
    """
    noisy = noisy_slices(manual, clean)
    report = {}
    if flagged_noisy is not None:
        report["filter_precision"], report["filter_recall"] = filter_precision_recall(flagged_noisy, noisy)
    report.update({
        "dice_manual_vs_clean": float(label_dice(manual, clean, num_classes).mean()),
        "dice_pseudo_vs_clean": float(label_dice(pseudo, clean, num_classes).mean()),
        "dice_pred_vs_clean": float(label_dice(prediction, clean, num_classes).mean()),
        "pooled_dice_manual_vs_clean": pooled_dice(manual, clean, num_classes),
        "pooled_dice_pseudo_vs_clean": pooled_dice(pseudo, clean, num_classes),
        "pseudo_supervised": supervised_fraction(pseudo),
    })
    if noisy.any():
        manual, pseudo, clean = manual[noisy], pseudo[noisy], clean[noisy]
        report.update(
            noisy_dice_manual_vs_clean=float(label_dice(manual, clean, num_classes).mean()),
            noisy_dice_pseudo_vs_clean=float(label_dice(pseudo, clean, num_classes).mean()),
            noisy_pooled_dice_manual_vs_clean=pooled_dice(manual, clean, num_classes),
            noisy_pooled_dice_pseudo_vs_clean=pooled_dice(pseudo, clean, num_classes),
            noisy_pseudo_supervised=supervised_fraction(pseudo),
            noisy_manual_wrong=wrong_fraction(manual, clean),
            noisy_pseudo_wrong=wrong_fraction(pseudo, clean),
        )
    return report
