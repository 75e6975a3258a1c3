import json

import nibabel as nib
import numpy as np
import pytest

from scripts.phantom import (
    GENERATOR_VERSION,
    ensure_phantom_dataset,
    main,
    make_phantom_volume,
    write_phantom_dataset,
)

SHAPE = (96, 96, 4)
N_CASES = 4


def _load(path):
    img = nib.load(str(path))
    return img, np.asanyarray(img.dataobj)


def _case_paths(root, name):
    return root / name / f"{name}_frame01.nii.gz", root / name / f"{name}_frame01_gt.nii.gz"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom") / "data"
    return write_phantom_dataset(root, n_cases=N_CASES, shape=SHAPE, seed=3, val_fraction=0.25)


def test_layout_and_splits(dataset):
    names = [f"patient{i:03d}" for i in range(1, N_CASES + 1)]
    assert sorted(p.name for p in dataset.iterdir() if p.is_dir()) == names
    for name in names:
        for path in _case_paths(dataset, name):
            assert path.is_file()
    splits = json.loads((dataset / "splits.json").read_text())
    assert set(splits) == {"train", "val"}
    assert len(splits["val"]) == 1 and len(splits["train"]) == N_CASES - 1
    assert sorted(splits["train"] + splits["val"]) == names
    meta = json.loads((dataset / "phantom.json").read_text())
    assert meta["params"] == {
        "generator_version": GENERATOR_VERSION,
        "n_cases": N_CASES,
        "shape": list(SHAPE),
        "seed": 3,
        "val_fraction": 0.25,
    }
    # No staging folder is left next to the finished data set.
    assert [p.name for p in dataset.parent.iterdir()] == ["data"]


def test_nifti_like_acdc_copy(dataset):
    image_path, label_path = _case_paths(dataset, "patient001")
    img, image = _load(image_path)
    seg, label = _load(label_path)
    assert image.shape == SHAPE and label.shape == SHAPE
    assert image.dtype == np.uint16 and label.dtype == np.uint8
    np.testing.assert_array_equal(img.affine, np.eye(4))
    np.testing.assert_array_equal(seg.affine, np.eye(4))
    assert image.min() == 0 and image.max() == 4095


def test_labels_and_contrast(dataset):
    for i in range(1, N_CASES + 1):
        _, image = _load(_case_paths(dataset, f"patient{i:03d}")[0])
        _, label = _load(_case_paths(dataset, f"patient{i:03d}")[1])
        assert set(np.unique(label).tolist()) == {0, 1, 2, 3}
        # The base slice always shows all three structures.
        assert set(np.unique(label[..., 0]).tolist()) == {0, 1, 2, 3}
        means = {k: image[label == k].mean() for k in range(4)}
        assert means[3] > means[2] and means[1] > means[2]


def _neighbours(plane):
    padded = np.pad(plane, 1, constant_values=0)
    h, w = plane.shape
    return [padded[r : r + h, c : c + w] for r, c in ((0, 1), (2, 1), (1, 0), (1, 2))]


@pytest.mark.parametrize("seed", range(6))
def test_myocardium_encloses_lv(seed):
    _, label = make_phantom_volume(np.random.default_rng(seed), SHAPE)
    for s in range(label.shape[2]):
        plane = label[..., s]
        lv = plane == 3
        if not lv.any():
            continue
        for nb in _neighbours(plane):
            assert not np.any(nb[lv] == 1), "an LV pixel touches the RV"
            assert np.all(np.isin(nb[lv], (2, 3))), "the myocardium does not close around the LV"


def test_heart_stays_central_at_default_size():
    for seed in range(4):
        _, label = make_phantom_volume(np.random.default_rng(100 + seed), (160, 160, 8))
        idx = np.argwhere(label > 0)[:, :2]
        centre = idx.mean(axis=0)
        assert np.all(centre >= 40) and np.all(centre <= 119)
        # The whole heart fits in a 128 x 128 window centred on it.
        assert np.all(idx.min(axis=0) >= centre - 64) and np.all(idx.max(axis=0) < centre + 64)


def test_make_volume_is_deterministic():
    a_img, a_lab = make_phantom_volume(np.random.default_rng(7), SHAPE)
    b_img, b_lab = make_phantom_volume(np.random.default_rng(7), SHAPE)
    c_img, _ = make_phantom_volume(np.random.default_rng(8), SHAPE)
    assert a_img.dtype == np.float32 and a_lab.dtype == np.uint8
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)


def test_dataset_is_deterministic(dataset, tmp_path):
    # Case k does not depend on n_cases, so a smaller regeneration must match the first cases.
    other = write_phantom_dataset(tmp_path / "again", n_cases=2, shape=SHAPE, seed=3)
    for name in ("patient001", "patient002"):
        for a, b in zip(_case_paths(dataset, name), _case_paths(other, name)):
            assert np.array_equal(_load(a)[1], _load(b)[1])


def test_ensure_is_idempotent(tmp_path):
    root = tmp_path / "phantom"
    kwargs = dict(n_cases=2, shape=SHAPE, seed=1)
    assert ensure_phantom_dataset(root, **kwargs) == root.absolute()
    image_path = _case_paths(root, "patient001")[0]
    stamp = image_path.stat().st_mtime_ns
    assert ensure_phantom_dataset(root, **kwargs) == root.absolute()
    assert image_path.stat().st_mtime_ns == stamp


def test_ensure_refuses_other_parameters(tmp_path):
    root = tmp_path / "phantom"
    ensure_phantom_dataset(root, n_cases=2, shape=SHAPE, seed=1)
    with pytest.raises(FileExistsError, match=str(root)):
        ensure_phantom_dataset(root, n_cases=2, shape=SHAPE, seed=2)


def test_ensure_refuses_foreign_folder(tmp_path):
    root = tmp_path / "user_data"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="user_data"):
        ensure_phantom_dataset(root, n_cases=2, shape=SHAPE)
    with pytest.raises(FileExistsError):
        write_phantom_dataset(root, n_cases=2, shape=SHAPE)
    assert [p.name for p in root.iterdir()] == ["notes.txt"]
    assert (root / "notes.txt").read_text() == "keep me"


def test_ensure_fills_empty_folder(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    ensure_phantom_dataset(root, n_cases=1, shape=SHAPE)
    assert (root / "phantom.json").is_file()


def test_interrupted_generation_leaves_no_dataset(tmp_path, monkeypatch):
    import scripts.phantom as phantom

    calls = []

    def failing(rng, shape):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return make_phantom_volume(rng, shape)

    monkeypatch.setattr(phantom, "make_phantom_volume", failing)
    with pytest.raises(KeyboardInterrupt):
        write_phantom_dataset(tmp_path / "data", n_cases=3, shape=SHAPE)
    assert list(tmp_path.iterdir()) == []


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError):
        write_phantom_dataset(tmp_path / "a", n_cases=0, shape=SHAPE)
    with pytest.raises(ValueError):
        write_phantom_dataset(tmp_path / "b", shape=(16, 16, 4))
    with pytest.raises(ValueError):
        write_phantom_dataset(tmp_path / "c", shape=SHAPE, val_fraction=1.0)


def test_cli(tmp_path, capsys):
    root = tmp_path / "cli"
    args = ["--root", str(root), "--n_cases", "2", "--seed", "5", "--shape", *map(str, SHAPE)]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(root.absolute())
    assert json.loads((root / "phantom.json").read_text())["params"]["seed"] == 5
    assert main(args) == 0
    assert main(["--root", str(root), "--n_cases", "3", "--shape", *map(str, SHAPE)]) == 1
    assert "different parameters" in capsys.readouterr().err
