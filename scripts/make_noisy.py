"""Write a noisy copy of a data set in the ACDC layout, keeping the clean labels and the true noise flags.

    python -m scripts.make_noisy --src ../shared/data/acdc --dst data/acdc_a70b10 --alpha 0.7 --beta 10 --seed 0

Images are copied unchanged. In each case folder, ``*_gt.nii.gz`` holds the noisy label, ``*_gt_clean.nii.gz``
the original, and ``<dst>/noise.json`` the parameters and, per volume, each slice's flag (0 clean, 1 missing
label, 2 boundary noise). Only the cases of the training split get noise; the others are copied clean, so
validation stays clean. Noise is drawn per 2D slice, as in training (Sec. 3.2). The destination must not exist:
nothing is overwritten, and the copy is built in a temporary folder that is renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from scripts.data import acdc_datalist
from scripts.noise import simulate_label_noise


def make_noisy_copy(src: str, dst: str, alpha: float, beta: int, seed: int = 0, num_classes: int = 4,
                    radius_scale: float = 1.0, split: str = "train") -> Path:
    src_p, dst_p = Path(src), Path(dst)
    if dst_p.exists():
        raise FileExistsError(f"destination exists, refusing to overwrite: {dst_p}")
    noisy_cases = {Path(r["image"]).parent.name for r in acdc_datalist(src, split)}
    every = acdc_datalist(src, "all")
    # one noise draw over all training slices, in datalist order, as the training pipeline draws it
    train_recs = [r for r in every if Path(r["image"]).parent.name in noisy_cases]
    labels, shapes = [], []
    for rec in train_recs:
        lab = np.asarray(nib.load(rec["label"]).dataobj)
        shapes.append(lab.shape)
        labels.extend(lab[..., z] for z in range(lab.shape[-1]))
    max_h = max(s[0] for s in shapes)
    max_w = max(s[1] for s in shapes)
    # volumes differ in size: pad slices to one shape for the batched draw, crop back afterwards
    stack = np.zeros((len(labels), max_h, max_w), dtype=np.uint8)
    for i, sl in enumerate(labels):
        stack[i, : sl.shape[0], : sl.shape[1]] = sl
    noisy, flags = simulate_label_noise(stack, alpha=alpha, beta=beta, seed=seed, num_classes=num_classes,
                                        radius_scale=radius_scale)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst_p.name}.", dir=dst_p.parent if dst_p.parent.exists() else None))
    try:
        for case_dir in sorted(p for p in src_p.iterdir() if p.is_dir()):
            shutil.copytree(case_dir, tmp / case_dir.name)
        for extra in ("splits.json", "README.md"):
            if (src_p / extra).is_file():
                shutil.copy2(src_p / extra, tmp / extra)
        record, start = {}, 0
        for rec, shape in zip(train_recs, shapes):
            n = shape[-1]
            gt = Path(rec["label"])
            out = tmp / gt.parent.name / gt.name
            img = nib.load(gt)
            vol = np.stack([noisy[start + z, : shape[0], : shape[1]] for z in range(n)], axis=-1).astype(np.uint8)
            os.replace(out, out.with_name(gt.name.replace("_gt.nii.gz", "_gt_clean.nii.gz")))
            nib.save(nib.Nifti1Image(vol, img.affine, img.header), out)
            record[rec["case"]] = [int(f) for f in flags[start : start + n]]
            start += n
        (tmp / "noise.json").write_text(json.dumps({"alpha": alpha, "beta": beta, "seed": seed,
                                                    "radius_scale": radius_scale, "flags": record}, indent=1))
        os.replace(tmp, dst_p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst_p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True)
    ap.add_argument("--dst", required=True)
    ap.add_argument("--alpha", type=float, required=True)
    ap.add_argument("--beta", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num_classes", type=int, default=4)
    ap.add_argument("--radius_scale", type=float, default=1.0)
    args = ap.parse_args(argv)
    out = make_noisy_copy(args.src, args.dst, args.alpha, args.beta, args.seed, args.num_classes, args.radius_scale)
    flags = json.loads((out / "noise.json").read_text())["flags"]
    total = sum(len(v) for v in flags.values())
    noisy = sum(1 for v in flags.values() for f in v if f)
    print(f"wrote {out}: {noisy} of {total} training slices noisy")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
