"""Score the masks an inference run wrote against the labels of the data set, per volume and per class.

    python -m scripts.score --dataset_dir DIR --pred_dir OUT [--split val] [--classes RV,Myo,LV] [--output CSV]

``DIR`` is a data set in any layout the bundle reads (its labels are found as for training); ``OUT`` holds the
``<image>_seg.nii.gz`` masks that ``configs/inference.json`` wrote for it. Dice is 3D per volume at the labels'
native resolution (MONAI ``compute_dice``, 1 when a class is absent from both), and the last line is the mean over
the volumes. This measures what a user gets from the inference command, with nothing but its output files.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot

from scripts.data import datalist, output_path

__all__ = ["score_masks"]


def _load(path: str | Path) -> np.ndarray:
    try:
        return np.asanyarray(nib.load(str(path)).dataobj)
    except FileNotFoundError:
        raise FileNotFoundError(f"mask not found: {path}") from None


def score_masks(dataset_dir: str, pred_dir: str, class_names: list[str], split: str = "all") -> list[dict]:
    """One row per labelled volume of ``dataset_dir`` (of ``split``: ``all``, ``train`` or ``val``): the Dice of its
    mask in ``pred_dir`` for every class."""
    rows = []
    n = len(class_names) + 1
    for rec in datalist(dataset_dir, split):
        label = _load(rec["label"])
        pred = _load(output_path(rec["image"], pred_dir, "seg"))
        if pred.shape != label.shape:
            raise ValueError(f"mask of {rec['image']} has shape {pred.shape}, its label {label.shape}")
        if pred.max() >= n or label.max() >= n:
            raise ValueError(f"{rec['image']}: values above {n - 1} in the mask or the label; give --classes")
        y_pred = one_hot(torch.as_tensor(pred.astype(np.int64))[None, None], n)
        y = one_hot(torch.as_tensor(label.astype(np.int64))[None, None], n)
        dice = compute_dice(y_pred, y, include_background=False, ignore_empty=False)[0]
        row = {"volume": rec["image"], **{c: float(d) for c, d in zip(class_names, dice)}}
        row["mean"] = float(dice.mean())
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--pred_dir", required=True)
    parser.add_argument("--split", default="all", choices=("all", "train", "val"))
    parser.add_argument("--classes", default="RV,Myo,LV", help="comma list of the foreground classes 1, 2, ...")
    parser.add_argument("--output", default=None, help="CSV file (default: <pred_dir>/dice.csv)")
    args = parser.parse_args(argv)
    names = args.classes.split(",")
    rows = score_masks(args.dataset_dir, args.pred_dir, names, args.split)
    mean = {"volume": "mean", **{k: float(np.mean([r[k] for r in rows])) for k in [*names, "mean"]}}
    output = Path(args.output or Path(args.pred_dir) / "dice.csv")
    with open(output, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(mean))
        writer.writeheader()
        writer.writerows([*rows, mean])
    for row in [*rows, mean]:
        print(f"{Path(row['volume']).name}: " + ", ".join(f"{k} {row[k]:.4f}" for k in [*names, "mean"]))
    print(f"written: {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
