"""Shared fixtures: tiny NIfTI data sets in the layouts the bundle reads (ACDC release folders, MSD datalists)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# `scripts` must import the same way whether pytest is started from the repo root or elsewhere
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# the test machine has two cores shared with other jobs; intra-op threads spinning against them cost far more
# than they gain on volumes this small
torch.set_num_threads(1)

ACDC_SHAPE = (32, 32)
ACDC_FRAMES = ("frame01", "frame12")
MSD_SHAPE = (40, 40, 3)
MSD_AFFINE = np.diag([0.8, 0.8, 5.0, 1.0])


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end bundle runs (seconds each); part of the default run")


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return path


def load_nifti(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def acdc_case(index: int, n_slices: int, shape=ACDC_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A nested RV/Myo/LV blob whose position moves with the case, on random (hence unique per slice) intensities."""
    rng = np.random.default_rng(100 + index)
    h, w = shape
    image = rng.normal(100.0, 20.0, size=(h, w, n_slices)).astype(np.float32)
    label = np.zeros((h, w, n_slices), dtype=np.uint8)
    r0, c0 = 6 + index % 3, 8 + index % 4
    label[r0 : r0 + 16, c0 : c0 + 14] = 1
    label[r0 + 2 : r0 + 14, c0 + 2 : c0 + 12] = 2
    label[r0 + 5 : r0 + 11, c0 + 5 : c0 + 9] = 3
    image[label == 3] += 150.0
    return image, label


def bad_dataset_dir(root: Path, kind: str) -> Path:
    """A ``--dataset_dir`` that holds no data: ``missing``, an ``empty`` folder, or a ``foreign`` one (a note)."""
    target = Path(root) / "data"
    if kind != "missing":
        target.mkdir(parents=True)
    if kind == "foreign":
        (target / "notes.txt").write_text("not a data set")
    return target


def write_acdc(root: Path, n_cases: int = 4, splits: dict | None = None, frames=ACDC_FRAMES) -> Path:
    """``patientNNN/patientNNN_frameNN[_gt].nii.gz``; slice counts alternate 3/4 so that per-volume offsets matter."""
    root = Path(root)
    for i in range(n_cases):
        case = f"patient{i + 1:03d}"
        for f, frame in enumerate(frames):
            image, label = acdc_case(10 * i + f, 3 + i % 2)
            save_nifti(root / case / f"{case}_{frame}.nii.gz", image)
            save_nifti(root / case / f"{case}_{frame}_gt.nii.gz", label)
    if splits is not None:
        (root / "splits.json").write_text(json.dumps(splits))
    return root


def msd_case(index: int, shape=MSD_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """Air around a soft-tissue body, a liver (label 1) holding a tumour (label 2), and strips exactly at the
    window edges (-70 and 180 HU) so the windowing end points can be checked."""
    rng = np.random.default_rng(200 + index)
    h, w, s = shape
    image = np.full(shape, -1000.0, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    image[4:-4, 4:-4] = 0.0
    image[2:4, 4:-4] = -70.0
    image[-4:-2, 4:-4] = 180.0
    r0 = 10 + index % 3
    image[r0 : r0 + 18, 10:30] = rng.uniform(40, 60, size=(18, 20, s))
    label[r0 : r0 + 18, 10:30] = 1
    image[r0 + 5 : r0 + 11, 16:24] = rng.uniform(100, 150, size=(6, 8, s))
    label[r0 + 5 : r0 + 11, 16:24] = 2
    return image, label


def write_msd(root: Path, n_cases: int = 5, validation: int = 0, binary: bool = False) -> Path:
    """An MSD task folder: ``imagesTr``, ``labelsTr`` and a ``dataset.json`` with paths relative to it; the last
    ``validation`` cases go into a ``"validation"`` section. ``binary`` merges liver and tumour into one target, as
    in the left-atrium set."""
    root = Path(root)
    entries = []
    for i in range(n_cases):
        image, label = msd_case(i)
        if binary:
            label = (label > 0).astype(label.dtype)
        name = f"liver_{i:03d}.nii.gz"
        save_nifti(root / "imagesTr" / name, image.astype(np.int16), MSD_AFFINE)
        save_nifti(root / "labelsTr" / name, label, MSD_AFFINE)
        entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    labels = {"0": "background", "1": "target"} if binary else {"0": "background", "1": "liver", "2": "tumour"}
    content = {"name": "tiny liver", "labels": labels}
    if validation:
        content["training"], content["validation"] = entries[:-validation], entries[-validation:]
    else:
        content["training"] = entries
    (root / "dataset.json").write_text(json.dumps(content, indent=1))
    return root


@pytest.fixture
def acdc_dir(tmp_path) -> Path:
    """Four cases with two frames each; patient003 is the validation case."""
    splits = {"train": ["patient001", "patient002", "patient004"], "val": ["patient003"]}
    return write_acdc(tmp_path / "acdc", splits=splits)


@pytest.fixture
def msd_dir(tmp_path) -> Path:
    return write_msd(tmp_path / "msd")


def run_bundle(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ...`` from the bundle root, as a user runs it; output is captured for asserts."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # two busy cores: OpenMP threads spinning against other jobs make these tiny runs many times slower
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args, "--meta_file", "configs/metadata.json",
           "--logging_file", "configs/logging.conf"]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
