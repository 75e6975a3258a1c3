import math

import numpy as np
import pytest
import torch

from scripts.filtering import (
    CLEANSE,
    KEEP_MANUAL,
    KEEP_PSEUDO,
    FilterResult,
    cascade,
    filter_precision_recall,
    gmm_filter,
    normalise_losses,
)


def _two_populations(seed=0):
    rng = np.random.default_rng(seed)
    losses = np.concatenate([rng.normal(0.1, 0.03, 200), rng.normal(0.7, 0.1, 100)])
    true_noisy = np.r_[np.zeros(200, bool), np.ones(100, bool)]
    perm = rng.permutation(losses.size)
    return torch.tensor(losses[perm], dtype=torch.float32), torch.from_numpy(true_noisy[perm])


def test_normalise_losses():
    out = normalise_losses(torch.tensor([2.0, 4.0, 3.0]))
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64))
    assert (normalise_losses(torch.full((5,), 0.3)) == 0).all()
    assert normalise_losses(torch.tensor([])).numel() == 0
    with pytest.raises(ValueError):
        normalise_losses(torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError):
        normalise_losses(torch.zeros(2, 2))


def test_gmm_separates_two_loss_populations():
    losses, true_noisy = _two_populations()
    res = gmm_filter(losses)
    assert isinstance(res, FilterResult) and res.status == "ok"
    assert res.clean.dtype == torch.bool and res.clean.shape == (300,)
    precision, recall = filter_precision_recall(res.noisy, true_noisy)
    assert precision >= 0.97 and recall >= 0.97
    assert res.means[0] < res.means[1]
    assert math.isclose(sum(res.weights), 1.0, rel_tol=1e-9)
    assert abs(res.weights[1] - 1 / 3) < 0.05
    # between the two means the decision is the posterior rule
    x = normalise_losses(losses)
    middle = (x > res.means[0]) & (x < res.means[1])
    assert torch.equal(res.clean[middle], res.clean_prob[middle] > 0.5)


def test_result_helpers_for_logging_and_plots():
    losses, _ = _two_populations(1)
    res = gmm_filter(losses)
    s = res.summary()
    assert s["n"] == 300 and s["n_clean"] + s["n_noisy"] == 300 and s["status"] == "ok"
    x = np.linspace(-0.5, 1.5, 2001)
    pdf_clean, pdf_noisy = res.component_pdfs(x)
    # each weighted density integrates to its weight
    dx = x[1] - x[0]
    assert abs(pdf_clean.sum() * dx - res.weights[0]) < 1e-3
    assert abs(pdf_noisy.sum() * dx - res.weights[1]) < 1e-3
    assert res.loss_min == pytest.approx(float(losses.min()))


def test_gmm_is_deterministic():
    rng = np.random.default_rng(5)
    losses = torch.tensor(rng.random(120))  # no clear structure: sensitive to the init
    a, b = gmm_filter(losses, seed=3), gmm_filter(losses, seed=3)
    assert a.status == b.status
    assert torch.equal(a.clean, b.clean) and torch.equal(a.clean_prob, b.clean_prob)
    assert a.means == b.means


@pytest.mark.parametrize(
    "losses, kwargs, status",
    [
        (torch.tensor([0.1, 0.9, 0.2, 0.8, 0.5]), {}, "too_few_samples"),
        (torch.tensor([]), {}, "too_few_samples"),
        (torch.full((50,), 0.42), {}, "constant_losses"),
        (0.42 + 1e-9 * torch.arange(50, dtype=torch.float64), {}, "constant_losses"),
        (torch.tensor([0.0] * 500 + [1.0]), {}, "collapsed"),  # one component on one point
        (_two_populations()[0], {"min_separation": 0.99}, "collapsed"),
    ],
)
def test_degenerate_cases_are_all_clean(losses, kwargs, status):
    res = gmm_filter(losses, **kwargs)
    assert res.status == status
    assert res.clean.shape == losses.shape and res.clean.all()
    assert (res.clean_prob == 1).all()
    assert res.n_noisy == 0


def test_nan_losses_raise():
    with pytest.raises(ValueError, match="NaN"):
        gmm_filter(torch.tensor([0.1] * 10 + [float("nan")]))


def test_monotone_fixes_only_the_low_loss_tail():
    rng = np.random.default_rng(0)
    losses = np.concatenate([rng.normal(0.3, 0.01, 300), rng.normal(0.6, 0.15, 100), [0.0, 0.02, 0.05]])
    raw = gmm_filter(torch.tensor(losses), monotone=False)
    fixed = gmm_filter(torch.tensor(losses))
    # the narrow clean Gaussian loses the far low tail to the wide noisy one ...
    assert not raw.clean[-3:].any() and (raw.clean_prob[-3:] < 0.5).all()
    # ... which the default corrects; decisions change only outside the two means
    assert fixed.clean[-3:].all()
    x = normalise_losses(torch.tensor(losses))
    between = (x > fixed.means[0]) & (x < fixed.means[1])
    assert torch.equal(fixed.clean[between], raw.clean[between])
    changed = fixed.clean != raw.clean
    assert ((x[changed] <= fixed.means[0]) & fixed.clean[changed]).all()
    assert torch.equal(fixed.clean_prob, raw.clean_prob)


def test_cascade_all_combinations():
    manual = torch.tensor([True, True, False, False])
    pseudo = torch.tensor([True, False, True, False])
    out = cascade(manual, pseudo)
    assert out.dtype == torch.int64
    assert out.tolist() == [KEEP_MANUAL, KEEP_MANUAL, KEEP_PSEUDO, CLEANSE]
    assert (KEEP_MANUAL, KEEP_PSEUDO, CLEANSE) == (0, 1, 2)


def test_cascade_without_pseudo_label_counts_as_pseudo_noisy():
    manual = torch.tensor([True, False, False])
    pseudo = torch.tensor([True, True, True])
    has = torch.tensor([False, False, True])
    assert cascade(manual, pseudo, has_pseudo=has).tolist() == [KEEP_MANUAL, CLEANSE, KEEP_PSEUDO]
    with pytest.raises(ValueError):
        cascade(manual, pseudo[:2])


def test_precision_recall_values_and_zero_division():
    pred = torch.tensor([True, True, False, False, True])
    true = torch.tensor([True, False, False, True, True])
    p, r = filter_precision_recall(pred, true)
    assert p == pytest.approx(2 / 3) and r == pytest.approx(2 / 3)
    none = torch.zeros(4, dtype=torch.bool)
    assert filter_precision_recall(none, none) == (1.0, 1.0)
    assert filter_precision_recall(none, torch.tensor([True, False, False, False])) == (1.0, 0.0)
    p, r = filter_precision_recall(none, none, zero_division=float("nan"))
    assert math.isnan(p) and math.isnan(r)


def test_separation_tells_two_populations_from_one_skewed_one():
    losses, _ = _two_populations()
    two = gmm_filter(losses)
    # (0.7 - 0.1) / sqrt(0.03² + 0.1²) * sqrt(2), in any units: min-max scaling leaves the ratio unchanged
    assert two.separation == pytest.approx(math.sqrt(2) * 0.6 / math.hypot(0.03, 0.1), rel=0.15)
    skewed = gmm_filter(torch.tensor(np.random.default_rng(1).gamma(2.0, 0.1, 300)))
    assert skewed.status == "ok" and skewed.separation < two.separation / 2
    assert two.summary()["separation"] == two.separation
    assert math.isnan(gmm_filter(torch.rand(3)).separation)  # too few samples: nothing fitted
