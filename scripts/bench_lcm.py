"""Benchmark: pairwise (naive) vs linear-identity LCM at the paper's scale.

Run from the bundle root: ``python -m scripts.bench_lcm [--reps-naive N --reps-linear N]``.

Setting: K = 64 grid (4096 cells), C = 16 channels, 256 x 256 features, a random
blob region covering about a quarter of the image. Timed in float32 on the same
inputs: representation degree (Eq. 5) plus the per-pixel score (Eq. 6), once with the
explicit cosine matrices (G x G and (H*W) x M) and once with the linear identity. The
grid pooling (Eq. 4) and the prototype selection are identical in both paths; they are
timed separately and shown for the end-to-end ratio. Agreement is checked in float64
(max abs difference relative to each quantity's scale, tolerance 1e-5); the float32
differences are printed for information. The last line is ``lcm_speedup <ratio>``
(naive / linear time of the part that differs), and the exit status is 1 if the two
paths disagree.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

from scripts.prototypes import (
    grid_features,
    prototype_score,
    prototype_score_naive,
    representation_degree,
    representation_degree_naive,
    select_prototypes,
)

SIZE = 256
CHANNELS = 16
GRID = 64
SIGMA = 0.7
TOLERANCE = 1e-5


def make_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (C, H, W) float64 and a blob region (H, W) bool of about 25% area."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(
        torch.arange(SIZE, dtype=torch.float64), torch.arange(SIZE, dtype=torch.float64), indexing="ij"
    )
    cy, cx = SIZE / 2 + 10.0, SIZE / 2 - 6.0
    theta = torch.atan2(yy - cy, xx - cx)
    phases = torch.rand(3, generator=gen, dtype=torch.float64) * 2 * math.pi
    wobble = 1 + 0.15 * torch.sin(3 * theta + phases[0]) + 0.08 * torch.sin(5 * theta + phases[1])
    base_radius = SIZE * math.sqrt(0.25 / math.pi)
    region = torch.hypot(yy - cy, xx - cx) < base_radius * wobble
    target = torch.hypot(yy - cy, xx - cx) < 0.85 * base_radius * wobble

    a = torch.randn(CHANNELS, generator=gen, dtype=torch.float64)
    b = torch.randn(CHANNELS, generator=gen, dtype=torch.float64)
    noise = torch.randn(CHANNELS, SIZE, SIZE, generator=gen, dtype=torch.float64)
    features = torch.where(target, a[:, None, None], b[:, None, None]) + 0.5 * noise
    return features.relu(), region


def _time_pair(naive_fn, linear_fn, reps_naive: int, reps_linear: int):
    """Median and min seconds of each function, repetitions interleaved.

    Interleaving spreads any background load on the machine over both paths instead of
    letting it land on whichever happened to run at that moment.
    """
    naive_fn()
    linear_fn()
    per_round = max(1, reps_linear // max(1, reps_naive))
    t_naive, t_linear = [], []
    for _ in range(max(1, reps_naive)):
        t0 = time.perf_counter()
        naive_fn()
        t_naive.append(time.perf_counter() - t0)
        for _ in range(per_round):
            t0 = time.perf_counter()
            linear_fn()
            t_linear.append(time.perf_counter() - t0)
    return (
        (statistics.median(t_naive), min(t_naive)),
        (statistics.median(t_linear), min(t_linear)),
    )


def _time(fn, reps: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def _rel_diff(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    diff = float((x - y).abs().max())
    scale = max(float(x.abs().max()), float(y.abs().max()), 1e-30)
    return diff, diff / scale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps-naive", type=int, default=5)
    parser.add_argument("--reps-linear", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    feats64, region = make_inputs(args.seed)
    cells64, inside = grid_features(feats64, region, GRID)
    deg_lin64 = representation_degree(cells64, inside)
    deg_naive64 = representation_degree_naive(cells64, inside)
    protos64, sel_lin = select_prototypes(cells64, deg_lin64, inside, SIGMA, return_mask=True)
    _, sel_naive = select_prototypes(cells64, deg_naive64, inside, SIGMA, return_mask=True)
    score_lin64 = prototype_score(feats64, protos64)
    score_naive64 = prototype_score_naive(feats64, protos64)

    feats = feats64.float()
    cells, _ = grid_features(feats, region, GRID)
    protos = protos64.float()
    deg_diff32 = _rel_diff(representation_degree(cells, inside), representation_degree_naive(cells, inside))
    score_diff32 = _rel_diff(prototype_score(feats, protos), prototype_score_naive(feats, protos))

    def naive() -> None:
        representation_degree_naive(cells, inside)
        prototype_score_naive(feats, protos)

    def linear() -> None:
        representation_degree(cells, inside)
        prototype_score(feats, protos)

    degree = representation_degree(cells, inside)
    t_grid = _time(lambda: grid_features(feats, region, GRID), args.reps_linear)
    t_select = _time(lambda: select_prototypes(cells, degree, inside, SIGMA), args.reps_linear)
    reps = (args.reps_naive, args.reps_linear)
    t_naive, t_linear = _time_pair(naive, linear, *reps)
    t_deg_naive, t_deg_lin = _time_pair(
        lambda: representation_degree_naive(cells, inside), lambda: representation_degree(cells, inside), *reps
    )
    t_score_naive, t_score_lin = _time_pair(
        lambda: prototype_score_naive(feats, protos), lambda: prototype_score(feats, protos), *reps
    )

    deg_diff = _rel_diff(deg_lin64, deg_naive64)
    score_diff = _rel_diff(score_lin64, score_naive64)
    agree = deg_diff[1] <= TOLERANCE and score_diff[1] <= TOLERANCE and bool((sel_lin == sel_naive).all())

    shared = t_grid[0] + t_select[0]
    speedup = t_naive[0] / t_linear[0]
    print(
        f"LCM benchmark: {SIZE}x{SIZE} features, C={CHANNELS}, K={GRID} ({GRID * GRID} cells, "
        f"{int(inside.sum())} in R), region {float(region.float().mean()):.1%} of the image, "
        f"M={protos.shape[0]} prototypes (sigma={SIGMA}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print("timing: float32, same inputs; median (min) over repetitions, naive and linear interleaved")
    print(f"{'step':<34}{'reps':>7}{'naive ms':>18}{'linear ms':>18}{'ratio':>10}")
    rows = [
        ("representation degree (Eq. 5)", t_deg_naive, t_deg_lin),
        ("per-pixel score (Eq. 6)", t_score_naive, t_score_lin),
        ("degree + score (timed together)", t_naive, t_linear),
    ]
    for name, tn, tl in rows:
        print(
            f"{name:<34}{args.reps_naive:>4}/{args.reps_linear:<2}"
            f"{tn[0] * 1e3:>10.3f} ({tn[1] * 1e3:.3f}){tl[0] * 1e3:>10.3f} ({tl[1] * 1e3:.3f})"
            f"{tn[0] / tl[0]:>9.1f}x"
        )
    print(f"{'shared: grid pooling (Eq. 4)':<34}{args.reps_linear:>7}{t_grid[0] * 1e3:>18.3f}  (same in both)")
    print(f"{'shared: prototype selection':<34}{args.reps_linear:>7}{t_select[0] * 1e3:>18.3f}  (same in both)")
    print(
        f"end-to-end incl. shared steps: naive {(t_naive[0] + shared) * 1e3:.3f} ms, "
        f"linear {(t_linear[0] + shared) * 1e3:.3f} ms, "
        f"ratio {(t_naive[0] + shared) / (t_linear[0] + shared):.1f}x"
    )
    print(
        f"agreement (float64): degree max|diff| {deg_diff[0]:.3e} (rel {deg_diff[1]:.3e}), "
        f"score max|diff| {score_diff[0]:.3e} (rel {score_diff[1]:.3e}), "
        f"same prototype cells: {bool((sel_lin == sel_naive).all())}; tolerance {TOLERANCE:g} "
        f"-> {'PASS' if agree else 'FAIL'}"
    )
    print(
        f"agreement (float32, for information): degree max|diff| {deg_diff32[0]:.3e} "
        f"(rel {deg_diff32[1]:.3e}), score max|diff| {score_diff32[0]:.3e} (rel {score_diff32[1]:.3e})"
    )
    if not agree:
        print("naive and linear results disagree", file=sys.stderr)
        return 1
    print(f"lcm_speedup {speedup:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
