"""Label-noise simulation of Sec. 3.2 of the paper: missing labels and boundary noise.

Recipe, for a stack of N label maps:

* Samples with no foreground at all cannot carry either kind of noise (removing
  nothing, or dilating nothing, leaves them unchanged), so they are never picked and
  stay ``CLEAN``. ``floor(alpha * N_fg + 0.5)`` samples are drawn without replacement
  among the N_fg samples that have foreground: ``alpha`` is the noisy fraction *of the
  samples that can be noisy*. When every slice has foreground (the usual case for
  heart-centred crops) this is the paper's "alpha of the images".
* Each picked sample gets, with equal odds, ``MISSING`` noise (every mask removed, the
  map becomes all background) or ``BOUNDARY`` noise.
* Boundary noise treats each foreground class present in the sample as one structure
  and, independently per class, dilates or erodes it (equal odds) by a disk of radius
  ``r = max(1, floor(u * radius_scale + 0.5))``, ``u`` uniform on the integers
  ``beta-3 .. beta+3`` (values below 0 are clipped to 0 before scaling).

Multi-class composition (ACDC: 1 RV, 2 Myo, 3 LV; liver: 1 liver, 2 tumour):

1. Erosions first, all computed on the clean map: pixels a structure loses become
   background. An eroded Myo therefore leaves a background gap on both of its sides,
   as a too-thin contour would.
2. Dilations next, each computed from the clean mask of its class and painted in
   ascending class order (``paint_order`` to change it). A dilated structure grows
   over background *and* over neighbouring structures, as an over-drawn contour does
   (a dilated LV takes the inner part of the Myo). Where two dilated structures claim
   the same pixel, the one painted later wins; with the default order that is the
   higher class index, i.e. the inner or smaller structure in both label conventions
   above, so a dilated Myo never buries a dilated LV.

Erosion does not erode from the image border (the annotation is assumed to continue
beyond the crop). Disks are ``x**2 + y**2 <= r**2``; morphology uses
``scipy.ndimage.binary_dilation`` / ``binary_erosion`` on the whole map of a sample.

Determinism: a ``numpy.random.Generator`` seeded with ``seed`` picks the samples and
the noise kind; each sample's boundary parameters come from its own child generator
(``SeedSequence(seed).spawn``), so one sample's noise does not depend on the classes
present in other samples.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from scipy import ndimage

from scripts.ignore_index import IGNORE_INDEX

__all__ = ["CLEAN", "MISSING", "BOUNDARY", "ORACLES", "disk", "simulate_label_noise", "oracle_labels"]

CLEAN = 0
MISSING = 1
BOUNDARY = 2

ArrayLike = Union[torch.Tensor, np.ndarray]

# Reference label sets built from the true noise flags (see ``oracle_labels``).
ORACLES = ("drop_noisy", "drop_missing", "fix_boundary")


def disk(radius: int) -> np.ndarray:
    """Boolean disk structuring element of the given integer radius, (2r+1, 2r+1)."""
    r = int(radius)
    if r < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy * yy + xx * xx) <= r * r


def _boundary_noise(
    label: np.ndarray,
    classes: Sequence[int],
    ops: Sequence[str],
    radii: Sequence[int],
) -> np.ndarray:
    out = label.copy()
    for c, op, r in zip(classes, ops, radii):
        if op == "erode":
            mask = label == c
            kept = ndimage.binary_erosion(mask, structure=disk(r), border_value=1)
            out[mask & ~kept] = 0
    for c, op, r in zip(classes, ops, radii):
        if op == "dilate":
            grown = ndimage.binary_dilation(label == c, structure=disk(r))
            out[grown] = c
    return out


def simulate_label_noise(
    labels: ArrayLike,
    alpha: float,
    beta: int,
    seed: int,
    num_classes: int,
    radius_scale: float = 1.0,
    paint_order: Optional[Sequence[int]] = None,
    return_details: bool = False,
):
    """Corrupt a fraction ``alpha`` of the label maps (see the module docstring).

    Args:
        labels: (N, H, W) integer label maps, tensor or array, values in [0, num_classes).
        alpha: fraction of the samples with foreground to corrupt, in [0, 1].
        beta: centre of the boundary-noise radius range ``beta-3 .. beta+3`` pixels.
        seed: seed of the ``numpy.random.Generator``.
        num_classes: number of classes including background.
        radius_scale: multiplies the drawn radius (for images at another scale than
            the paper's, e.g. 0.5 after halving the resolution); the result is rounded
            and at least 1.
        paint_order: order in which dilated classes are painted (later wins); default
            ascending class index.
        return_details: also return a list with, per sample, ``None`` or a dict
            ``{"kind": "missing"|"boundary", "classes", "ops", "radii"}``.

    Returns:
        ``(noisy, flags)``: noisy maps of the input's type, dtype and device, and
        (N,) int64 flags (``CLEAN``/``MISSING``/``BOUNDARY``) of the input's type; with
        ``return_details`` a third element as described above.
    """
    is_tensor = isinstance(labels, torch.Tensor)
    arr = labels.detach().cpu().numpy() if is_tensor else np.asarray(labels)
    if arr.ndim != 3:
        raise ValueError(f"labels must be (N, H, W), got shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_:
        raise TypeError(f"labels must be integer class maps, got dtype {arr.dtype}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(
            f"label values must lie in [0, {num_classes - 1}], got [{arr.min()}, {arr.max()}]"
        )
    order = list(range(1, num_classes)) if paint_order is None else [int(c) for c in paint_order]
    if sorted(order) != list(range(1, num_classes)):
        raise ValueError(f"paint_order must be a permutation of 1..{num_classes - 1}, got {order}")

    n = arr.shape[0]
    noisy = arr.copy()
    flags = np.zeros(n, dtype=np.int64)
    details: list = [None] * n

    nonempty = np.flatnonzero(arr.reshape(n, -1).any(axis=1))
    n_pick = min(int(np.floor(alpha * nonempty.size + 0.5)), nonempty.size)
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(nonempty, size=n_pick, replace=False)) if n_pick else nonempty[:0]
    missing = rng.random(n_pick) < 0.5
    children = np.random.SeedSequence(seed).spawn(n) if n_pick else []

    for i, is_missing in zip(picked, missing):
        if is_missing:
            noisy[i] = 0
            flags[i] = MISSING
            details[i] = {"kind": "missing", "classes": [], "ops": [], "radii": []}
            continue
        sample_rng = np.random.default_rng(children[i])
        present = set(np.unique(arr[i]).tolist())
        classes = [c for c in order if c in present]
        k = len(classes)
        dilate = sample_rng.random(k) < 0.5
        base = np.maximum(sample_rng.integers(beta - 3, beta + 4, size=k), 0)
        radii = [max(1, int(np.floor(b * radius_scale + 0.5))) for b in base]
        ops = ["dilate" if d else "erode" for d in dilate]
        noisy[i] = _boundary_noise(arr[i], classes, ops, radii)
        flags[i] = BOUNDARY
        details[i] = {"kind": "boundary", "classes": classes, "ops": ops, "radii": radii}

    if is_tensor:
        noisy_out = torch.from_numpy(noisy).to(device=labels.device, dtype=labels.dtype)
        flags_out = torch.from_numpy(flags).to(labels.device)
    else:
        noisy_out, flags_out = noisy, flags
    if return_details:
        return noisy_out, flags_out, details
    return noisy_out, flags_out


def oracle_labels(noisy: torch.Tensor, clean: torch.Tensor, flags: torch.Tensor, oracle: str) -> torch.Tensor:
    """Training labels that only someone who knows the true noise flags could build: upper bounds to judge a
    noise-robust method against, never a method itself.

    ``drop_noisy`` takes every noisy slice out of supervision (a perfect filter that discards what it finds);
    ``drop_missing`` takes the missed slices out and leaves the boundary noise as it is (perfect handling of
    missing labels alone); ``fix_boundary`` takes the missed slices out and gives the boundary-noise slices their
    clean labels back (a perfect filter with a perfect contour repair: what a method reaches when it cannot
    invent the foreground of a missed slice). Slices taken out are filled with the losses' ignore index 255.

    Args:
        noisy, clean: (N, H, W) label maps after and before the noise.
        flags: (N,) ``CLEAN`` / ``MISSING`` / ``BOUNDARY`` per slice, as ``simulate_label_noise`` returns them.
        oracle: one of ``ORACLES``.
    """
    if oracle not in ORACLES:
        raise ValueError(f"unknown oracle '{oracle}': use one of {list(ORACLES)}")
    if noisy.shape != clean.shape or noisy.ndim != 3 or tuple(flags.shape) != noisy.shape[:1]:
        raise ValueError(f"oracle labels need (N, H, W) noisy and clean maps and (N,) flags, got "
                         f"{tuple(noisy.shape)}, {tuple(clean.shape)} and {tuple(flags.shape)}")
    out = noisy.clone()
    dropped = flags != CLEAN if oracle == "drop_noisy" else flags == MISSING
    out[dropped] = IGNORE_INDEX
    if oracle == "fix_boundary":
        fixed = flags == BOUNDARY
        out[fixed] = clean[fixed]
    return out
