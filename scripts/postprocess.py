"""Post-processing of cleansed pseudo-labels (Sec. 2.3, last paragraph of the paper).

Two steps, each relative to the foreground area of the mask being cleaned:

1. drop connected foreground components smaller than ``min_fraction`` of the foreground;
2. fill enclosed background holes smaller than ``max_fraction`` of the foreground.

Connectivity: foreground components are 8-connected and background (holes) are
4-connected. This is the usual dual pairing on a square grid: a ring that is closed
only through diagonal steps still encloses its interior, so an 8-connected ring
always has a well-defined inside and a diagonal gap never leaks a hole to the
outside. With 8-connected foreground, pixels touching at a corner count as one
object, which makes the removal step the more conservative of the two choices.

Functions accept a ``torch.Tensor`` or a ``numpy.ndarray`` and return the same type
(tensors come back on their original device). The work is done with
``scipy.ndimage.label`` and ``numpy.bincount``; there is no loop over components.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "FOREGROUND_STRUCTURE",
    "HOLE_STRUCTURE",
    "remove_small_components",
    "fill_small_holes",
    "clean_label_map",
]

ArrayLike = Union[torch.Tensor, np.ndarray]

FOREGROUND_STRUCTURE = np.ones((3, 3), dtype=bool)  # 8-connectivity
HOLE_STRUCTURE = ndimage.generate_binary_structure(2, 1)  # 4-connectivity


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _like(result: np.ndarray, reference: ArrayLike) -> ArrayLike:
    if isinstance(reference, torch.Tensor):
        return torch.from_numpy(np.ascontiguousarray(result)).to(reference.device)
    return result


def _check_2d(arr: np.ndarray, name: str) -> None:
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2D (H, W), got shape {tuple(arr.shape)}")


def _keep_large_components(mask: np.ndarray, min_fraction: float) -> np.ndarray:
    total = int(mask.sum())
    if total == 0 or min_fraction <= 0:
        return mask.copy()
    labels, _ = ndimage.label(mask, structure=FOREGROUND_STRUCTURE)
    areas = np.bincount(labels.ravel())
    keep = areas >= min_fraction * total
    keep[0] = False
    return keep[labels]


def _border_labels(labels: np.ndarray) -> np.ndarray:
    return np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))


def remove_small_components(mask: ArrayLike, min_fraction: float = 0.1) -> ArrayLike:
    """Drop 8-connected foreground components with area < ``min_fraction`` x foreground area.

    The reference area is the whole foreground of ``mask`` (all components together),
    so a mask with a single component is never changed. An empty mask, or
    ``min_fraction <= 0``, comes back unchanged. Returns a bool mask of the input's type.
    """
    arr = _to_numpy(mask).astype(bool, copy=False)
    _check_2d(arr, "mask")
    return _like(_keep_large_components(arr, float(min_fraction)), mask)


def fill_small_holes(mask: ArrayLike, max_fraction: float = 0.1) -> ArrayLike:
    """Fill enclosed background components with area < ``max_fraction`` x foreground area.

    A hole is a 4-connected background component that does not touch the image
    border (a region open to the border is outside the object, not inside it). The
    reference area is the foreground of ``mask`` before filling. An empty mask, or
    ``max_fraction <= 0``, comes back unchanged. Returns a bool mask of the input's type.
    """
    arr = _to_numpy(mask).astype(bool, copy=False)
    _check_2d(arr, "mask")
    total = int(arr.sum())
    if total == 0 or max_fraction <= 0:
        return _like(arr.copy(), mask)
    labels, _ = ndimage.label(~arr, structure=HOLE_STRUCTURE)
    areas = np.bincount(labels.ravel())
    fill = areas < max_fraction * total
    fill[0] = False
    fill[_border_labels(labels)] = False
    return _like(arr | fill[labels], mask)


def clean_label_map(
    label: ArrayLike,
    num_classes: int,
    component_fraction: float = 0.1,
    hole_fraction: float = 0.1,
) -> ArrayLike:
    """Per-class post-processing of an integer label map (0 = background).

    Step 1, components: for every foreground class ``c`` the 8-connected components of
    ``label == c`` smaller than ``component_fraction`` x (area of ``c``) are set to
    background. All classes are judged on the input map, so the result does not
    depend on the order of the classes.

    Step 2, holes: on the map from step 1, a hole of class ``c`` is a 4-connected
    component of *background* pixels that does not touch the image border and whose
    4-neighbours outside the component all belong to class ``c``. It is filled with
    ``c`` when its area is < ``hole_fraction`` x (area of ``c`` after step 1).
    Pixels of another class are never overwritten: the LV inside the myocardium ring
    is a hole of the Myo mask geometrically, but it is not background, so it stays
    LV. A background gap bordered by two classes (say between LV and Myo) belongs to
    neither and is left alone, since nothing says which class should claim it. Each
    background component is enclosed by at most one class, so the fills do not
    conflict and their order does not matter. For a binary map this is exactly
    :func:`remove_small_components` followed by :func:`fill_small_holes`.

    Classes with no pixels are skipped; a map without foreground comes back
    unchanged. Returns the input's type and dtype.
    """
    arr = _to_numpy(label)
    _check_2d(arr, "label")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(
            f"label values must lie in [0, {num_classes - 1}], got [{arr.min()}, {arr.max()}]"
        )
    out = arr.copy()
    if not out.any():
        return _like(out, label)

    for c in range(1, num_classes):
        mask = arr == c
        if mask.any():
            out[mask & ~_keep_large_components(mask, component_fraction)] = 0

    if hole_fraction <= 0:
        return _like(out, label)
    background = out == 0
    holes, n_holes = ndimage.label(background, structure=HOLE_STRUCTURE)
    if n_holes == 0:
        return _like(out, label)

    # For every background component, count which classes sit on its outer 4-neighbour
    # boundary: pair each hole pixel with its neighbour in each of the four directions.
    pair_counts = np.zeros((n_holes + 1) * num_classes, dtype=np.int64)
    for src, dst in (
        ((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
        ((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
        ((slice(1, None), slice(None)), (slice(None, -1), slice(None))),
        ((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
    ):
        hole_ids = holes[src]
        neighbour = out[dst]
        sel = (hole_ids > 0) & (neighbour > 0)
        idx = hole_ids[sel].astype(np.int64) * num_classes + neighbour[sel].astype(np.int64)
        pair_counts += np.bincount(idx, minlength=pair_counts.size)
    touches = pair_counts.reshape(n_holes + 1, num_classes)[:, 1:] > 0

    enclosing = np.zeros(n_holes + 1, dtype=np.int64)
    single = touches.sum(axis=1) == 1
    enclosing[single] = touches[single].argmax(axis=1) + 1
    enclosing[0] = 0
    enclosing[_border_labels(holes)] = 0

    areas = np.bincount(holes.ravel(), minlength=n_holes + 1)
    class_area = np.bincount(out.ravel().astype(np.int64), minlength=num_classes)
    limit = hole_fraction * class_area[enclosing]
    fill_class = np.where((enclosing > 0) & (areas < limit), enclosing, 0)
    fill_px = fill_class[holes]
    target = fill_px > 0
    out[target] = fill_px[target].astype(out.dtype)
    return _like(out, label)
