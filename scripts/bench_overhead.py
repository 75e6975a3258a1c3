"""Cost of self-cleansing: wall time of the bundle's self-cleansing training over the Baseline's, on the same data
for the same epochs, both run in this process one after the other (and repeated, interleaved).

    python -m scripts.bench_overhead [--epochs 10] [--interval 5] [--repeats 5]

Both runs include validation. The self-cleansing run does a cleansing round every ``interval`` epochs from the
end of epoch 1. One pair of one-minute runs moves by up to ten percent on a shared machine, as much as the goal
allows, so the ratio is taken between the medians of five repeats (about ten minutes), and every other repeat runs
self-cleansing first so that a machine that slows down or speeds up during the benchmark favours neither. Each
repeat's own ratio is printed too. Last line: ``cleansing_overhead <ratio>`` (goal: at most 1.08 with k=5).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile

import torch

from scripts.bench_common import now, parse_bundle


def timed_run(self_cleansing: bool, epochs: int, interval: int, out: str) -> tuple[float, int]:
    torch.manual_seed(0)
    parser = parse_bundle(["configs/train.json", "configs/quick.json"], {
        "epochs": epochs, "self_cleansing": self_cleansing, "warmup_epochs": 1,
        "full_pseudo_epoch": max(1, epochs // 2), "cleansing_interval": interval,
        "output_dir": out, "ckpt_dir": f"{out}/models"})
    trainer = parser.get_parsed_content("train#trainer")
    t0 = now()
    trainer.run()
    rounds = len(parser.get_parsed_content("train#store").rounds)
    return now() - t0, rounds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--interval", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench_overhead_")
    try:
        base, ours = [], []
        for r in range(args.repeats):
            runs = {}
            for cleansing in ((True, False) if r % 2 else (False, True)):
                runs[cleansing] = timed_run(cleansing, args.epochs, args.interval,
                                            f"{tmp}/{'cleansing' if cleansing else 'baseline'}{r}")
            (tb, _), (tc, rounds) = runs[False], runs[True]
            base.append(tb)
            ours.append(tc)
            print(f"repeat {r}: baseline {tb:.1f} s, self-cleansing {tc:.1f} s ({rounds} cleansing rounds), "
                  f"ratio {tc / tb:.3f}")
        print(f"{args.epochs} epochs, k={args.interval}, torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(f"cleansing_overhead {statistics.median(ours) / statistics.median(base):.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
