import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import DataLoader
from monai.transforms import Compose, LoadImaged

from conftest import REPO_ROOT, bad_dataset_dir, load_nifti, save_nifti, write_msd
from scripts.data import (
    SliceDataset,
    acdc_datalist,
    check_volumes,
    empty_end_runs,
    datalist,
    dataset_layout,
    list_volumes,
    msd_datalist,
    noise_for_phantoms,
    refuse_existing_outputs,
    resolve_dataset,
    spread_subjects,
)
from scripts.losses import ALL_CLASS_BITS
from scripts.ignore_index import IGNORE_INDEX
from scripts.store import PseudoLabelStore

LOAD = Compose([LoadImaged(keys=["image", "label"], image_only=True, ensure_channel_first=True)])
NOISE = {"alpha": 1.0, "beta": 3, "seed": 0, "radius_scale": 1.0}


def _cases(records):
    return sorted({Path(r["image"]).parent.name for r in records})


# ---------------------------------------------------------------- acdc_datalist


def test_acdc_uses_splits_file(acdc_dir):
    train = acdc_datalist(str(acdc_dir), "train")
    val = acdc_datalist(str(acdc_dir), "val")
    assert _cases(train) == ["patient001", "patient002", "patient004"]
    assert _cases(val) == ["patient003"]
    # every frame of a case, each with its own _gt file
    assert len(train) == 6
    for rec in train + val:
        assert Path(rec["image"]).is_file() and Path(rec["label"]).is_file()
        assert rec["label"] == rec["image"].replace(".nii.gz", "_gt.nii.gz")
        assert rec["case"] == Path(rec["image"]).name[: -len(".nii.gz")]
    assert not any(r["image"].endswith("_gt.nii.gz") for r in train)


def test_acdc_seeded_split_without_splits_file(acdc_dir):
    (acdc_dir / "splits.json").unlink()
    train, val = acdc_datalist(str(acdc_dir), "train"), acdc_datalist(str(acdc_dir), "val")
    assert len(_cases(val)) == 1
    assert set(_cases(train)) | set(_cases(val)) == {f"patient{i:03d}" for i in range(1, 5)}
    assert not set(_cases(train)) & set(_cases(val))
    assert acdc_datalist(str(acdc_dir), "val") == val
    # another seed is free to pick another case, but must still partition the cases
    other = acdc_datalist(str(acdc_dir), "val", seed=3)
    assert len(_cases(other)) == 1


def test_acdc_none_ignores_splits_file(acdc_dir):
    # patient003 is the val case in splits.json; splits_file=None must not read it
    (acdc_dir / "splits.json").write_text(json.dumps({"train": ["patient001"], "val": ["patient002"]}))
    forced = acdc_datalist(str(acdc_dir), "train", splits_file=None)
    assert len(_cases(forced)) == 3


def test_acdc_all(acdc_dir):
    records = acdc_datalist(str(acdc_dir), "all")
    assert _cases(records) == [f"patient{i:03d}" for i in range(1, 5)]
    assert len(records) == 8
    no_label = acdc_datalist(str(acdc_dir), "all", with_label=False)
    assert all("label" not in r for r in no_label)


def test_acdc_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        acdc_datalist(str(missing))


def test_acdc_no_patient_folders(tmp_path):
    (tmp_path / "data" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="patientNNN") as err:
        acdc_datalist(str(tmp_path / "data"))
    assert str(tmp_path / "data") in str(err.value)


def test_acdc_splits_file_names_missing_case(acdc_dir):
    (acdc_dir / "splits.json").write_text(json.dumps({"train": ["patient001", "patient099"], "val": []}))
    with pytest.raises(FileNotFoundError) as err:
        acdc_datalist(str(acdc_dir), "train")
    assert "patient099" in str(err.value) and "splits.json" in str(err.value)


def test_acdc_missing_label_file(acdc_dir):
    gt = acdc_dir / "patient002" / "patient002_frame12_gt.nii.gz"
    gt.unlink()
    with pytest.raises(FileNotFoundError, match="patient002_frame12_gt.nii.gz"):
        acdc_datalist(str(acdc_dir), "train")


# ---------------------------------------------------------------- msd_datalist


def test_msd_relative_paths_resolved(msd_dir):
    records = msd_datalist(str(msd_dir / "dataset.json"), "all")
    assert [r["case"] for r in records] == [f"liver_{i:03d}" for i in range(5)]
    for rec in records:
        assert Path(rec["image"]).is_absolute() and Path(rec["image"]).is_file()
        assert Path(rec["label"]).parent == (msd_dir / "labelsTr").resolve()
        assert Path(rec["image"]).name == Path(rec["label"]).name


def test_msd_seeded_split(msd_dir):
    path = str(msd_dir / "dataset.json")
    train, val = msd_datalist(path, "train"), msd_datalist(path, "val")
    assert len(val) == 1 and len(train) == 4
    assert {r["case"] for r in train} | {r["case"] for r in val} == {f"liver_{i:03d}" for i in range(5)}
    assert msd_datalist(path, "val") == val


def test_msd_validation_section(tmp_path):
    root = write_msd(tmp_path / "msd", n_cases=5, validation=2)
    path = str(root / "dataset.json")
    val = msd_datalist(path, "val")
    assert [r["case"] for r in val] == ["liver_003", "liver_004"]
    # with a validation section, the whole training section trains
    assert [r["case"] for r in msd_datalist(path, "train")] == ["liver_000", "liver_001", "liver_002"]


def test_msd_wrong_section(msd_dir):
    with pytest.raises(KeyError) as err:
        msd_datalist(str(msd_dir / "dataset.json"), section="train_set")
    assert "dataset.json" in str(err.value) and "train_set" in str(err.value)


def test_msd_invalid_json(tmp_path):
    bad = tmp_path / "dataset.json"
    bad.write_text('{"training": [')
    with pytest.raises(ValueError, match="dataset.json"):
        msd_datalist(str(bad))


def test_msd_entry_points_to_missing_file(msd_dir):
    (msd_dir / "labelsTr" / "liver_001.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="liver_001.nii.gz"):
        msd_datalist(str(msd_dir / "dataset.json"), "all")


# ---------------------------------------------------------------- list_volumes


def test_list_volumes_skips_labels(acdc_dir):
    records = list_volumes(str(acdc_dir))
    assert len(records) == 8
    assert all(not r["image"].endswith("_gt.nii.gz") for r in records)
    assert [r["image"] for r in records] == sorted(r["image"] for r in records)
    assert records[0]["case"] == "patient001_frame01"


def test_list_volumes_errors_and_json(tmp_path, msd_dir):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_volumes(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        list_volumes(str(tmp_path / "empty"))
    from_json = list_volumes(str(msd_dir / "dataset.json"))
    assert len(from_json) == 5 and all("label" not in r for r in from_json)


# ---------------------------------------------------------------- SliceDataset


def _reference_slices(records):
    """(case, slice, image, label) in datalist-then-slice order, read straight from the files."""
    out = []
    for rec in records:
        image, label = load_nifti(rec["image"]), load_nifti(rec["label"])
        for z in range(image.shape[-1]):
            out.append((rec["case"], z, image[..., z], label[..., z]))
    return out


def test_slice_dataset_ids_follow_datalist_order(acdc_dir):
    records = acdc_datalist(str(acdc_dir), "all")
    ds = SliceDataset(records, volume_transform=LOAD)
    ref = _reference_slices(records)
    assert len(ds) == len(ref) == 2 * (3 + 4 + 3 + 4)
    for i, (case, z, image, label) in enumerate(ref):
        item = ds[i]
        assert (item["id"], item["case"], item["slice"]) == (i, case, z)
        assert item["image"].shape == (1, 32, 32)
        np.testing.assert_allclose(item["image"][0].numpy(), image, rtol=1e-6)
        np.testing.assert_array_equal(item["label"][0].numpy(), label)
    assert ds.slice_shape == (32, 32)
    labels = ds.labels()
    assert labels.shape == (len(ref), 32, 32) and labels.dtype == torch.uint8
    np.testing.assert_array_equal(labels.numpy(), np.stack([r[3] for r in ref]))


def test_slice_step_keeps_every_kth_slice_with_its_index_in_the_volume(acdc_dir):
    records = acdc_datalist(str(acdc_dir), "all")
    ref = _reference_slices(records)
    ds = SliceDataset(records, volume_transform=LOAD, slice_step=2)
    kept = [r for r in ref if r[1] % 2 == 0]
    assert len(ds) == len(kept) == sum(v["n_slices"] for v in ds.volume_info)
    for i, (case, z, _, label) in enumerate(kept):
        item = ds[i]
        assert (item["id"], item["case"], item["slice"]) == (i, case, z)
        np.testing.assert_array_equal(item["label"][0].numpy(), label)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="slice_step"):
            SliceDataset(records, volume_transform=LOAD, slice_step=bad)


def _first_volume_starting_empty(ds: SliceDataset, empty: int, drawn_after: bool = False) -> int:
    """Empty the first ``empty`` kept slices of the data set's first volume (a run from its end), optionally draw a
    pixel on the slice after them; returns the first volume's first sample id."""
    first = ds.volume_info[0]
    assert first["n_slices"] >= empty + drawn_after
    start, labels = first["first_id"], ds.labels()
    labels[start : start + empty] = 0
    if drawn_after:
        labels[start + empty, 0, 0] = 1
    ds.set_labels(labels)
    return start


def test_trusted_empty_run_counts_slices_of_the_volume_not_kept_slices(acdc_dir):
    """With every second slice kept, a run of 4 volume slices is 2 kept ones: trusted_empty_run=4 still finds it."""
    ds = SliceDataset(acdc_datalist(str(acdc_dir), "train"), volume_transform=LOAD, slice_step=2, trusted_empty_run=4)
    start = _first_volume_starting_empty(ds, 2)  # volume slices 0 and 2 empty: a run of 4 from the end
    assert ds.trusted[start : start + 2].all()
    ds.trusted_empty_run = 5  # now 3 kept slices are needed
    ds._index_label_classes()
    assert not ds.trusted[start : start + 2].any()


def test_trusted_empty_margin_leaves_the_slice_next_to_the_drawn_ones_to_the_filter(acdc_dir):
    records = acdc_datalist(str(acdc_dir), "train")
    ds = SliceDataset(records, volume_transform=LOAD, trusted_empty_run=2, trusted_empty_margin=1)
    start = _first_volume_starting_empty(ds, 2, drawn_after=True)  # slices 0 and 1 empty, slice 2 drawn
    assert ds.trusted[start : start + 2].tolist() == [True, False]
    assert ds.classes_known[start + 1] == 0  # judged like any empty slice: it may be a missed one
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="trusted_empty_margin"):
            SliceDataset(records, volume_transform=LOAD, trusted_empty_margin=bad)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_slice_dataset_ids_survive_shuffling(acdc_dir, num_workers):
    records = acdc_datalist(str(acdc_dir), "train")
    ds = SliceDataset(records, volume_transform=LOAD)
    ref = _reference_slices(records)
    loader = DataLoader(ds, batch_size=3, shuffle=True, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(1))
    seen = []
    for batch in loader:
        for k, idx in enumerate(batch["id"].tolist()):
            seen.append(idx)
            np.testing.assert_allclose(batch["image"][k, 0].numpy(), ref[idx][2], rtol=1e-6)
            np.testing.assert_array_equal(batch["label"][k, 0].numpy(), ref[idx][3])
    assert sorted(seen) == list(range(len(ref)))
    assert seen != sorted(seen), "the loader did not shuffle, so the test proves nothing"


def test_label_noise_changes_only_training_labels(acdc_dir):
    records = acdc_datalist(str(acdc_dir), "train")
    clean = SliceDataset(records, volume_transform=LOAD)
    assert clean.clean_labels() is None
    noisy = SliceDataset(records, volume_transform=LOAD, label_noise=NOISE, num_classes=4)
    torch.testing.assert_close(noisy.clean_labels(), clean.labels())
    changed = (noisy.labels() != clean.labels()).flatten(1).any(1)
    assert changed.all(), "alpha=1 must corrupt every slice with foreground"
    assert noisy.noise_flags.shape == (len(clean),) and (noisy.noise_flags > 0).all()
    for i in range(len(clean)):
        item = noisy[i]
        assert "clean_label" not in item
        torch.testing.assert_close(item["image"], clean[i]["image"])
        torch.testing.assert_close(item["label"][0].to(torch.uint8), noisy.labels()[i])


def test_default_noise_reaches_phantoms_only(acdc_dir, tmp_path):
    """train.json's simulated noise applies to a generated phantom set and to nothing else: another data folder
    or a datalist of other files (as MONAI Label hands in) trains on its labels as given."""
    from monai.bundle import ConfigParser

    from scripts.phantom import write_phantom_dataset

    phantom = write_phantom_dataset(tmp_path / "phantom", n_cases=3, shape=(48, 48, 2))
    assert noise_for_phantoms(acdc_datalist(str(phantom), "train"), NOISE) == NOISE
    assert noise_for_phantoms(acdc_datalist(str(acdc_dir), "train"), NOISE) is None
    mixed = acdc_datalist(str(phantom), "train") + acdc_datalist(str(acdc_dir), "train")
    assert noise_for_phantoms(mixed, NOISE) is None
    assert noise_for_phantoms([], NOISE) is None
    assert noise_for_phantoms(acdc_datalist(str(phantom), "train"), None) is None

    def noise(overrides):
        parser = ConfigParser()
        parser.read_config("configs/train.json")
        parser.update({"bundle_root": str(tmp_path), **overrides})
        return getattr(parser.get_parsed_content("train#dataset"), "noise_flags", None)

    assert noise({"dataset_dir": str(phantom), "data_root": str(phantom)}) is not None
    assert noise({"dataset_dir": str(acdc_dir), "data_root": str(acdc_dir)}) is None
    # MONAI Label's override: the phantom folder stays the default, the training data are the user's volumes
    user = [{"image": r["image"], "label": r["label"]} for r in acdc_datalist(str(acdc_dir), "train")]
    assert noise({"dataset_dir": str(phantom), "data_root": str(phantom), "train#dataset#data": user}) is None


def test_oracle_labels_replace_the_noisy_ones(acdc_dir):
    records = acdc_datalist(str(acdc_dir), "train")
    noise = {**NOISE, "alpha": 0.5}
    noisy = SliceDataset(records, volume_transform=LOAD, label_noise=noise, num_classes=4)
    oracle = SliceDataset(records, volume_transform=LOAD, label_noise=noise, num_classes=4, oracle="drop_noisy")
    torch.testing.assert_close(oracle.noise_flags, noisy.noise_flags)
    flagged = noisy.noise_flags > 0
    assert flagged.any() and (~flagged).any()
    assert (oracle.labels()[flagged] == 255).all()
    torch.testing.assert_close(oracle.labels()[~flagged], noisy.clean_labels()[~flagged])
    # the loader hands the ignore value on to the loss unchanged
    assert (oracle[int(flagged.nonzero()[0])]["label"] == 255).all()
    with pytest.raises(ValueError, match="oracle 'drop_noisy' needs label_noise"):
        SliceDataset(records, volume_transform=LOAD, num_classes=4, oracle="drop_noisy")


def test_label_noise_needs_num_classes(acdc_dir):
    with pytest.raises(ValueError, match="num_classes"):
        SliceDataset(acdc_datalist(str(acdc_dir), "train"), volume_transform=LOAD, label_noise=NOISE)


def _train_augmentation(patch=(24, 24)):
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "configs" / "train.json"))
    parser["patch_size"] = list(patch)
    return parser.get_parsed_content("train#preprocessing")


def test_pseudo_label_moves_with_image(acdc_dir):
    ds = SliceDataset(acdc_datalist(str(acdc_dir), "train"), volume_transform=LOAD)
    store = PseudoLabelStore("manual")
    store.initialise(ds.labels())
    ds.store = store
    ds.transform = _train_augmentation()
    ds.transform.set_random_state(seed=0)
    moved = 0
    for _ in range(3):
        for i in range(len(ds)):
            (item,) = ds[i]  # the patch sampler draws one patch per slice
            # the random patch (foreground or background centred), flips and rotations move Y' with the label
            assert item["pseudo"].shape == item["label"].shape == item["image"].shape == (1, 24, 24)
            torch.testing.assert_close(torch.as_tensor(item["pseudo"]), torch.as_tensor(item["label"]))
            moved += not torch.equal(torch.as_tensor(item["label"])[0].to(torch.uint8), ds.labels()[i][4:28, 4:28])
    assert moved > 0, "no sample was cropped off-centre, flipped or rotated, so the test proves nothing"


def test_pseudo_label_read_from_store_by_id(acdc_dir):
    ds = SliceDataset(acdc_datalist(str(acdc_dir), "train"), volume_transform=LOAD)
    store = PseudoLabelStore("zeros")
    store.initialise(ds.labels())
    # a distinct constant per id shows which store row each sample got
    store.labels.copy_(torch.arange(len(ds), dtype=torch.uint8)[:, None, None].expand_as(store.labels))
    ds.store = store
    for batch in DataLoader(ds, batch_size=4, shuffle=True, num_workers=0):
        for k, idx in enumerate(batch["id"].tolist()):
            assert torch.all(batch["pseudo"][k] == idx)


def test_empty_end_runs():
    labels = torch.zeros(11, 2, 2, dtype=torch.uint8)
    labels[[2, 4, 5, 8], 0, 0] = 1  # volume 1: slices 0-6, empty 0, 1, 3, 6; volume 2: slices 7-10, empty 7, 9, 10
    got = empty_end_runs(labels, [7, 4], min_run=2)
    # runs of two or more from an end: 0-1 (volume 1) and 9-10 (volume 2); 3 is a gap, 6 and 7 runs of one
    assert got.nonzero().flatten().tolist() == [0, 1, 9, 10]
    assert empty_end_runs(labels, [7, 4], min_run=1).nonzero().flatten().tolist() == [0, 1, 6, 7, 9, 10]
    assert not empty_end_runs(torch.zeros(3, 2, 2, dtype=torch.uint8), [3], min_run=4).any()
    with pytest.raises(ValueError, match="sum"):
        empty_end_runs(labels, [7, 3], min_run=2)


def test_the_margin_leaves_the_empty_slices_next_to_the_labelled_part_untrusted():
    labels = torch.zeros(12, 2, 2, dtype=torch.uint8)
    labels[[4, 5], 0, 0] = 1  # volume 1: slices 0-7, drawn on 4 and 5; volume 2: slices 8-11, all empty
    full = empty_end_runs(labels, [8, 4], min_run=2)
    assert full.nonzero().flatten().tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 10, 11]
    # slices 3 and 6 border the drawn ones: an annotator who stopped a slice early leaves them empty
    assert empty_end_runs(labels, [8, 4], min_run=2, margin=1).nonzero().flatten().tolist() == [0, 1, 2, 7, 8, 9, 10,
                                                                                               11]
    # the run's length before the margin decides whether it counts; a volume with nothing drawn keeps every slice
    assert empty_end_runs(labels, [8, 4], min_run=4, margin=2).nonzero().flatten().tolist() == [0, 1, 8, 9, 10, 11]
    assert empty_end_runs(labels, [8, 4], min_run=2, margin=9)[:8].sum() == 0
    with pytest.raises(ValueError, match="margin"):
        empty_end_runs(labels, [8, 4], min_run=2, margin=-1)


def test_truly_empty_slices_state_every_class(acdc_dir):
    """A slice in a long empty run at a volume's end states every class (its background is real); an empty slice
    inside the volume states none (it may be missed)."""
    records = acdc_datalist(str(acdc_dir), "train")
    ds = SliceDataset(records, volume_transform=LOAD, trusted_empty_run=2)
    first = ds.volume_info[0]
    labels = ds.labels()
    labels[first["first_id"] : first["first_id"] + 2] = 0  # the first two slices of volume 1: a run at its end
    labels[first["first_id"] + 3] = 0  # a gap inside it
    ds.set_labels(labels)
    store = PseudoLabelStore("zeros")
    store.initialise(ds.labels())
    ds.store = store
    ids = first["first_id"] + torch.arange(4)
    assert [ds[int(i)]["classes_known"] for i in ids][:2] == [ALL_CLASS_BITS, ALL_CLASS_BITS]
    assert ds[int(ids[3])]["classes_known"] == 0
    assert ds[int(ids[2])]["classes_known"] not in (0, ALL_CLASS_BITS)
    # cleansed, a slice taken as truly empty still states every class; a missed one only what its Y' holds
    store.labels[ids[:4]] = 0
    store.labels[ids[:4], :2, :2] = IGNORE_INDEX
    assert ds[int(ids[0])]["pseudo_known"] == ALL_CLASS_BITS
    assert ds[int(ids[3])]["pseudo_known"] == 0
    for bad in (0, 1.5, "2", True):  # a fraction would have been cut to a shorter run than asked for
        with pytest.raises(ValueError, match="trusted_empty_run"):
            SliceDataset(records, volume_transform=LOAD, trusted_empty_run=bad)


def test_each_sample_carries_the_classes_of_its_whole_manual_slice(acdc_dir):
    ds = SliceDataset(acdc_datalist(str(acdc_dir), "train"), volume_transform=LOAD)
    labels = ds.labels()
    labels[1] = 0  # a missed slice
    ds.set_labels(labels)
    store = PseudoLabelStore("zeros")
    store.initialise(ds.labels())
    ds.store = store
    bits = [ds[i]["classes_known"] for i in range(len(ds))]
    assert bits == [sum(1 << (int(c) - 1) for c in lab.unique().tolist() if c > 0) for lab in labels]
    assert bits[1] == 0 and any(bits)
    # Y' states every class where it is the manual label, only the classes it holds on a cleansed slice
    drawn = next(i for i, b in enumerate(bits) if b & 1 and b & 4)  # a slice with RV and LV
    assert ds[drawn]["pseudo_known"] == 0  # Y' not made yet (zeros): it holds nothing
    store.labels[drawn] = labels[drawn]
    assert ds[drawn]["pseudo_known"] == ALL_CLASS_BITS
    pseudo = labels[drawn].clone()
    pseudo[pseudo == 1] = IGNORE_INDEX
    store.labels[drawn] = pseudo
    assert ds[drawn]["pseudo_known"] == bits[drawn] & ~1
    store.labels[1] = 0  # the missed slice, cleansed to background: it states nothing
    assert ds[1]["pseudo_known"] == ALL_CLASS_BITS  # Y' equals its (empty) manual label
    store.labels[1, :2, :2] = IGNORE_INDEX
    assert ds[1]["pseudo_known"] == 0


# ---------------------------------------------------------------- refuse_existing_outputs


def test_refuse_existing_outputs(tmp_path):
    image = save_nifti(tmp_path / "in" / "case_a.nii.gz", np.zeros((4, 4, 2), np.float32))
    records = [{"image": str(image)}]
    out_dir = tmp_path / "out"
    assert refuse_existing_outputs(records, str(out_dir)) == records
    out_dir.mkdir()
    (out_dir / "case_a_seg.nii.gz").write_bytes(b"earlier result")
    with pytest.raises(FileExistsError, match="case_a_seg.nii.gz"):
        refuse_existing_outputs(records, str(out_dir))
    assert refuse_existing_outputs(records, str(out_dir), overwrite=True) == records


def test_refuse_output_that_is_an_input(tmp_path):
    a = save_nifti(tmp_path / "in" / "case_a.nii.gz", np.zeros((4, 4, 2), np.float32))
    b = shutil.copy(a, tmp_path / "in" / "case_a_seg.nii.gz")
    records = [{"image": str(a)}, {"image": str(b)}]
    # even overwrite=True must not replace an input
    with pytest.raises(FileExistsError, match="input"):
        refuse_existing_outputs(records, str(tmp_path / "in"), overwrite=True)


def test_refuse_two_inputs_with_one_output(tmp_path):
    # imagesTr/x and imagesTs/x both map to out/x_seg.nii.gz: one result would silently replace the other
    a = save_nifti(tmp_path / "imagesTr" / "x.nii.gz", np.zeros((4, 4, 2), np.float32))
    b = save_nifti(tmp_path / "imagesTs" / "x.nii.gz", np.zeros((4, 4, 2), np.float32))
    with pytest.raises(FileExistsError, match="x_seg.nii.gz") as err:
        refuse_existing_outputs([{"image": str(a)}, {"image": str(b)}], str(tmp_path / "out"), overwrite=True)
    assert "imagesTr" in str(err.value) and "imagesTs" in str(err.value)


def test_corrupt_nifti_names_the_file(acdc_dir):
    records = acdc_datalist(str(acdc_dir), "all")
    broken = Path(records[1]["label"])
    broken.write_bytes(b"not a nifti file" * 8)
    transform = Compose([LoadImaged(["image", "label"], image_only=True, ensure_channel_first=True)])
    with pytest.raises(RuntimeError, match=broken.name) as info:
        SliceDataset(records, volume_transform=transform)
    assert "gzip" in str(info.value) or "nifti" in str(info.value).lower()


# ---------------------------------------------------------------- layouts, --dataset_dir, input checks


def test_dataset_layouts(acdc_dir, msd_dir, tmp_path):
    flat = tmp_path / "flat"
    for i in range(3):
        save_nifti(flat / f"scan{i}.nii.gz", np.zeros((8, 8, 2), np.float32))
        save_nifti(flat / f"scan{i}_gt.nii.gz", np.zeros((8, 8, 2), np.uint8))
    assert dataset_layout(acdc_dir) == "acdc"
    assert dataset_layout(msd_dir) == dataset_layout(msd_dir / "dataset.json") == "msd"
    assert dataset_layout(flat) == "flat"
    # the same datalist function serves every layout; a flat folder pairs <name> with <name>_gt
    assert {r["case"] for r in datalist(str(acdc_dir), "val")} == {"patient003_frame01", "patient003_frame12"}
    assert len(datalist(str(msd_dir), "all")) == len(datalist(str(msd_dir / "dataset.json"), "all")) == 5
    records = datalist(str(flat), "all")
    assert [Path(r["label"]).name for r in records] == [f"scan{i}_gt.nii.gz" for i in range(3)]
    train, val = datalist(str(flat), "train"), datalist(str(flat), "val")
    assert len(train) + len(val) == 3 and not {r["case"] for r in train} & {r["case"] for r in val}
    # inference lists the images of a dataset.json folder, not its label files
    assert all("labelsTr" not in r["image"] for r in list_volumes(str(msd_dir)))
    (flat / "scan1_gt.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="scan1_gt.nii.gz"):
        datalist(str(flat), "all")


@pytest.mark.parametrize("kind", ["missing", "empty", "foreign"])
def test_resolve_dataset_refuses_without_writing(kind, tmp_path):
    target = bad_dataset_dir(tmp_path, kind)
    with pytest.raises(FileNotFoundError, match=str(target)):
        resolve_dataset(target, tmp_path / "default")
    assert not (tmp_path / "default").exists()
    assert (not target.exists()) if kind == "missing" else len(list(target.iterdir())) == (kind == "foreign")


def test_resolve_dataset_accepts_existing_data(acdc_dir, msd_dir, tmp_path):
    assert resolve_dataset(acdc_dir, tmp_path / "default") == acdc_dir
    assert resolve_dataset(msd_dir / "dataset.json", tmp_path / "default") == msd_dir / "dataset.json"


def test_check_volumes_names_the_bad_file(tmp_path):
    good = save_nifti(tmp_path / "a.nii.gz", np.zeros((8, 8, 2), np.float32))
    truncated = save_nifti(tmp_path / "b.nii.gz", np.random.default_rng(0).normal(size=(16, 16, 4)))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    four_d = save_nifti(tmp_path / "c.nii.gz", np.zeros((8, 8, 2, 3), np.float32))
    nan = np.zeros((8, 8, 2), np.float32)
    nan[0, 0, 0] = np.nan
    nan_file = save_nifti(tmp_path / "d.nii.gz", nan)
    assert check_volumes([{"image": str(good)}]) == [{"image": str(good)}]
    for bad, message in ((truncated, "cannot be read"), (four_d, "single-channel 3D"), (nan_file, "NaN")):
        with pytest.raises(ValueError, match=message) as err:
            check_volumes([{"image": str(good)}, {"image": str(bad)}])
        assert str(bad) in str(err.value)
    with pytest.raises(FileNotFoundError, match="e.nii.gz"):
        check_volumes([{"image": str(tmp_path / "e.nii.gz")}])


def test_score_masks_per_volume_and_class(tmp_path):
    from scripts.score import main, score_masks

    data, pred = tmp_path / "data", tmp_path / "seg"
    label = np.zeros((10, 10, 2), np.uint8)
    label[2:6, 2:6] = 1
    label[6:8, 2:6] = 2
    for name, mask in (("a", label), ("b", np.where(label == 2, 0, label))):
        save_nifti(data / f"{name}.nii.gz", np.zeros(label.shape, np.float32))
        save_nifti(data / f"{name}_gt.nii.gz", label)
        save_nifti(pred / f"{name}_seg.nii.gz", mask.astype(np.uint8))
    rows = score_masks(str(data), str(pred), ["RV", "Myo", "LV"])
    # b misses class 2 entirely; class 3 is absent from label and mask alike, which counts as agreement
    assert [(r["RV"], r["Myo"], r["LV"]) for r in rows] == [(1.0, 1.0, 1.0), (1.0, 0.0, 1.0)]
    assert main(["--dataset_dir", str(data), "--pred_dir", str(pred)]) == 0
    last = (pred / "dice.csv").read_text().strip().splitlines()[-1].split(",")
    assert last[0] == "mean" and abs(float(last[-1]) - (1.0 + 2 / 3) / 2) < 1e-6
    (pred / "b_seg.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="b_seg.nii.gz"):
        score_masks(str(data), str(pred), ["RV", "Myo", "LV"])


def test_spread_subjects_takes_every_frame_of_evenly_spaced_subjects():
    records = [{"image": f"p{p:03d}_frame{f}.nii.gz", "case": f"patient{p:03d}_frame{f:02d}"}
               for p in range(1, 21) for f in (1, 12)]
    picked = spread_subjects(records, 4)
    assert [r["case"] for r in picked] == [f"patient{p:03d}_frame{f:02d}" for p in (1, 6, 11, 16) for f in (1, 12)]
    # a data set of one volume per subject (MSD)
    single = [{"image": f"la_{i:03d}.nii.gz", "case": f"la_{i:03d}"} for i in range(10)]
    assert [r["case"] for r in spread_subjects(single, 3)] == ["la_000", "la_003", "la_006"]
    with pytest.raises(ValueError, match="cannot take 11 subjects"):
        spread_subjects(single, 11)
