import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import LoadImaged

from conftest import MSD_SHAPE, REPO_ROOT, load_nifti, save_nifti
from scripts.data import msd_datalist
from scripts.transforms import CheckInputsd, HeartCentredCropd, SelectLabeld

LOAD = LoadImaged(keys=["image", "label"], image_only=True, ensure_channel_first=True, allow_missing_keys=True)


def _pair(tmp_path, image, label=None, image_affine=None, label_affine=None):
    rec = {"image": str(save_nifti(tmp_path / "img.nii.gz", image, image_affine))}
    if label is not None:
        rec["label"] = str(save_nifti(tmp_path / "img_gt.nii.gz", label, label_affine))
    return LOAD(rec)


def _good(shape=(16, 16, 3)):
    rng = np.random.default_rng(0)
    label = np.zeros(shape, np.uint8)
    label[4:10, 4:10] = 1
    label[6:8, 6:8] = 3
    return rng.normal(size=shape).astype(np.float32), label


# ---------------------------------------------------------------- CheckInputsd


def test_check_inputs_accepts_valid_pair(tmp_path):
    image, label = _good()
    d = _pair(tmp_path, image, label)
    out = CheckInputsd(num_classes=4)(d)
    assert out["image"] is d["image"] and out["label"] is d["label"]


def test_check_inputs_image_only(tmp_path):
    image, _ = _good()
    d = _pair(tmp_path, image)
    assert CheckInputsd(label_key=None)(d)["image"] is d["image"]


@pytest.mark.parametrize("case", ["shape", "affine", "values", "non_integer"])
def test_check_inputs_rejects_bad_label(tmp_path, case):
    image, label = _good()
    label_affine = None
    if case == "shape":
        label = label[:, :12]
    elif case == "affine":
        label_affine = np.diag([1.0, 1.0, 2.5, 1.0])
    elif case == "values":
        label[0, 0, 0] = 7
    else:
        label = label.astype(np.float32)
        label[0, 0, 0] = 1.5
    d = _pair(tmp_path, image, label, label_affine=label_affine)
    with pytest.raises(ValueError) as err:
        CheckInputsd(num_classes=4)(d)
    assert "img_gt.nii.gz" in str(err.value)
    if case == "values":
        assert "7" in str(err.value).replace(str(tmp_path), "")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_inputs_rejects_non_finite_image(tmp_path, bad):
    image, label = _good()
    image[3, 3, 1] = bad
    d = _pair(tmp_path, image, label)
    with pytest.raises(ValueError, match="NaN or infinite") as err:
        CheckInputsd(num_classes=4)(d)
    assert "img.nii.gz" in str(err.value)


def test_check_inputs_rejects_4d_image(tmp_path):
    image = np.zeros((16, 16, 3, 2), np.float32)
    d = _pair(tmp_path, image)
    with pytest.raises(ValueError, match="4D") as err:
        CheckInputsd(label_key=None)(d)
    assert "img.nii.gz" in str(err.value)


def test_check_inputs_min_slices(tmp_path):
    image, label = _good((16, 16, 1))
    d = _pair(tmp_path, image, label)
    CheckInputsd(num_classes=4)(d)  # one slice is fine unless asked otherwise
    with pytest.raises(ValueError, match="slice") as err:
        CheckInputsd(num_classes=4, min_slices=2)(d)
    assert "img.nii.gz" in str(err.value)


# ---------------------------------------------------------------- HeartCentredCropd


def _volume(h, w, s=3):
    image = MetaTensor(torch.arange(1, h * w * s + 1, dtype=torch.float32).reshape(1, h, w, s))
    return image, MetaTensor(torch.zeros(1, h, w, s))


def _bbox_centre(mask):
    rows, cols = np.nonzero(mask)
    return (rows.min() + rows.max() + 1) / 2, (cols.min() + cols.max() + 1) / 2


def test_crop_centres_off_centre_blob():
    image, label = _volume(40, 48)
    label[0, 4:10, 30:40, 0] = 1  # off-centre, and in one slice only
    crop = HeartCentredCropd(keys=["image", "label"], roi_size=(16, 16))
    out = crop({"image": image, "label": label})
    assert out["image"].shape == out["label"].shape == (1, 16, 16, 3)
    lab = out["label"][0].numpy()
    assert lab.sum() == label.sum(), "the whole blob must be inside the patch"
    cy, cx = _bbox_centre(lab.any(-1))
    assert abs(cy - 8) <= 0.5 and abs(cx - 8) <= 0.5
    # every slice uses the same window, and the image moves with the label
    y0, x0 = out["image"].meta["crop_origin"]
    img = out["image"][0].numpy()
    for r in range(16):
        for c in range(16):
            y, x = r + y0, c + x0
            expected = image[0, y, x].numpy() if 0 <= y < 40 and 0 <= x < 48 else np.zeros(3)
            np.testing.assert_array_equal(img[r, c], expected)


def test_crop_pads_at_the_border():
    image, label = _volume(32, 32)
    label[0, 0:4, 0:4] = 2  # a blob in the corner: the window reaches outside the image
    out = HeartCentredCropd(keys=["image", "label"], roi_size=(24, 24))({"image": image, "label": label})
    assert out["image"].shape == (1, 24, 24, 3)
    assert out["label"].sum() == label.sum()
    img = out["image"][0]
    # the image starts where the window leaves the padding; values 1.. mark real voxels
    assert (img[:10] == 0).all() and (img[:, :10] == 0).all()
    assert (img[10:, 10:] > 0).all()


def test_crop_larger_than_image():
    image, label = _volume(12, 10)
    label[0, 5:7, 4:6] = 1
    out = HeartCentredCropd(keys=["image", "label"], roi_size=(32, 32))({"image": image, "label": label})
    assert out["image"].shape == (1, 32, 32, 3)
    assert torch.count_nonzero(out["image"]) == image.numel()
    assert out["label"].sum() == label.sum()


@pytest.mark.parametrize("with_label", [True, False])
def test_crop_without_foreground_uses_image_centre(with_label):
    image, label = _volume(40, 36)
    d = {"image": image, "label": label} if with_label else {"image": image}
    out = HeartCentredCropd(keys=["image", "label"], roi_size=(16, 16))(d)
    torch.testing.assert_close(out["image"].as_tensor(), image[:, 12:28, 10:26].as_tensor())


# ---------------------------------------------------------------- CT windowing (configs/ct.json)


def _ct_transforms(patch=(32, 32)):
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / "configs" / "train.json"), str(REPO_ROOT / "configs" / "ct.json")])
    parser["resize"] = list(patch)
    return parser.get_parsed_content("volume_transforms")


def test_ct_window_and_target_mask(msd_dir):
    transforms = _ct_transforms()
    rec = msd_datalist(str(msd_dir / "dataset.json"), "all")[0]
    raw_image, raw_label = load_nifti(rec["image"]).astype(np.float32), load_nifti(rec["label"])

    d, windowed = dict(rec), None
    for t in transforms:
        if type(t).__name__ == "Resized" and windowed is None:
            windowed = d
        d = t(d)
    # before resizing: the configured window maps HU linearly onto [0, 1]
    img = windowed["image"][0].numpy()
    np.testing.assert_allclose(img, np.clip((raw_image + 70.0) / 250.0, 0.0, 1.0), atol=1e-5)
    assert np.all(img[raw_image == -70.0] == 0.0) and (raw_image == -70.0).any()
    assert np.all(img[raw_image == 180.0] == 1.0) and (raw_image == 180.0).any()
    assert np.all(img[raw_image == -1000.0] == 0.0)
    np.testing.assert_array_equal(windowed["label"][0].numpy(), (raw_label == 2).astype(np.float32))

    # after resizing: the configured in-plane size, slices untouched, a binary tumour mask
    assert d["image"].shape == d["label"].shape == (1, 32, 32, MSD_SHAPE[2])
    assert float(d["image"].min()) >= 0.0 and float(d["image"].max()) <= 1.0
    assert set(torch.unique(d["label"]).tolist()) == {0.0, 1.0}
    tumour = d["label"][0].numpy() > 0
    # tumour HU (100..150) map to 0.68..0.88; interpolation only blurs its rim
    assert d["image"][0].numpy()[tumour].mean() > 0.65
    assert float(d["image"][0, 0, 0, 0]) == 0.0


def test_ct_checks_source_label_range(tmp_path):
    """ct.json checks the source labels (0..2) before selecting the target."""
    transforms = _ct_transforms()
    image = np.zeros(MSD_SHAPE, np.int16)
    label = np.zeros(MSD_SHAPE, np.uint8)
    label[1, 1, 1] = 3
    rec = {"image": str(save_nifti(tmp_path / "ct.nii.gz", image)),
           "label": str(save_nifti(tmp_path / "ct_seg.nii.gz", label))}
    d = transforms[0](rec)
    with pytest.raises(ValueError, match="ct_seg.nii.gz"):
        transforms[1](d)


def test_select_label_several_targets():
    lab = MetaTensor(torch.tensor([[[0, 1, 2, 3]]]).float())
    out = SelectLabeld(keys="label", target=[1, 3])({"label": lab})["label"]
    assert out.tolist() == [[[0.0, 1.0, 0.0, 1.0]]]
    assert isinstance(out, MetaTensor)

