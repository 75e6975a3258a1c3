"""Label audit: from a trained network and a labelled data set, a per-slice verdict on every manual label and a
cleansed label volume per input, for an annotator to review.

Runs one cleansing round (the same code as training: :class:`scripts.handlers.SelfCleansing`) over the data set
and writes to ``output_dir``:

* ``audit.csv``: one row per slice: volume, slice, the Dice loss against its manual label, the clean posterior of
  the label filter, the verdict (clean/noisy) and, when clean labels are known (simulated noise), whether the
  slice was truly noisy;
* ``<volume>_cleansed.nii.gz``: the manual label where the filter judged it clean and the LCM pseudo-label where
  it judged it noisy, written back into the geometry (shape and affine) of the input label file.
"""

from __future__ import annotations

import copy
import csv
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import allow_missing_keys_mode

from scripts.flags import as_flag
from scripts.geometry import load_weights
from scripts.handlers import CleansingRound, SelfCleansing
from scripts.metrics import noisy_slices
from scripts.store import PseudoLabelStore

logger = logging.getLogger(__name__)

__all__ = ["run_audit", "to_source_geometry", "invert_to_source"]


def invert_to_source(labels: torch.Tensor, label_ops: list, volume_transform, source_shape: tuple) -> np.ndarray:
    """Map (S, h, w) slice labels back to the (H, W, S) source volume by undoing the invertible operations the
    volume preprocessing applied to the label (in-plane zoom or resize, padding or cropping to the canvas).

    The labels are inverted as one channel per value and the largest channel wins, so that an interpolating
    inverse (a recorded bilinear resize) cannot mix label values into a class that is not there."""
    values, index = torch.unique(labels, return_inverse=True)
    onehot = F.one_hot(index.long(), len(values)).permute(3, 1, 2, 0).float()  # (K, h, w, S)
    lab = MetaTensor(onehot, applied_operations=copy.deepcopy(label_ops))
    with allow_missing_keys_mode(volume_transform):
        out = volume_transform.inverse({"label": lab})["label"]
    vol = values[torch.as_tensor(out).argmax(0)].to(torch.uint8).numpy()
    if tuple(vol.shape) != tuple(source_shape):
        raise ValueError(f"labels mapped back to {tuple(vol.shape)}, the source volume has {tuple(source_shape)}")
    return vol


def to_source_geometry(labels: torch.Tensor, source_shape: tuple, crop_origin=None, crop_size=None) -> np.ndarray:
    """Map (S, h, w) slice labels made on heart-centred (and possibly resized) patches back to an (H, W, S) volume.

    Without crop information the slices must already have the source's in-plane shape.
    """
    lab = labels.to(torch.uint8)
    if crop_origin is None:
        if tuple(lab.shape[1:]) != tuple(source_shape[:2]):
            raise ValueError(f"slices of {tuple(lab.shape[1:])} cannot be placed in a volume of {source_shape}")
        return lab.permute(1, 2, 0).numpy()
    h, w = crop_size
    if tuple(lab.shape[1:]) != (h, w):
        lab = F.interpolate(lab[:, None].float(), size=(h, w), mode="nearest")[:, 0].to(torch.uint8)
    out = np.zeros(source_shape, dtype=np.uint8)
    y0, x0 = crop_origin
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + h, source_shape[0]), min(x0 + w, source_shape[1])
    out[ys:ye, xs:xe, :] = lab[:, ys - y0 : ye - y0, xs - x0 : xe - x0].permute(1, 2, 0).numpy()
    return out


def run_audit(network: torch.nn.Module, dataset, checkpoint: str, output_dir: str, num_classes: int,
              overwrite: bool = False, **cleansing_kwargs) -> Path:
    """Audit ``dataset`` (a :class:`scripts.data.SliceDataset`) with the network weights in ``checkpoint``."""
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not as_flag(overwrite, "overwrite"):
        raise FileExistsError(f"audit folder {out} is not empty; pass --overwrite True or choose another folder")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    network.load_state_dict(load_weights(checkpoint))
    out.mkdir(parents=True, exist_ok=True)
    store = PseudoLabelStore("zeros")
    store.initialise(dataset.labels())
    # the audit writes whole labels for a person to review, so no target rule marks pixels as unsupervised
    cleansing = SelfCleansing(network, dataset, store, num_classes, start_epoch=0, interval=1,
                              **cleansing_kwargs)
    rnd = CleansingRound(epoch=0, index=1)
    cleansing.collect(rnd)
    cleansing.filter(rnd)
    cleansing.cleanse(rnd)
    manual = dataset.labels()
    clean = dataset.clean_labels() if hasattr(dataset, "clean_labels") else None
    true_noisy = noisy_slices(manual, clean) if clean is not None else None
    verdict_clean = rnd.manual_filter.clean

    rows = []
    for info in dataset.volume_info:
        rec, first, n = info["record"], info["first_id"], info["n_slices"]
        ids = list(range(first, first + n))
        label_file = Path(rec["label"])
        src = nib.load(str(label_file))
        if info.get("label_ops"):
            vol = invert_to_source(store.labels[ids], info["label_ops"], dataset.volume_transform, tuple(src.shape))
        else:
            vol = to_source_geometry(store.labels[ids], tuple(src.shape), info["crop_origin"], info["crop_size"])
        name = label_file.name.split(".nii")[0]
        nib.save(nib.Nifti1Image(vol, src.affine, src.header), str(out / f"{name}_cleansed.nii.gz"))
        for z, i in enumerate(ids):
            row = {"volume": rec.get("case", rec["image"]), "slice": z, "id": i,
                   "dice_loss": f"{float(rnd.manual_loss[i]):.4f}",
                   "clean_posterior": f"{float(rnd.manual_filter.clean_prob[i]):.4f}",
                   "verdict": "clean" if bool(verdict_clean[i]) else "noisy"}
            if true_noisy is not None:
                row["truly_noisy"] = int(true_noisy[i])
            rows.append(row)
    with open(out / "audit.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    s = rnd.summary
    logger.info(f"audit: {s['manual_noisy']} of {len(manual)} slices judged noisy ({s['manual_filter_status']}); "
                f"results in {out}")
    if true_noisy is not None:
        logger.info(f"audit against the known noise: precision {s['filter_precision']:.3f}, recall "
                    f"{s['filter_recall']:.3f}, Dice of the cleansed labels vs clean {s['dice_pseudo_vs_clean']:.3f}"
                    f" (manual labels: {s['dice_manual_vs_clean']:.3f})")
    return out
