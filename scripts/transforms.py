"""Transforms MONAI does not have: input checks with clear errors, heart-centred patches, target-label masks."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelWriter
from monai.transforms import MapTransform

logger = logging.getLogger(__name__)

__all__ = ["CheckInputsd", "HeartCentredCropd", "SelectLabeld", "VolumeWriter", "source_name"]


def source_name(data: Mapping, key: Hashable) -> str:
    """The file a loaded array came from, for error messages."""
    value = data.get(key)
    if isinstance(value, MetaTensor):
        return str(value.meta.get("filename_or_obj", key))
    return str(data.get(f"{key}_path", key))


class CheckInputsd(MapTransform):
    """Reject inputs that would otherwise train silently on garbage; each error names the file.

    Checks, after loading and ``EnsureChannelFirstd``: the image is 3D with one channel, has only finite values,
    and is not a single slice when ``min_slices`` > 1; the label (when present) has the image's shape and affine
    and only values in ``0..num_classes-1``.
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str | None = "label",
        num_classes: int | None = None,
        spatial_dims: int = 3,
        min_slices: int = 1,
        affine_atol: float = 1e-3,
        allow_missing_keys: bool = True,
    ) -> None:
        keys = [image_key] + ([label_key] if label_key else [])
        super().__init__(keys, allow_missing_keys)
        self.image_key, self.label_key = image_key, label_key
        self.num_classes, self.spatial_dims, self.min_slices = num_classes, spatial_dims, min_slices
        self.affine_atol = affine_atol

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        img = d[self.image_key]
        name = source_name(d, self.image_key)
        if img.ndim != self.spatial_dims + 1 or img.shape[0] != 1:
            raise ValueError(
                f"{name}: expected a single-channel {self.spatial_dims}D volume, got an array of shape "
                f"{tuple(img.shape)} (channel first): is it a 4D or multi-channel file?"
            )
        if self.min_slices > 1 and img.shape[-1] < self.min_slices:
            raise ValueError(f"{name}: has {img.shape[-1]} slice(s), at least {self.min_slices} are needed")
        if not torch.isfinite(torch.as_tensor(img)).all():
            raise ValueError(f"{name}: image holds NaN or infinite intensities")
        if self.label_key and self.label_key in d:
            lab = d[self.label_key]
            lname = source_name(d, self.label_key)
            if tuple(lab.shape) != tuple(img.shape):
                raise ValueError(
                    f"{lname}: label shape {tuple(lab.shape[1:])} differs from image shape {tuple(img.shape[1:])} "
                    f"of {name}"
                )
            if isinstance(img, MetaTensor) and isinstance(lab, MetaTensor):
                if not np.allclose(np.asarray(img.affine), np.asarray(lab.affine), atol=self.affine_atol):
                    raise ValueError(f"{lname}: label affine differs from the affine of image {name}")
            lab_t = torch.as_tensor(lab)
            if not torch.isfinite(lab_t).all() or not torch.equal(lab_t, lab_t.round()):
                raise ValueError(f"{lname}: label holds non-integer values")
            if self.num_classes is not None:
                values = torch.unique(lab_t).long().tolist()
                bad = [v for v in values if v < 0 or v >= self.num_classes]
                if bad:
                    raise ValueError(
                        f"{lname}: unexpected label values {bad[:10]} (expected 0..{self.num_classes - 1})"
                    )
        return d


class HeartCentredCropd(MapTransform):
    """Cut a fixed in-plane patch around the labelled structures of a (C, H, W, S) volume.

    The centre is the middle of the bounding box of ``source_key > 0`` over the whole volume, so every slice of a
    volume gets the same window. A volume without foreground (or without the source key, as at inference) is cut
    around the in-plane image centre and a warning is logged. Borders are zero padded so the patch always has
    ``roi_size``; the patch origin is stored in the meta data (``crop_origin``).
    """

    def __init__(self, keys: KeysCollection, roi_size: Sequence[int] = (128, 128), source_key: str = "label",
                 allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.roi_size = tuple(int(r) for r in roi_size)
        self.source_key = source_key

    def centre(self, d: Mapping) -> tuple[int, int]:
        src = d.get(self.source_key)
        ref = d[self.first_key(d)]
        if src is not None:
            fg = torch.as_tensor(src)[0] > 0
            if fg.any():
                rows = torch.nonzero(fg.any(dim=(1, 2)))
                cols = torch.nonzero(fg.any(dim=(0, 2)))
                return (int(rows.min() + rows.max() + 1) // 2, int(cols.min() + cols.max() + 1) // 2)
            logger.warning(f"{source_name(d, self.source_key)}: no foreground; patch centred on the image centre")
        return (ref.shape[1] // 2, ref.shape[2] // 2)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        cy, cx = self.centre(d)
        h, w = self.roi_size
        y0, x0 = cy - h // 2, cx - w // 2
        for key in self.key_iterator(d):
            arr = d[key]
            t = torch.as_tensor(arr)
            out = t.new_zeros((t.shape[0], h, w, *t.shape[3:]))
            ys, xs = max(y0, 0), max(x0, 0)
            ye, xe = min(y0 + h, t.shape[1]), min(x0 + w, t.shape[2])
            if ye > ys and xe > xs:
                out[:, ys - y0 : ye - y0, xs - x0 : xe - x0] = t[:, ys:ye, xs:xe]
            if isinstance(arr, MetaTensor):
                out = MetaTensor(out, meta=dict(arr.meta))
                out.meta["crop_origin"] = (y0, x0)
                out.meta["crop_size"] = (h, w)
            d[key] = out
        return d


class SelectLabeld(MapTransform):
    """Turn a multi-label map into the binary mask of one target label (for example tumour = 2 in MSD liver)."""

    def __init__(self, keys: KeysCollection, target: int | Sequence[int], allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.target = [int(t) for t in ([target] if isinstance(target, int) else target)]

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            mask = torch.zeros_like(torch.as_tensor(lab))
            for t in self.target:
                mask = torch.where(torch.as_tensor(lab) == t, torch.ones_like(mask), mask)
            d[key] = MetaTensor(mask, meta=dict(lab.meta)) if isinstance(lab, MetaTensor) else mask
        return d


class VolumeWriter(NibabelWriter):
    """A NIfTI writer that keeps every spatial dimension of a channel-first mask.

    MONAI's writer drops all trailing singleton dimensions after moving the channel last, so the mask of a
    single-slice volume (H, W, 1) would be written as (H, W); here only the channel is dropped.
    """

    def set_data_array(self, data_array, channel_dim=0, squeeze_end_dims=True, **kwargs):
        super().set_data_array(data_array, channel_dim=channel_dim, squeeze_end_dims=False, **kwargs)
        if channel_dim is not None and self.data_obj.shape[-1] == 1:
            self.data_obj = self.data_obj[..., 0]
