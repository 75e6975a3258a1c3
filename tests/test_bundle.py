"""End-to-end runs of the bundle's configs on tiny data sets, through ``python -m monai.bundle`` as a user runs them.

Each run takes a few seconds: two epochs on four 64 x 64 x 3 phantom cases with a 48 x 48 patch.
"""

import csv
import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser

from conftest import REPO_ROOT, bad_dataset_dir, load_nifti, run_bundle, save_nifti, write_msd
from scripts.geometry import load_weights
from scripts.network import ResidualUNet
from scripts.phantom import write_phantom_dataset

pytestmark = pytest.mark.slow

PATCH = "[48, 48]"
SLICE = "[64, 64]"
SHORT = ["--warmup_epochs", "1", "--full_pseudo_epoch", "2", "--cleansing_interval", "1",
         "--batch_size", "4"]


def _train(data: Path, work: Path, *configs: str, epochs: int = 2, extra: tuple = ()):
    files = str(["configs/train.json", *configs])
    args = ["training", "--config_file", files, "--bundle_root", str(work), "--dataset_dir", str(data),
            "--output_dir", str(work / "runs"), "--ckpt_dir", str(work / "models"),
            "--slice_size", SLICE, "--patch_size", PATCH, "--epochs", str(epochs), *SHORT, *extra]
    return run_bundle(*args)


def _infer(data: Path, out: Path, ckpt: Path, *extra: str):
    return run_bundle("--config_file", "configs/inference.json", "--bundle_root", str(out.parent),
                      "--dataset_dir", str(data), "--output_dir", str(out),
                      "--ckpt_path", str(ckpt), "--slice_size", SLICE, "--patch_size", PATCH, *extra)


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _load_net(path: Path, out_channels: int = 4) -> ResidualUNet:
    net = ResidualUNet(spatial_dims=2, in_channels=1, out_channels=out_channels)
    net.load_state_dict(load_weights(path))
    return net


def _state(run_dir: Path) -> dict:
    states = sorted(run_dir.glob("state_*.pt"))
    assert states, f"no state_*.pt in {run_dir}: {sorted(p.name for p in run_dir.iterdir())}"
    return torch.load(states[-1], map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("phantom") / "data", n_cases=4, shape=(64, 64, 3))


@pytest.fixture(scope="module")
def trained(phantom, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("self_cleansing")
    _ok(_train(phantom, work, "configs/quick.json"))
    return work


# ---------------------------------------------------------------- training


def _train_slices(phantom: Path) -> int:
    splits = json.loads((phantom / "splits.json").read_text())
    return sum(load_nifti(phantom / c / f"{c}_frame01.nii.gz").shape[-1] for c in splits["train"])


def test_self_cleansing_training(trained, phantom):
    models = trained / "models"
    for name in ("model.pt", "model_final.pt"):
        net = _load_net(models / name).eval()
        with torch.no_grad():
            assert net(torch.zeros(1, 1, 48, 48)).shape == (1, 4, 48, 48)
    store = _state(trained / "runs")["store"]
    n = _train_slices(phantom)
    assert store["labels"].shape == (n, 64, 64)  # the whole slice canvas: the round sees whole slices
    assert store["has_pseudo"].all(), "after a cleansing round every sample has a pseudo-label"
    # class labels, or 255 where the default's agreement rule leaves a contested pixel unsupervised
    assert set(torch.unique(store["labels"]).tolist()) <= {0, 1, 2, 3, 255}
    # rounds at the end of epochs 1 and 2 (start = warm-up = 1, interval 1)
    assert store["actions"].shape == (2, n)
    assert [r["epoch"] for r in store["rounds"]] == [1, 2]


def test_second_training_on_cleansed_labels_with_repair_options(trained, phantom, tmp_path):
    """A new network trained from the store of the ``trained`` run, with the optional repair rules switched on."""
    first = _state(trained / "runs")["store"]
    source = sorted((trained / "runs").glob("state_checkpoint_*.pt"))[-1]
    second = tmp_path / "second"
    _ok(run_bundle("training", "--config_file", str(["configs/train.json", "configs/quick.json",
                                                     "configs/variants/repair_fill.json"]),
                   "--bundle_root", str(second), "--dataset_dir", str(phantom),
                   "--output_dir", str(second / "runs"), "--ckpt_dir", str(second / "models"),
                   "--slice_size", SLICE, "--patch_size", PATCH, "--epochs", "1", *SHORT,
                   "--train#store#source", str(source),
                   "--train#cleansing#slice_pass#flip_average", "true"))
    store = _state(second / "runs")["store"]
    # the history goes on from the first run's two rounds; the labels it started from were the first run's
    assert [r["epoch"] for r in store["rounds"]] == [1, 2, 1]
    assert torch.equal(store["actions"][:2], first["actions"])
    assert "repaired_structures" in store["rounds"][-1]


def test_soft_dice_training_leaves_out_the_classes_y_prime_does_not_hold(phantom, tmp_path):
    """Under soft Dice the default turns cleansed_absent_unknown on and says so; the pseudo term then reads the
    classes Y' states through dataset, batch and loss for two epochs after the first round."""
    proc = _train(phantom, tmp_path, "configs/quick.json", epochs=3, extra=("--train_loss#kind", "dice"))
    _ok(proc)
    assert "cleansed_absent_unknown='auto': on for a SegmentationLoss(kind='dice')" in proc.stdout + proc.stderr
    assert [r["epoch"] for r in _state(tmp_path / "runs")["store"]["rounds"]] == [1, 2, 3]


def test_baseline_training(phantom, tmp_path):
    _ok(_train(phantom, tmp_path, "configs/quick.json", "configs/baseline.json"))
    _load_net(tmp_path / "models" / "model.pt")
    _load_net(tmp_path / "models" / "model_final.pt")
    store = _state(tmp_path / "runs")["store"]
    # no cleansing handler: the store was never sized, let alone filled
    assert store["labels"].numel() == 0 and store["rounds"] == []


def test_ct_training_and_inference_on_msd_datalist(tmp_path):
    """configs/ct.json overlays both train.json and inference.json."""
    data = write_msd(tmp_path / "msd", n_cases=5)
    work = tmp_path / "work"
    args = ["training", "--config_file", str(["configs/train.json", "configs/ct.json", "configs/quick.json"]),
            "--bundle_root", str(work), "--dataset_dir", str(data), "--output_dir", str(work / "runs"),
            "--ckpt_dir", str(work / "models"), "--resize", "[32, 32]", "--epochs", "2", *SHORT]
    _ok(run_bundle(*args))
    _load_net(work / "models" / "model_final.pt", out_channels=1)
    store = _state(work / "runs")["store"]
    assert store["labels"].shape == (4 * 3, 32, 32)  # 4 of 5 cases train, 3 slices each
    assert set(torch.unique(store["labels"]).tolist()) <= {0, 1, 255}

    out = tmp_path / "seg"
    _ok(run_bundle("--config_file", str(["configs/inference.json", "configs/ct.json"]), "--bundle_root", str(work),
                   "--dataset_dir", str(data), "--output_dir", str(out), "--ckpt_path",
                   str(work / "models" / "model_final.pt"), "--resize", "[32, 32]"))
    assert len(list(out.iterdir())) == 5
    for i in range(5):
        src = nib.load(str(data / "imagesTr" / f"liver_{i:03d}.nii.gz"))
        seg = nib.load(str(out / f"liver_{i:03d}_seg.nii.gz"))
        # resized to the patch for the network and back to the scan's grid for the mask
        assert seg.shape == src.shape
        np.testing.assert_allclose(seg.affine, src.affine, atol=1e-5)
        assert set(np.unique(np.asanyarray(seg.dataobj)).tolist()) <= {0, 1}


# ---------------------------------------------------------------- inference


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def infer_inputs(phantom, tmp_path) -> Path:
    """Two phantom images re-saved with other affines and shapes, and a label file inference must skip."""
    folder = tmp_path / "in"
    a = nib.load(str(phantom / "patient001" / "patient001_frame01.nii.gz"))
    rotated = np.array([[0.0, -1.5, 0.0, 10.0], [1.5, 0.0, 0.0, -20.0], [0.0, 0.0, 8.0, 5.0], [0.0, 0.0, 0.0, 1.0]])
    save_nifti(folder / "case_a.nii.gz", np.asanyarray(a.dataobj), rotated)
    b = np.asanyarray(nib.load(str(phantom / "patient002" / "patient002_frame01.nii.gz")).dataobj)
    save_nifti(folder / "case_b.nii.gz", b[2:58, 1:61, :2], np.diag([1.2, 1.3, 6.0, 1.0]))
    shutil.copy(phantom / "patient002" / "patient002_frame01_gt.nii.gz", folder / "case_b_gt.nii.gz")
    save_nifti(folder / "case_c.nii.gz", b[:, :, 1:2])  # a single-slice volume keeps its (H, W, 1) shape
    return folder


def test_inference(trained, infer_inputs, tmp_path):
    out = tmp_path / "seg"
    before = _digest(infer_inputs)
    _ok(_infer(infer_inputs, out, trained / "models" / "model.pt"))
    assert sorted(p.name for p in out.iterdir()) == ["case_a_seg.nii.gz", "case_b_seg.nii.gz", "case_c_seg.nii.gz"]
    for name in ("case_a", "case_b", "case_c"):
        src = nib.load(str(infer_inputs / f"{name}.nii.gz"))
        seg = nib.load(str(out / f"{name}_seg.nii.gz"))
        assert seg.shape == src.shape
        np.testing.assert_allclose(seg.affine, src.affine, atol=1e-5)
        values = set(np.unique(np.asanyarray(seg.dataobj)).tolist())
        assert values <= {0, 1, 2, 3}
    first = _digest(out)

    again = _infer(infer_inputs, out, trained / "models" / "model.pt")
    assert again.returncode != 0
    assert "already exist" in again.stderr and "case_a_seg.nii.gz" in again.stderr
    assert _digest(out) == first, "a refused run must leave earlier results alone"

    _ok(_infer(infer_inputs, out, trained / "models" / "model.pt", "--overwrite", "true"))
    assert sorted(p.name for p in out.iterdir()) == ["case_a_seg.nii.gz", "case_b_seg.nii.gz", "case_c_seg.nii.gz"]
    assert _digest(infer_inputs) == before, "inference must never modify its inputs"


def test_truncated_input_fails_before_any_output(phantom, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for case in ("patient001", "patient002"):
        shutil.copy(phantom / case / f"{case}_frame01.nii.gz", folder / f"{case}.nii.gz")
    broken = folder / "patient002.nii.gz"
    broken.write_bytes(broken.read_bytes()[:-200])  # cut inside the gzip stream, as an interrupted copy leaves it
    out = tmp_path / "seg"
    proc = _infer(folder, out, REPO_ROOT / "models" / "model.pt")
    assert proc.returncode != 0
    assert str(broken) in proc.stderr and "cannot be read" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists() or not any(out.iterdir()), "no mask may be written when an input is unreadable"


@pytest.mark.parametrize("kind", ["missing", "empty", "foreign"])
def test_bad_dataset_dir_fails_without_writing(kind, tmp_path):
    target = bad_dataset_dir(tmp_path, kind)
    before = sorted(p.name for p in target.iterdir()) if target.exists() else None
    work = tmp_path / "work"
    runs = [
        run_bundle("--config_file", "configs/inference.json", "--bundle_root", str(work), "--dataset_dir",
                   str(target), "--output_dir", str(tmp_path / "seg")),
        run_bundle("training", "--config_file", str(["configs/train.json", "configs/quick.json"]), "--bundle_root",
                   str(work), "--dataset_dir", str(target), "--epochs", "1"),
    ]
    for proc in runs:
        assert proc.returncode != 0
        assert str(target) in proc.stderr, proc.stderr[-3000:]
    # nothing generated into a folder the user named: a typo must not turn into a phantom training run
    assert (sorted(p.name for p in target.iterdir()) if target.exists() else None) == before
    assert not (tmp_path / "seg").exists()


def test_profile_geometry_travels_with_the_checkpoint(phantom, tmp_path):
    """A model trained at half scale segments at half scale, through the same keys, and is refused at another."""
    work = tmp_path / "work"
    _ok(run_bundle("training", "--config_file", str(["configs/train.json", "configs/quick.json"]), "--bundle_root",
                   str(work), "--dataset_dir", str(phantom), "--output_dir", str(work / "runs"), "--ckpt_dir",
                   str(work / "models"), "--scale", "0.5", "--slice_size", "[32, 32]", "--patch_size", "[24, 24]",
                   "--epochs", "1", *SHORT))
    ckpt = work / "models" / "model_final.pt"
    assert torch.load(ckpt, weights_only=True)["geometry"]["scale"] == 0.5
    state = _state(work / "runs")["store"]
    assert state["labels"].shape[1:] == (32, 32)  # 64 x 64 phantom slices at half scale

    out = tmp_path / "seg"
    _ok(run_bundle("--config_file", "configs/inference.json", "--bundle_root", str(work), "--dataset_dir",
                   str(phantom), "--output_dir", str(out), "--ckpt_path", str(ckpt), "--scale", "0.5"))
    image = phantom / "patient001" / "patient001_frame01.nii.gz"
    assert nib.load(str(out / "patient001_frame01_seg.nii.gz")).shape == nib.load(str(image)).shape

    refused = tmp_path / "seg_native"
    proc = run_bundle("--config_file", "configs/inference.json", "--bundle_root", str(work), "--dataset_dir",
                      str(phantom), "--output_dir", str(refused), "--ckpt_path", str(ckpt))
    assert proc.returncode != 0
    assert "another input geometry" in proc.stderr and "scale: trained with 0.5" in proc.stderr
    assert not refused.exists() or not any(refused.iterdir())


# ---------------------------------------------------------------- evaluation


class FixedPrediction(torch.nn.Module):
    """Predicts the same label map for every slice; the map comes from the checkpoint, so that the evaluation's
    CheckpointLoader is exercised too."""

    def __init__(self, shape, classes: int = 4) -> None:
        super().__init__()
        self.classes = classes
        self.register_buffer("prediction", torch.zeros(shape, dtype=torch.long))

    def forward(self, x):
        logits = F.one_hot(self.prediction, self.classes).permute(2, 0, 1).float() * 10.0
        return logits[None].repeat(x.shape[0], 1, 1, 1).to(x.dtype)


def _bands(classes_by_band):
    """A 32 x 32 map with three horizontal 8-row bands in rows 4..27, cols 4..27 (the bounding box is centred, so
    the heart-centred 32 x 32 crop leaves the volume as it is)."""
    m = np.zeros((32, 32), np.uint8)
    for k, c in enumerate(classes_by_band):
        m[4 + 8 * k : 12 + 8 * k, 4:28] = c
    return m


def test_evaluate_dice_report(tmp_path):
    prediction = _bands([1, 2, 3])
    # case 1: RV, LV exact; Myo labelled on half its predicted rows -> 2*96/(192+96) = 2/3 per slice
    label1 = prediction.copy()
    label1[16:20, 4:28] = 0
    # case 2: RV and LV swapped -> 0, Myo exact -> 1
    label2 = _bands([3, 2, 1])
    data = tmp_path / "acdc"
    for case, label in (("patient001", label1), ("patient002", label2)):
        vol = np.repeat(label[..., None], 2, axis=-1)
        save_nifti(data / case / f"{case}_frame01.nii.gz", vol.astype(np.float32) * 10 + 1)
        save_nifti(data / case / f"{case}_frame01_gt.nii.gz", vol)
    (data / "splits.json").write_text(json.dumps({"train": [], "val": ["patient001", "patient002"]}))

    ckpt_dir = tmp_path / "models"
    ckpt_dir.mkdir()
    stub = FixedPrediction((32, 32))
    stub.prediction.copy_(torch.as_tensor(prediction))
    torch.save(stub.state_dict(), ckpt_dir / "model.pt")

    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / "configs" / "train.json"), str(REPO_ROOT / "configs" / "evaluate.json")])
    parser.update({"bundle_root": str(tmp_path), "data_root": str(data), "output_dir": str(tmp_path / "runs"),
                   "ckpt_dir": str(ckpt_dir), "patch_size": [32, 32], "device": torch.device("cpu"),
                   "network_def": FixedPrediction((32, 32))})
    parser.get_parsed_content("run")

    with open(tmp_path / "runs" / "eval" / "dice_per_volume.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["volume", "RV", "Myo", "LV", "mean"]
    expected = {"patient001_frame01.nii.gz": [1.0, 2 / 3, 1.0], "patient002_frame01.nii.gz": [0.0, 1.0, 0.0]}
    assert len(rows) == 3
    for row in rows[1:]:
        want = expected[Path(row[0]).name]
        np.testing.assert_allclose([float(v) for v in row[1:]], want + [np.mean(want)], atol=1e-4)
    class_dice = parser.get_parsed_content("validate#evaluator").state.class_dice
    np.testing.assert_allclose([class_dice[k] for k in ("RV", "Myo", "LV")], [0.5, 5 / 6, 0.5], atol=1e-4)


# ---------------------------------------------------------------- bad input through the bundle


@pytest.fixture
def small_phantom(tmp_path) -> Path:
    return write_phantom_dataset(tmp_path / "data", n_cases=4, shape=(48, 48, 2))


def _first_train_case(root: Path) -> str:
    return json.loads((root / "splits.json").read_text())["train"][0]


def test_missing_file_is_named(small_phantom, tmp_path):
    case = _first_train_case(small_phantom)
    missing = small_phantom / case / f"{case}_frame01_gt.nii.gz"
    missing.unlink()
    proc = _train(small_phantom, tmp_path / "work", "configs/quick.json", epochs=1)
    assert proc.returncode != 0
    assert f"label file not found: {missing}" in proc.stderr
    assert not (tmp_path / "work" / "models" / "model_final.pt").exists()


def test_unexpected_label_value_is_named(small_phantom, tmp_path):
    case = _first_train_case(small_phantom)
    gt = small_phantom / case / f"{case}_frame01_gt.nii.gz"
    img = nib.load(str(gt))
    label = np.asanyarray(img.dataobj).copy()
    label[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(label, img.affine), str(gt))
    proc = _train(small_phantom, tmp_path / "work", "configs/quick.json", epochs=1)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if gt.name in line and "7" in line.replace(str(gt), "")]
    assert lines, proc.stderr[-4000:]
    assert not (tmp_path / "work" / "models" / "model_final.pt").exists()


def test_resume_continues_with_the_store(phantom, tmp_path):
    """A run stopped after epoch 2 and resumed to epoch 3 ends in the state of a 3-epoch run's bookkeeping:
    the epoch counter, the store's rounds and verdict history continue instead of starting over."""
    work = tmp_path / "resumed"
    _ok(_train(phantom, work, "configs/quick.json", epochs=2))
    first = _state(work / "runs")
    epoch = lambda state: state["trainer"]["iteration"] // state["trainer"]["epoch_length"]  # noqa: E731
    assert epoch(first) == 2 and len(first["store"]["rounds"]) == 2
    _ok(run_bundle("training", "--config_file", str(["configs/train.json", "configs/quick.json"]),
                   "--bundle_root", str(work), "--dataset_dir", str(phantom),
                   "--output_dir", str(work / "runs"), "--ckpt_dir", str(work / "models"),
                   "--slice_size", SLICE, "--patch_size", PATCH,
                   "--epochs", "3", *SHORT, "--resume", "true"))
    second = _state(work / "runs")
    assert epoch(second) == 3 and second["trainer"]["max_epochs"] == 3
    store = second["store"]
    assert len(store["rounds"]) == 3 and store["actions"].shape[0] == 3
    # the history up to the interruption is the one the first run wrote
    assert torch.equal(store["actions"][:2], first["store"]["actions"])
    assert [r["epoch"] for r in store["rounds"]] == [1, 2, 3]
