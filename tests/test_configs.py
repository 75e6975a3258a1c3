"""Every config file under ``configs/`` merged the way its users merge it, and the engine it declares resolved, so
that no overlay can go stale unseen when a key it refers to moves."""

from __future__ import annotations


import pytest
import torch
from monai.bundle import ConfigParser

from conftest import REPO_ROOT, write_acdc, write_msd

CONFIGS = REPO_ROOT / "configs"
# how each file is used: the configs it is merged over, and what it declares
SPECIAL = {
    "train.json": ([], "train#trainer"),
    "inference.json": (None, "evaluator"),
    "evaluate.json": (["train.json"], "validate#evaluator"),
    "audit.json": (["train.json", "quick.json"], "audit_dataset"),
    "ct.json": (["train.json"], "train#trainer"),
    "acdc.json": (["train.json"], "train#trainer"),
    "acdc_cpu.json": (["train.json", "acdc.json"], "train#trainer"),
    "acdc_collapse.json": (["train.json", "acdc.json", "acdc_cpu.json"], "train#trainer"),
    "la.json": (["train.json"], "train#trainer"),
    "la_cpu.json": (["train.json", "la.json"], "train#trainer"),
    "la_collapse.json": (["train.json", "la.json", "la_cpu.json"], "train#trainer"),
    # overlays of a competitor's config
    "methods/train_loss_supervision.json": (["train.json", "methods/jocor.json"], "train#trainer"),
    "methods/pick_and_learn_dice.json": (["train.json", "methods/pick_and_learn.json"], "train#trainer"),
    # the oracle references are built from the true flags of simulated noise
    **{f"variants/oracle_{k}.json": (["train.json", "noise.json"], "train#trainer")
       for k in ("drop_missing", "drop_noisy", "fix_boundary", "after_warmup", "filter")},
}
# keys a file needs set otherwise for the three-patient test data
EXTRA = {"acdc_collapse.json": {"train_subjects": 2}}
# started by torchrun only: tests/test_distributed.py runs it in two real processes
NOT_HERE = {"multi_gpu_train.json": "needs a torch.distributed process group (tests/test_distributed.py)"}
ALL = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.json") if p.name != "metadata.json")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    splits = {"train": ["patient001", "patient002"], "val": ["patient003"]}
    return {"acdc": write_acdc(root / "acdc", n_cases=3, splits=splits), "msd": write_msd(root / "msd", n_cases=3),
            "binary": write_msd(root / "binary", n_cases=3, validation=1, binary=True)}


def _dataset(files: list[str], data: dict) -> str:
    """The test data a config set reads: the liver set for CT, a binary MSD set for the left atrium, else ACDC."""
    if "ct.json" in files:
        return str(data["msd"])
    return str(data["binary"] if "la.json" in files else data["acdc"])


def _parser(files: list[str], overrides: dict) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    parser.update(overrides)
    return parser


@pytest.mark.parametrize("name", ALL)
def test_config_resolves(name, data, tmp_path):
    if name in NOT_HERE:
        pytest.skip(NOT_HERE[name])
    base, target = SPECIAL.get(name, (["train.json"], "train#trainer"))
    files = [name] if base is None else [*base, name] if name != "train.json" else ["train.json"]
    overrides = {"bundle_root": str(tmp_path), "dataset_dir": _dataset(files, data), "device": torch.device("cpu"),
                 "output_dir": str(tmp_path / "out"), "ckpt_dir": str(tmp_path / "models"),
                 "slice_size": [32, 32], "patch_size": [24, 24], "resize": [32, 32] if name == "ct.json" else None,
                 "num_workers": 0, **EXTRA.get(name, {})}
    if base is None:
        overrides = {k: overrides[k] for k in ("bundle_root", "dataset_dir", "device", "output_dir")}
    parser = _parser(files, overrides)
    assert parser.get_parsed_content(target) is not None


@pytest.mark.parametrize("profile", [["acdc.json", "acdc_cpu.json"], ["ct.json"], ["acdc.json"],
                                     ["la.json", "la_cpu.json"]])
def test_data_profiles_merge_into_inference(profile, data, tmp_path):
    """A data profile is merged into inference.json exactly as into train.json, and sets the same geometry."""
    common = {"bundle_root": str(tmp_path), "dataset_dir": _dataset(profile, data), "device": torch.device("cpu"),
              "output_dir": str(tmp_path / "out")}
    infer = _parser(["inference.json", *profile], common)
    train = _parser(["train.json", *profile], common)
    assert infer.get_parsed_content("evaluator") is not None
    assert infer.get_parsed_content("geometry").state_dict() == train.get_parsed_content("geometry").state_dict()
    for key in ("intensity_transforms", "geometry_transforms"):
        assert infer.get(key) == train.get(key), f"{key} differs between inference.json and train.json"


@pytest.mark.parametrize("kind, share", [("dicece", 0.0), ("dice", 0.9)])
def test_the_default_filter_decides_its_pile_share_from_the_training_loss(kind, share):
    """train.json's label filter reads the training loss it is wired to, not a copy of its kind."""
    parser = _parser(["train.json"], {"train_loss#kind": kind})
    label_filter = parser.get_parsed_content("train#cleansing#label_filter")
    assert label_filter.peel_pile_share == share and label_filter.skip_trusted


@pytest.mark.parametrize("profile, source", [([], "NoPseudoLabel"), (["acdc.json", "acdc_cpu.json"], "Prediction"),
                                             (["acdc.json", "acdc_cpu.json", "acdc_collapse.json"], "NoPseudoLabel"),
                                             (["la.json", "la_cpu.json"], "Prediction"),
                                             (["la.json", "la_cpu.json", "la_collapse.json"], "NoPseudoLabel")])
def test_drop_long_schedule_decides_from_the_profiles_schedule(profile, source):
    """The variant leaves flagged slices out of the loss where rounds span 100 epochs or more (train.json's 500
    epochs, the ACDC and LA collapse profiles'), and keeps the agreement targets of the prediction in the 20-epoch
    profiles."""
    parser = _parser(["train.json", *profile, "variants/drop_long_schedule.json"], {})
    assert type(parser.get_parsed_content("train#cleansing#source")).__name__ == source


@pytest.mark.parametrize("profile, separation", [([], 3.0), (["acdc.json", "acdc_cpu.json"], None),
                                                 (["acdc.json", "acdc_cpu.json", "acdc_collapse.json"], 3.0),
                                                 (["la.json", "la_cpu.json"], None),
                                                 (["la.json", "la_cpu.json", "la_collapse.json"], 3.0)])
def test_default_leaves_flagged_slices_out_only_in_long_schedules(profile, separation):
    """The default's ``leave_out_separation`` is set where rounds span 100 epochs or more (train.json's 500 epochs,
    the ACDC and LA collapse profiles') and off in the 20-epoch profiles, where leaving flagged slices out costs their
    data; the paper's recipe never has it."""
    rules = _parser(["train.json", *profile], {}).get_parsed_content("train#cleansing#rules")
    assert rules.leave_out_separation == separation and rules.agreement
    paper = _parser(["train.json", "paper.json", *profile], {}).get_parsed_content("train#cleansing#rules")
    assert paper.leave_out_separation is None
