"""The bundle served by a real MONAI Label server (``monailabel start_server``), as docs/monailabel.md describes.

The module builds, in a temporary folder: the ``monaibundle`` sample app (copied out of the monailabel install with
``monailabel apps --download``), a copy of this bundle in the app's ``model/`` folder with a checkpoint trained for
a few epochs on small phantoms, and a studies folder of phantom volumes whose labels sit where MONAI Label's local
datastore keeps final labels (``labels/final/``). It then starts the server on a free loopback port and talks to it
over REST: ``GET /info/``, ``POST /infer/<model>`` (auto-segmentation of a volume) and ``POST /train/<model>`` (one
epoch of the bundle's training, run by the server in its own training process).

The server process and everything it starts run in their own process group, which teardown ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, load_nifti
from scripts.phantom import write_phantom_dataset

pytestmark = pytest.mark.slow

MODEL = "self_cleansing_segmentation"  # the folder name; MONAI Label takes the task type ("segmentation") from it
SHAPE = (64, 64, 3)
N_CASES = 4
STARTUP_S = 240  # the server imports torch, MONAI and the app, then loads the bundle: about a minute on 2 cores
TRAIN_S = 300  # one epoch on a few small volumes, plus the training process loading the app again
POLL_S = 1.0


def _env() -> dict:
    env = dict(os.environ)
    # two shared cores: OpenMP threads spinning against other jobs make these small runs many times slower
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("PYTHONPATH", None)
    return env


def _copy_bundle(dst: Path) -> Path:
    """The bundle's own files, as a user would place them in ``<app>/model/<name>``; no data, runs or checkpoints."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    dst.mkdir(parents=True)
    for name in ("configs", "scripts", "docs"):
        shutil.copytree(REPO_ROOT / name, dst / name, ignore=ignore)
    shutil.copy(REPO_ROOT / "LICENSE", dst / "LICENSE")
    (dst / "models").mkdir()
    return dst


def _bundle_command(bundle: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run ...`` from the served bundle copy, as a user runs it there."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args,
           "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
           "--bundle_root", str(bundle)]
    env = _env()
    env["PYTHONPATH"] = str(bundle)
    proc = subprocess.run(cmd, cwd=bundle, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def _train_checkpoint(bundle: Path, data: Path) -> None:
    """models/model.pt for inference: a few epochs of the bundle's Baseline recipe on the phantoms, run from the
    bundle copy itself."""
    _bundle_command(bundle, "training",
                    "--config_file", "['configs/train.json','configs/quick.json','configs/baseline.json']",
                    "--dataset_dir", str(data),
                    "--epochs", "4", "--batch_size", "4", "--slice_size", "[64, 64]", "--patch_size", "[48, 48]")
    assert (bundle / "models" / "model.pt").is_file(), sorted(p.name for p in (bundle / "models").iterdir())
    # what the server's training must produce afresh
    (bundle / "models" / "model_final.pt").unlink()
    shutil.rmtree(bundle / "runs")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``monailabel start_server`` process on 127.0.0.1 with its log in a file."""

    def __init__(self, app: Path, studies: Path, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
               "--conf", "models", MODEL,
               "--conf", "zoo_source", "github",  # any value but the default: the local bundle, no zoo listing
               "--conf", "sam2", "false",  # else SAM2 weights are downloaded at start
               "--host", "127.0.0.1", "--port", str(self.port)]
        self._log_file = open(log, "w")
        # a session of its own, so teardown can end the server and the training process it starts as one group
        self.proc = subprocess.Popen(cmd, cwd=app, env=_env(), stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def log_tail(self, n: int = 6000) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")[-n:]

    def request(self, method: str, path: str, body: dict | None = None, form: dict | None = None,
                timeout: float = 120) -> tuple[int, bytes]:
        """``body`` goes as JSON (the train endpoint's parameters), ``form`` as form fields (the infer endpoint's
        ``params``)."""
        headers, data = {}, None
        if body is not None:
            headers["Content-Type"], data = "application/json", json.dumps(body).encode()
        elif form is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            data = urllib.parse.urlencode(form).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def wait_ready(self, timeout: float = STARTUP_S) -> dict:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / POLL_S) + 1):
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode} while starting:\n"
                                     f"{self.log_tail()}")
            try:
                status, body = self.request("GET", "/info/", timeout=10)
                if status == 200:
                    return json.loads(body)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        raise AssertionError(f"the server did not answer /info/ within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
            except ProcessLookupError:
                pass
        # the training process shares the group; make sure nothing of it is left either
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log_file.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("monailabel")
    data = write_phantom_dataset(work / "phantom", n_cases=N_CASES, shape=SHAPE)

    # the sample app, exactly as a user gets it
    proc = subprocess.run([sys.executable, "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle",
                           "--output", str(work / "apps")], env=_env(), capture_output=True, text=True, timeout=120)
    app = work / "apps" / "monaibundle"
    assert proc.returncode == 0 and (app / "main.py").is_file(), f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"

    bundle = _copy_bundle(app / "model" / MODEL)
    _train_checkpoint(bundle, data)

    # studies: image volumes in the folder, their labels where the local datastore keeps final labels
    studies = work / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for case in sorted(p.name for p in data.iterdir() if p.name.startswith("patient")):
        shutil.copy(data / case / f"{case}_frame01.nii.gz", studies / f"{case}.nii.gz")
        shutil.copy(data / case / f"{case}_frame01_gt.nii.gz", studies / "labels" / "final" / f"{case}.nii.gz")
    return {"work": work, "app": app, "bundle": bundle, "studies": studies}


@pytest.fixture(scope="module")
def server(setup):
    srv = Server(setup["app"], setup["studies"], setup["work"] / "server.log")
    try:
        srv.info = srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_info_lists_the_bundle(server):
    info = server.info
    assert MODEL in info["models"], f"models served: {sorted(info['models'])}"
    model = info["models"][MODEL]
    assert model["type"] == "segmentation"
    assert model["labels"] == {"right ventricle": 1, "myocardium": 2, "left ventricle": 3}
    assert MODEL in info["trainers"], f"trainers: {sorted(info['trainers'])}"


def test_auto_segmentation(server, setup, tmp_path):
    image = setup["studies"] / "patient001.nii.gz"
    status, body = server.request("POST", f"/infer/{MODEL}?image=patient001&output=image",
                                  form={"params": json.dumps({"device": "cpu"})}, timeout=180)
    assert status == 200, f"infer answered {status}: {body[:2000]!r}\n{server.log_tail()}"
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(body)
    mask = nib.load(str(out))
    src = nib.load(str(image))
    assert mask.shape == src.shape
    np.testing.assert_allclose(mask.affine, src.affine, atol=1e-5)
    values = set(np.unique(np.asanyarray(mask.dataobj)).tolist())
    assert values <= {0, 1, 2, 3}, values
    assert values & {1, 2, 3}, "the trained checkpoint should find some heart structure"

    # the server runs the bundle's own inference pipeline: the same mask as configs/inference.json on the command line
    single = tmp_path / "in"
    single.mkdir()
    shutil.copy(image, single / image.name)
    _bundle_command(setup["bundle"], "--config_file", "configs/inference.json", "--dataset_dir", str(single),
                    "--output_dir", str(tmp_path / "cli"))
    cli = load_nifti(tmp_path / "cli" / "patient001_seg.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(mask.dataobj), cli)


def test_training_one_epoch(server, setup):
    bundle = setup["bundle"]
    before = (bundle / "models" / "model.pt").stat().st_mtime_ns
    params = {"device": "cpu", "max_epochs": 1, "val_split": 0.25, "multi_gpu": False, "tracking": "None"}
    status, body = server.request("POST", f"/train/{MODEL}", body=params)
    assert status == 200, f"train answered {status}: {body[:2000]!r}"
    task = json.loads(body)
    assert task.get("status") in ("SUBMITTED", "RUNNING"), task

    deadline = time.monotonic() + TRAIN_S
    state = task
    for _ in range(int(TRAIN_S / POLL_S) + 1):
        status, body = server.request("GET", "/train/", timeout=10)
        state = json.loads(body) if status == 200 else {"http": status}
        if state.get("status") in ("DONE", "ERROR", "STOPPED") or time.monotonic() > deadline:
            break
        time.sleep(POLL_S)
    details = "\n".join(state.get("details", []))
    assert state.get("status") == "DONE", f"training ended as {state.get('status')}:\n{details}\n{server.log_tail()}"
    log = server.log_tail(n=200_000)
    # MONAI Label started from the served checkpoint, trained on 3 of the 4 labelled studies and kept 1 to validate
    assert f"Add Checkpoint Loader for Path: {bundle / 'models' / 'model.pt'}" in log
    assert "SliceDataset: 3 volumes, 9 slices" in log
    assert "simulated noise" not in log

    runs = bundle / "runs" / "self_cleansing"
    history = (runs / "history.csv").read_text().splitlines()
    assert len(history) == 2, history  # a header and the one epoch
    final = bundle / "models" / "model_final.pt"
    assert final.is_file(), sorted(p.name for p in (bundle / "models").iterdir())
    checkpoint = torch.load(final, map_location="cpu")
    assert any(k.endswith("weight") for k in checkpoint["model"]) and checkpoint["geometry"]["scale"] == 1.0
    # the validation volume set a best Dice, so the served checkpoint was replaced too
    assert (bundle / "models" / "model.pt").stat().st_mtime_ns > before
    assert load_nifti(setup["studies"] / "labels" / "final" / "patient001.nii.gz").shape == SHAPE
