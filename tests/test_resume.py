"""Interrupted runs: a training process killed with SIGKILL resumes from its last checkpoint and ends exactly where
an uninterrupted run with the same seed ends.

The kill is real: the training runs as ``python -m monai.bundle run training`` in a child process, a small hook
(written by the test, merged in through an extra config) drops a marker file at the chosen moment and waits, and
the test sends SIGKILL as soon as the marker appears. The resumed run is the user's command plus ``--resume true``.

On one CPU thread every computation of the run repeats bit for bit (same data order, augmentation draws, GMM
seeds), so the comparison is exact: weights, pseudo-labels, verdict history and the per-epoch CSV rows.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, run_bundle
from scripts.geometry import load_weights
from scripts.phantom import write_phantom_dataset

pytestmark = pytest.mark.slow

EPOCHS = 4
KILL_EPOCH = 3
ARGS = ["--slice_size", "[64, 64]", "--patch_size", "[48, 48]", "--batch_size", "4", "--warmup_epochs", "1",
        "--full_pseudo_epoch", "2",
        "--cleansing_interval", "1"]

# The hook stops the run at a chosen point of epoch KILL_EPOCH: after an optimiser step in the middle of the epoch
# ("iteration"), or inside the cleansing round, once Y' has been replaced in memory and the round's row has been
# logged but before any checkpoint holds it ("round").
KILLPOINT = '''
import time
from pathlib import Path

from ignite.engine import Events

from scripts.engine import CleansingEvents


class KillPoint:
    def __init__(self, where, epoch, marker):
        self.where, self.epoch, self.marker = where, epoch, marker

    def install(self, trainer):
        event = Events.ITERATION_COMPLETED if self.where == "iteration" else CleansingEvents.LABELS_CLEANSED
        trainer.add_event_handler(event, self.stop)

    def stop(self, engine):
        in_epoch = (engine.state.iteration - 1) % engine.state.epoch_length
        if engine.state.epoch != self.epoch or (self.where == "iteration" and in_epoch != 1):
            return
        Path(self.marker).write_text(f"{self.where} epoch {engine.state.epoch} iteration {engine.state.iteration}")
        time.sleep(300)  # the test kills the process here
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("resume") / "data", n_cases=6, shape=(48, 48, 3))


def _args(data: Path, work: Path) -> list[str]:
    return ["--bundle_root", str(work), "--dataset_dir", str(data),
            "--output_dir", str(work / "runs"), "--ckpt_dir", str(work / "models"), "--epochs", str(EPOCHS), *ARGS]


def _configs(*extra: str) -> str:
    return str(["configs/train.json", "configs/quick.json", *extra])


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("uninterrupted")
    _ok(run_bundle("training", "--config_file", _configs(), *_args(data, work)))
    return work


def _kill_during(data: Path, work: Path, where: str) -> str:
    """Start the training with the hook, SIGKILL it at the marker, return what the marker says."""
    hook_dir = work / "hook"
    hook_dir.mkdir(parents=True)
    (hook_dir / "killpoint.py").write_text(KILLPOINT)
    marker = work / "killed_at.txt"
    (hook_dir / "kill.json").write_text(json.dumps({
        "kill": {"_target_": "killpoint.KillPoint", "where": where, "epoch": KILL_EPOCH, "marker": str(marker)},
        "run": ["$@kill.install(@train#trainer)", "$@train#trainer.run()"],
    }))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(hook_dir), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training",
           "--config_file", _configs(str(hook_dir / "kill.json")), *_args(data, work),
           "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf"]
    log = open(work / "killed_run.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the kill point:\n" + \
                (work / "killed_run.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the kill point was not reached in time"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    return marker.read_text()


def _state(work: Path) -> dict:
    states = sorted((work / "runs").glob("state_*.pt"))
    assert len(states) == 1, states
    return torch.load(states[0], map_location="cpu", weights_only=False)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("where", ["iteration", "round"])
def test_killed_run_resumes_to_the_uninterrupted_end_state(data, uninterrupted, tmp_path, where):
    work = tmp_path / where
    said = _kill_during(data, work, where)
    assert said.startswith(f"{where} epoch {KILL_EPOCH}")
    # the kill left the last complete checkpoint, of the epoch before, readable
    before = _state(work)
    assert before["trainer"]["iteration"] // before["trainer"]["epoch_length"] == KILL_EPOCH - 1
    assert len(before["store"]["rounds"]) == KILL_EPOCH - 1
    assert not list((work / "runs").glob("*.tmp"))

    _ok(run_bundle("training", "--config_file", _configs(), *_args(data, work), "--resume", "true"))

    got, want = _state(work), _state(uninterrupted)
    assert got["trainer"]["iteration"] == want["trainer"]["iteration"]
    for key in ("labels", "has_pseudo", "actions", "manual_clean_prob", "pseudo_clean_prob"):
        assert torch.equal(got["store"][key], want["store"][key]), key
    assert got["store"]["rounds"] == want["store"]["rounds"]
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    assert got["best_model"]["best_metric"] == want["best_model"]["best_metric"]
    assert got["best_model"]["best_metric_epoch"] == want["best_model"]["best_metric_epoch"]
    for ckpt in ("model.pt", "model_final.pt"):  # B-model and L-model
        a, b = load_weights(work / "models" / ckpt), load_weights(uninterrupted / "models" / ckpt)
        assert all(torch.equal(a[k], b[k]) for k in b), ckpt
    # per-epoch and per-round logs: every epoch once, with the uninterrupted run's values
    for csv_name in ("history.csv", "cleansing_rounds.csv"):
        assert _rows(work / "runs" / csv_name) == _rows(uninterrupted / "runs" / csv_name), csv_name


def test_same_seed_gives_the_same_noise_verdicts_and_pseudo_labels(data, uninterrupted, tmp_path):
    """Two runs with the same seed draw the same noisy labels, reach the same GMM verdicts in every round and
    write the same pseudo-labels; another noise seed changes the noisy labels."""
    work = tmp_path / "again"
    _ok(run_bundle("training", "--config_file", _configs(), *_args(data, work)))
    got, want = _state(work), _state(uninterrupted)
    for key in ("labels", "actions", "manual_clean_prob", "pseudo_clean_prob"):
        assert torch.equal(got["store"][key], want["store"][key]), key
    assert got["store"]["actions"].shape[0] == EPOCHS  # a round at every epoch: the verdicts of each one matched

    from monai.bundle import ConfigParser

    def noisy_labels(seed: int) -> torch.Tensor:
        parser = ConfigParser()
        parser.read_config(["configs/train.json", "configs/quick.json"])
        parser.update({"bundle_root": str(tmp_path), "dataset_dir": str(data), "data_root": str(data),
                       "phantom_label_noise#seed": seed})
        dataset = parser.get_parsed_content("train#dataset")
        return dataset.labels()

    first, second, other = noisy_labels(0), noisy_labels(0), noisy_labels(1)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
