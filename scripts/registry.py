"""What the benchmark can run: methods (configs merged over ``configs/train.json``), noise levels and data
profiles. The benchmark (:mod:`scripts.benchmark`) and its report (:mod:`scripts.bench_report`) both read this
registry, so neither imports the other."""

from __future__ import annotations

from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent

__all__ = ["METHODS", "NOISE", "PROFILES", "method_configs", "radius_scale"]

# A method is a list of configs merged over configs/train.json (and the data configs).
METHODS = {
    "baseline": ["configs/baseline.json"],
    "self_cleansing": [],
    "self_cleansing_paper": ["configs/paper.json"],
    # the paper's competitors (docs/competitors.md)
    "pick_and_learn": ["configs/methods/pick_and_learn.json"],
    # with the loss Zhu et al. weight (per-sample soft Dice) whatever the table's loss
    "pick_and_learn_dice": ["configs/methods/pick_and_learn.json", "configs/methods/pick_and_learn_dice.json"],
    "confident_learning": ["configs/methods/confident_learning.json"],
    "jocor": ["configs/methods/jocor.json"],
    "superpixel": ["configs/methods/superpixel.json"],
    # the same two with the Baseline's loss (train_loss) on the selected pixels in place of the published
    # cross-entropy term (docs/competitors.md)
    "jocor_train_loss": ["configs/methods/jocor.json", "configs/methods/train_loss_supervision.json"],
    "superpixel_train_loss": ["configs/methods/superpixel.json", "configs/methods/train_loss_supervision.json"],
    # and with the small-loss selection made within each foreground class, so that the hardest structure is not
    # dropped whole when three share one budget
    "jocor_per_class": ["configs/methods/jocor.json", "configs/methods/train_loss_supervision.json",
                        "configs/methods/select_per_class.json"],
    "superpixel_per_class": ["configs/methods/superpixel.json", "configs/methods/train_loss_supervision.json",
                             "configs/methods/select_per_class.json"],
    # an outside peer: cleanlab's segmentation filter, flagged pixels left out of the loss
    "cleanlab": ["configs/methods/cleanlab.json"],
    # Table 4: LCM without LFM (the paper's grid prototypes, the prediction, one averaged prototype); the full
    # method (LCM + LFM) is self_cleansing_paper
    "ablation_lcm": ["configs/paper.json", "configs/ablations/lcm.json"],
    "ablation_lcm_pred": ["configs/paper.json", "configs/ablations/lcm_pred.json"],
    "ablation_lcm_avg": ["configs/paper.json", "configs/ablations/lcm_avg.json"],
}
# Noise levels of Sec. 3.2: the fraction of noisy slices α and the mean disk radius β.
NOISE = {
    "clean": None,
    **{f"a{a}b{b}": {"alpha": a / 100, "beta": b} for a in (30, 50, 70) for b in (5, 10)},
}
# Scale profiles: extra configs per data set and profile. The collapse profile trains on few volumes for many
# epochs, so that every noisy label is seen often enough to be memorised (docs/README.md, Results).
PROFILES = {
    ("acdc", "cpu"): ["configs/acdc.json", "configs/acdc_cpu.json"],
    ("acdc", "collapse"): ["configs/acdc.json", "configs/acdc_cpu.json", "configs/acdc_collapse.json"],
    ("acdc", "paper"): ["configs/acdc.json"],
    # left atrium (binary, a third of the slices truly empty): half of the training volumes at half scale, so that
    # a cell sees about as many slices as the ACDC CPU profile
    ("la", "cpu"): ["configs/la.json", "configs/la_cpu.json"],
    # the collapse profile's counterpart: every fourth slice of twelve training volumes (about as many slices as
    # ACDC's twelve patients, from as many subjects) at quarter scale, each label seen 500 times
    ("la", "collapse"): ["configs/la.json", "configs/la_cpu.json", "configs/la_collapse.json"],
    ("phantom", "cpu"): ["configs/quick.json"],
    ("phantom", "paper"): [],
}




def radius_scale(data: str, profile: str) -> float:
    """The scale of the simulated noise's disk radius for a data set and profile: the profile's in-plane ``scale``,
    since the radius is given at full resolution and the noise is drawn on the zoomed slices."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(_ROOT / "configs" / "train.json"), *(str(_ROOT / c) for c in PROFILES[(data, profile)])])
    return float(parser.get("scale"))


def method_configs(method: str) -> list[str] | None:
    """The configs of a named method, or of a variant kept in ``configs/variants/<name>.json``."""
    if method in METHODS:
        return METHODS[method]
    variant = Path("configs/variants") / f"{method}.json"
    return [str(variant)] if variant.is_file() else None
