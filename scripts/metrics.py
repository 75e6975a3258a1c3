"""Small label-map metrics used to report how well labels were repaired."""

from __future__ import annotations

import torch

__all__ = ["label_dice"]


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
