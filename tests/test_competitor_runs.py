"""Every competitor and Table-4 ablation config trains end to end through ``python -m monai.bundle``, on four tiny
phantom cases (three epochs, 48 x 48 patches), and leaves the state its method needs in the checkpoints."""

from pathlib import Path

import pytest
import torch

from conftest import run_bundle
from scripts.geometry import load_weights
from scripts.network import ResidualUNet
from scripts.phantom import write_phantom_dataset

pytestmark = pytest.mark.slow

EPOCHS = 3
SHORT = ["--slice_size", "[64, 64]", "--patch_size", "[48, 48]", "--batch_size", "4", "--warmup_epochs", "1",
         "--full_pseudo_epoch", "1",
         "--cleansing_interval", "1"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("phantom") / "data", n_cases=4, shape=(64, 64, 3))


def _train(data: Path, work: Path, configs: list[str], *extra: str, epochs: int = EPOCHS):
    files = str(["configs/train.json", "configs/quick.json", *configs])
    proc = run_bundle("training", "--config_file", files, "--bundle_root", str(work), "--dataset_dir", str(data),
                      "--output_dir", str(work / "runs"), "--ckpt_dir", str(work / "models"),
                      "--epochs", str(epochs), *SHORT, *extra)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _latest(run_dir: Path, prefix: str) -> dict:
    files = sorted(run_dir.glob(f"{prefix}_*.pt"))
    assert files, f"no {prefix}_*.pt in {run_dir}: {sorted(p.name for p in run_dir.iterdir())}"
    return torch.load(files[-1], map_location="cpu", weights_only=False)


def _net(state: dict) -> ResidualUNet:
    net = ResidualUNet(spatial_dims=2, in_channels=1, out_channels=4)
    net.load_state_dict(state)
    return net


def _history_rows(work: Path) -> int:
    return len((work / "runs" / "history.csv").read_text().strip().splitlines()) - 1


def test_pick_and_learn_trains(phantom, tmp_path):
    _train(phantom, tmp_path, ["configs/methods/pick_and_learn.json"])
    _net(load_weights(tmp_path / "models" / "model.pt"))
    assert _history_rows(tmp_path) == EPOCHS
    quality = _latest(tmp_path / "runs", "quality")
    final = torch.load(tmp_path / "models" / "quality_net_final.pt", map_location="cpu")
    assert set(quality) == set(final) and torch.equal(quality["head.weight"], final["head.weight"])


def test_jocor_trains_saves_and_resumes_both_networks(phantom, tmp_path):
    _train(phantom, tmp_path, ["configs/methods/jocor.json"], "--num_gradual", "1", epochs=1)
    peer = _latest(tmp_path / "runs", "peer")
    assert set(peer) == {"model2", "loss"}
    net1 = load_weights(tmp_path / "models" / "model_final.pt")
    net2 = torch.load(tmp_path / "models" / "model2_final.pt", map_location="cpu")
    _net(net1), _net(net2)
    assert any(not torch.equal(net1[k], net2[k]) for k in net1 if net1[k].is_floating_point())
    assert all(torch.equal(peer["model2"][k], net2[k]) for k in net2)
    # forget rates were estimated in epoch 1 and used from epoch 2 on
    assert peer["loss"]["noise_estimate"][1] > 0

    proc = _train(phantom, tmp_path, ["configs/methods/jocor.json"], "--num_gradual", "1", "--resume", "true",
                  epochs=2)
    assert "restored ['loss', 'model2']" in proc.stdout + proc.stderr
    assert _history_rows(tmp_path) == 2
    assert sorted(p.name for p in (tmp_path / "runs").glob("peer_*.pt")) == ["peer_checkpoint_2.pt"]


def test_confident_learning_trains_on_corrected_labels(phantom, tmp_path):
    _train(phantom, tmp_path, ["configs/methods/confident_learning.json"], "--teacher_epochs", "1")
    store = _latest(tmp_path / "runs", "state")["store"]
    assert len(store["rounds"]) == 1  # one-shot maps, made before epoch 1
    summary = store["rounds"][0]
    assert {"flagged_pixel_fraction", "flag_precision", "flag_recall", "threshold_0"} <= set(summary)
    assert store["labels"].shape[1:] == (64, 64)  # whole slices: the maps are made on the canvas
    assert set(torch.unique(store["labels"]).tolist()) <= {0, 1, 2, 3}
    assert _history_rows(tmp_path) == EPOCHS


def test_superpixel_trains_and_refines(phantom, tmp_path):
    # no waiting for the loss gap, and a refinement every epoch, so that a 3-epoch run refines twice
    _train(phantom, tmp_path, ["configs/methods/superpixel.json"], "--refine_start_epoch", "1",
           "--refine_patience", "0", "--refine_interval", "1", "--num_gradual", "1", "--refine_conf_thres", "0.3")
    store = _latest(tmp_path / "runs", "state")["store"]
    # refinements after epochs 1 and 2 (each run as the next epoch starts)
    assert [r["epoch"] for r in store["rounds"]] == [1, 2]
    assert "pixel_error_refined" in store["rounds"][-1]
    # no more of the foreground's pixels change than the forget rate of the epoch
    assert store["rounds"][-1]["change_rate_fg"] > 0
    assert _latest(tmp_path / "runs", "peer")["model2"]
    assert (tmp_path / "models" / "model2_final.pt").exists()


def test_table4_ablation_cleanses_every_slice(phantom, tmp_path):
    # one end-to-end run: the three ablations differ only in their source, whose configs tests/test_benchmark.py
    # checks and whose outputs tests/test_sources.py checks
    _train(phantom, tmp_path, ["configs/paper.json", "configs/ablations/lcm.json"], epochs=1)
    store = _latest(tmp_path / "runs", "state")["store"]
    assert store["actions"].shape[0] == 1
    assert torch.all(store["actions"] == 2), "without the filter every slice is cleansed in every round"
