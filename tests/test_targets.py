"""The target rules of a cleansed slice on hand-made label maps, without a network or an engine."""

from __future__ import annotations

import pytest
import torch

from scripts.ignore_index import IGNORE_INDEX
from scripts.noise import _boundary_noise
from scripts.repair import offset_mask, signed_distance, trusted_side
from scripts.targets import TargetRules, cleansed_targets

U = IGNORE_INDEX


def maps(*rows_per_slice) -> torch.Tensor:
    return torch.tensor(rows_per_slice, dtype=torch.uint8)


# slice 0 has a drawn label that disagrees with the LCM output in two pixels; slice 1 was missed (empty label)
CAND = maps([[0, 1, 1, 0], [0, 1, 1, 0]],
            [[0, 2, 2, 0], [0, 0, 0, 0]])
MANUAL = maps([[0, 1, 0, 0], [1, 1, 1, 0]],
              [[0, 0, 0, 0], [0, 0, 0, 0]])
CONF = maps([[255, 250, 200, 255], [100, 255, 255, 255]],
            [[255, 250, 100, 255], [255, 255, 255, 255]])


def test_without_rules_the_lcm_output_is_the_target():
    cand = CAND.clone()
    targets, repaired = cleansed_targets(cand, MANUAL, TargetRules(), num_classes=3)
    assert torch.equal(targets, CAND) and repaired is None
    targets[:] = 7
    assert torch.equal(cand, CAND), "the candidates are not written to"


def test_agreement_keeps_only_what_lcm_and_annotator_share():
    targets, _ = cleansed_targets(CAND, MANUAL, TargetRules(agreement=True), num_classes=3)
    assert torch.equal(targets, maps([[0, 1, U, 0], [U, 1, 1, 0]],
                                     [[0, U, U, 0], [0, 0, 0, 0]]))


def test_confidence_thresholds_narrow_and_widen_the_agreement():
    narrow, _ = cleansed_targets(CAND, MANUAL, TargetRules(agreement=True, agreement_confidence=0.9), 3,
                                 confidence=CONF)
    # every agreeing pixel is at 250/255 or more: the threshold of 0.9 (230/255) takes none of them away
    assert torch.equal(narrow, maps([[0, 1, U, 0], [U, 1, 1, 0]],
                                    [[0, U, U, 0], [0, 0, 0, 0]]))
    conf = CONF.clone()
    conf[0, 0, 0] = 200  # an agreeing pixel the network is unsure of
    narrow, _ = cleansed_targets(CAND, MANUAL, TargetRules(agreement=True, agreement_confidence=0.9), 3,
                                 confidence=conf)
    assert narrow[0, 0, 0] == U
    wide, _ = cleansed_targets(CAND, MANUAL, TargetRules(agreement=True, confident_fill=0.95), 3, confidence=CONF)
    # a contested pixel at 0.95 (242/255) or more takes the LCM label: only the missed slice's (0, 1), at 250
    assert torch.equal(wide, maps([[0, 1, U, 0], [U, 1, 1, 0]],
                                  [[0, 2, U, 0], [0, 0, 0, 0]]))


def test_empty_fill_and_neighbour_fill_act_on_missed_slices_only():
    conf = torch.full_like(CONF, 255)
    filled, _ = cleansed_targets(CAND, MANUAL, TargetRules(agreement=True, empty_fill=0.9), 3, confidence=conf)
    assert torch.equal(filled[1], CAND[1]), "the missed slice takes the confident LCM output"
    assert filled[0, 0, 2] == U and filled[0, 1, 0] == U, "a drawn label's contested pixels stay unsupervised"
    previous = maps([[0, 0, 0, 0], [0, 0, 0, 0]], [[0, 2, 0, 0], [0, 0, 0, 0]])
    following = maps([[0, 0, 0, 0], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]])
    beside, _ = cleansed_targets(CAND, MANUAL, TargetRules(agreement=True, neighbour_fill=True), 3,
                                 neighbours=(previous, following))
    assert torch.equal(beside[1], maps([[0, 2, U, 0], [0, 0, 0, 0]])[0])
    assert torch.equal(beside[0], maps([[0, 1, U, 0], [U, 1, 1, 0]])[0])


def test_whole_slice_rules():
    no_empty, _ = cleansed_targets(CAND, MANUAL, TargetRules(ignore_empty=True), 3)
    assert torch.equal(no_empty[0], CAND[0]) and (no_empty[1] == U).all()
    no_drawn, _ = cleansed_targets(CAND, MANUAL, TargetRules(ignore_drawn=True), 3)
    assert (no_drawn[0] == U).all() and torch.equal(no_drawn[1], CAND[1])


def test_empty_margin_drops_background_next_to_the_prediction_on_missed_slices():
    cand = torch.zeros(2, 1, 8, dtype=torch.uint8)
    manual = cand.clone()
    manual[0, 0, 0] = 1  # slice 0 is drawn (elsewhere), slice 1 is missed
    prediction = torch.zeros_like(cand)
    prediction[:, 0, 4] = 1
    targets, _ = cleansed_targets(cand, manual, TargetRules(agreement=True, empty_margin=2), 2,
                                  prediction=prediction)
    assert targets[1, 0].tolist() == [0, 0, U, U, U, U, U, 0]
    assert targets[0, 0].tolist() == [U, 0, 0, 0, 0, 0, 0, 0], "a drawn slice keeps its agreed background"


def test_repair_radius_compares_with_the_repaired_label():
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    dist2 = (yy - 8) ** 2 + (xx - 8) ** 2
    truth = (dist2 <= 16).to(torch.uint8)[None]
    # drawn two pixels too wide: the truth dilated by a disk of radius 2
    wide = torch.from_numpy(offset_mask(signed_distance(truth[0].numpy()), 2)).to(torch.uint8)[None]
    plain, repaired = cleansed_targets(truth, wide, TargetRules(agreement=True), 2)
    assert (plain == U).any() and repaired is None
    fixed, repaired = cleansed_targets(truth, wide, TargetRules(agreement=True, repair_radius=3), 2,
                                       prediction=truth)
    assert torch.equal(fixed, truth) and repaired == 1


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match=r"\(2, 2, 4\) and \(1, 2, 4\)"):
        cleansed_targets(CAND, MANUAL[:1], TargetRules(), 3)
    with pytest.raises(ValueError, match="need confidence"):
        cleansed_targets(CAND, MANUAL, TargetRules(agreement=True, confident_fill=0.9), 3)
    with pytest.raises(ValueError, match="need prediction, neighbours"):
        cleansed_targets(CAND, MANUAL, TargetRules(agreement=True, empty_margin=1, neighbour_fill=True), 3)


@pytest.mark.parametrize("kwargs, message", [
    ({"confident_fill": 0.9}, "confident_fill need agreement=True"),
    ({"agreement_confidence": 0.9, "neighbour_fill": True}, "agreement_confidence, neighbour_fill need agreement"),
    ({"agreement": True, "confident_fill": 1.5}, "confident_fill is a probability"),
    ({"agreement": True, "ignore_empty": True, "empty_fill": 0.9}, "exclude each other"),
    ({"agreement": True, "ignore_empty": True, "neighbour_fill": True}, "exclude each other"),
    ({"ignore_empty": True, "ignore_drawn": True}, "NoPseudoLabel"),
    ({"repair_radius": 2}, "repair_radius"),
    ({"agreement": True, "empty_margin": 0}, "empty_margin"),
])
def test_rules_that_cannot_work_together_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TargetRules(**kwargs)


def test_trusted_side_keeps_the_inside_of_a_tight_contour_and_the_outside_of_a_wide_one():
    # slice 0: class 1 drawn tighter than predicted, class 2 drawn wider; slice 1 missed (empty label)
    manual = maps([[0, 1, 0, 0, 2, 2], [0, 1, 0, 0, 2, 2]],
                  [[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    pred = maps([[1, 1, 1, 0, 0, 2], [1, 1, 1, 0, 0, 2]],
                [[1, 1, 0, 0, 2, 0], [0, 0, 0, 0, 0, 0]])
    pred[0, 0, 1] = 0  # one pixel of the tight structure the network misses: the annotator is right there
    manual[0, 0, 3], pred[0, 0, 3] = 0, 2  # and one background pixel it calls class 2: right again
    trusted = trusted_side(manual, pred, 3)
    assert trusted[0, 0, 1] and trusted[0, 0, 3]
    assert not trusted[0, 0, 0] and not trusted[0, 1, 4], "the outside of a tight and the inside of a wide contour"
    assert not trusted[1].any(), "a missed slice is right nowhere for sure"
    targets, _ = cleansed_targets(pred, manual, TargetRules(agreement=True, trusted_side=True), 3, prediction=pred)
    plain, _ = cleansed_targets(pred, manual, TargetRules(agreement=True), 3, prediction=pred)
    assert targets[0, 0, 1] == 1 and targets[0, 0, 3] == 0, "contested pixels on the trusted side take the manual label"
    assert plain[0, 0, 1] == U and plain[0, 0, 3] == U
    assert targets[0, 0, 0] == U and targets[0, 1, 4] == U, "the other side stays unsupervised"
    assert torch.equal(targets[1], plain[1])
    with pytest.raises(ValueError, match="prediction"):
        cleansed_targets(pred, manual, TargetRules(agreement=True, trusted_side=True), 3)
    with pytest.raises(ValueError, match="trusted_side"):
        TargetRules(trusted_side=True)


def test_trusted_side_is_exact_on_simulated_boundary_noise():
    # a network that errs on both sides of the true contours: wherever it lets each offset's direction be judged,
    # the trusted pixels of a dilated or eroded structure carry the clean class
    clean = torch.zeros(1, 28, 28, dtype=torch.uint8)
    clean[0, 4:24, 4:24] = 1
    clean[0, 9:19, 9:19] = 2
    network = clean.clone()
    network[0, 1:4, 4:24] = 1  # beyond the ring's outer contour
    network[0, 6, 6:22] = 0  # a row of the ring missed
    network[0, 9, 9:19] = 1  # the inner structure's first row called ring
    for ops in (("dilate", "erode"), ("erode", "dilate"), ("dilate", "dilate"), ("erode", "erode")):
        noisy = torch.from_numpy(_boundary_noise(clean[0].numpy(), (1, 2), ops, (2, 2)))[None]
        trusted = trusted_side(noisy, network, 3)
        contested = trusted & (noisy != network)
        assert contested.any(), ops
        assert torch.equal(noisy[trusted], clean[trusted]), ops
