import numpy as np
import pytest
import torch

from scripts.postprocess import clean_label_map, fill_small_holes, remove_small_components


def _disc(size, cy, cx, r):
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_small_speck_removed_large_kept():
    mask = np.zeros((40, 40), bool)
    mask[5:20, 5:20] = True  # 225 px
    mask[30:35, 30:36] = True  # 30 px, >= 10% of 259
    mask[36:38, 2:4] = True  # 4 px speck
    out = remove_small_components(mask, 0.1)
    assert out.dtype == bool
    assert out[5:20, 5:20].all() and out[30:35, 30:36].all()
    assert not out[36:38, 2:4].any()
    assert out.sum() == 225 + 30


def test_components_are_8_connected():
    mask = np.zeros((30, 30), bool)
    mask[2:22, 2:22] = True
    mask[22:24, 22:24] = True  # touches the big square only at a corner
    mask[27:29, 27:29] = True  # isolated, same size
    out = remove_small_components(mask, 0.1)
    assert out[22:24, 22:24].all()
    assert not out[27:29, 27:29].any()


def test_small_hole_filled_big_hole_and_border_opening_kept():
    mask = np.zeros((40, 40), bool)
    mask[2:20, 2:20] = True
    mask[8:11, 8:11] = False  # 9 px hole
    mask[22:38, 22:38] = True
    mask[25:35, 25:35] = False  # 100 px hole, > 10% of the foreground
    mask[0:4, 30:32] = False
    out = fill_small_holes(mask, 0.1)
    assert out[8:11, 8:11].all()
    assert not out[25:35, 25:35].any()
    assert out.sum() == mask.sum() + 9


def test_hole_open_to_border_is_not_filled():
    mask = np.zeros((20, 20), bool)
    mask[0:10, 0:10] = True
    mask[0:3, 4:6] = False  # notch reaching the top border
    out = fill_small_holes(mask, 0.5)
    assert not out[0:3, 4:6].any()


def test_diagonal_gap_does_not_leak_hole():
    # A 1-px ring whose corner is missing is closed only diagonally: with 4-connected
    # background its inside is still a hole; with 8-connected background it would leak.
    mask = np.zeros((12, 12), bool)
    mask[2, 2:9] = mask[8, 2:9] = True
    mask[2:9, 2] = mask[2:9, 8] = True
    mask[2, 8] = False
    out = fill_small_holes(mask, 2.0)
    assert out[3:8, 3:8].all()
    assert not out[2, 8]


@pytest.mark.parametrize("fn", [remove_small_components, fill_small_holes])
def test_empty_mask_unchanged(fn):
    empty = np.zeros((16, 16), bool)
    assert not fn(empty).any()
    t = torch.zeros(16, 16, dtype=torch.bool)
    out = fn(t)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bool and not out.any()


def test_tensor_roundtrip_keeps_type():
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[2:15, 2:15] = True
    mask[18, 18] = True
    out = remove_small_components(mask)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bool
    assert not out[18, 18] and out[2:15, 2:15].all()


def _myo_lv(size=64):
    label = np.zeros((size, size), np.int64)
    label[_disc(size, 32, 32, 16)] = 2  # Myo ring ...
    label[_disc(size, 32, 32, 10)] = 3  # ... around the LV
    return label


def test_lv_inside_myo_is_not_filled_over():
    label = _myo_lv()
    out = clean_label_map(label, 4, 0.1, 0.9)
    np.testing.assert_array_equal(out, label)


def test_multiclass_holes_components_and_gap():
    label = _myo_lv()
    label[_disc(64, 32, 32, 11) & ~_disc(64, 32, 32, 10)] = 0  # gap between LV and Myo
    label[31:33, 31:33] = 0  # small hole inside LV
    label[32, 17:19] = 0  # small hole inside the Myo wall
    label[2:4, 2:4] = 3  # LV speck far away
    label[60:62, 60:62] = 1  # a lone, small RV: only class 1, so it is its whole area
    out = clean_label_map(label, 4, 0.1, 0.1)
    gap = _disc(64, 32, 32, 11) & ~_disc(64, 32, 32, 10)
    assert (out[gap] == 0).all(), "a gap bordered by two classes belongs to neither"
    assert (out[31:33, 31:33] == 3).all()
    assert (out[32, 17:19] == 2).all()
    assert (out[2:4, 2:4] == 0).all()
    assert (out[60:62, 60:62] == 1).all(), "component size is relative to its own class"


def test_removed_speck_inside_other_class_becomes_its_hole():
    label = np.zeros((40, 40), np.int64)
    label[5:35, 5:35] = 1
    label[19:21, 19:21] = 2  # 4 px of class 2 inside class 1
    label[0:3, 36:40] = 2  # 12 px of class 2 elsewhere
    out = clean_label_map(label, 3, 0.5, 0.1)
    # the speck is 25% of class 2 (< 50%) and goes; its pixels, now background enclosed
    # by class 1, are filled with 1
    assert (out[19:21, 19:21] == 1).all()
    assert (out[0:3, 36:40] == 2).all()


def test_binary_map_matches_the_two_mask_functions():
    rng = np.random.default_rng(3)
    for _ in range(5):
        mask = rng.random((32, 32)) < 0.55
        mask[8:24, 8:24] = True
        mask[14:16, 14:17] = False
        expected = fill_small_holes(remove_small_components(mask, 0.1), 0.1)
        out = clean_label_map(mask.astype(np.int64), 2, 0.1, 0.1)
        np.testing.assert_array_equal(out == 1, expected)


def test_clean_label_map_empty_and_types():
    empty = torch.zeros(10, 10, dtype=torch.int32)
    out = clean_label_map(empty, 4)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.int32 and not out.any()
    label = torch.from_numpy(_myo_lv()).to(torch.uint8)
    assert clean_label_map(label, 4).dtype == torch.uint8
    with pytest.raises(ValueError):
        clean_label_map(label, 3)
