import math

import pytest
import torch

from scripts.prototypes import (
    cleanse_batch,
    cleanse_labels,
    grid_features,
    prototype_score,
    prototype_score_naive,
    representation_degree,
    representation_degree_naive,
    select_prototypes,
)

SIZE = 64
CHANNELS = 8


def _disc(cy, cx, r, size=SIZE):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _dice(a, b):
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _basis(i, c=CHANNELS):
    v = torch.zeros(c)
    v[i] = 1.0
    return v


def _synthetic(masks_and_vectors, background, noise=0.15, seed=0):
    """Features that are ``background`` everywhere and ``vector`` on each mask, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    f = background[:, None, None].expand(CHANNELS, SIZE, SIZE).clone()
    for mask, vec in masks_and_vectors:
        f[:, mask] = vec[:, None]
    return f + noise * torch.randn(CHANNELS, SIZE, SIZE, generator=gen)


def _random_case(seed, grid=8, size=32, channels=6, zero_fraction=0.0):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(channels, size, size, generator=gen, dtype=torch.float64)
    if zero_fraction:
        f[:, torch.rand(size, size, generator=gen) < zero_fraction] = 0.0
    region = torch.rand(size, size, generator=gen) < 0.3
    region[: size // 2] = False  # whole rows of cells without region pixels
    return f, region


# --- the linear identities against the explicit pairwise computation -------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("zero_fraction", [0.0, 0.2])
def test_degree_identity_matches_pairwise(seed, zero_fraction):
    f, region = _random_case(seed, zero_fraction=zero_fraction)
    cells, inside = grid_features(f, region, 8)
    assert cells.dtype == torch.float64
    assert (~inside).any() and inside.any()
    fast = representation_degree(cells, inside)
    slow = representation_degree_naive(cells, inside)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)
    assert (fast[~inside] == 0).all()
    # the explicit formula, one cell at a time
    j = int(inside.nonzero()[0])
    cos = torch.nn.functional.cosine_similarity(cells[j][None], cells[inside], dim=1)
    assert math.isclose(float(fast[j]), float(cos.sum()), rel_tol=1e-12, abs_tol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("zero_fraction", [0.0, 0.2])
def test_score_identity_matches_pairwise(seed, zero_fraction):
    f, region = _random_case(seed, zero_fraction=zero_fraction)
    gen = torch.Generator().manual_seed(100 + seed)
    protos = torch.randn(7, f.shape[0], generator=gen, dtype=torch.float64)
    protos[3] = 0.0  # a zero prototype counts as cosine 0
    fast = prototype_score(f, protos)
    slow = prototype_score_naive(f, protos)
    assert fast.shape == region.shape and torch.isfinite(fast).all()
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)
    assert fast.abs().max() <= 1 + 1e-12
    if zero_fraction:
        zero_px = (f == 0).all(dim=0)
        assert (fast[zero_px] == 0).all()


def test_grid_features_matches_loop_and_per_pixel():
    f, region = _random_case(5, size=16)
    cells, inside = grid_features(f, region, 4)
    for gy in range(4):
        for gx in range(4):
            k = gy * 4 + gx
            m = region[gy * 4 : gy * 4 + 4, gx * 4 : gx * 4 + 4]
            block = f[:, gy * 4 : gy * 4 + 4, gx * 4 : gx * 4 + 4]
            assert bool(inside[k]) == bool(m.any())
            if m.any():
                torch.testing.assert_close(cells[k], block[:, m].mean(dim=1))
            else:
                assert (cells[k] == 0).all()
    per_px, inside_px = grid_features(f, region, 16)
    torch.testing.assert_close(inside_px, region.reshape(-1))
    torch.testing.assert_close(per_px[inside_px], f[:, region].T)


def test_grid_features_rejects_bad_grid():
    f, region = _random_case(0, size=16)
    with pytest.raises(ValueError):
        grid_features(f, region, 5)
    with pytest.raises(ValueError):
        grid_features(f, region[:8], 4)


def test_low_precision_features_are_computed_in_float32():
    f, region = _random_case(1)
    cells, inside = grid_features(f.to(torch.bfloat16), region, 8)
    assert cells.dtype == torch.float32
    assert prototype_score(f.half(), cells[inside]).dtype == torch.float32


# --- prototype selection ----------------------------------------------------------------


def test_select_prototypes_threshold_and_fallbacks():
    cells = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    inside = torch.tensor([True, True, True, True, False, False])
    degree = torch.tensor([0.0, 1.0, 2.0, 10.0, 0.0, 0.0])
    protos, mask = select_prototypes(cells, degree, inside, 0.15, return_mask=True)
    # normalised over R: [0, .1, .2, 1] -> the last two exceed 0.15
    assert mask.tolist() == [False, False, True, True, False, False]
    torch.testing.assert_close(protos, cells[[2, 3]])
    # nothing above sigma -> the maximum cell
    _, mask = select_prototypes(cells, degree, inside, 1.0, return_mask=True)
    assert mask.tolist() == [False, False, False, True, False, False]
    # a single cell in R
    single = torch.tensor([False, True, False, False, False, False])
    torch.testing.assert_close(select_prototypes(cells, degree, single, 0.7), cells[[1]])
    # all cells of R equally representative -> all of them
    _, mask = select_prototypes(cells, torch.full((6,), 3.0), inside, 0.7, return_mask=True)
    assert mask.tolist() == inside.tolist()
    # empty R -> no prototype, and the score map says "no evidence"
    none = select_prototypes(cells, degree, torch.zeros(6, dtype=torch.bool), 0.7)
    assert none.shape == (0, 2)
    assert torch.isneginf(prototype_score(torch.ones(2, 3, 3), none)).all()


def test_mixed_cells_are_central():
    # A cell straddling two feature populations has cosine 1/sqrt(2) to both and so the
    # largest degree: documented behaviour of Eq. 5, relevant to coarse grids.
    a, b = _basis(0, 2), _basis(1, 2)
    cells = torch.stack([a, a, a, b, b, (a + b) / 2])
    degree = representation_degree(cells, torch.ones(6, dtype=torch.bool))
    assert int(degree.argmax()) == 5


# --- label cleansing on synthetic feature maps -----------------------------------------


def test_cleanse_shrinks_dilated_prediction():
    target = _disc(32, 32, 16)
    f = _synthetic([(target, _basis(0))], _basis(1))
    for grid, radius in ((16, 19), (64, 21)):  # 4x4 cells as at the paper's 256/64; per-pixel
        pred = _disc(32, 32, radius).long()
        out = cleanse_labels(f, pred, num_classes=2, grid=grid)
        assert out.dtype == torch.int64 and out.shape == target.shape
        before, after = _dice(pred == 1, target), _dice(out == 1, target)
        assert after > before + 0.1 and after > 0.95, (grid, before, after)


def test_cleanse_recovers_removed_part_of_target():
    target = _disc(32, 32, 16)
    f = _synthetic([(target, _basis(0))], _basis(1))
    half = target & (torch.arange(SIZE)[None, :] < 32)
    out = cleanse_labels(f, half.long(), num_classes=2, grid=16)
    assert _dice(half, target) < 0.7
    assert ((out == 1) & target).sum() >= 0.95 * target.sum()
    assert _dice(out == 1, target) > 0.95


def test_cleanse_multiclass_two_structures():
    t1, t2 = _disc(20, 20, 11), _disc(44, 44, 11)
    f = _synthetic([(t1, _basis(0)), (t2, _basis(2))], _basis(1))
    pred = torch.zeros(SIZE, SIZE, dtype=torch.long)
    pred[_disc(20, 20, 12)] = 1  # over-segmented
    pred[t2 & (torch.arange(SIZE)[:, None] < 44)] = 2  # top half only
    out = cleanse_labels(f, pred, num_classes=3, grid=16)
    for c, t in ((1, t1), (2, t2)):
        before, after = _dice(pred == c, t), _dice(out == c, t)
        assert after > before and after > 0.95, (c, before, after)
    assert set(out.unique().tolist()) <= {0, 1, 2}


def test_cleanse_missing_class_and_empty_prediction():
    t1 = _disc(20, 20, 11)
    f = _synthetic([(t1, _basis(0)), (_disc(44, 44, 11), _basis(2))], _basis(1))
    pred = t1.long()  # class 2 not predicted: score -inf, never assigned
    out = cleanse_labels(f, pred, num_classes=3, grid=16)
    assert not (out == 2).any() and _dice(out == 1, t1) > 0.95
    empty = cleanse_labels(f, torch.zeros(SIZE, SIZE, dtype=torch.long), num_classes=3)
    assert not empty.any()


def test_avg_mode_uses_the_region_mean_as_single_prototype():
    target = _disc(32, 32, 16)
    f = _synthetic([(target, _basis(0))], _basis(1))
    pred = _disc(32, 32, 19).long()
    out = cleanse_labels(f, pred, num_classes=2, mode="avg", postprocess=False)
    mean = f[:, pred.bool()].mean(dim=1)
    expected = (prototype_score(f, mean[None]) > 0.7).long()
    torch.testing.assert_close(out, expected)
    assert _dice(out == 1, target) > _dice(pred == 1, target)


def test_pred_mode_returns_the_prediction():
    pred = torch.zeros(SIZE, SIZE, dtype=torch.int32)
    pred[3:5, 3:5] = 1  # a speck that post-processing would not touch in this mode
    pred[10:40, 10:40] = 2
    out = cleanse_labels(torch.zeros(CHANNELS, SIZE, SIZE), pred, num_classes=3, mode="pred")
    assert out.dtype == torch.int64
    torch.testing.assert_close(out, pred.long())
    out[0, 0] = 2
    assert pred[0, 0] == 0, "a copy, not a view"


def test_postprocessing_applies_min_fraction():
    target = _disc(32, 32, 12)
    f = _synthetic([(target, _basis(0))], _basis(1))
    f[:, 2:4, 2:4] = _basis(0)[:, None, None]  # a 4 px lookalike far from the target
    pred = target.long()
    raw = cleanse_labels(f, pred, num_classes=2, grid=16, postprocess=False)
    assert (raw[2:4, 2:4] == 1).all()
    cleaned = cleanse_labels(f, pred, num_classes=2, grid=16, min_fraction=0.1)
    assert (cleaned[2:4, 2:4] == 0).all()
    assert _dice(cleaned == 1, target) > 0.95


def test_grid_is_clamped_to_small_images():
    target = _disc(8, 8, 5, size=16)
    gen = torch.Generator().manual_seed(0)
    f = torch.where(target, _basis(0)[:, None, None], _basis(1)[:, None, None])
    f = f + 0.1 * torch.randn(CHANNELS, 16, 16, generator=gen)
    half = target & (torch.arange(16)[None, :] < 8)
    out = cleanse_labels(f, half.long(), num_classes=2, grid=64)  # clamped to 16
    assert _dice(out == 1, target) > 0.9
    with pytest.raises(ValueError):
        cleanse_labels(f[:, :12, :10], half[:12, :10].long(), num_classes=2, grid=64)


def test_zero_feature_pixels_do_not_produce_nan():
    target = _disc(32, 32, 12)
    f = _synthetic([(target, _basis(0))], _basis(1)).relu()
    f[:, :, :8] = 0.0
    pred = target.long()
    pred[:, :8] = 1
    out = cleanse_labels(f, pred, num_classes=2, grid=16)
    assert not (out[:, :8] == 1).any()
    assert _dice(out == 1, target) > 0.95


def test_cleanse_input_validation():
    f = torch.zeros(CHANNELS, SIZE, SIZE)
    pred = torch.zeros(SIZE, SIZE, dtype=torch.long)
    with pytest.raises(ValueError):
        cleanse_labels(f, pred, num_classes=2, mode="median")
    with pytest.raises(ValueError):
        cleanse_labels(f[:, :32], pred, num_classes=2)
    with pytest.raises(ValueError):
        cleanse_labels(f, pred + 3, num_classes=2)
    with pytest.raises(TypeError):
        cleanse_labels(f, pred.float(), num_classes=2)


def test_cleanse_batch_matches_per_sample():
    t1 = _disc(32, 32, 14)
    feats = torch.stack([_synthetic([(t1, _basis(0))], _basis(1), seed=s) for s in range(2)])
    preds = torch.stack([_disc(32, 32, 16).long(), (t1 & (torch.arange(SIZE)[None, :] < 32)).long()])
    out = cleanse_batch(feats, preds, num_classes=2, grid=16)
    assert out.shape == (2, SIZE, SIZE) and out.dtype == torch.int64
    for i in range(2):
        torch.testing.assert_close(out[i], cleanse_labels(feats[i], preds[i], num_classes=2, grid=16))
    with pytest.raises(ValueError):
        cleanse_batch(feats, preds[0], num_classes=2)
