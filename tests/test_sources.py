"""The parts a cleansing round is made of, each on its own: pseudo-label sources, the label filter, the slice
pass, the store's record of a competitor's refinement, and the handler's surface (its few parameters, the error a
renamed one gives)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from scripts.filtering import CLEANSE, KEEP_MANUAL, KEEP_PSEUDO, LabelFilter
from scripts.handlers import SelfCleansing
from scripts.ignore_index import IGNORE_INDEX
from scripts.prototypes import cleanse_labels
from scripts.slice_pass import SlicePass
from scripts.sources import AveragedPrototype, GridPrototypes, NoPseudoLabel, Prediction
from scripts.store import PseudoLabelStore
from tests.test_handlers import constant_network, toy_dataset


def _two_region_features(size: int = 16):
    """A prediction with a disc (class 1) and features that mark the disc, plus a patch the prediction missed."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = (yy - 8) ** 2 + (xx - 8) ** 2 <= 9
    missed = (yy - 8) ** 2 + (xx - 8) ** 2 <= 16
    features = torch.stack([missed.float(), (~missed).float()])
    return features[None], disc.long()[None], missed


@pytest.mark.parametrize("source", [GridPrototypes(grid=4), AveragedPrototype()])
def test_prototype_sources_extend_the_prediction_to_pixels_that_look_alike(source):
    features, prediction, missed = _two_region_features()
    out = source.candidates(features, prediction, num_classes=2)
    assert out.dtype == torch.uint8 and out.shape == prediction.shape
    # the prototypes of the predicted disc also claim the ring the prediction missed, and nothing else
    assert torch.equal(out[0].bool(), missed)


def test_grid_prototypes_default_to_a_quarter_of_the_slice_and_match_the_lcm_function():
    features, prediction, _ = _two_region_features()
    source = GridPrototypes(sigma=0.5, mu=0.6)
    assert source.grid_for(16, 16) == 4 and source.grid_for(256, 256) == 64
    expected = cleanse_labels(features[0], prediction[0], num_classes=2, grid=4, sigma=0.5, mu=0.6)
    assert torch.equal(source.candidates(features, prediction, 2)[0].long(), expected)
    maps = source.degree_maps(features[0], prediction[0], 2)
    assert len(maps) == 1 and maps[0].shape == (4, 4)
    with pytest.raises(ValueError, match="divide"):
        GridPrototypes(grid=5).candidates(features, prediction, 2)
    with pytest.raises(ValueError, match="fraction"):
        GridPrototypes(component_fraction=1.5)


def test_prediction_and_no_pseudo_label_sources():
    features, prediction, _ = _two_region_features()
    assert torch.equal(Prediction().candidates(features, prediction, 2), prediction.to(torch.uint8))
    assert (NoPseudoLabel().candidates(features, prediction, 2) == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="num_classes"):
        Prediction().candidates(features, prediction * 3, 2)


def test_label_filter_cascade_and_options():
    # eight slices with low losses and four with high ones, against manual and pseudo-labels
    manual = torch.tensor([0.1] * 8 + [0.9] * 4) + torch.linspace(0, 0.01, 12)
    pseudo = torch.tensor([0.5] * 8 + [0.1, 0.1, 0.9, 0.9]) + torch.linspace(0, 0.01, 12)
    has = torch.ones(12, dtype=torch.bool)
    verdicts = LabelFilter()(manual, pseudo, has)
    assert (verdicts.actions[:8] == KEEP_MANUAL).all()
    assert verdicts.actions[8:].tolist() == [KEEP_PSEUDO, KEEP_PSEUDO, CLEANSE, CLEANSE]
    summary = verdicts.summary()
    assert (summary["kept_manual"], summary["kept_pseudo"], summary["cleansed"]) == (8, 2, 2)
    # refresh re-cleanses every manual-Noisy slice; a disabled filter cleanses everything
    assert (LabelFilter(refresh=True)(manual, pseudo, has).actions[8:] == CLEANSE).all()
    assert (LabelFilter(enabled=False)(manual, pseudo, has).actions == CLEANSE).all()
    # without pseudo-labels yet, GMM-2 is not fitted and the manual-Noisy slices are cleansed
    fresh = LabelFilter()(manual, pseudo, torch.zeros(12, dtype=torch.bool))
    assert fresh.pseudo is None and (fresh.actions[8:] == CLEANSE).all()


def test_store_records_a_refinement_as_one_round():
    store = PseudoLabelStore("zeros")
    manual = torch.zeros(3, 4, 4, dtype=torch.uint8)
    store.initialise(manual)
    refined = manual.clone()
    refined[1, :2] = 1
    store.record_refinement(refined, torch.tensor([False, True, False]), {"epoch": 0})
    assert torch.equal(store.labels, refined) and store.has_pseudo.all()
    assert store.actions.tolist() == [[KEEP_MANUAL, CLEANSE, KEEP_MANUAL]]
    with pytest.raises(ValueError, match="each of the 3 slices"):
        store.record_refinement(refined, torch.tensor([True]), {})


def test_slice_pass_probabilities_cover_the_requested_slices_in_order():
    ds = toy_dataset(n_volumes=1, n_slices=5)
    net = constant_network(ds)
    net.train()
    probs = SlicePass(batch_size=2).probabilities([net], ds, [4, 0, 3])
    assert probs.shape == (3, 2, 32, 32) and net.training  # the network is given back in its mode
    # the constant network predicts each slice's own disc: the rows are the requested slices, in that order
    assert torch.equal(probs.argmax(1), ds.labels()[[4, 0, 3]].long())


def test_self_cleansing_takes_few_parameters_and_names_the_new_key_for_an_old_one():
    params = [p for p in inspect.signature(SelfCleansing.__init__).parameters if p != "self"]
    assert len(params) <= 12, params
    ds = toy_dataset(n_volumes=1, n_slices=4)
    with pytest.raises(TypeError) as err:
        SelfCleansing(constant_network(ds), ds, PseudoLabelStore(), 2, 1, pseudo_source="pred", flip_average=True,
                      colour="blue")
    message = str(err.value)
    assert "train#cleansing#pseudo_source is now train#cleansing#source" in message
    assert "train#cleansing#flip_average is now train#cleansing#slice_pass#flip_average" in message
    assert "train#cleansing#colour is not an argument" in message


def test_round_summary_carries_the_manual_mixture():
    manual = torch.tensor([0.1] * 8 + [0.9] * 4) + torch.linspace(0, 0.01, 12)
    summary = LabelFilter()(manual, manual, torch.ones(12, dtype=torch.bool)).summary()
    assert summary["gmm1_mean_clean"] < 0.1 < 0.9 < summary["gmm1_mean_noisy"]
    assert summary["gmm1_weight_noisy"] == pytest.approx(4 / 12, abs=0.01)
    assert summary["gmm1_separation"] > 5
    # too few slices for a fit: the same columns, NaN
    few = LabelFilter()(manual[:4], manual[:4], torch.ones(4, dtype=torch.bool)).summary()
    assert set(summary) == set(few) and math.isnan(few["gmm1_separation"])
