"""The cleansing round as Ignite handlers: the cascade on a first round, events, training state, audit, noisy copy."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from scipy import ndimage

from conftest import REPO_ROOT, load_nifti

from scripts.data import SliceDataset, acdc_datalist
from scripts.engine import CleansingEvents, HybridPrepareBatch
from scripts.filtering import CLEANSE, KEEP_MANUAL, KEEP_PSEUDO, LabelFilter
from scripts.handlers import CleansingRound, HybridLossSchedule, OracleCleansing, SelfCleansing
from scripts.losses import HybridLoss, SegmentationLoss
from scripts.network import ResidualUNet
from scripts.noise import BOUNDARY, CLEAN, MISSING, disk
from scripts.repair import near_foreground
from scripts.slice_pass import SlicePass
from scripts.sources import GridPrototypes, Prediction
from scripts.store import PseudoLabelStore
from scripts.targets import TargetRules


def disc_volume(n_slices: int, size: int = 32, seed: int = 0):
    """A bright disc (label 1) on noise in every slice, radius varying by slice."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = rng.normal(0, 0.1, (1, size, size, n_slices)).astype(np.float32)
    label = np.zeros((1, size, size, n_slices), dtype=np.uint8)
    for z in range(n_slices):
        r = 5 + z % 4
        disc = (yy - size // 2) ** 2 + (xx - size // 2) ** 2 <= r * r
        image[0, disc, z] += 1.0
        label[0, disc, z] = 1
    return image, label


def toy_dataset(n_volumes: int = 3, n_slices: int = 8, missing: tuple = (), trusted_empty_run=None) -> SliceDataset:
    records = []
    for v in range(n_volumes):
        image, label = disc_volume(n_slices, seed=v)
        records.append({"image": image, "label": label, "case": f"case{v}"})
    ds = SliceDataset(records, trusted_empty_run=trusted_empty_run)
    if missing:
        labels = ds.labels().clone()
        labels[list(missing)] = 0  # simulated missing-label noise, clean labels kept
        ds.set_labels(labels)
    return ds


class ConstantNetwork(torch.nn.Module):
    """Predicts the clean disc of every slice confidently, whatever the input."""

    def __init__(self, dataset: SliceDataset):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.maps = torch.stack([s["clean_label"] if "clean_label" in s else s["label"] for s in dataset.data])
        self.index = {}

    def forward_features(self, x):
        idx = [self.index[round(float(v), 2)] for v in x.flatten(1).sum(1)]
        fg = self.maps[idx].float()
        logits = torch.cat([-8 * fg + 4, 8 * fg - 4], 1) + self.weight
        return logits, torch.cat([fg, 1 - fg], 1) + 0.01 * torch.randn_like(fg)

    def forward(self, x):
        return self.forward_features(x)[0]


def constant_network(ds):
    net = ConstantNetwork(ds)
    net.index = {round(float(s["image"].sum()), 2): i for i, s in enumerate(ds.data)}
    return net


_FILTER_OPTIONS = {"unlabelled_as_noisy", "refresh", "enabled", "seed", "skip_trusted"}


def cleansing(ds, store, net=None, source=None, **options) -> SelfCleansing:
    """A round on the toy set cleansed by the prediction; ``options`` name target rules and label filter options."""
    rules = {k: options.pop(k) for k in list(options) if k in TargetRules.__dataclass_fields__}
    label_filter = {k: options.pop(k) for k in list(options) if k in _FILTER_OPTIONS}
    return SelfCleansing(net if net is not None else constant_network(ds), ds, store, num_classes=2, start_epoch=1,
                         source=source if source is not None else Prediction(), rules=TargetRules(**rules),
                         label_filter=LabelFilter(**label_filter), **options)


def run_round(handler: SelfCleansing) -> CleansingRound:
    """The first round of ``handler`` on its data set, its store starting from the manual labels."""
    handler.store.initialise(handler.dataset.labels())
    rnd = CleansingRound(epoch=1, index=1)
    handler.collect(rnd)
    handler.filter(rnd)
    handler.cleanse(rnd)
    return rnd


def first_round(missing: tuple, trusted_empty_run=None, **kwargs):
    """One cleansing round on the toy set with the given slices' labels removed, cleansed by prediction."""
    ds = toy_dataset(missing=missing, trusted_empty_run=trusted_empty_run)
    store = PseudoLabelStore("zeros")
    return ds, store, run_round(cleansing(ds, store, **kwargs))


@pytest.mark.parametrize("unlabelled_as_noisy", [True, False])
def test_first_round_with_all_zero_pseudo_labels(unlabelled_as_noisy):
    missing = (1, 5, 9, 13, 17, 21)
    ds, store, rnd = first_round(missing, unlabelled_as_noisy=unlabelled_as_noisy)
    noisy = torch.zeros(len(ds), dtype=torch.bool)
    noisy[list(missing)] = True
    # the filter finds exactly the slices whose label went missing
    assert torch.equal(~rnd.manual_filter.clean, noisy)
    assert (rnd.actions[~noisy] == KEEP_MANUAL).all()
    if unlabelled_as_noisy:
        assert (rnd.actions[noisy] == CLEANSE).all()
        # cleansed with the prediction: the pseudo-labels of the missing slices are the clean discs again
        assert torch.equal(store.labels, ds.clean_labels())
        assert rnd.summary["dice_pseudo_vs_clean"] == pytest.approx(1.0)
        assert rnd.summary["noisy_pooled_dice_pseudo_vs_clean"] == pytest.approx(1.0)
        assert rnd.summary["noisy_pooled_dice_manual_vs_clean"] == 0.0  # the removed discs
        assert rnd.summary["pseudo_supervised"] == 1.0
    else:
        # the paper read literally: every pseudo loss is equal, GMM-2 calls all Clean, the empty targets stay
        assert rnd.pseudo_filter.status == "constant_losses"
        assert (rnd.actions[noisy] == KEEP_PSEUDO).all()
        assert store.labels[noisy].sum() == 0
    assert store.has_pseudo.all() and store.actions.shape == (1, len(ds))


@pytest.mark.parametrize("skip_trusted", [True, False])
def test_slices_the_data_set_trusts_are_not_judged(skip_trusted):
    """Slices 0 and 1 open volume 0 with a run of 2 empty labels, so the data set takes them as truly empty; slice 13
    is a gap inside volume 1. All three miss the disc the network predicts."""
    ds, store, rnd = first_round((0, 1, 13), trusted_empty_run=2, skip_trusted=skip_trusted)
    assert ds.trusted.nonzero().flatten().tolist() == [0, 1]
    assert not rnd.manual_filter.clean[13] and rnd.actions[13] == CLEANSE
    if skip_trusted:
        assert rnd.manual_filter.clean[:2].all() and (rnd.actions[:2] == KEEP_MANUAL).all()
        assert rnd.summary["gmm1_trusted"] == 2 and store.labels[:2].sum() == 0
    else:
        assert not rnd.manual_filter.clean[:2].any() and rnd.summary["gmm1_trusted"] == 0


def test_refresh_recleanses_noisy_slices_every_round():
    ds = toy_dataset(missing=(2, 3))
    store = PseudoLabelStore("zeros")
    handler = cleansing(ds, store, refresh=True)
    store.initialise(ds.labels())
    for index in (1, 2):
        rnd = CleansingRound(epoch=index, index=index)
        handler.collect(rnd)
        handler.filter(rnd)
        handler.cleanse(rnd)
    # in round 2 the pseudo-labels of the noisy slices are Clean for GMM-2, yet refresh cleanses them again
    assert (rnd.actions[[2, 3]] == CLEANSE).all()


def test_round_fires_events_in_order_and_updates_store_during_training():
    torch.manual_seed(0)
    ds = toy_dataset(n_volumes=2, n_slices=8)
    net = ResidualUNet(out_channels=2)
    store = PseudoLabelStore("zeros")
    loss = HybridLoss(SegmentationLoss("dicece"))
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    prepare = HybridPrepareBatch()
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True)

    def step(engine, batch):
        x, y = prepare(batch)
        optimizer.zero_grad()
        value = loss(net(x), y).mean()
        value.backward()
        optimizer.step()
        engine.state.targets_channels = y.shape[1]
        return value.item()

    trainer = Engine(step)
    HybridLossSchedule(loss, e1=1, e2=2).attach(trainer)
    SelfCleansing(net, ds, store, num_classes=2, start_epoch=1, interval=1, source=GridPrototypes(grid=32),
                  slice_pass=SlicePass(batch_size=8)).attach(trainer)
    fired = []
    for event in CleansingEvents:
        trainer.add_event_handler(event, lambda e, ev=event: fired.append(ev))
    channels = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: channels.append(e.state.targets_channels))
    trainer.run(loader, max_epochs=3)
    assert fired == list(CleansingEvents) * 3
    assert len(store.rounds) == 3 and store.has_pseudo.all()
    # the store was attached to the data set: batches carried the pseudo-label as a second target channel
    assert channels == [2, 2, 2]
    assert trainer.state.lambda2 == 1.0 and loss.lambda1 == 0.0


def test_audit_writes_verdicts_and_volumes_in_source_geometry(acdc_dir, tmp_path):
    from monai.transforms import Compose, LoadImaged

    from scripts.audit import run_audit
    from scripts.transforms import HeartCentredCropd

    transform = Compose([LoadImaged(["image", "label"], image_only=True, ensure_channel_first=True),
                         HeartCentredCropd(["image", "label"], roi_size=(24, 24))])
    records = acdc_datalist(str(acdc_dir), "all")
    ds = SliceDataset(records, volume_transform=transform)
    net = ResidualUNet(out_channels=4)
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    out = run_audit(net, ds, str(ckpt), str(tmp_path / "audit"), num_classes=4, source=GridPrototypes(grid=24))
    rows = (out / "audit.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(ds)
    for rec in records:
        name = rec["label"].split("/")[-1].split(".nii")[0]
        written = nib.load(str(out / f"{name}_cleansed.nii.gz"))
        source = nib.load(rec["label"])
        assert written.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine)
    with pytest.raises(FileExistsError, match="not empty"):
        run_audit(net, ds, str(ckpt), str(out), num_classes=4, source=GridPrototypes(grid=24))


def test_audit_maps_zoomed_canvas_slices_back_to_the_source(acdc_dir):
    """With the default volume pipeline (in-plane zoom, then a centred canvas), slice labels go back to the
    source grid through MONAI's inverse of the recorded operations."""
    from monai.bundle import ConfigParser

    from scripts.audit import invert_to_source

    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "configs" / "train.json"))
    parser.update({"scale": 0.5, "slice_size": [20, 12]})  # 32 x 32 -> 16 x 16 -> padded rows, cropped columns
    transform = parser.get_parsed_content("train#volume_preprocessing")
    records = acdc_datalist(str(acdc_dir), "all")
    ds = SliceDataset(records, volume_transform=transform)
    assert ds.slice_shape == (20, 12)
    for info in ds.volume_info:
        ids = list(range(info["first_id"], info["first_id"] + info["n_slices"]))
        source = load_nifti(info["record"]["label"])
        back = invert_to_source(ds.labels()[ids], info["label_ops"], transform, source.shape)
        assert back.shape == source.shape
        # the four source columns the canvas cut off on each side come back empty; inside, nearest zooming down and up
        # keeps each structure where it was
        kept = np.zeros(source.shape, bool)
        kept[:, 4:28] = True
        assert not back[~kept].any()
        agree = (back[kept] == source[kept]).mean()
        assert agree > 0.85, agree


def test_noisy_copy_keeps_clean_labels_and_flags(acdc_dir, tmp_path):
    from scripts.make_noisy import make_noisy_copy

    dst = make_noisy_copy(str(acdc_dir), str(tmp_path / "noisy"), alpha=1.0, beta=4, seed=0)
    info = json.loads((dst / "noise.json").read_text())
    train_cases = {r["case"] for r in acdc_datalist(str(acdc_dir), "train")}
    assert set(info["flags"]) == train_cases
    for case, flags in info["flags"].items():
        patient = case.split("_")[0]
        noisy = np.asarray(nib.load(str(dst / patient / f"{case}_gt.nii.gz")).dataobj)
        clean = np.asarray(nib.load(str(dst / patient / f"{case}_gt_clean.nii.gz")).dataobj)
        original = np.asarray(nib.load(str(acdc_dir / patient / f"{case}_gt.nii.gz")).dataobj)
        np.testing.assert_array_equal(clean, original)
        for z, flag in enumerate(flags):
            changed = not np.array_equal(noisy[..., z], clean[..., z])
            # α = 1: every slice with foreground is noisy; a flag says how, and only flagged slices changed
            assert changed == (flag != 0) or (flag == 2 and not changed and clean[..., z].any())
    with pytest.raises(FileExistsError):
        make_noisy_copy(str(acdc_dir), str(dst), alpha=0.5, beta=4)


@pytest.mark.parametrize("kind", ["dice", "dicece"])
@pytest.mark.parametrize("channels", [1, 4])
def test_ignored_pixels_carry_neither_loss_nor_gradient(kind, channels):
    torch.manual_seed(0)
    logits = torch.randn(2, channels, 16, 16, requires_grad=True)
    target = torch.randint(0, max(2, channels), (2, 1, 16, 16)).float()
    target[:, :, :8] = 255
    loss = SegmentationLoss(kind)
    value = loss(logits, target)
    value.sum().backward()
    assert torch.isfinite(value).all()
    assert logits.grad[:, :, :8].abs().max() == 0 and logits.grad[:, :, 8:].abs().max() > 0
    changed = logits.detach().clone()
    changed[:, :, :8] += 5.0
    assert torch.allclose(loss(changed, target), value.detach())


def test_agreement_marks_contested_pixels_unsupervised():
    missing = (1, 5, 9, 13, 17, 21)
    ds, store, _ = first_round(missing, agreement=True)
    clean = ds.clean_labels()
    for i in missing:
        # the manual label says background, the prediction says disc: the disc is left unsupervised
        assert torch.equal(store.labels[i] == 255, clean[i] == 1)
        assert (store.labels[i][clean[i] == 0] == 0).all()


def test_agreement_confidence_leaves_uncertain_agreeing_pixels_unsupervised():
    missing = (1, 5, 9, 13, 17, 21)
    ds = toy_dataset(missing=missing)
    store = PseudoLabelStore("zeros")
    handler = cleansing(ds, store, agreement=True, agreement_confidence=0.8)
    store.initialise(ds.labels())
    rnd = CleansingRound(epoch=1, index=1)
    handler.collect(rnd)
    unsure = torch.zeros_like(rnd.confidence, dtype=torch.bool)
    unsure[:, :4] = True  # the network is unsure of the top rows of every slice
    rnd.confidence[unsure] = round(255 * 0.6)
    handler.filter(rnd)
    handler.cleanse(rnd)
    clean, idx = ds.clean_labels(), list(missing)
    labels, unsure_noisy = store.labels[idx], unsure[idx]
    assert (labels[unsure_noisy] == 255).all()
    # elsewhere the plain agreement: background where both say so, the contested disc unsupervised
    sure = ~unsure_noisy
    assert torch.equal(labels[sure] == 255, clean[idx][sure] == 1)
    # the slices kept with their manual label are untouched by the threshold
    kept = [i for i in range(len(ds)) if i not in missing]
    assert torch.equal(store.labels[kept], ds.labels()[kept])


def test_confident_fill_restores_what_the_network_is_sure_of():
    missing = (1, 5, 9, 13, 17, 21)
    ds, store, rnd = first_round(missing, agreement=True, confident_fill=0.9)
    clean = ds.clean_labels()
    # the constant network predicts the clean discs with probability ~0.9997: contested pixels are filled
    assert (rnd.confidence[list(missing)] >= 250).all()
    assert torch.equal(store.labels[list(missing)], clean[list(missing)])


def _round_on(ds: SliceDataset, **kwargs) -> tuple[PseudoLabelStore, CleansingRound]:
    store = PseudoLabelStore("zeros")
    return store, run_round(cleansing(ds, store, agreement=True, **kwargs))


def test_repair_radius_moves_a_wide_contour_back_and_keeps_its_ring_supervised():
    ds = toy_dataset()
    labels, wide = ds.labels().clone(), [2, 6, 10, 14, 18, 22]
    for i in wide:  # contours drawn 3 pixels too wide
        labels[i] = torch.as_tensor(ndimage.binary_dilation(labels[i].numpy(), disk(3))).to(torch.uint8)
    ds.set_labels(labels)
    clean = ds.clean_labels()
    plain, _ = _round_on(ds)
    repaired, rnd = _round_on(ds, repair_radius=5)
    assert set(torch.nonzero(rnd.actions == CLEANSE).flatten().tolist()) == set(wide)
    assert rnd.summary["repaired_structures"] == len(wide)
    for i in wide:
        ring = (labels[i] == 1) & (clean[i] == 0)
        assert (plain.labels[i][ring] == 255).all()  # as drawn, the ring is contested
        assert torch.equal(repaired.labels[i], clean[i])  # repaired, it is background again and supervised
    with pytest.raises(ValueError, match="agreement"):
        cleansing(ds, PseudoLabelStore(), repair_radius=3)


def test_empty_fill_restores_only_slices_whose_label_is_empty():
    missing = (1, 5, 9, 13)
    ds = toy_dataset(missing=missing)
    labels, tight = ds.labels().clone(), [3, 7, 11]
    for i in tight:  # contours drawn too tight: not empty, so not filled
        labels[i] = torch.as_tensor(ndimage.binary_erosion(labels[i].numpy(), disk(4))).to(torch.uint8)
    ds.set_labels(labels)
    clean = ds.clean_labels()
    store, rnd = _round_on(ds, empty_fill=0.9)
    assert set(torch.nonzero(rnd.actions == CLEANSE).flatten().tolist()) == set(missing) | set(tight)
    assert torch.equal(store.labels[list(missing)], clean[list(missing)])
    for i in tight:
        assert (store.labels[i][(clean[i] == 1) & (labels[i] == 0)] == 255).all()


def test_flip_average_makes_the_round_prediction_flip_equivariant():
    torch.manual_seed(0)
    net = ResidualUNet(spatial_dims=2, in_channels=1, out_channels=2).eval()
    slice_pass = SlicePass(flip_average=True)
    image = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        logits, features = slice_pass.forward(net, image, features=True)
        flips = [(), (-1,), (-2,), (-2, -1)]
        outputs = [net.forward_features(image.flip(d) if d else image) for d in flips]
        expected = sum(o[0].flip(d) if d else o[0] for o, d in zip(outputs, flips)) / 4
        assert torch.allclose(logits, expected, atol=1e-5)
        assert features.shape == outputs[0][1].shape
        # a flipped slice gets the flipped prediction, which a single forward pass does not guarantee
        mirrored, _ = slice_pass.forward(net, image.flip(-1))
        assert torch.allclose(mirrored.flip(-1), logits, atol=1e-5)
        assert not torch.allclose(net(image.flip(-1)).flip(-1), net(image), atol=1e-5)


def test_ignore_empty_leaves_slices_with_empty_labels_unsupervised():
    missing = (1, 5, 9, 13, 17, 21)
    ds = toy_dataset(missing=missing)
    store, rnd = _round_on(ds, ignore_empty=True)
    assert set(torch.nonzero(rnd.actions == CLEANSE).flatten().tolist()) == set(missing)
    assert (store.labels[list(missing)] == 255).all()
    kept = [i for i in range(len(ds)) if i not in missing]
    assert torch.equal(store.labels[kept], ds.labels()[kept])
    with pytest.raises(ValueError, match="need agreement"):
        cleansing(ds, PseudoLabelStore(), empty_fill=0.9)
    with pytest.raises(ValueError, match="exclude each other"):
        cleansing(ds, PseudoLabelStore(), agreement=True,
                      ignore_empty=True, empty_fill=0.9)


def test_empty_margin_keeps_a_missed_slice_background_only_away_from_the_prediction():
    missing = (1, 5, 9, 13, 17, 21)
    ds = toy_dataset(missing=missing)
    plain, _ = _round_on(ds)
    store, rnd = _round_on(ds, empty_margin=3)
    clean, idx = ds.clean_labels(), list(missing)
    near = near_foreground(rnd.prediction[idx], 3)
    assert (near & (clean[idx] == 0)).any() and (~near).any()
    # within the margin nothing is supervised; beyond it the agreed background, exactly as without the option
    assert (store.labels[idx][near] == 255).all()
    assert torch.equal(store.labels[idx][~near], plain.labels[idx][~near])
    assert (store.labels[idx][~near] == 0).all()
    kept = [i for i in range(len(ds)) if i not in missing]
    assert torch.equal(store.labels[kept], plain.labels[kept])
    for bad in ({"empty_margin": 2}, {"agreement": True, "empty_margin": 0},
                {"agreement": True, "ignore_empty": True, "empty_margin": 2}):
        with pytest.raises(ValueError, match="empty_margin"):
            cleansing(ds, PseudoLabelStore(), **bad)


def test_ignore_drawn_leaves_cleansed_contours_out_and_keeps_missed_slices():
    missing = (1, 5, 9, 13)
    ds = toy_dataset(missing=missing)
    labels, tight = ds.labels().clone(), [3, 7, 11]
    for i in tight:  # contours drawn too tight
        labels[i] = torch.as_tensor(ndimage.binary_erosion(labels[i].numpy(), disk(4))).to(torch.uint8)
    ds.set_labels(labels)
    plain, _ = _round_on(ds)
    store, rnd = _round_on(ds, ignore_drawn=True)
    assert set(torch.nonzero(rnd.actions == CLEANSE).flatten().tolist()) == set(missing) | set(tight)
    assert (plain.labels[tight] == 1).any(), "without the option the agreed core teaches"
    assert (store.labels[tight] == 255).all()
    torch.testing.assert_close(store.labels[list(missing)], plain.labels[list(missing)])
    assert (store.labels[list(missing)] == 0).any()
    kept = [i for i in range(len(ds)) if i not in missing + tuple(tight)]
    assert torch.equal(store.labels[kept], ds.labels()[kept])
    with pytest.raises(ValueError, match="NoPseudoLabel"):
        cleansing(ds, PseudoLabelStore(), ignore_drawn=True,
                      ignore_empty=True)


def test_neighbour_fill_takes_what_the_prediction_and_an_adjacent_contour_agree_on():
    # slices 1 and 9 lie inside labelled stacks; 16 and 17 are the first two slices of the third volume, missed both
    missing = (1, 9, 16, 17)
    ds = toy_dataset(missing=missing)
    store, rnd = _round_on(ds, neighbour_fill=True)
    assert set(torch.nonzero(rnd.actions == CLEANSE).flatten().tolist()) == set(missing)
    clean, manual = ds.clean_labels(), ds.labels()
    for i in (1, 9):
        beside = (clean[i] == 1) & ((manual[i - 1] == 1) | (manual[i + 1] == 1))
        assert beside.any()
        assert torch.equal(store.labels[i] == 1, beside)
        # the disc pixels no neighbour covers stay unsupervised, the background the network agrees on is kept
        assert (store.labels[i][(clean[i] == 1) & ~beside] == 255).all()
        assert (store.labels[i][clean[i] == 0] == 0).all()
    # slice 16 has no previous slice and a missed next one; slice 17 only the missed 16 and the labelled 18
    assert not (store.labels[16] == 1).any()
    assert torch.equal(store.labels[17] == 1, (clean[17] == 1) & (manual[18] == 1))
    with pytest.raises(ValueError, match="need agreement"):
        cleansing(ds, PseudoLabelStore(), neighbour_fill=True)
    flat = torch.utils.data.TensorDataset(ds.labels())  # slices without volumes: no neighbours to ask
    handler = cleansing(ds, PseudoLabelStore(), agreement=True, neighbour_fill=True)
    handler.dataset = flat
    with pytest.raises(ValueError, match="volume_info"):
        handler.attach(Engine(lambda engine, batch: None))
    handler.dataset = ds
    ds.slice_step = 2  # every second slice kept: the slices beside one in the data set are not adjacent in its volume
    with pytest.raises(ValueError, match="train_slice_step 2"):
        handler.attach(Engine(lambda engine, batch: None))


@pytest.mark.parametrize("name, module", [("MetricsHistory", "scripts.reporting"),
                                          ("TrainingState", "scripts.checkpointing")])
def test_configs_of_version_0_5_still_find_the_moved_handlers(name, module):
    from monai.bundle import ConfigParser

    import scripts.handlers

    parser = ConfigParser({"cls": {"_target_": f"scripts.handlers.{name}", "_mode_": "callable"}})
    with pytest.warns(DeprecationWarning, match=f"now {module}.{name}"):
        moved = parser.get_parsed_content("cls")
    assert moved.__module__ == module and moved.__name__ == name
    with pytest.raises(AttributeError, match="NoSuchHandler"):
        _ = scripts.handlers.NoSuchHandler


def test_progress_bar_only_in_a_terminal(monkeypatch):
    """Written to a log file, a progress bar is thousands of carriage-return updates: it is attached only when
    standard error is a terminal."""
    import sys

    from scripts.reporting import TrainingProgress

    def handlers(engine):
        return sum(len(engine._event_handlers[e]) for e in list(engine._event_handlers))

    engine = Engine(lambda e, b: {"loss": torch.tensor(0.0)})
    before = handlers(engine)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    TrainingProgress().attach(engine)
    assert handlers(engine) == before
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    TrainingProgress().attach(engine)
    assert handlers(engine) > before


def test_history_names_a_metric_that_first_appears_after_epoch_one(tmp_path):
    """Validation every second epoch adds its metric from epoch 2 on: the header widens, the epochs without
    validation leave the cell empty (no stale reading repeated), and every value sits under its name (so curve
    plots and resume trims can read the file)."""
    import csv

    from scripts.reporting import MetricsHistory, _trim_csv

    evaluator = Engine(lambda e, b: None)
    trainer = Engine(lambda e, b: {"loss": torch.tensor(float(e.state.epoch))})

    @evaluator.on(Events.COMPLETED)
    def score(engine):
        engine.state.metrics = {"val_mean_dice": 0.1 * trainer.state.epoch}

    @trainer.on(Events.EPOCH_COMPLETED(every=2))
    def validate(engine):
        evaluator.run([0])

    path = tmp_path / "history.csv"
    MetricsHistory(evaluator, str(path)).attach(trainer)
    trainer.run([0, 1], max_epochs=4)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    assert all(None not in r for r in rows)
    assert rows[0]["val_mean_dice"] == ""
    assert float(rows[1]["val_mean_dice"]) == pytest.approx(0.2)
    assert rows[2]["val_mean_dice"] == ""
    assert float(rows[3]["val_mean_dice"]) == pytest.approx(0.4)
    assert float(rows[2]["train_loss"]) == pytest.approx(3.0)
    assert _trim_csv(str(path), 2) == 2
    with open(path, newline="") as f:
        assert [r["val_mean_dice"] for r in csv.DictReader(f)] == ["", "0.2"]


def test_leave_out_separation_follows_the_first_rounds_separation(caplog):
    """Missed labels against a network that predicts every disc: GMM-1's two populations are far apart (D > 5)."""
    missing = (1, 5, 9, 13, 17, 21)
    ds = toy_dataset(missing=missing)
    plain, _ = _round_on(ds)
    with caplog.at_level("INFO"):
        store, rnd = _round_on(ds, leave_out_separation=3.0)
    assert rnd.summary["gmm1_separation"] > 5 and rnd.summary["flagged_left_out"]
    assert "flagged slices carry no loss for the rest of the run" in caplog.text
    assert (store.labels[list(missing)] == 255).all() and (plain.labels[list(missing)] == 0).any()
    kept = [i for i in range(len(ds)) if i not in missing]
    assert torch.equal(store.labels[kept], ds.labels()[kept])
    # a threshold above the separation keeps the agreement targets
    store, rnd = _round_on(ds, leave_out_separation=1000.0)
    assert not rnd.summary["flagged_left_out"] and torch.equal(store.labels, plain.labels)
    # the first round decides: after one whose mixture barely separated, a well separated round changes nothing
    store = PseudoLabelStore("zeros")
    handler = cleansing(ds, store, agreement=True, leave_out_separation=3.0)
    store.initialise(ds.labels())
    store.rounds.append({"gmm1_separation": float("nan")})  # a round without a fit does not decide
    store.rounds.append({"gmm1_separation": 1.5})
    rnd = CleansingRound(epoch=2, index=2)
    handler.collect(rnd)
    handler.filter(rnd)
    handler.cleanse(rnd)
    assert rnd.summary["gmm1_separation"] > 5 and not rnd.summary["flagged_left_out"]
    assert torch.equal(store.labels, plain.labels)
    # the decision reads the first fit's separation on the losses, not that of a refit (contour offsets separate
    # less than losses: a refit at D 2.5 beside a first fit at D 6 still shows a noisy population)
    store = PseudoLabelStore("zeros")
    handler = cleansing(ds, store, agreement=True, leave_out_separation=3.0)
    store.initialise(ds.labels())
    store.rounds.append({"gmm1_separation": 2.5, "gmm1_loss_separation": 6.0})
    rnd = CleansingRound(epoch=2, index=2)
    handler.collect(rnd)
    handler.filter(rnd)
    handler.cleanse(rnd)
    assert rnd.summary["flagged_left_out"] and (store.labels[list(missing)] == 255).all()
    with pytest.raises(ValueError, match="leave_out_separation"):
        TargetRules(agreement=True, leave_out_separation=0.0)


def test_the_filter_hears_whether_an_earlier_round_used_the_peels_refit():
    """``LabelFilter(peel_keep=True)`` needs the run's history; the handler reads it from the store's round
    summaries, which the state checkpoint holds, so a resumed run decides as an uninterrupted one."""
    seen = []

    class Recording(LabelFilter):
        def __call__(self, *args, peeled_before=False, **kwargs):
            seen.append(peeled_before)
            return super().__call__(*args, peeled_before=peeled_before, **kwargs)

    ds = toy_dataset(missing=(1, 5))
    store = PseudoLabelStore("zeros")
    handler = SelfCleansing(constant_network(ds), ds, store, num_classes=2, start_epoch=1, source=Prediction(),
                            rules=TargetRules(), label_filter=Recording(peel_saturated=True, peel_keep=True))
    store.initialise(ds.labels())
    for history in ([], [{"gmm1_saturated": 0}], [{"gmm1_saturated": 0}, {"gmm1_saturated": 12}, {}]):
        store.rounds[:] = history
        rnd = CleansingRound(epoch=len(history) + 1, index=len(history) + 1)
        handler.collect(rnd)
        handler.filter(rnd)
    assert seen == [False, False, True]


def offset_refit_round(epoch: int = 1):
    """A round's handler, store and data set on the toy set with slices 1 and 5 missed and slice 9 drawn 3 px too
    wide, whose label filter refits on contour offsets."""
    ds = toy_dataset(missing=(1, 5))
    labels = ds.labels().clone()
    labels[9] = torch.from_numpy(ndimage.binary_dilation(labels[9].numpy() > 0, iterations=3)).to(labels.dtype)
    ds.set_labels(labels)
    store = PseudoLabelStore("zeros")
    handler = SelfCleansing(constant_network(ds), ds, store, num_classes=2, start_epoch=1, source=Prediction(),
                            rules=TargetRules(), label_filter=LabelFilter(peel_saturated=True,
                                                                         refit_statistic="contour_offset"))
    store.initialise(ds.labels())
    return handler, store, ds, CleansingRound(epoch=epoch, index=1)


def test_the_round_measures_contour_offsets_for_a_filter_that_refits_on_them():
    """The handler computes each slice's contour offset between the prediction and the manual label only when the
    label filter's refit judges by it, keeps it on the round (the round's CSV writes it) and hands it over."""
    handler, store, ds, rnd = offset_refit_round()
    handler.collect(rnd)
    handler.filter(rnd)
    offsets = rnd.contour_offset
    assert offsets.shape == (len(ds.data),)
    assert 2.0 < float(offsets[9]) < 4.5  # drawn 3 px too wide
    correct = [i for i in range(len(ds.data)) if i not in (1, 5, 9)]
    assert float(offsets[correct].max()) == 0.0  # the constant network predicts the clean discs
    assert rnd.summary["gmm1_statistic"] == "contour_offset" and rnd.summary["gmm1_saturated"] == 2
    assert rnd.manual_filter.noisy.nonzero().flatten().tolist() == [1, 5, 9]
    plain = SelfCleansing(constant_network(ds), ds, store, num_classes=2, start_epoch=1, source=Prediction(),
                          rules=TargetRules(), label_filter=LabelFilter(peel_saturated=True))
    rnd = CleansingRound(epoch=2, index=2)
    plain.collect(rnd)
    plain.filter(rnd)
    assert rnd.contour_offset is None and rnd.summary["gmm1_statistic"] == "loss"


def _noisy_toy() -> tuple[SliceDataset, list[int], list[int]]:
    """The toy set with missed slices and contours drawn 2 pixels too wide, its true flags set as noise sets them."""
    ds = toy_dataset()
    labels, missing, wide = ds.labels().clone(), [1, 5, 9], [2, 6, 10]
    labels[missing] = 0
    for i in wide:
        labels[i] = torch.from_numpy(ndimage.binary_dilation(labels[i].numpy() == 1, disk(2)).astype(np.uint8))
    ds.set_labels(labels)
    flags = torch.full((len(ds.data),), CLEAN)
    flags[missing], flags[wide] = MISSING, BOUNDARY
    ds.noise_flags = flags
    return ds, missing, wide


def test_oracle_round_cleanses_exactly_the_noisy_slices_with_the_reference_labels():
    ds, missing, wide = _noisy_toy()
    store = PseudoLabelStore("zeros")
    run_round(OracleCleansing(constant_network(ds), ds, store, num_classes=2, start_epoch=1, source=Prediction()))
    noisy = torch.zeros(len(ds.data), dtype=torch.bool)
    noisy[missing + wide] = True
    assert torch.equal(store.actions[-1] == CLEANSE, noisy)
    assert torch.equal(store.actions[-1] == KEEP_MANUAL, ~noisy)
    assert (store.labels[missing] == 255).all()  # a missed slice carries no loss
    assert torch.equal(store.labels[wide], ds.clean_labels()[wide])
    assert torch.equal(store.labels[~noisy], ds.labels()[~noisy])
    summary = store.rounds[-1]
    assert summary["filter_precision"] == summary["filter_recall"] == 1.0
    assert (summary["cleansed"], summary["kept_manual"], summary["oracle"]) == (6, len(ds.data) - 6, "fix_boundary")


def test_oracle_round_refuses_what_it_cannot_build():
    ds = toy_dataset()  # no simulated noise: no true flags
    with pytest.raises(ValueError, match="needs simulated label noise"):
        OracleCleansing(constant_network(ds), ds, PseudoLabelStore("zeros"), num_classes=2,
                        start_epoch=1).attach(Engine(lambda e, b: None))
    with pytest.raises(ValueError, match="unknown oracle 'perfect'.*or None"):
        OracleCleansing(constant_network(ds), ds, PseudoLabelStore("zeros"), num_classes=2, start_epoch=1,
                        oracle="perfect")
    with pytest.raises(ValueError, match="reference labels as they are"):
        OracleCleansing(constant_network(ds), ds, PseudoLabelStore("zeros"), num_classes=2, start_epoch=1,
                        rules=TargetRules(agreement=True))


def test_oracle_filter_gives_the_true_verdicts_and_keeps_the_methods_targets():
    ds, missing, wide = _noisy_toy()
    store = PseudoLabelStore("zeros")
    run_round(OracleCleansing(constant_network(ds), ds, store, num_classes=2, start_epoch=1, source=Prediction(),
                              rules=TargetRules(agreement=True), oracle=None))
    assert sorted(torch.nonzero(store.actions[-1] == CLEANSE).flatten().tolist()) == sorted(missing + wide)
    manual, clean = ds.labels(), ds.clean_labels()
    # agreement: a wide contour's ring, where the (clean) prediction and the manual label disagree, carries no loss
    ring = (manual[wide] == 1) & (clean[wide] == 0)
    assert ring.any() and (store.labels[wide][ring] == 255).all()
    assert torch.equal(store.labels[wide][~ring], clean[wide][~ring])
    # a missed slice keeps the background both agree on and leaves the disc out
    assert (store.labels[missing][clean[missing] == 1] == 255).all()
    assert (store.labels[missing][clean[missing] == 0] == 0).all()
