"""cleanlab inside the bundle: Confident Learning's flags from cleanlab's confident joint, checked against the
rule the competitor used before (a reference kept here), and the cleanlab segmentation peer (flagged pixels left
out of the loss) from its store to one training step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser

from conftest import REPO_ROOT

from scripts.confident_learning import (
    CleanlabSegmentationPhase,
    ConfidentLearningPhase,
    StoredLabelLoss,
    confident_thresholds,
    find_label_issues,
    segmentation_label_issues,
    slice_quality_scores,
)
from scripts.data import SliceDataset
from scripts.engine import HybridPrepareBatch
from scripts.ignore_index import IGNORE_INDEX
from scripts.losses import SegmentationLoss
from scripts.network import ResidualUNet
from scripts.registry import METHODS
from scripts.store import PseudoLabelStore


def reference_label_issues(probs: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The competitor's flags before cleanlab: the confident class is the most probable class among those reaching
    their threshold; a pixel is an issue when it has one, it is not the given label, and neither is the arg-max."""
    probs = probs.float()
    above = probs >= thresholds.float()[None, :, None, None]
    confident = torch.where(above, probs, torch.full_like(probs, -1.0)).argmax(1)
    labels = labels.long()
    issues = above.any(1) & (confident != labels) & (probs.argmax(1) != labels)
    return issues, torch.where(issues, confident, labels)


def _probs(labels: torch.Tensor, table: dict[int, list[float]]) -> torch.Tensor:
    """(N, C, H, W) probabilities: each pixel gets the row of ``table`` for its given label."""
    rows = torch.tensor([table[k] for k in sorted(table)])
    return rows[labels.long()].movedim(-1, 1).contiguous()


def crafted_case():
    """Four 8 x 8 slices, three classes. Classes 0 and 1 are predicted with 0.9, class 2 only with 0.45 (so its
    threshold is low). On top of that, in slice 0 a block labelled 0 is confidently class 2 (a missed structure)
    and a block labelled 1 confidently class 0 (a spill); in slice 1 a block labelled 0 leans to class 1 without
    reaching its threshold (uncertain) and a block labelled 0 has class 2 above its threshold but keeps its own
    label as arg-max."""
    labels = torch.zeros(4, 8, 8, dtype=torch.long)
    labels[:, 1:5, 1:5] = 1
    labels[:, 5:8, 4:8] = 2
    probs = _probs(labels, {0: [0.9, 0.05, 0.05], 1: [0.05, 0.9, 0.05], 2: [0.3, 0.25, 0.45]})
    blocks = {
        "missed": (0, slice(0, 1), slice(5, 8), [0.04, 0.03, 0.93]),
        "spill": (0, slice(1, 3), slice(1, 3), [0.95, 0.03, 0.02]),
        "uncertain": (1, slice(0, 1), slice(0, 4), [0.3, 0.5, 0.2]),
        "agreeing": (1, slice(6, 8), slice(0, 2), [0.5, 0.02, 0.48]),
    }
    for n, rows, cols, p in blocks.values():
        probs[n, :, rows, cols] = torch.tensor(p)[:, None, None]
    masks = {}
    for name, (n, rows, cols, _) in blocks.items():
        masks[name] = torch.zeros(labels.shape, dtype=torch.bool)
        masks[name][n, rows, cols] = True
    return probs, labels, masks


def test_thresholds_are_cleanlabs_per_class_means():
    probs, labels, _ = crafted_case()
    t = confident_thresholds(probs, labels)
    for k in range(3):
        assert float(t[k]) == pytest.approx(float(probs[:, k][labels == k].mean()), abs=1e-6)
    # a class no pixel carries gets a threshold no probability reaches
    t = confident_thresholds(torch.softmax(torch.randn(1, 3, 4, 4), 1), torch.tensor([[0, 1] * 8]).view(1, 4, 4))
    assert float(t[2]) > 1


def test_cleanlab_flags_equal_the_reference_on_the_crafted_case():
    probs, labels, masks = crafted_case()
    t = confident_thresholds(probs, labels)
    # the case is what its docstring says: the uncertain block reaches no threshold, the agreeing one does
    assert float(masks["uncertain"].sum()) and not (probs[:, 1][masks["uncertain"]] >= t[1]).any()
    assert (probs[:, 2][masks["agreeing"]] >= t[2]).all()
    issues, corrected = find_label_issues(probs, labels)
    ref_issues, ref_corrected = reference_label_issues(probs, labels, t)
    assert torch.equal(issues, ref_issues)
    assert torch.equal(issues, masks["missed"] | masks["spill"])
    assert torch.equal(corrected.long(), ref_corrected)


def test_corrected_labels_are_the_confident_classes_on_flagged_pixels():
    probs, labels, masks = crafted_case()
    issues, corrected = find_label_issues(probs, labels)
    assert corrected.dtype == labels.dtype
    assert torch.all(corrected[masks["missed"]] == 2) and torch.all(corrected[masks["spill"]] == 0)
    assert torch.equal(corrected[~issues], labels[~issues])
    assert torch.all(corrected[issues] != labels[issues])  # every flag changes the SLSR target


def test_cleanlab_counts_several_confident_classes_under_the_arg_max():
    """The one documented difference: when two classes reach their thresholds while a third one that does not
    leads, cleanlab's confident joint counts the pixel under the overall arg-max, the reference under the most
    probable confident class. A pixel labelled 1 whose confident classes are 1 and 2 but whose arg-max is 0 is
    then an issue for cleanlab (corrected to 0) and none for the reference."""
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[:, :4, :4] = 1
    labels[:, 4:, 4:] = 2
    probs = _probs(labels, {0: [0.9, 0.05, 0.05], 1: [0.6, 0.3, 0.1], 2: [0.65, 0.1, 0.25]})
    probs[0, :, 0, 0] = torch.tensor([0.40, 0.32, 0.28])
    t = confident_thresholds(probs, labels)
    assert float(probs[0, 0, 0, 0]) < t[0] and float(probs[0, 1, 0, 0]) >= t[1] and float(probs[0, 2, 0, 0]) >= t[2]
    issues, corrected = find_label_issues(probs, labels)
    ref_issues, _ = reference_label_issues(probs, labels, t)
    corner = torch.zeros_like(issues)
    corner[0, 0, 0] = True
    assert not ref_issues.any()
    assert torch.equal(issues, corner) and int(corrected[0, 0, 0]) == 0


# ---------------------------------------------------------------- the cleanlab segmentation peer


def disc_dataset(n_volumes: int = 2, n_slices: int = 4, size: int = 32, erased: tuple = ()) -> SliceDataset:
    """Bright discs (label 1) on noise; the discs of the ``erased`` slices are cut in half in the given labels,
    the clean labels kept."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    records = []
    for v in range(n_volumes):
        image = rng.normal(0, 0.1, (1, size, size, n_slices)).astype(np.float32)
        label = np.zeros((1, size, size, n_slices), dtype=np.uint8)
        for z in range(n_slices):
            disc = (yy - size // 2) ** 2 + (xx - size // 2) ** 2 <= (5 + z + v) ** 2
            image[0, disc, z] += 1.0
            label[0, disc, z] = 1
        records.append({"image": image, "label": label, "case": f"case{v}"})
    ds = SliceDataset(records)
    if erased:
        labels = ds.labels().clone()
        labels[list(erased), :, : size // 2] = 0
        ds.set_labels(labels)
    return ds


def run_phase(phase_class, ds: SliceDataset, probs: torch.Tensor) -> PseudoLabelStore:
    """The phase's work after the teachers, on fixed out-of-sample probabilities."""

    class Given(phase_class):
        def out_of_sample_probabilities(self, n_slices):
            return probs.to(torch.float16)

    store = PseudoLabelStore("manual")
    store.ensure(ds.labels())
    Given(None, ds, store, None, teacher_epochs=1)(Engine(lambda e, b: None))
    assert ds.store is store  # training batches carry the store's labels from now on
    return store


def truth_probabilities(ds: SliceDataset) -> torch.Tensor:
    """Teachers that learnt the truth: 0.9 on the clean class."""
    p1 = 0.1 + 0.8 * ds.clean_labels().float()
    return torch.stack([1 - p1, p1], 1)


def test_confident_learning_phase_stores_the_corrections():
    ds = disc_dataset(erased=(1, 6))
    clean, manual = ds.clean_labels(), ds.labels()
    store = run_phase(ConfidentLearningPhase, ds, truth_probabilities(ds))
    assert torch.equal(store.labels, clean)  # every erased pixel flagged and corrected, nothing else touched
    summary = store.rounds[0]
    assert summary["flag_precision"] == 1.0 and summary["flag_recall"] == 1.0
    assert summary["pixel_error_corrected"] == 0.0 and summary["flagged_slices"] == 2
    assert {"threshold_0", "threshold_1"} <= set(summary)
    assert summary["pixel_error_manual"] == pytest.approx(float((manual != clean).float().mean()))


def test_cleanlab_store_ignores_exactly_the_flagged_pixels():
    ds = disc_dataset(erased=(1, 6))
    clean, manual = ds.clean_labels(), ds.labels()
    probs = truth_probabilities(ds)
    store = run_phase(CleanlabSegmentationPhase, ds, probs)
    flags = segmentation_label_issues(probs.to(torch.float16), manual)
    wrong = manual != clean
    assert flags.any() and torch.equal(flags, wrong)  # the erased half discs, and nothing else
    assert torch.equal(store.labels == IGNORE_INDEX, flags)
    assert torch.equal(store.labels[~flags], manual[~flags])
    assert torch.equal(store.actions[0] == 2, flags.flatten(1).any(1))  # the flagged slices count as cleansed
    summary = store.rounds[0]
    assert summary["flagged_slices"] == 2 and summary["flag_precision"] == 1.0 and summary["flag_recall"] == 1.0
    assert summary["flagged_pixel_fraction"] == pytest.approx(float(flags.float().mean()))
    assert summary["pixel_error_supervised"] == 0.0


def test_slice_quality_scores_rank_the_wrong_slices_lowest():
    ds = disc_dataset(erased=(1, 6))
    clean = ds.clean_labels()
    p1 = 0.05 + 0.9 * clean.float()
    probs = torch.stack([1 - p1, p1], 1)
    scores = slice_quality_scores(probs, ds.labels())
    assert scores.shape == (len(ds),) and torch.all((scores >= 0) & (scores <= 1))
    assert set(torch.argsort(scores)[:2].tolist()) == {1, 6}


def test_stored_label_loss_reads_the_store_channel():
    torch.manual_seed(0)
    base = SegmentationLoss("dicece")
    loss = StoredLabelLoss(base)
    logits = torch.randn(2, 3, 8, 8)
    given = torch.randint(0, 3, (2, 1, 8, 8)).float()
    stored = given.clone()
    stored[:, :, :4] = IGNORE_INDEX
    assert torch.allclose(loss(logits, torch.cat([given, stored], 1)), base(logits, stored))
    assert torch.allclose(loss(logits, given), base(logits, given))


def test_one_training_step_of_the_cleanlab_method():
    torch.manual_seed(0)
    ds = disc_dataset(erased=(1, 6))
    net = ResidualUNet(out_channels=2, channels=(4, 8, 16, 32))
    store = PseudoLabelStore("manual")
    seg = SegmentationLoss("dicece")
    loss = StoredLabelLoss(seg)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    prepare = HybridPrepareBatch()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    seen = []

    def step(engine, batch):
        x, y = prepare(batch)
        seen.append(y)
        optimizer.zero_grad()
        value = loss(net(x), y).mean()
        value.backward()
        optimizer.step()
        return value.item()

    trainer = Engine(step)
    CleanlabSegmentationPhase(net, ds, store, seg, teacher_epochs=1, batch_size=4).attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: e.terminate())
    trainer.run(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False), max_epochs=1)
    assert len(store.rounds) == 1 and {"flagged_pixel_fraction", "flag_precision"} <= set(store.rounds[0])
    # the batch carried the store's labels, IGNORE_INDEX on flagged pixels and the given labels elsewhere
    y = seen[0]
    assert y.shape[1] == 2
    kept = y[:, 1] != IGNORE_INDEX
    assert torch.equal(y[:, 1][kept], y[:, 0][kept])
    assert int((store.labels == IGNORE_INDEX).sum()) == round(store.rounds[0]["flagged_pixel_fraction"]
                                                              * store.labels.numel())
    after = net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


def test_cleanlab_method_config():
    assert METHODS["cleanlab"] == ["configs/methods/cleanlab.json"]
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / c) for c in ["configs/train.json", *METHODS["cleanlab"]]])
    assert parser["run_name"] == "cleanlab" and parser["self_cleansing"] is False
    assert parser["train#store#init"] == "manual"
    assert parser["loss"]["_target_"] == "scripts.confident_learning.StoredLabelLoss"
    assert parser["train#handlers"][-1]["_target_"] == "scripts.confident_learning.CleanlabSegmentationPhase"
    assert issubclass(CleanlabSegmentationPhase, ConfidentLearningPhase)
