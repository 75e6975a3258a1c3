"""Two-process training on CPU (gloo): the cleansing round sees every rank's samples and leaves every rank with the
same pseudo-label store; ``configs/multi_gpu_train.json`` runs under torchrun and writes from rank 0 only.

Each test starts two Python processes on tiny data and takes some 20-40 s on two busy cores.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from scripts.geometry import load_weights
from scripts.network import ResidualUNet
from scripts.phantom import write_phantom_dataset

pytestmark = pytest.mark.slow

TIMEOUT = 240  # seconds for a whole two-process run; a hung collective fails the test instead of the suite


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(procs: list[subprocess.Popen]) -> list[str]:
    """Outputs of all processes; on timeout every process group started here is killed and the test fails."""
    try:
        return [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        outs = [p.communicate()[0] for p in procs]
        pytest.fail(f"no result within {TIMEOUT} s\n" + "\n----\n".join(o[-3000:] for o in outs))


def _same_store(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"ranks differ in store '{key}'"
        else:
            assert a[key] == b[key], f"ranks differ in store '{key}'"


def test_two_ranks_gather_losses_and_hold_the_same_store(tmp_path):
    """tests/dist_worker.py in two processes: DDP training, a cleansing round after each of two epochs."""
    port = str(_free_port())
    procs = [
        subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "dist_worker.py"), str(tmp_path)], cwd=REPO_ROOT,
                         env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=port),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for r in (0, 1)
    ]
    outs = _wait(procs)
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} exited {p.returncode}\n{out[-4000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [x["rank"] for x in ranks] == [0, 1] and all(x["world_size"] == 2 for x in ranks)

    # the store: labels, verdicts and history are the same on both ranks after the last round
    store = ranks[0]["store"]
    _same_store(store, ranks[1]["store"])
    assert store["labels"].shape == (15, 32, 32)
    assert store["actions"].shape == (2, 15) and [r["epoch"] for r in store["rounds"]] == [1, 2]
    assert store["has_pseudo"].all()

    # the GMMs saw every sample's loss on every rank: the gathered vectors are equal, and each rank's own share
    # (samples rank, rank + 2, ...) is what its network gives those samples when computed locally
    for i in range(2):
        gathered = [x["rounds"][i]["gathered_manual_loss"] for x in ranks]
        assert gathered[0].shape == (15,) and torch.equal(gathered[0], gathered[1])
        assert torch.equal(ranks[0]["rounds"][i]["gathered_pseudo_loss"], ranks[1]["rounds"][i]["gathered_pseudo_loss"])
        assert (gathered[0] > 0).all(), "a sample's loss stayed at the zero it was initialised with"
        for r in (0, 1):
            local = ranks[r]["rounds"][i]["local_manual_loss"]
            # same weights and batch-norm statistics; only the batch composition differs (float32 round-off)
            torch.testing.assert_close(gathered[r][r::2], local[r::2], rtol=0, atol=1e-5)

    # PseudoLabelStore.broadcast: rank 1's diverged store became rank 0's fresh one, in its own shared tensor
    probes = [x["probe"] for x in ranks]
    _same_store(probes[0]["state"], probes[1]["state"])
    assert probes[1]["state"]["labels"].max() == 0 and not probes[1]["state"]["has_pseudo"].any()
    assert probes[1]["state"]["rounds"] == []
    assert all(p["in_place"] and p["shared"] for p in probes)

    # DistributedDataParallel kept the weights equal although the ranks started from different seeds
    w0, w1 = ranks[0]["weights"], ranks[1]["weights"]
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)


SAVE_STORES = """{
    "finalize": [
        "$torch.save(@train#store.state_dict(), os.path.join(@output_dir, 'store_rank%d.pt' % dist.get_rank()))",
        "$dist.is_initialized() and dist.barrier()",
        "$dist.is_initialized() and dist.destroy_process_group()"
    ]
}
"""


def test_torchrun_multi_gpu_config(tmp_path):
    """The documented command with configs/multi_gpu_train.json, two CPU processes, two epochs, two rounds."""
    data = write_phantom_dataset(tmp_path / "data", n_cases=4, shape=(64, 64, 3))
    work = tmp_path / "work"
    # test-only addition: every rank saves its store when the run ends, so the two can be compared
    extra = tmp_path / "save_stores.json"
    extra.write_text(SAVE_STORES)
    configs = str(["configs/train.json", "configs/quick.json", "configs/multi_gpu_train.json", str(extra)])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", "training", "--config_file", configs,
           "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
           "--bundle_root", str(work), "--dataset_dir", str(data),
           "--output_dir", str(work / "runs"), "--ckpt_dir", str(work / "models"),
           "--slice_size", "[64, 64]", "--patch_size", "[48, 48]",
           "--epochs", "2", "--warmup_epochs", "1", "--full_pseudo_epoch", "2", "--cleansing_interval", "1",
           "--batch_size", "4"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    out = _wait([proc])[0]
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}\n{out[-6000:]}"

    # checkpoints hold the state dict of the unwrapped network (no "module." prefix from DDP) beside the geometry
    for name in ("model.pt", "model_final.pt"):
        net = ResidualUNet(spatial_dims=2, in_channels=1, out_channels=4)
        net.load_state_dict(load_weights(work / "models" / name))
    runs = work / "runs"
    stores = [torch.load(runs / f"store_rank{r}.pt", weights_only=False) for r in (0, 1)]
    _same_store(*stores)
    assert [r["epoch"] for r in stores[0]["rounds"]] == [1, 2]

    # rank 0 alone writes: one row per epoch / round, one process's TensorBoard files, rank 1 logs no INFO lines
    with open(runs / "history.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]
    with open(runs / "cleansing_rounds.csv") as f:
        assert [row["round"] for row in csv.DictReader(f)] == ["1", "2"]
    writers = {p.name.split(".")[-2] for p in runs.glob("events.out.tfevents.*")}
    assert len(writers) == 1, f"TensorBoard files from several processes: {sorted(runs.glob('events.*'))}"
    assert out.count("cleansing round 1 (epoch 1)") == 1, out[-4000:]
    assert out.count("Train completed, saved final checkpoint") == 1, out[-4000:]
