"""Contour-offset repair: move each structure of a manual label onto the network's prediction by the one dilation or
erosion that fits it best.

A contour drawn too generously or too tightly is, to first order, the true contour offset outwards or inwards by a
few pixels. One signed radius per structure is a far more robust thing to estimate from an imperfect prediction than
the label of every pixel: the repaired structure keeps the annotator's shape and position and takes only its size
from the network. Structures the prediction does not contain are left as drawn (no radius fits better than none).

All offsets of a mask come from one signed distance map: a pixel lies in the dilation by a disk of radius ``r``
(``x**2 + y**2 <= r**2``) when its distance to the mask is at most ``r``, and in the erosion when its distance to
the nearest background pixel exceeds ``r``. Only background inside the image counts, so a structure cut by the
image border is not eroded from the border (as in :mod:`scripts.noise`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from scripts.ignore_index import IGNORE_INDEX

__all__ = ["signed_distance", "offset_mask", "offset_repair", "trusted_side", "adjacent_labels", "near_foreground"]


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance to the mask for pixels outside it, minus the distance to the nearest background pixel
    for pixels inside (``-inf`` inside a mask without background, ``+inf`` everywhere for an empty mask)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.full(mask.shape, np.inf)
    if mask.all():
        return np.full(mask.shape, -np.inf)
    return np.where(mask, -ndimage.distance_transform_edt(mask), ndimage.distance_transform_edt(~mask))


def offset_mask(distance: np.ndarray, radius: int) -> np.ndarray:
    """The mask of a signed distance map offset by ``radius`` pixels: dilated for ``radius > 0``, eroded for
    ``radius < 0``."""
    return distance <= radius if radius >= 0 else distance < radius


def offset_repair(manual: torch.Tensor, prediction: torch.Tensor, num_classes: int, max_radius: int,
                  ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Repair every structure of ``manual`` by the signed offset that best matches ``prediction``.

    Args:
        manual: (N, H, W) integer label maps as drawn.
        prediction: (N, H, W) integer label maps of the network, same shape.
        num_classes: classes including background.
        max_radius: the largest offset tried, in pixels (radii ``-max_radius .. max_radius``).
        ignore_index: the value given to pixels that two repaired structures both claim.

    Returns:
        ``(repaired, offsets)``: (N, H, W) uint8 label maps, and (N, num_classes - 1) int64 signed radii per
        foreground class (0 where a class is absent from the manual label or from the prediction). Per class, the
        offset with the highest Dice against the prediction's mask of that class wins, the smallest ``|r|`` among
        equals (the erosion first); a pixel claimed by one repaired structure takes its class, by none
        background, by several ``ignore_index`` (the contours cannot both be right there).
    """
    if manual.shape != prediction.shape or manual.ndim != 3:
        raise ValueError(f"manual and prediction must be (N, H, W) of one shape, got {tuple(manual.shape)} and "
                         f"{tuple(prediction.shape)}")
    if num_classes < 2 or max_radius < 0:
        raise ValueError(f"need num_classes >= 2 and max_radius >= 0, got {num_classes} and {max_radius}")
    man, pred = manual.cpu().numpy(), prediction.cpu().numpy()
    radii = np.array([0] + [s * r for r in range(1, max_radius + 1) for s in (-1, 1)])
    repaired = np.zeros(man.shape, dtype=np.uint8)
    offsets = np.zeros((man.shape[0], num_classes - 1), dtype=np.int64)
    for i in range(man.shape[0]):
        claims = np.zeros(man.shape[1:], dtype=np.int64)
        for c in range(1, num_classes):
            mask, target = man[i] == c, pred[i] == c
            if not mask.any() or not target.any():
                chosen = mask
            else:
                d = signed_distance(mask)
                # the Dice of every offset at once: each pixel is in the offsets whose radius its distance reaches
                r = radii[:, None, None]
                inside = np.where(r < 0, d[None] < r, d[None] <= r)
                inter = (inside & target).sum((1, 2))
                dice = 2 * inter / (inside.sum((1, 2)) + target.sum())
                k = int(np.argmax(dice))
                offsets[i, c - 1] = radii[k]
                chosen = inside[k]
            claims += chosen
            repaired[i][chosen] = c
        repaired[i][claims > 1] = ignore_index
    return torch.from_numpy(repaired).to(manual.device), torch.from_numpy(offsets).to(manual.device)


def trusted_side(manual: torch.Tensor, prediction: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The pixels of an offset manual label that are right whichever way the contour was offset.

    A contour drawn too tightly lies inside the true one and a contour drawn too generously encloses it, so one side
    of every offset contour is right: the inside of an under-drawn structure, the outside of an over-drawn one.
    Per slice and foreground class, the structure counts as under-drawn when the prediction holds more of it outside
    the manual mask than the manual mask holds outside the prediction, over-drawn in the opposite case (neither on a
    tie). The pixels returned are those where the manual label is

    * class ``c`` of an under-drawn ``c`` (inside the true structure), or
    * background where the prediction says ``c`` and ``c`` is over-drawn (outside the true structure).

    A missed slice (no manual foreground) gets no pixel: nothing of it is known to be right but its background,
    and that only where the network agrees. Where several structures were offset at once the second case can call
    background a pixel that an eroded neighbour truly covers; agreement leaves it unsupervised otherwise.

    Args:
        manual: (N, H, W) integer label maps as drawn.
        prediction: (N, H, W) integer label maps of the network, same shape.
        num_classes: classes including background.

    Returns:
        (N, H, W) bool, True where the manual label is trusted.
    """
    if manual.shape != prediction.shape or manual.ndim != 3:
        raise ValueError(f"manual and prediction must be (N, H, W) of one shape, got {tuple(manual.shape)} and "
                         f"{tuple(prediction.shape)}")
    if num_classes < 2:
        raise ValueError(f"need num_classes >= 2, got {num_classes}")
    trusted = torch.zeros(manual.shape, dtype=torch.bool, device=manual.device)
    background = manual == 0
    for c in range(1, num_classes):
        drawn, predicted = manual == c, prediction == c
        beyond_drawn = (predicted & ~drawn).flatten(1).sum(1)  # the network's structure outside the manual mask
        beyond_predicted = (drawn & ~predicted).flatten(1).sum(1)
        under = (beyond_drawn > beyond_predicted)[:, None, None]
        over = (beyond_predicted > beyond_drawn)[:, None, None]
        trusted |= (under & drawn) | (over & predicted & background)
    return trusted


def adjacent_labels(labels: torch.Tensor, volume_sizes: list[int],
                    missing: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """The label maps of each slice's previous and next slice in its volume.

    Args:
        labels: (N, H, W) label maps of all slices, volume after volume, slices in order within a volume.
        volume_sizes: slices per volume, summing to N.
        missing: the value of the maps returned for a slice at either end of its volume.

    Returns:
        ``(previous, next)``, each (N, H, W) like ``labels``.
    """
    if sum(volume_sizes) != labels.shape[0]:
        raise ValueError(f"volume sizes sum to {sum(volume_sizes)}, but there are {labels.shape[0]} label maps")
    previous = torch.full_like(labels, missing)
    following = torch.full_like(labels, missing)
    start = 0
    for size in volume_sizes:
        end = start + size
        previous[start + 1 : end] = labels[start : end - 1]
        following[start : end - 1] = labels[start + 1 : end]
        start = end
    return previous, following


def near_foreground(labels: torch.Tensor, margin: int) -> torch.Tensor:
    """Pixels within ``margin`` pixels (chessboard distance) of any foreground pixel of (N, H, W) label maps, the
    foreground included, as a boolean (N, H, W) tensor."""
    if labels.ndim != 3 or margin < 0:
        raise ValueError(f"need (N, H, W) labels and a margin >= 0, got shape {tuple(labels.shape)} and {margin}")
    foreground = ((labels > 0) & (labels != IGNORE_INDEX)).float()[:, None]
    return F.max_pool2d(foreground, 2 * margin + 1, stride=1, padding=margin)[:, 0] > 0
