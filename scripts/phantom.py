"""Deterministic synthetic short-axis cardiac MRI phantoms in the ACDC release layout.

This is the bundle's default, download-free data set. Volumes are written exactly like the local ACDC copy
(``patientNNN/patientNNN_frame01.nii.gz`` as uint16 rescaled per volume to 0..4095, ``..._frame01_gt.nii.gz``
as uint8 labels, identity affine, ``splits.json`` with "train"/"val" lists), so a training run on phantoms goes
through the same loading and pre-processing code as one on real data.

Labels: 0 background, 1 right ventricle (RV), 2 myocardium (Myo), 3 left-ventricular blood pool (LV).

Each volume is a stack of short-axis slices from the base (slice 0) to the apex (last slice). Per slice:

* LV: a bright, slightly elliptical blood pool with a few dark papillary muscles (labelled LV, as in ACDC);
* Myo: a darker ring of angle-dependent thickness around the LV; near the apex it may close into a solid cap;
* RV: a bright crescent against one side of the myocardium, with an unlabelled thin free wall; it ends
  before the apex;
* background: a textured body (smooth random field), dark lungs beside the heart, pericardial and
  subcutaneous fat, a bright aorta-like disc and other organ-like blobs, air outside the body;
* acquisition: slight in-plane blur (partial volume), a smooth multiplicative bias field and Rician noise.

Sizes, positions, orientation, contrasts and the apex position vary between cases and smoothly along the
slices; the last slice can be past the apex (empty) or without RV, as in real stacks. The LV centre is drawn
from the central 36 % of each axis (plus a small base-to-apex drift), which keeps the heart centre about 45 px
or more from the edges of a 160 x 160 image, so a 128 x 128 heart-centred crop holds the whole heart.

Every case is drawn from its own generator seeded with ``(seed, case index)``, so case k is the same whatever
``n_cases`` is, and generation is reproducible bit for bit.

CLI: ``python -m scripts.phantom --root DIR [--n_cases N] [--seed S] [--shape H W S] [--val_fraction F]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

__all__ = ["make_phantom_volume", "write_phantom_dataset", "ensure_phantom_dataset", "GENERATOR_VERSION"]

# Bump whenever the generated voxels change, so that ensure_phantom_dataset notices data sets from older code.
GENERATOR_VERSION = 1

METADATA_FILE = "phantom.json"
SPLITS_FILE = "splits.json"
FRAME = "frame01"
INTENSITY_MAX = 4095
LABEL_NAMES = {0: "background", 1: "right ventricle", 2: "myocardium", 3: "left ventricle"}
_MIN_INPLANE = 48


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ValueError(f"shape must be (H, W, slices), got {tuple(shape)}.")
    h, w, s = (int(v) for v in shape)
    if min(h, w) < _MIN_INPLANE or s < 1:
        raise ValueError(f"shape must have H, W >= {_MIN_INPLANE} and at least one slice, got {tuple(shape)}.")
    return h, w, s


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: Sequence[float]) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="reflect")
    return (field - field.mean()) / (field.std() + 1e-12)


def _ellipse(rows, cols, centre, semi_axes, angle: float) -> np.ndarray:
    """Normalised radius: < 1 inside the (rotated) ellipse."""
    dr, dc = rows - centre[0], cols - centre[1]
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    u = dr * sin_a + dc * cos_a
    v = -dr * cos_a + dc * sin_a
    return np.sqrt((u / max(semi_axes[0], 1e-6)) ** 2 + (v / max(semi_axes[1], 1e-6)) ** 2)


def _direction(angle: float) -> np.ndarray:
    # (row, col) unit vector; angle 0 points along +col.
    return np.array([math.sin(angle), math.cos(angle)])


def make_phantom_volume(
    rng: np.random.Generator, shape: Sequence[int] = (160, 160, 8)
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one phantom case.

    Args:
        rng: source of all randomness; the same generator state gives the same volume.
        shape: (H, W, slices); H and W at least 48.

    Returns:
        image: float32 (H, W, S), integral values in 0..4095 (rescaled per volume, like the ACDC copy).
        label: uint8 (H, W, S) with values in {0, 1, 2, 3}.
    """
    h, w, n_slices = _check_shape(shape)
    size = float(min(h, w))
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    t_of = [s / (n_slices - 1) if n_slices > 1 else 0.0 for s in range(n_slices)]

    # ---- case-level anatomy -------------------------------------------------------------------------------
    centre0 = np.array([rng.uniform(0.32, 0.68) * h, rng.uniform(0.32, 0.68) * w])
    drift = rng.normal(0.0, 0.015 * size, 2)  # base-to-apex shift of the long axis
    r_epi0 = rng.uniform(0.11, 0.145) * size
    thick0 = max(rng.uniform(0.03, 0.045) * size, 2.5)
    thick_amp = rng.uniform(0.0, 0.3)
    thick_phase = rng.uniform(0.0, 2 * math.pi)
    lv_aspect = rng.uniform(0.85, 1.0)
    lv_angle = rng.uniform(0.0, math.pi)
    t_apex = rng.uniform(0.9, 1.3)  # > 1: the apex lies beyond the last slice
    t_rv = t_apex * rng.uniform(0.6, 0.9)
    rv_angle0 = rng.normal(0.75 * math.pi, 0.35)
    rv_twist = rng.normal(0.0, 0.15)
    rv_offset = rng.uniform(0.5, 0.8)
    rv_len = rng.uniform(0.8, 1.1)
    rv_width = rng.uniform(1.2, 1.6)
    rv_wall = rng.uniform(1.0, 2.0)
    n_papillary = int(rng.integers(1, 4))
    papillary_angles = rng.uniform(0.0, 2 * math.pi, n_papillary)
    papillary_sizes = rng.uniform(0.1, 0.18, n_papillary)
    has_epicardial_fat = rng.random() < 0.7
    fat_width = rng.uniform(1.5, 3.0) * size / 160
    fat_centre_angle = rng.uniform(0.0, 2 * math.pi)
    fat_half_span = rng.uniform(0.5, 1.5)

    # ---- case-level contrast --------------------------------------------------------------------------------
    blood = rng.uniform(1500.0, 2300.0)
    rv_blood = blood * rng.uniform(0.75, 0.95)
    myo = rng.uniform(450.0, 700.0)
    tissue = rng.uniform(350.0, 550.0)
    lung = tissue * rng.uniform(0.05, 0.15)
    fat = blood * rng.uniform(0.8, 1.2)
    texture_amp = rng.uniform(0.2, 0.35)
    noise_frac = rng.uniform(0.02, 0.05)
    blur_sigma = rng.uniform(0.5, 0.9)
    bias_coeffs = rng.normal(0.0, 0.15, 6)

    # ---- body, lungs, organ-like blobs (shared by all slices, so they change smoothly) ------------------------
    body_centre = np.array([h / 2, w / 2]) + rng.normal(0.0, 0.03 * size, 2)
    body_rho = _ellipse(rows, cols, body_centre, (rng.uniform(0.5, 0.65) * w, rng.uniform(0.45, 0.6) * h), 0.0)
    body = body_rho < 1.0
    # Unpadded on purpose: where the body runs out of the field of view there is no skin, hence no fat.
    body_depth = ndimage.distance_transform_edt(body)
    subcutaneous_fat = body & (body_depth <= rng.uniform(0.02, 0.05) * size)

    lungs = np.zeros((h, w), dtype=bool)
    for side in (-1.0, 1.0):
        angle = rv_angle0 + side * math.pi / 2 + rng.normal(0.0, 0.2)
        centre = centre0 + r_epi0 * rng.uniform(2.2, 2.8) * _direction(angle)
        axes = (rng.uniform(0.08, 0.14) * size, rng.uniform(0.12, 0.22) * size)
        lungs |= _ellipse(rows, cols, centre, axes, angle) < 1.0
    lungs &= body & ~subcutaneous_fat

    # (centre, semi-axes, angle, slice centre in t units, half extent in t units, intensity)
    blobs = []
    aorta_angle = rv_angle0 + math.pi + rng.normal(0.0, 0.6)
    aorta_radius = rng.uniform(0.03, 0.045) * size
    aorta_centre = centre0 + (r_epi0 * rng.uniform(1.3, 1.6) + aorta_radius) * _direction(aorta_angle)
    if rng.random() < 0.8:
        blobs.append((aorta_centre, (aorta_radius, aorta_radius), 0.0, 0.5, 5.0, blood * rng.uniform(0.9, 1.1)))
    for _ in range(int(rng.integers(2, 6))):
        axes = (rng.uniform(0.04, 0.13) * size, rng.uniform(0.04, 0.13) * size)
        angle = rng.uniform(0.0, math.pi)
        z_centre, z_half = rng.uniform(-0.3, 1.3), rng.uniform(0.4, 1.2)
        value = blood * rng.uniform(0.3, 1.0)
        # Keep organ blobs off the heart so that they never hide a labelled structure.
        for _attempt in range(20):
            centre = np.array([rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w])
            if np.linalg.norm(centre - centre0) > 2.2 * r_epi0 + max(axes):
                blobs.append((centre, axes, angle, z_centre, z_half, value))
                break

    texture = _smooth_field(rng, (h, w, n_slices), (size / 25, size / 25, 0.8))
    grain = _smooth_field(rng, (h, w, n_slices), (1.5, 1.5, 0.0))

    image = np.zeros((h, w, n_slices), dtype=np.float64)
    label = np.zeros((h, w, n_slices), dtype=np.uint8)
    for s, t in enumerate(t_of):
        centre = centre0 + drift * t
        phi = np.arctan2(rows - centre[0], cols - centre[1])
        tex = 1.0 + texture_amp * texture[..., s] + 0.08 * grain[..., s]

        sl = np.where(body, tissue * tex, 0.0)
        sl[subcutaneous_fat] = fat * (1.0 + 0.05 * texture[..., s][subcutaneous_fat])
        sl[lungs] = lung
        for b_centre, b_axes, b_angle, z_centre, z_half, value in blobs:
            extent = 1.0 - ((t - z_centre) / z_half) ** 2
            if extent <= 0.05:
                continue
            scale = math.sqrt(extent)
            inside = (_ellipse(rows, cols, b_centre, (b_axes[0] * scale, b_axes[1] * scale), b_angle) < 1.0) & body
            sl[inside] = value * (1.0 + 0.05 * texture[..., s][inside])

        # ---- heart ----------------------------------------------------------------------------------------------
        along = 1.0 - (t / t_apex) ** 2
        r_epi = r_epi0 * math.sqrt(max(along, 0.0))
        lv = np.zeros((h, w), dtype=bool)
        myo_mask = np.zeros((h, w), dtype=bool)
        rv = np.zeros((h, w), dtype=bool)
        if r_epi >= 2.5:
            thick = thick0 * (1.0 + 0.3 * t)
            r_lv = r_epi - thick
            if r_lv * lv_aspect >= 1.5:
                lv = _ellipse(rows, cols, centre, (r_lv, r_lv * lv_aspect), lv_angle) < 1.0
                dist = ndimage.distance_transform_edt(~lv)
                # Floor of 2 px: every 4-neighbour of an LV pixel is myocardium, so the ring is always closed.
                local_thick = np.maximum(thick * (1.0 + thick_amp * np.cos(phi - thick_phase)), 2.0)
                myo_mask = (dist > 0) & (dist <= local_thick)
            else:
                # Apical cap: the cavity has closed.
                myo_mask = _ellipse(rows, cols, centre, (r_epi, r_epi * lv_aspect), lv_angle) < 1.0
            if t < t_rv:
                rv_scale = math.sqrt(1.0 - (t / t_rv) ** 2)
                rv_angle = rv_angle0 + rv_twist * t
                rv_centre = centre + r_epi * rv_offset * _direction(rv_angle)
                rv_axes = (r_epi * rv_len * rv_scale, r_epi * rv_width * rv_scale)
                rv = (_ellipse(rows, cols, rv_centre, rv_axes, rv_angle) < 1.0) & ~lv & ~myo_mask

        heart = lv | myo_mask | rv
        if heart.any():
            if rv.any():
                rv_free_wall = (ndimage.distance_transform_edt(~rv) <= rv_wall) & ~heart
                sl[rv_free_wall] = myo
                heart_and_wall = heart | rv_free_wall
            else:
                heart_and_wall = heart
            if has_epicardial_fat:
                angular = np.cos(phi - fat_centre_angle) > math.cos(fat_half_span)
                band = (ndimage.distance_transform_edt(~heart_and_wall) <= fat_width) & ~heart_and_wall & angular
                sl[band] = fat
            sl[myo_mask] = myo * (1.0 + 0.5 * texture_amp * texture[..., s][myo_mask])
            sl[rv] = rv_blood * (1.0 + 0.05 * texture[..., s][rv])
            sl[lv] = blood * (1.0 + 0.05 * texture[..., s][lv])
            r_lv_now = r_epi - thick0 * (1.0 + 0.3 * t)
            if lv.any() and r_lv_now * lv_aspect > 5.0:
                for angle, rel in zip(papillary_angles, papillary_sizes):
                    p_centre = centre + 0.72 * r_lv_now * lv_aspect * _direction(angle)
                    p_radius = rel * r_lv_now
                    muscle = (_ellipse(rows, cols, p_centre, (p_radius, p_radius), 0.0) < 1.0) & lv
                    sl[muscle] = myo * 1.1

        label[..., s] = np.where(lv, 3, np.where(myo_mask, 2, np.where(rv, 1, 0))).astype(np.uint8)
        image[..., s] = sl

    # ---- acquisition ----------------------------------------------------------------------------------------------
    image = ndimage.gaussian_filter(image, sigma=(blur_sigma, blur_sigma, 0.0), mode="nearest")
    x = (rows - h / 2) / (h / 2)
    y = (cols - w / 2) / (w / 2)
    a = bias_coeffs
    for s, t in enumerate(t_of):
        log_bias = a[0] * x + a[1] * y + a[2] * x**2 + a[3] * y**2 + a[4] * x * y + a[5] * (t - 0.5)
        image[..., s] *= np.exp(np.clip(log_bias, -0.6, 0.6))
    sigma = noise_frac * blood
    real = image + rng.normal(0.0, sigma, image.shape)
    imag = rng.normal(0.0, sigma, image.shape)
    image = np.sqrt(real**2 + imag**2)

    lo, hi = float(image.min()), float(image.max())
    image = np.round((image - lo) / max(hi - lo, 1e-6) * INTENSITY_MAX)
    return image.astype(np.float32), label


def _case_rng(seed: int, index: int) -> np.random.Generator:
    # Distinct tags keep the case streams and the split stream apart.
    return np.random.default_rng([seed, 1, index])


def _params(n_cases: int, shape: Sequence[int], seed: int, val_fraction: float) -> dict:
    if int(n_cases) < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}.")
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}.")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    return {
        "generator_version": GENERATOR_VERSION,
        "n_cases": int(n_cases),
        "shape": list(_check_shape(shape)),
        "seed": int(seed),
        "val_fraction": float(val_fraction),
    }


def _split(names: list[str], seed: int, val_fraction: float) -> dict[str, list[str]]:
    n_val = int(round(len(names) * val_fraction))
    if val_fraction > 0 and len(names) >= 2:
        n_val = min(max(n_val, 1), len(names) - 1)
    order = np.random.default_rng([seed, 0]).permutation(len(names))
    val = sorted(names[i] for i in order[:n_val])
    train = sorted(names[i] for i in order[n_val:])
    return {"train": train, "val": val}


def _case_name(index: int) -> str:
    return f"patient{index + 1:03d}"


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def write_phantom_dataset(
    root: str | os.PathLike,
    n_cases: int = 24,
    shape: Sequence[int] = (160, 160, 8),
    seed: int = 0,
    val_fraction: float = 0.25,
) -> Path:
    """Generate a phantom data set in ``root`` (which must not exist, or be an empty folder).

    The cases are written into a hidden sibling folder that is renamed to ``root`` only once complete, so an
    interrupted run leaves a ``.NAME.partial-*`` folder behind, never a ``root`` that looks finished.

    Returns:
        ``root`` as a Path.

    Raises:
        FileExistsError: ``root`` exists and is not empty (nothing there is touched).
    """
    root = Path(root).expanduser().absolute()
    params = _params(n_cases, shape, seed, val_fraction)
    if root.exists() and not _is_empty_dir(root):
        raise FileExistsError(f"Refusing to write phantom data into {root}: the path exists and is not empty.")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        names = [_case_name(i) for i in range(params["n_cases"])]
        affine = np.eye(4)
        for i, name in enumerate(names):
            image, label = make_phantom_volume(_case_rng(params["seed"], i), params["shape"])
            case_dir = staging / name
            case_dir.mkdir()
            nib.save(nib.Nifti1Image(image.astype(np.uint16), affine), case_dir / f"{name}_{FRAME}.nii.gz")
            nib.save(nib.Nifti1Image(label, affine), case_dir / f"{name}_{FRAME}_gt.nii.gz")
        with open(staging / SPLITS_FILE, "w") as f:
            json.dump(_split(names, params["seed"], params["val_fraction"]), f, indent=1)
            f.write("\n")
        metadata = {
            "description": "Synthetic short-axis cardiac phantoms in the ACDC layout (scripts/phantom.py).",
            "params": params,
            "labels": {str(k): v for k, v in LABEL_NAMES.items()},
            "frames": [FRAME],
            "image_dtype": "uint16",
            "intensity_range": [0, INTENSITY_MAX],
            "affine": "identity (1 mm voxels)",
        }
        # Written last: its presence in a finished folder is what ensure_phantom_dataset trusts.
        with open(staging / METADATA_FILE, "w") as f:
            json.dump(metadata, f, indent=1)
            f.write("\n")
        if _is_empty_dir(root):
            root.rmdir()
        try:
            os.rename(staging, root)
        except OSError as err:
            raise FileExistsError(
                f"Could not move the generated phantom data into {root}: it was created meanwhile ({err})."
            ) from err
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return root


def _check_existing(root: Path, params: dict) -> None:
    meta_path = root / METADATA_FILE
    if not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder; choose another phantom data root.")
    if not meta_path.is_file():
        raise FileExistsError(
            f"{root} exists but holds no {METADATA_FILE}, so it is not a phantom data set written by "
            "scripts.phantom. It is left untouched; point the phantom root at another (or a missing) folder."
        )
    try:
        found = json.loads(meta_path.read_text()).get("params")
    except (OSError, ValueError, AttributeError) as err:
        raise FileExistsError(
            f"{meta_path} cannot be read as phantom metadata ({err}); {root} is left untouched."
        ) from err
    if found != params:
        raise FileExistsError(
            f"{root} holds a phantom data set generated with different parameters: found {found}, requested "
            f"{params}. It is left untouched; use another folder or remove this one yourself."
        )
    missing = [SPLITS_FILE] if not (root / SPLITS_FILE).is_file() else []
    for i in range(params["n_cases"]):
        name = _case_name(i)
        for suffix in ("", "_gt"):
            rel = f"{name}/{name}_{FRAME}{suffix}.nii.gz"
            if not (root / rel).is_file():
                missing.append(rel)
    if missing:
        raise FileExistsError(f"Phantom data set {root} is incomplete, missing e.g. {missing[:3]}.")


def ensure_phantom_dataset(
    root: str | os.PathLike,
    *,
    n_cases: int = 24,
    shape: Sequence[int] = (160, 160, 8),
    seed: int = 0,
    val_fraction: float = 0.25,
) -> Path:
    """Return ``root`` holding the phantom data set for these parameters, generating it if needed.

    Generates when ``root`` is missing or an empty folder; returns at once when ``root/phantom.json`` records
    the same parameters (and the files are there). Never deletes or overwrites anything.

    Raises:
        FileExistsError: ``root`` exists with other content, without ``phantom.json``, with different
            parameters, or incomplete.
    """
    root = Path(root).expanduser().absolute()
    params = _params(n_cases, shape, seed, val_fraction)
    if root.exists() and not _is_empty_dir(root):
        _check_existing(root, params)
        return root
    try:
        return write_phantom_dataset(root, n_cases=n_cases, shape=shape, seed=seed, val_fraction=val_fraction)
    except FileExistsError:
        # Another process may have finished the same data set first; accept it if it matches.
        if root.exists():
            _check_existing(root, params)
            return root
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.phantom",
        description="Write (or verify) the synthetic cardiac phantom data set in the ACDC layout.",
    )
    parser.add_argument("--root", required=True, help="output folder; must not exist, or hold the same data set")
    parser.add_argument("--n_cases", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 160, 8], metavar=("H", "W", "S"))
    parser.add_argument("--val_fraction", type=float, default=0.25)
    args = parser.parse_args(argv)
    try:
        root = ensure_phantom_dataset(
            args.root, n_cases=args.n_cases, shape=args.shape, seed=args.seed, val_fraction=args.val_fraction
        )
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
