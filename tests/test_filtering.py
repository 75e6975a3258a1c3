import math

import numpy as np
import pytest
import torch

from scripts.filtering import (
    CLEANSE,
    KEEP_MANUAL,
    KEEP_PSEUDO,
    REFIT_SEPARATION,
    FilterResult,
    cascade,
    filter_precision_recall,
    LabelFilter,
    gmm_filter,
    normalise_losses,
    gmm_filter_peeled,
    saturated_pile,
    spread_result,
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


def _with_saturated_pile(seed=0):
    """Correct labels (low loss), wrong ones (middle) and a pile of labels the prediction misses altogether (the
    largest loss, all but equal): the last two are noisy."""
    rng = np.random.default_rng(seed)
    losses = np.concatenate([rng.normal(0.15, 0.05, 150), rng.normal(0.55, 0.07, 60), 1 - rng.uniform(0, 1e-4, 80)])
    true_noisy = np.r_[np.zeros(150, bool), np.ones(140, bool)]
    return torch.tensor(losses), torch.from_numpy(true_noisy)


def test_a_saturated_pile_hides_the_wrong_labels_from_one_fit():
    recalls = []
    for seed in range(6):
        losses, true_noisy = _with_saturated_pile(seed)
        precision, recall = filter_precision_recall(gmm_filter(losses).noisy, true_noisy)
        assert precision == 1.0
        recalls.append(recall)
    # in most draws the Noisy component is the pile and little else (80 of the 140 noisy samples)
    assert sum(r <= 0.75 for r in recalls) >= 3, recalls


def test_peeling_the_pile_finds_the_wrong_labels_where_one_fit_called_only_the_pile_noisy():
    peeled_seeds = []
    for seed in range(6):
        losses, true_noisy = _with_saturated_pile(seed)
        pile = saturated_pile(losses)
        assert torch.equal(pile, torch.arange(290) >= 210)
        once, peeled = gmm_filter(losses), gmm_filter_peeled(losses)
        if (pile & once.noisy).sum() >= 0.9 * once.n_noisy:
            peeled_seeds.append(seed)
            precision, recall = filter_precision_recall(peeled.noisy, true_noisy)
            assert precision >= 0.97 and recall >= 0.97
            assert peeled.status == "ok" and peeled.extra["saturated"] == 80
            assert (peeled.clean_prob[210:] == 0).all() and (peeled.clean_prob[150:210] < 0.5).all()
        else:  # a fit that reached beyond the pile is kept as it is
            assert peeled.means == once.means and torch.equal(peeled.clean, once.clean)
            assert "saturated" not in peeled.extra
    assert len(peeled_seeds) >= 3, peeled_seeds


def test_a_peeled_fit_is_drawn_in_the_units_of_all_losses():
    losses, _ = _with_saturated_pile()
    peeled = gmm_filter_peeled(losses)
    rest = gmm_filter(losses[:210])
    lo, hi = float(losses.min()), float(losses.max())
    assert (peeled.loss_min, peeled.loss_max) == (lo, hi)
    # the Clean component's mean, mapped back to raw units, is the rest fit's
    raw_mean = lambda r: r.loss_min + r.means[0] * (r.loss_max - r.loss_min)  # noqa: E731
    assert raw_mean(peeled) == pytest.approx(raw_mean(rest))
    assert sum(peeled.weights) == pytest.approx(210 / 290)
    # so the histogram of all losses and the drawn densities have the same mass
    x = np.linspace(-0.2, 1.2, 4001)
    assert float(sum(peeled.component_pdfs(x)).sum() * (x[1] - x[0])) == pytest.approx(210 / 290, rel=1e-3)


def test_without_a_pile_peeling_changes_nothing():
    losses, _ = _two_populations()
    plain, peeled = gmm_filter(losses), gmm_filter_peeled(losses)
    assert torch.equal(plain.clean, peeled.clean) and plain.means == peeled.means and "saturated" not in peeled.extra
    # the largest loss alone is no pile: the top outliers a fit calls Noisy stay its only Noisy samples
    outliers = torch.cat([torch.linspace(0.1, 0.3, 60), torch.tensor([0.95, 1.0])])
    assert int(saturated_pile(outliers).sum()) == 1
    assert torch.equal(gmm_filter_peeled(outliers).clean, gmm_filter(outliers).clean)
    assert not saturated_pile(torch.full((5,), 0.4)).any()


def test_the_first_fit_stays_when_the_others_do_not_split_cleanly():
    """Besides the pile, correct and wrong labels that overlap in loss (early in training): the second fit would
    flag many correct labels, so the first fit is kept; likewise when too few samples are left to fit."""
    rng = np.random.default_rng(3)
    overlapping = torch.tensor(np.r_[rng.normal(0.40, 0.15, 150), rng.normal(0.62, 0.15, 60), np.ones(80)])
    once = gmm_filter(overlapping)
    assert (saturated_pile(overlapping) & once.noisy).sum() >= 0.9 * once.n_noisy  # the pile is all it flags
    assert gmm_filter(overlapping[:210]).separation < 3
    kept = gmm_filter_peeled(overlapping)
    assert torch.equal(kept.clean, once.clean) and "saturated" not in kept.extra
    assert gmm_filter_peeled(overlapping, min_refit_separation=0.0).extra["saturated"] == 80
    few = torch.tensor(np.r_[rng.normal(0.2, 0.05, 6), np.ones(10)])
    assert torch.equal(gmm_filter_peeled(few).clean, gmm_filter(few).clean)


def test_peel_keep_keeps_the_refit_once_a_round_has_used_it():
    """A refit whose separation falls just below the guard: the first fit (the pile alone Noisy) comes back unless an
    earlier round of the run used the refit and ``peel_keep`` is on."""
    rng = np.random.default_rng(3)
    overlapping = torch.tensor(np.r_[rng.normal(0.40, 0.15, 150), rng.normal(0.62, 0.15, 60), np.ones(80)])
    has = torch.zeros(290, dtype=torch.bool)
    guarded = LabelFilter(peel_saturated=True, peel_pile_share=0.0)
    keeping = LabelFilter(peel_saturated=True, peel_pile_share=0.0, peel_keep=True)
    first = guarded(overlapping, overlapping, has, peeled_before=True)
    assert first.summary()["gmm1_saturated"] == 0 and first.manual.n_noisy < 90  # the pile and little else
    # no earlier refit: the guard holds as without the rule
    assert keeping(overlapping, overlapping, has).summary()["gmm1_saturated"] == 0
    kept = keeping(overlapping, overlapping, has, peeled_before=True)
    assert kept.summary()["gmm1_saturated"] == 80
    assert kept.manual.noisy[210:].all() and 80 < kept.manual.n_noisy < 290
    assert "peel_keep=True" in repr(keeping)
    with pytest.raises(ValueError, match="peel_saturated"):
        LabelFilter(peel_keep=True)


def test_a_pile_share_of_zero_peels_where_the_first_fit_also_took_the_worst_wrong_labels():
    """Wrong labels in the middle, others between them and the pile (ACDC, collapse profile, seed 0: 64% of GMM-1's
    Noisy calls in the pile): the first fit calls the pile and the upper ones Noisy, so the default share (0.9) keeps
    it; with ``pile_share=0`` the pile is peeled whenever it is large, and the middle ones are found too."""
    for seed in range(4):
        rng = np.random.default_rng(seed)
        losses = torch.tensor(np.r_[rng.normal(0.18, 0.05, 80), rng.normal(0.5, 0.07, 40), rng.uniform(0.7, 0.97, 40),
                                    1 - rng.uniform(0, 1e-4, 90)])
        true_noisy = torch.arange(250) >= 80
        once = gmm_filter(losses)
        assert 0.6 < (saturated_pile(losses) & once.noisy).sum() / once.n_noisy < 0.9
        kept, peeled = gmm_filter_peeled(losses), gmm_filter_peeled(losses, pile_share=0.0)
        assert torch.equal(kept.clean, once.clean) and "saturated" not in kept.extra
        assert filter_precision_recall(once.noisy, true_noisy)[1] < 0.8
        assert peeled.extra["saturated"] == 90
        precision, recall = filter_precision_recall(peeled.noisy, true_noisy)
        assert precision >= 0.99 and recall >= 0.99
    filtered = LabelFilter(peel_saturated=True, peel_pile_share=0.0)(losses, losses, torch.zeros(250, dtype=torch.bool))
    assert filtered.summary()["gmm1_saturated"] == 90
    with pytest.raises(ValueError, match="peel_pile_share"):
        LabelFilter(peel_pile_share=1.5)


def test_label_filter_peels_only_when_asked_and_says_so():
    losses, true_noisy = _with_saturated_pile(1)
    has = torch.zeros(losses.numel(), dtype=torch.bool)
    plain, peeled = LabelFilter()(losses, losses, has), LabelFilter(peel_saturated=True)(losses, losses, has)
    assert plain.summary()["gmm1_saturated"] == 0 and peeled.summary()["gmm1_saturated"] == 80
    assert filter_precision_recall(plain.manual.noisy, true_noisy)[1] < 0.75
    assert filter_precision_recall(peeled.manual.noisy, true_noisy)[1] >= 0.97
    assert (peeled.actions[true_noisy] != KEEP_MANUAL).all()
    assert "peel_saturated=True" in repr(LabelFilter(peel_saturated=True))


def test_trusted_samples_are_clean_and_stay_out_of_the_fits():
    """Truly empty slices (left atrium: a third of them) score the soft Dice's worst loss against their empty label
    whatever the network predicts, so GMM-1 calls them Noisy beside the wrong labels; marked as trusted they are
    Clean and the mixture is fitted to the others."""
    rng = np.random.default_rng(0)
    losses = torch.tensor(np.r_[rng.normal(0.15, 0.04, 100), rng.uniform(0.9, 1.0, 60), rng.uniform(0.85, 1.0, 40)])
    trusted, true_noisy = torch.arange(200) // 100 == 1, torch.arange(200) >= 160
    trusted[160:] = False
    has = torch.zeros(200, dtype=torch.bool)
    plain = LabelFilter(skip_trusted=False)(losses, losses, has, trusted=trusted)
    assert filter_precision_recall(plain.manual.noisy, true_noisy)[0] < 0.5  # the trusted ones called Noisy too
    skipped = LabelFilter()(losses, losses, has, trusted=trusted)
    assert filter_precision_recall(skipped.manual.noisy, true_noisy) == (1.0, 1.0)
    assert skipped.manual.clean_prob[trusted].eq(1).all() and (skipped.actions[trusted] == KEEP_MANUAL).all()
    assert skipped.summary()["gmm1_trusted"] == 60 and plain.summary()["gmm1_trusted"] == 0
    # the mixture fitted to the 140 others, in the units of all 200 losses, its weights summing to their share
    assert skipped.manual.loss_min == float(losses.min()) and skipped.manual.loss_max == float(losses.max())
    assert sum(skipped.manual.weights) == pytest.approx(0.7)
    assert 0 <= skipped.manual.means[0] < 0.3 < skipped.manual.means[1] <= 1
    assert torch.equal(LabelFilter()(losses, losses, has).manual.clean, plain.manual.clean)
    with pytest.raises(ValueError, match="each of the 200 samples"):
        LabelFilter()(losses, losses, has, trusted=trusted[:10])
    assert "skip_trusted=True" in repr(LabelFilter())


def test_spread_result_fills_the_samples_it_did_not_judge():
    part = gmm_filter(torch.tensor([0.1, 0.12, 0.11, 0.13, 0.9, 0.95, 0.92, 0.1, 0.11, 0.93]))
    judged = torch.tensor([True] * 10 + [False] * 2)
    losses = torch.cat([torch.tensor([0.1, 0.12, 0.11, 0.13, 0.9, 0.95, 0.92, 0.1, 0.11, 0.93]),
                        torch.tensor([0.0, 2.0])])
    for others_clean in (True, False):
        out = spread_result(part, judged, losses, others_clean=others_clean, note=1)
        assert torch.equal(out.clean[:10], part.clean) and out.clean[10:].eq(others_clean).all()
        assert out.clean_prob[10:].eq(float(others_clean)).all() and out.extra["note"] == 1
        assert (out.loss_min, out.loss_max) == (0.0, 2.0)
        # the same density per unit of raw loss, times the judged share (10 of 12)
        x, part_range = 0.9, part.loss_max - part.loss_min
        per_raw_part = part.component_pdfs((x - part.loss_min) / part_range)[1] / part_range
        assert per_raw_part * 10 / 12 == pytest.approx(out.component_pdfs(x / 2.0)[1] / 2.0)


def test_auto_pile_share_follows_the_training_loss(caplog):
    from scripts.losses import SegmentationLoss

    with caplog.at_level("INFO", logger="scripts.filtering"):
        assert LabelFilter(peel_pile_share="auto", train_loss=SegmentationLoss("dicece")).peel_pile_share == 0.0
    assert "peel_pile_share='auto': 0.0" in caplog.text and "kind='dicece'" in caplog.text
    assert LabelFilter(peel_pile_share="auto", train_loss=SegmentationLoss("dice")).peel_pile_share == 0.9
    with pytest.raises(ValueError, match="label_filter#train_loss"):
        LabelFilter(peel_pile_share="auto")
    with pytest.raises(ValueError, match="'auto'"):
        LabelFilter(peel_pile_share="sometimes")


def _pile_and_hidden_wrong_labels(seed=0):
    """80 saturated losses (missed labels), then 150 correct and 100 wrong drawn labels whose losses overlap
    completely while their contour offsets do not."""
    rng = np.random.default_rng(seed)
    losses = torch.tensor(np.r_[np.ones(80), rng.normal(0.3, 0.08, 250).clip(0.0, 0.9)])
    offsets = torch.tensor(np.r_[rng.uniform(2, 4, 80), rng.gamma(2.0, 0.2, 150), rng.normal(3.0, 0.4, 100)])
    true_noisy = torch.cat([torch.ones(80, dtype=torch.bool), torch.zeros(150, dtype=torch.bool),
                            torch.ones(100, dtype=torch.bool)])
    return losses, offsets, true_noisy


def test_the_refit_can_judge_the_slices_outside_the_pile_by_their_contour_offset():
    losses, offsets, true_noisy = _pile_and_hidden_wrong_labels()
    on_loss = gmm_filter_peeled(losses, pile_share=0.0)
    on_offset = gmm_filter_peeled(losses, pile_share=0.0, refit_on=offsets, refit_name="contour_offset")
    assert on_offset.extra == {"saturated": 80, "statistic": "contour_offset",
                               "loss_separation": pytest.approx(gmm_filter(losses).separation)}
    assert on_offset.noisy[:80].all()  # the pile is found on the losses and stays Noisy
    precision, recall = filter_precision_recall(on_offset.noisy, true_noisy)
    assert precision >= 0.95 and recall >= 0.95
    assert filter_precision_recall(on_loss.noisy, true_noisy)[1] < 0.8
    # the parameters are in the normalised units of the offsets the refit saw
    x = normalise_losses(offsets)
    assert on_offset.means[1] == pytest.approx(float(x[230:].mean()), abs=0.05)
    with pytest.raises(ValueError, match="one value per sample"):
        gmm_filter_peeled(losses, refit_on=offsets[:-1], refit_name="contour_offset")


def test_label_filter_passes_the_contour_offset_to_the_refit_and_names_it_in_the_summary():
    losses, offsets, true_noisy = _pile_and_hidden_wrong_labels(1)
    has = torch.zeros(losses.numel(), dtype=torch.bool)
    trusted = torch.zeros(losses.numel(), dtype=torch.bool)
    trusted[80:100] = True  # correct labels the data set vouches for stay out of both fits
    lf = LabelFilter(peel_saturated=True, peel_pile_share=0.0, refit_statistic="contour_offset")
    verdicts = lf(losses, losses, has, trusted=trusted, contour_offset=offsets)
    summary = verdicts.summary()
    assert summary["gmm1_statistic"] == "contour_offset" and summary["gmm1_saturated"] == 80
    assert summary["gmm1_trusted"] == 20 and verdicts.manual.clean[80:100].all()
    precision, recall = filter_precision_recall(verdicts.manual.noisy, true_noisy)
    assert precision >= 0.95 and recall >= 0.95
    # the first fit's separation on the losses (of the judged, untrusted slices) is kept beside the refit's
    assert summary["gmm1_loss_separation"] == pytest.approx(gmm_filter(losses[~trusted]).separation)
    assert summary["gmm1_loss_separation"] != pytest.approx(summary["gmm1_separation"])
    on_loss = LabelFilter(peel_saturated=True, peel_pile_share=0.0)(losses, losses, has)
    assert on_loss.summary()["gmm1_statistic"] == "loss"
    single = LabelFilter()(losses, losses, has).summary()
    assert single["gmm1_loss_separation"] == single["gmm1_separation"]
    assert "refit_statistic='contour_offset'" in repr(lf)
    with pytest.raises(ValueError, match="pass contour_offset"):
        lf(losses, losses, has)
    with pytest.raises(ValueError, match="each of the 330 samples"):
        lf(losses, losses, has, contour_offset=offsets[:10])
    with pytest.raises(ValueError, match="needs peel_saturated"):
        LabelFilter(refit_statistic="contour_offset")
    with pytest.raises(ValueError, match="refit_statistic must be one of"):
        LabelFilter(peel_saturated=True, refit_statistic="area")


def _pile_and_offsets_apart_at(separation_scale, seed=0):
    """A pile of 80 saturated losses, then 150 correct and 100 wrong drawn labels with overlapping losses, whose
    contour offsets lie two populations apart by a separation that grows with ``separation_scale``."""
    rng = np.random.default_rng(seed)
    losses = torch.tensor(np.r_[np.ones(80), rng.normal(0.3, 0.08, 250).clip(0.0, 0.9)])
    offsets = torch.tensor(np.r_[rng.uniform(2, 4, 80), rng.normal(1.0, 0.4, 150),
                                 rng.normal(1.0 + separation_scale, 0.4, 100)])
    return losses, offsets


def test_the_refit_on_contour_offsets_needs_less_separation_than_the_refit_on_losses():
    """Offsets of correct labels stay small, so two offset populations at D between 2 and 3 are used; the same
    separation on the losses is not trusted (correct and wrong labels overlap there early in training)."""
    losses, offsets = _pile_and_offsets_apart_at(1.0)
    rest = gmm_filter(offsets[80:])
    assert 2.0 <= rest.separation < 3.0
    on_offset = gmm_filter_peeled(losses, pile_share=0.0, refit_on=offsets, refit_name="contour_offset")
    assert on_offset.extra.get("statistic") == "contour_offset"
    assert on_offset.noisy[230:].float().mean() >= 0.8 and on_offset.noisy[80:230].float().mean() <= 0.2
    # the same values judged under the loss's guard: the first fit (the pile alone) comes back
    as_loss = gmm_filter_peeled(losses, pile_share=0.0, refit_on=offsets, refit_name="loss")
    assert "statistic" not in as_loss.extra and torch.equal(as_loss.noisy, gmm_filter(losses).noisy)
    assert REFIT_SEPARATION == {"loss": 3.0, "contour_offset": 2.0}
    # two populations too close for either guard
    close, close_offsets = _pile_and_offsets_apart_at(0.4)
    assert gmm_filter(close_offsets[80:]).separation < 2.0
    kept = gmm_filter_peeled(close, pile_share=0.0, refit_on=close_offsets, refit_name="contour_offset")
    assert "statistic" not in kept.extra
    with pytest.raises(ValueError, match="no separation guard is set for a refit on 'area'"):
        gmm_filter_peeled(losses, pile_share=0.0, refit_on=offsets, refit_name="area")
    assert gmm_filter_peeled(losses, pile_share=0.0, refit_on=offsets, refit_name="area",
                             min_refit_separation=2.0).extra["statistic"] == "area"


def test_label_filter_takes_the_guard_of_its_statistic_unless_told_otherwise():
    losses, offsets = _pile_and_offsets_apart_at(1.0, seed=1)
    has = torch.zeros(losses.numel(), dtype=torch.bool)
    by_offset = LabelFilter(peel_saturated=True, peel_pile_share=0.0, refit_statistic="contour_offset")
    assert by_offset.refit_separation == 2.0 and LabelFilter(peel_saturated=True).refit_separation == 3.0
    assert by_offset(losses, losses, has, contour_offset=offsets).summary()["gmm1_statistic"] == "contour_offset"
    strict = LabelFilter(peel_saturated=True, peel_pile_share=0.0, refit_statistic="contour_offset",
                         refit_separation=3.0)
    assert strict(losses, losses, has, contour_offset=offsets).summary()["gmm1_statistic"] == "loss"
    assert "refit_separation=3.0" in repr(strict)
    for bad in (-1.0, float("nan"), True, "wide"):
        with pytest.raises(ValueError, match="refit_separation must be a separation"):
            LabelFilter(peel_saturated=True, refit_separation=bad)
