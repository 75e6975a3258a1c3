"""Pictures of a cleansing round: the panels' pixels, the figures' form, and the PNGs a round writes."""

from __future__ import annotations

import csv

import matplotlib
import numpy as np
import pytest
import torch
from ignite.engine import Engine

from scripts.figures import (CLASS_ALPHA, CLASS_COLOURS, GAP, PANEL_PIXELS, UNSUPERVISED_ALPHA, UNSUPERVISED_COLOUR,
                             degree_panel, gmm_figure, label_overlay, mosaic, pseudo_label_figure,
                             representation_figure)
from scripts.filtering import gmm_filter
from scripts.handlers import CleansingRound, SelfCleansing
from scripts.reporting import CleansingImages
from scripts.sources import Prediction
from scripts.store import PseudoLabelStore
from tests.test_handlers import constant_network, offset_refit_round, toy_dataset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_label_overlay_blends_each_class_and_the_unsupervised_pixels():
    image = torch.tensor([[0.0, 1.0, 2.0, 4.0]])  # grey levels 0, .25, .5, 1 after scaling by the range
    label = torch.tensor([[0, 1, 255, 3]], dtype=torch.uint8)
    rgb = label_overlay(image, label)
    assert rgb.shape == (1, 4, 3)
    np.testing.assert_allclose(rgb[0, 0], [0, 0, 0])  # background: the grey image itself
    np.testing.assert_allclose(rgb[0, 1], (1 - CLASS_ALPHA) * 0.25 + CLASS_ALPHA * np.array(CLASS_COLOURS[0]),
                               rtol=1e-6)
    np.testing.assert_allclose(rgb[0, 2], (1 - UNSUPERVISED_ALPHA) * 0.5
                               + UNSUPERVISED_ALPHA * np.array(UNSUPERVISED_COLOUR), rtol=1e-6)
    np.testing.assert_allclose(rgb[0, 3], (1 - CLASS_ALPHA) + CLASS_ALPHA * np.array(CLASS_COLOURS[2]), rtol=1e-6)


def test_label_overlay_cycles_colours_past_the_last_and_handles_a_flat_image():
    rgb = label_overlay(torch.ones(1, 2), torch.tensor([[4, 1]], dtype=torch.uint8))
    np.testing.assert_allclose(rgb[0, 0], rgb[0, 1])  # class 4 takes class 1's colour
    np.testing.assert_allclose(rgb[0, 0], CLASS_ALPHA * np.array(CLASS_COLOURS[0]), rtol=1e-6)  # flat image: black


def test_label_overlay_names_disagreeing_shapes():
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        label_overlay(torch.zeros(4, 4), torch.zeros(4, 5, dtype=torch.uint8))


def test_mosaic_places_panels_with_gaps():
    panels = [[np.full((2, 3, 3), r * 2 + c, np.float32) / 4 for c in range(2)] for r in range(2)]
    out = mosaic(panels)
    assert out.shape == (2 * 2 + GAP, 2 * 3 + GAP, 3)
    for r in range(2):
        for c in range(2):
            block = out[r * (2 + GAP): r * (2 + GAP) + 2, c * (3 + GAP): c * (3 + GAP) + 3]
            assert np.all(block == (r * 2 + c) / 4)
    assert np.all(out[2: 2 + GAP] == 1) and np.all(out[:, 3: 3 + GAP] == 1)  # white gaps
    with pytest.raises(ValueError, match=r"panel \(1, 0\)"):
        mosaic([[panels[0][0]], [np.zeros((2, 2, 3), np.float32)]])


def test_degree_panel_spreads_each_cell_over_its_pixels():
    degree = torch.zeros(4, 4)
    degree[1, 2] = 1.0
    panel = degree_panel(degree, (8, 8))
    jet = matplotlib.colormaps["jet"]
    hot, cold = np.array(jet(1.0)[:3]), np.array(jet(0.0)[:3])
    np.testing.assert_allclose(panel[2:4, 4:6].reshape(-1, 3), np.tile(hot, (4, 1)), rtol=1e-6)
    others = np.ones((8, 8), bool)
    others[2:4, 4:6] = False
    np.testing.assert_allclose(panel[others], np.tile(cold, (others.sum(), 1)), rtol=1e-6)


def test_figures_are_rgb_images_sized_by_their_panels():
    images = torch.rand(3, 32, 32)
    labels = torch.randint(0, 4, (3, 32, 32), dtype=torch.uint8)
    two_rows = pseudo_label_figure(images, {"manual": labels, "pseudo": labels})
    four_rows = pseudo_label_figure(images, {"clean": labels, "manual": labels, "prediction": labels,
                                             "pseudo": labels})
    for rgb in (two_rows, four_rows):
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert four_rows.shape[1] == two_rows.shape[1] and four_rows.shape[0] > 1.8 * two_rows.shape[0] - 40
    rep = representation_figure(images[0], [torch.rand(8, 8), torch.rand(8, 8)], ["RV", "LV"])
    assert rep.dtype == np.uint8 and rep.shape[1] > 2.5 * rep.shape[0]  # three panels side by side
    losses = torch.cat([torch.rand(40) * 0.2, 0.8 + torch.rand(20) * 0.2])
    for flags in (None, torch.arange(60) >= 40):
        rgb = gmm_figure(losses, gmm_filter(losses), "GMM-1", flags)
        assert rgb.dtype == np.uint8 and rgb.shape[2] == 3
    # too few samples to fit: drawn without the component curves, not an error
    few = gmm_filter(torch.rand(3))
    assert few.status != "ok"
    assert gmm_figure(torch.rand(3), few, "GMM-1").shape[2] == 3


class _Writer:
    def __init__(self):
        self.images = []

    def add_image(self, tag, image, step, dataformats):
        self.images.append((tag, image.shape, step, dataformats))


def test_a_round_writes_its_pictures(tmp_path):
    ds = toy_dataset(missing=(1, 9, 17))
    store = PseudoLabelStore("zeros")
    handler = SelfCleansing(constant_network(ds), ds, store, num_classes=2, start_epoch=1, source=Prediction())
    store.initialise(ds.labels())
    rnd = CleansingRound(epoch=3, index=1)
    handler.collect(rnd)
    handler.filter(rnd)
    handler.cleanse(rnd)
    engine = Engine(lambda e, b: None)
    engine.state.cleansing = rnd
    writer = _Writer()
    CleansingImages(handler, str(tmp_path / "cleansing"), n_examples=2, class_names=["disc"],
                    summary_writer=writer)(engine)
    names = sorted(p.name for p in (tmp_path / "cleansing").iterdir())
    assert names == ["round_01_gmm_manual.png", "round_01_losses.csv", "round_01_pseudo_labels.png",
                     "round_01_representation.png"]
    with open(tmp_path / "cleansing" / "round_01_losses.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["sample"]) for r in rows] == list(range(len(ds)))
    assert [float(r["manual_loss"]) for r in rows] == pytest.approx(rnd.manual_loss.tolist())
    assert [int(r["action"]) for r in rows] == rnd.actions.tolist()
    # the missed slices are the truly noisy ones, and the table says so
    assert [i for i, r in enumerate(rows) if r["truly_noisy"] == "True"] == [1, 9, 17]
    for name in (n for n in names if n.endswith(".png")):
        assert (tmp_path / "cleansing" / name).read_bytes()[:8] == PNG_MAGIC
    assert [(tag, step, fmt) for tag, _, step, fmt in writer.images] == [
        ("gmm_manual", 3, "HWC"), ("representation", 3, "HWC"), ("pseudo_labels", 3, "HWC")]
    # rows clean, manual, prediction, pseudo: the pseudo-label figure is taller than it is wide for two samples
    height, width, _ = writer.images[2][1]
    assert height > width


def test_panels_reach_the_figure_unresampled():
    """The mosaic is placed pixel for pixel, enlarged by a whole factor: a uniform panel keeps its exact colour."""
    image = torch.zeros(1, 32, 32)
    label = torch.full((1, 32, 32), 3, dtype=torch.uint8)
    rgb = pseudo_label_figure(image, {"manual": label})
    expected = np.round(255 * CLASS_ALPHA * np.array(CLASS_COLOURS[2])).astype(np.uint8)  # black image, LV colour
    side = 32 * round(PANEL_PIXELS / 32)
    assert (rgb == expected).all(-1).sum() == side * side


def test_a_round_refitted_on_contour_offsets_draws_and_writes_them(tmp_path):
    """When GMM-1's verdicts come from the refit on contour offsets, the round's figure draws that statistic and its
    table gives each slice's offset."""
    handler, _, _, rnd = offset_refit_round(epoch=3)
    handler.collect(rnd)
    handler.filter(rnd)
    handler.cleanse(rnd)
    assert rnd.manual_filter.extra["statistic"] == "contour_offset"
    engine = Engine(lambda e, b: None)
    engine.state.cleansing = rnd
    CleansingImages(handler, str(tmp_path / "cleansing"), n_examples=2, class_names=["disc"])(engine)
    with open(tmp_path / "cleansing" / "round_01_losses.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["contour_offset"]) for r in rows] == pytest.approx(rnd.contour_offset.tolist())
    assert float(rows[9]["contour_offset"]) > 2.0
    assert (tmp_path / "cleansing" / "round_01_gmm_manual.png").read_bytes()[:8] == PNG_MAGIC
