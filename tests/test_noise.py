import numpy as np
import pytest
import torch
from scipy import ndimage

from scripts.noise import BOUNDARY, CLEAN, MISSING, disk, oracle_labels, simulate_label_noise

SIZE = 48


def _disc(cy, cx, r, size=SIZE):
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _binary_stack(n_fg=30, n_empty=10, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.zeros((n_fg + n_empty, SIZE, SIZE), np.int64)
    for i in range(n_fg):
        labels[i][_disc(24 + rng.integers(-3, 4), 24 + rng.integers(-3, 4), rng.integers(8, 13))] = 1
    return labels[rng.permutation(len(labels))]


def _cardiac_stack(n=24):
    # RV (1) beside a Myo ring (2) around the LV (3), ACDC's label convention
    labels = np.zeros((n, SIZE, SIZE), np.int64)
    for i in range(n):
        labels[i][_disc(24, 14, 7 + i % 3)] = 1
        labels[i][_disc(24, 28, 12)] = 2
        labels[i][_disc(24, 28, 7 + i % 2)] = 3
    return labels


def _expected_boundary(label, detail):
    """The documented composition rule, rebuilt with Euclidean distance transforms."""
    out = label.copy()
    for c, op, r in zip(detail["classes"], detail["ops"], detail["radii"]):
        if op == "erode":
            mask = label == c
            # distances to the nearest non-c pixel inside the image: no erosion from the border
            out[mask & (ndimage.distance_transform_edt(mask) <= r)] = 0
    for c, op, r in zip(detail["classes"], detail["ops"], detail["radii"]):
        if op == "dilate":
            out[ndimage.distance_transform_edt(label != c) <= r] = c
    return out


def test_disk():
    d = disk(2)
    assert d.shape == (5, 5) and d.sum() == 13 and d[2, 0] and not d[0, 0]
    assert disk(0).tolist() == [[True]]


def test_fraction_picked_and_empty_samples_stay_clean():
    labels = _binary_stack()
    nonempty = labels.reshape(len(labels), -1).any(axis=1)
    for alpha, expected in ((0.0, 0), (0.3, 9), (0.5, 15), (0.7, 21), (1.0, 30)):
        noisy, flags = simulate_label_noise(labels, alpha, 5, seed=1, num_classes=2)
        assert flags.dtype == np.int64 and noisy.dtype == labels.dtype
        assert (flags != CLEAN).sum() == expected
        assert (flags[~nonempty] == CLEAN).all()
        clean = flags == CLEAN
        np.testing.assert_array_equal(noisy[clean], labels[clean])


def test_missing_and_boundary_noise():
    labels = _binary_stack(n_fg=60, n_empty=0, seed=2)
    noisy, flags, details = simulate_label_noise(
        labels, 1.0, 5, seed=3, num_classes=2, return_details=True
    )
    assert set(np.unique(flags).tolist()) == {MISSING, BOUNDARY}
    assert 15 <= (flags == MISSING).sum() <= 45  # equal odds
    assert not noisy[flags == MISSING].any()
    ops_seen = set()
    for i in np.flatnonzero(flags == BOUNDARY):
        d = details[i]
        assert d["kind"] == "boundary" and d["classes"] == [1]
        op, r = d["ops"][0], d["radii"][0]
        ops_seen.add(op)
        assert 2 <= r <= 8
        before, after = labels[i] == 1, noisy[i] == 1
        if op == "dilate":
            assert (after >= before).all() and after.sum() > before.sum()
        else:
            assert (after <= before).all() and after.sum() < before.sum()
        # the changed band has the width of a disk of radius r around a disc
        radius = np.sqrt(before.sum() / np.pi)
        new_radius = np.sqrt(after.sum() / np.pi)
        assert abs(abs(new_radius - radius) - r) <= 1.0, (op, r, radius, new_radius)
        np.testing.assert_array_equal(noisy[i], _expected_boundary(labels[i], d))
    assert ops_seen == {"dilate", "erode"}


def test_multiclass_composition_rule():
    labels = _cardiac_stack()
    noisy, flags, details = simulate_label_noise(
        labels, 1.0, 5, seed=4, num_classes=4, return_details=True
    )
    boundary = np.flatnonzero(flags == BOUNDARY)
    assert boundary.size >= 5
    saw_lv_over_myo = saw_myo_eroded = False
    for i in boundary:
        d = details[i]
        assert d["classes"] == [1, 2, 3]
        np.testing.assert_array_equal(noisy[i], _expected_boundary(labels[i], d))
        ops = dict(zip(d["classes"], d["ops"]))
        if ops[3] == "dilate":
            took = (labels[i] == 2) & (noisy[i] == 3)
            assert took.any(), "a dilated LV grows over the Myo"
            saw_lv_over_myo = True
        if ops[2] == "erode":
            reached = np.zeros_like(labels[i], dtype=bool)
            for c, op, r in zip(d["classes"], d["ops"], d["radii"]):
                if op == "dilate":
                    reached |= ndimage.distance_transform_edt(labels[i] != c) <= r
            freed = (labels[i] == 2) & (noisy[i] != 2) & ~reached
            if freed.any():
                assert (noisy[i][freed] == 0).all(), "pixels freed by erosion become background"
                saw_myo_eroded = True
    assert saw_lv_over_myo and saw_myo_eroded


def test_paint_order_decides_overlaps():
    label = np.zeros((1, 32, 32), np.int64)
    label[0][_disc(16, 10, 5, 32)] = 1
    label[0][_disc(16, 22, 5, 32)] = 2
    # find a seed that dilates both structures, then flip the order
    for seed in range(200):
        _, flags, det = simulate_label_noise(label, 1.0, 4, seed, 3, return_details=True)
        if flags[0] == BOUNDARY and det[0]["ops"] == ["dilate", "dilate"]:
            break
    else:
        pytest.fail("no seed dilated both structures")
    detail = det[0]
    ascending, _ = simulate_label_noise(label, 1.0, 4, seed, 3)
    reversed_, _ = simulate_label_noise(label, 1.0, 4, seed, 3, paint_order=[2, 1])
    overlap = (ndimage.distance_transform_edt(label[0] != 1) <= detail["radii"][0]) & (
        ndimage.distance_transform_edt(label[0] != 2) <= detail["radii"][1]
    )
    assert overlap.any()
    assert (ascending[0][overlap] == 2).all() and (reversed_[0][overlap] == 1).all()
    with pytest.raises(ValueError):
        simulate_label_noise(label, 1.0, 4, 0, 3, paint_order=[1, 1])


def test_radius_scale_and_minimum_radius():
    labels = _binary_stack(n_fg=40, n_empty=0, seed=5)
    _, flags, details = simulate_label_noise(labels, 1.0, 10, 0, 2, radius_scale=0.5, return_details=True)
    radii = [details[i]["radii"][0] for i in np.flatnonzero(flags == BOUNDARY)]
    assert radii and min(radii) >= 4 and max(radii) <= 7  # 7*0.5 and 13*0.5, rounded half up
    _, flags, details = simulate_label_noise(labels, 1.0, 1, 0, 2, return_details=True)
    radii = [details[i]["radii"][0] for i in np.flatnonzero(flags == BOUNDARY)]
    assert min(radii) >= 1 and max(radii) <= 4


def test_determinism_and_seed_dependence():
    labels = _cardiac_stack()
    a, fa = simulate_label_noise(labels, 0.5, 5, seed=7, num_classes=4)
    b, fb = simulate_label_noise(labels, 0.5, 5, seed=7, num_classes=4)
    c, fc = simulate_label_noise(labels, 0.5, 5, seed=8, num_classes=4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fa, fb)
    assert not (np.array_equal(a, c) and np.array_equal(fa, fc))
    np.testing.assert_array_equal(labels, _cardiac_stack())  # input left untouched


def test_tensor_input_returns_tensors():
    labels = torch.from_numpy(_binary_stack(n_fg=10, n_empty=2)).to(torch.uint8)
    noisy, flags = simulate_label_noise(labels, 0.5, 5, seed=0, num_classes=2)
    assert isinstance(noisy, torch.Tensor) and noisy.dtype == torch.uint8
    assert isinstance(flags, torch.Tensor) and flags.dtype == torch.int64 and flags.shape == (12,)
    ref_noisy, ref_flags = simulate_label_noise(labels.numpy(), 0.5, 5, seed=0, num_classes=2)
    np.testing.assert_array_equal(noisy.numpy(), ref_noisy)
    np.testing.assert_array_equal(flags.numpy(), ref_flags)


def test_input_validation():
    labels = _binary_stack(n_fg=4, n_empty=0)
    with pytest.raises(ValueError):
        simulate_label_noise(labels[0], 0.5, 5, 0, 2)
    with pytest.raises(ValueError):
        simulate_label_noise(labels, 1.5, 5, 0, 2)
    with pytest.raises(ValueError):
        simulate_label_noise(labels + 2, 0.5, 5, 0, 2)
    with pytest.raises(TypeError):
        simulate_label_noise(labels.astype(np.float32), 0.5, 5, 0, 2)


def test_oracle_labels_use_the_true_flags():
    clean = torch.as_tensor(_cardiac_stack(24))
    noisy, flags = simulate_label_noise(clean, alpha=0.75, beta=4, seed=3, num_classes=4)
    assert {MISSING, BOUNDARY} <= set(flags.tolist()) and (flags == CLEAN).any()
    dropped = oracle_labels(noisy, clean, flags, "drop_noisy")
    torch.testing.assert_close(dropped[flags == CLEAN], clean[flags == CLEAN])
    assert (dropped[flags != CLEAN] == 255).all()
    only_missing = oracle_labels(noisy, clean, flags, "drop_missing")
    assert (only_missing[flags == MISSING] == 255).all()
    torch.testing.assert_close(only_missing[flags != MISSING], noisy[flags != MISSING])
    fixed = oracle_labels(noisy, clean, flags, "fix_boundary")
    assert (fixed[flags == MISSING] == 255).all()
    torch.testing.assert_close(fixed[flags != MISSING], clean[flags != MISSING])
    assert not torch.equal(noisy[flags == BOUNDARY], clean[flags == BOUNDARY]), "nothing was repaired"
    assert torch.equal(noisy, simulate_label_noise(clean, alpha=0.75, beta=4, seed=3, num_classes=4)[0])


def test_oracle_labels_reject_bad_input():
    clean = torch.zeros(4, 8, 8, dtype=torch.uint8)
    flags = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="unknown oracle 'perfect'"):
        oracle_labels(clean, clean, flags, "perfect")
    with pytest.raises(ValueError, match=r"\(N,\) flags"):
        oracle_labels(clean, clean, flags[:3], "drop_noisy")
    with pytest.raises(ValueError, match="noisy and clean"):
        oracle_labels(clean, clean[:, :4], flags, "fix_boundary")
