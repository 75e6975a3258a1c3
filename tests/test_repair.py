"""Contour-offset repair: offsets equal disk morphology, a dilated or eroded contour is moved back onto the
prediction, what cannot be judged is left as drawn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from scripts.noise import disk
from scripts.repair import adjacent_labels, near_foreground, offset_mask, offset_repair, signed_distance


def disc(size: int, radius: float, centre=None) -> np.ndarray:
    cy, cx = centre if centre is not None else (size // 2, size // 2)
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


@pytest.mark.parametrize("radius", range(-5, 6))
def test_offsets_equal_disk_dilation_and_erosion(radius):
    rng = np.random.default_rng(radius + 10)
    mask = ndimage.binary_opening(rng.random((40, 40)) < 0.6, iterations=1)
    mask[:, :3] = True  # a structure cut by the image border
    if radius >= 0:
        expected = ndimage.binary_dilation(mask, structure=disk(radius)) if radius else mask
    else:
        # the image border is not background: nothing is eroded from it
        expected = ndimage.binary_erosion(mask, structure=disk(-radius), border_value=1)
    assert np.array_equal(offset_mask(signed_distance(mask), radius), expected)


def test_signed_distance_of_empty_and_full_masks():
    assert np.isposinf(signed_distance(np.zeros((4, 4), bool))).all()
    assert np.isneginf(signed_distance(np.ones((4, 4), bool))).all()
    assert not offset_mask(signed_distance(np.zeros((4, 4), bool)), 3).any()
    assert offset_mask(signed_distance(np.ones((4, 4), bool)), -3).all()


@pytest.mark.parametrize("noise", [4, -3])
def test_a_dilated_or_eroded_contour_is_moved_back_onto_the_prediction(noise):
    truth = disc(48, 10)
    drawn = offset_mask(signed_distance(truth), noise)
    # the prediction is the truth with a few wrong pixels: one radius still fits it best
    pred = truth.copy()
    pred[24, 36:40] = True
    pred[10:12, 20] = False
    repaired, offsets = offset_repair(torch.as_tensor(drawn[None]).to(torch.uint8),
                                      torch.as_tensor(pred[None]).to(torch.uint8), num_classes=2, max_radius=6)
    assert offsets.tolist() == [[-noise]]
    fixed = repaired[0].numpy() == 1
    assert (fixed != truth).sum() <= 0.02 * truth.sum()
    # the repaired label is the drawn shape moved, not the prediction copied: the prediction's spur is not in it
    assert not fixed[24, 38:40].any()


def test_multi_class_repair_and_contested_pixels():
    size = 48
    lv, ring = disc(size, 8), disc(size, 12) & ~disc(size, 8)
    truth = np.where(lv, 3, np.where(ring, 2, 0)).astype(np.uint8)
    drawn = truth.copy()
    drawn[disc(size, 10)] = 3  # LV drawn 2 pixels too wide, over the myocardium
    drawn[disc(size, 4, (6, 6))] = 1  # an RV blob the network does not see
    repaired, offsets = offset_repair(torch.as_tensor(drawn[None]), torch.as_tensor(truth[None]), num_classes=4,
                                      max_radius=4)
    r = repaired[0].numpy()
    assert offsets[0, 2] == -2  # the LV moved back
    assert offsets[0, 0] == 0  # the RV, absent from the prediction, is left as drawn
    assert (r[disc(size, 4, (6, 6))] == 1).all()
    assert (r[lv] == 3).sum() >= 0.97 * lv.sum()
    # the myocardium, eroded by the wide LV, grows back over it; where both claim a pixel it is contested
    assert (r[ring] == 2).mean() > 0.8
    # (a few ring pixels stay LV: a discrete disc eroded by a disk is not exactly the smaller disc)
    assert ((r[ring] == 2) | (r[ring] == 255)).mean() > 0.9


def test_pixels_two_repaired_structures_claim_are_contested():
    size = 48
    a, b = disc(size, 5, (20, 16)), disc(size, 5, (20, 32))
    drawn = np.where(a, 1, np.where(b, 2, 0)).astype(np.uint8)
    wide_a, wide_b = disc(size, 9, (20, 16)), disc(size, 9, (20, 32))
    pred = np.where(wide_b, 2, np.where(wide_a, 1, 0)).astype(np.uint8)  # both drawn too tight
    repaired, offsets = offset_repair(torch.as_tensor(drawn[None]), torch.as_tensor(pred[None]), num_classes=3,
                                      max_radius=6)
    grown = [offset_mask(signed_distance(m), int(o)) for m, o in zip((a, b), offsets[0])]
    assert (offsets[0] > 0).all()
    r = repaired[0].numpy()
    both = grown[0] & grown[1]
    assert both.any() and (r[both] == 255).all()
    assert (r[grown[0] & ~both] == 1).all() and (r[grown[1] & ~both] == 2).all()
    assert (r[~grown[0] & ~grown[1]] == 0).all()


def test_slices_without_foreground_and_bad_input():
    empty = torch.zeros(2, 16, 16, dtype=torch.uint8)
    repaired, offsets = offset_repair(empty, torch.ones_like(empty), num_classes=2, max_radius=3)
    assert not repaired.any() and not offsets.any()
    with pytest.raises(ValueError, match="one shape"):
        offset_repair(empty, torch.zeros(2, 16, 17, dtype=torch.uint8), num_classes=2, max_radius=3)
    with pytest.raises(ValueError, match="max_radius"):
        offset_repair(empty, empty, num_classes=2, max_radius=-1)


def test_adjacent_labels_stay_inside_their_volume():
    labels = torch.arange(5, dtype=torch.uint8)[:, None, None].expand(5, 2, 2).clone()
    previous, following = adjacent_labels(labels, [3, 2])
    assert previous[:, 0, 0].tolist() == [255, 0, 1, 255, 3]
    assert following[:, 0, 0].tolist() == [1, 2, 255, 4, 255]
    with pytest.raises(ValueError, match="sum to 4"):
        adjacent_labels(labels, [2, 2])


@pytest.mark.parametrize("margin", [0, 1, 3])
def test_near_foreground_is_the_chessboard_neighbourhood(margin):
    rng = np.random.default_rng(margin)
    labels = torch.as_tensor(rng.random((3, 20, 24)) > 0.97).to(torch.uint8) * 2
    labels[2] = 0
    labels[1, 0, :] = 255  # unsupervised pixels are not foreground
    near = near_foreground(labels, margin).numpy()
    for i in range(3):
        fg = (labels[i].numpy() > 0) & (labels[i].numpy() != 255)
        expected = ndimage.distance_transform_cdt(~fg, metric="chessboard") <= margin if fg.any() else np.zeros_like(fg)
        np.testing.assert_array_equal(near[i], expected)
    with pytest.raises(ValueError, match="margin >= 0"):
        near_foreground(labels, -1)
