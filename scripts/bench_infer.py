"""Inference throughput: slices per second of the bundle's NIfTI inference end to end (load, preprocess, infer,
post-process, write) over the bare network forward on the same slices held in memory. Measured interleaved in one
run on the default data's volumes.

    python -m scripts.bench_infer [--repeats 3]

Last line: ``infer_vs_forward <ratio>`` (goal: at least 0.8).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from scripts.bench_common import now, parse_bundle, ratio_line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench_infer_"))
    try:
        torch.manual_seed(0)
        probe = parse_bundle(["configs/inference.json"])
        network = probe.get_parsed_content("network_def")
        ckpt = tmp / "model.pt"
        torch.save(network.state_dict(), ckpt)  # throughput does not depend on the weights

        def make_parser(run: int):
            overrides = {"ckpt_path": str(ckpt), "output_dir": str(tmp / f"out{run}")}
            return parse_bundle(["configs/inference.json"], overrides)

        # the bare side: every volume's slices, preprocessed once, as the network sees them
        parser = make_parser(-1)
        dataset = parser.get_parsed_content("dataset")
        net = parser.get_parsed_content("network")
        net.load_state_dict(torch.load(ckpt, weights_only=True))
        net.eval()
        sw = parser.get_parsed_content("inferer").sw_batch_size
        slices = []
        for item in dataset:
            vol = item["image"].as_tensor()  # (1, H, W, S)
            slices.append(vol.permute(3, 0, 1, 2).contiguous())
        n_slices = sum(len(s) for s in slices)

        def bare_rate() -> float:
            t0 = now()
            with torch.no_grad():
                for vol in slices:
                    for i in range(0, len(vol), sw):
                        net(vol[i : i + sw]).softmax(1).argmax(1)
            return n_slices / (now() - t0)

        def bundle_rate(run: int) -> float:
            evaluator = make_parser(run).get_parsed_content("evaluator")
            t0 = now()
            evaluator.run()
            rate = n_slices / (now() - t0)
            written = list((tmp / f"out{run}").glob("*.nii.gz"))
            if len(written) != len(slices):
                raise RuntimeError(f"inference wrote {len(written)} masks for {len(slices)} volumes")
            return rate

        ours, bare = [], []
        for run in range(args.repeats):
            ours.append(bundle_rate(run))
            bare.append(bare_rate())
        print(f"{len(slices)} volumes, {n_slices} slices of {tuple(slices[0].shape[2:])}, sw_batch_size {sw}")
        print(ratio_line("infer_vs_forward", ours, bare, "slices/s"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
