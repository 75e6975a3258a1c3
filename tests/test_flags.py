"""Switches typed on the command line: `--key false` arrives as text, and must mean off."""

import pytest

from scripts.filtering import LabelFilter
from scripts.flags import as_flag
from scripts.losses import HybridLoss, SegmentationLoss
from scripts.slice_pass import SlicePass
from scripts.targets import TargetRules


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), (1, True), (0, False), ("false", False),
                                             ("False", False), (" TRUE ", True), ("true", True)])
def test_both_spellings_of_a_switch_are_read(value, expected):
    assert as_flag(value, "switch") is expected


@pytest.mark.parametrize("value", ["off", "no", "", 2, None, 0.5, "auto"])
def test_anything_else_is_refused_by_name(value):
    with pytest.raises(ValueError, match="peel_saturated is a switch"):
        as_flag(value, "peel_saturated")


def test_components_take_a_lowercase_false_as_off():
    f = LabelFilter(enabled="false", refresh="false", unlabelled_as_noisy="true", peel_saturated="false")
    assert (f.enabled, f.refresh, f.unlabelled_as_noisy, f.peel_saturated) == (False, False, True, False)
    assert SlicePass(flip_average="false").flip_average is False
    assert TargetRules(agreement="false").agreement is False and TargetRules(agreement="true").agreement is True
    loss = HybridLoss(SegmentationLoss("dice"), ignore_empty_manual="false", cleansed_absent_unknown="false")
    assert loss.ignore_empty_manual is False and loss.cleansed_absent_unknown is False
    assert HybridLoss(SegmentationLoss("dice"), cleansed_absent_unknown="auto").cleansed_absent_unknown is True
    with pytest.raises(ValueError, match="refresh is a switch"):
        LabelFilter(refresh="maybe")
    with pytest.raises(ValueError, match="cleansed_absent_unknown"):
        HybridLoss(SegmentationLoss("dice"), cleansed_absent_unknown="sometimes")
