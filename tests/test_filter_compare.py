"""The filter-only comparison's scoring: same share of flagged slices, precision, recall, average precision."""

import pytest
import torch

from scripts.filter_compare import compare_rankings, flag_lowest


def test_flag_lowest_takes_the_k_lowest_scores():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.1, 0.7])
    assert flag_lowest(scores, 2).tolist() == [False, True, False, True, False]
    assert not flag_lowest(scores, 0).any()


def test_rankings_are_compared_at_the_filters_share():
    true = torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool)
    gmm = torch.tensor([1, 1, 0, 1, 0, 0], dtype=torch.bool)  # 3 flagged, 2 right
    gmm_clean_prob = torch.tensor([0.1, 0.2, 0.6, 0.3, 0.8, 0.9])
    cleanlab = torch.tensor([0.05, 0.2, 0.1, 0.9, 0.8, 0.7])  # its three lowest are exactly the noisy slices
    rows = {r["approach"]: r for r in compare_rankings(true, gmm, gmm_clean_prob, cleanlab)}
    assert rows["gmm1_filter"]["flagged"] == rows["cleanlab_slice_score"]["flagged"] == 3
    assert rows["gmm1_filter"]["precision"] == pytest.approx(2 / 3, abs=1e-4)
    assert rows["gmm1_filter"]["recall"] == pytest.approx(2 / 3, abs=1e-4)
    assert rows["cleanlab_slice_score"]["precision"] == rows["cleanlab_slice_score"]["recall"] == 1.0
    assert rows["cleanlab_slice_score"]["average_precision"] == 1.0
    assert rows["gmm1_filter"]["average_precision"] < 1.0
