"""Export and bundle checks, through ``python -m monai.bundle`` as a user runs them: TorchScript export of a
checkpoint, the network's input/output shapes against the metadata, and the metadata against MONAI's schema.

The schema cannot be downloaded here; ``tests/schema/`` holds a copy (see the README there).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys

import jsonschema
import pytest
import torch
from monai.data import load_net_with_metadata

from conftest import REPO_ROOT
from scripts.network import ResidualUNet

pytestmark = pytest.mark.slow

SCHEMA = REPO_ROOT / "tests" / "schema" / "meta_schema_20240725.json"
METADATA = REPO_ROOT / "configs" / "metadata.json"
# the export must compute what the eager network computes; scripting keeps the same float32 kernels, so the
# outputs agree to round-off (observed: identical); logits are O(1-10)
ATOL, RTOL = 1e-5, 1e-5


def bundle(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """``python -m monai.bundle <args>`` from the bundle root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-6000:]}"
    return out


def _trained_looking_network() -> ResidualUNet:
    """A fresh network whose batch-norm statistics are not the identity, so eval mode really uses them."""
    torch.manual_seed(3)
    net = ResidualUNet(spatial_dims=2, in_channels=1, out_channels=4)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0.0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0.0, 0.2)
    return net.eval()


def test_ckpt_export_matches_eager(tmp_path):
    net = _trained_looking_network()
    ckpt, ts = tmp_path / "model.pt", tmp_path / "model.ts"
    # saved as the bundle saves its models: the weights beside the geometry record
    torch.save({"model": net.state_dict(), "geometry": {"scale": 1.0}}, ckpt)
    out = _ok(bundle("ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(ckpt),
                     "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
                     "--key_in_ckpt", "model"))
    assert "exported to file" in out and ts.is_file()

    scripted, meta, extra = load_net_with_metadata(str(ts), more_extra_files=("inference.json",))
    assert isinstance(scripted, torch.jit.ScriptModule)
    assert meta["network_data_format"] == json.loads(METADATA.read_text())["network_data_format"]
    assert json.loads(extra["inference.json"])["network_def"]["_target_"] == "scripts.network.ResidualUNet"
    scripted.eval()
    torch.manual_seed(4)
    # two sizes: the metadata's and a non-square whole slice as inference feeds it (divisible by 8)
    for shape in ((2, 1, 128, 128), (1, 1, 96, 72)):
        x = torch.randn(shape)
        with torch.no_grad():
            expected, got = net(x), scripted(x)
        assert got.shape == (shape[0], 4, *shape[2:])
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_verify_net_in_out():
    out = _ok(bundle("verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                     "--config_file", "configs/inference.json"))
    assert "data shape of network is verified with no error" in out


def _validator():
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_metadata_matches_schema():
    metadata = json.loads(METADATA.read_text())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator().iter_errors(metadata)]
    assert not errors, errors
    # the copy is the file the metadata names
    assert metadata["schema"].rsplit("/", 1)[-1] == SCHEMA.name


def test_schema_copy_rejects_broken_metadata():
    """The local schema is not vacuous: metadata missing a required key or with a wrong type fails."""
    validator = _validator()
    metadata = json.loads(METADATA.read_text())
    missing = {k: v for k, v in metadata.items() if k != "network_data_format"}
    assert any("network_data_format" in e.message for e in validator.iter_errors(missing))
    wrong = copy.deepcopy(metadata)
    wrong["network_data_format"]["inputs"]["image"]["num_channels"] = "one"
    assert not validator.is_valid(wrong)


def test_verify_metadata_with_local_schema(tmp_path):
    """MONAI's own check; it downloads the schema unless the file is already there (and has the given hash)."""
    schema = tmp_path / SCHEMA.name
    shutil.copy(SCHEMA, schema)
    md5 = hashlib.md5(schema.read_bytes()).hexdigest()
    out = _ok(bundle("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(schema),
                     "--hash_val", md5))
    assert "skipped downloading" in out and "metadata is verified with no error" in out


def test_metadata_agrees_with_configs():
    """Checks beyond the schema (MONAI's bundle specification and the model zoo's CI): the current version has a
    changelog entry, every tensor description has the specification's keys, and channels agree with the
    network and the class names of the configs."""
    metadata = json.loads(METADATA.read_text())
    assert metadata["version"] in metadata["changelog"]
    fmt = metadata["network_data_format"]
    keys = {"type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data",
            "channel_def"}
    for group in ("inputs", "outputs"):
        for name, spec in fmt[group].items():
            assert keys <= spec.keys(), f"{group}/{name} lacks {sorted(keys - spec.keys())}"
            assert len(spec["channel_def"]) == spec["num_channels"], f"{group}/{name}"
    assert "modality" in fmt["inputs"]["image"]
    train = json.loads((REPO_ROOT / "configs" / "train.json").read_text())
    inference = json.loads((REPO_ROOT / "configs" / "inference.json").read_text())
    assert fmt["inputs"]["image"]["num_channels"] == inference["network_def"]["in_channels"]
    assert fmt["outputs"]["pred"]["num_channels"] == inference["num_classes"] == train["num_classes"]
    assert len(train["class_names"]) == train["num_classes"] - 1
    assert len(fmt["inputs"]["image"]["spatial_shape"]) == inference["network_def"]["spatial_dims"]
