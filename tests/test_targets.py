"""The target rules of a cleansed slice on hand-made label maps, without a network or an engine."""

from __future__ import annotations

import pytest
import torch

from scripts.ignore_index import IGNORE_INDEX
from scripts.repair import offset_mask, signed_distance
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
