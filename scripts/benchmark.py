"""Run a grid of trainings (data set × noise level × training loss × method × seed) and tabulate B- and L-model Dice.

Every cell is one ordinary bundle run (``python -m monai.bundle run training``) with the method's config and the
cell's overrides merged, followed by two evaluations on the validation split (``configs/evaluate.json``) of the
B-model (best validation Dice) and the L-model (last epoch). ``--jobs N`` trains N cells at once. A cell whose
``result.json`` exists is never rerun, and a cell stopped half-way goes on from its newest state checkpoint, so an
interrupted grid resumes where it stopped. After every cell, ``results.csv``, ``results.md``,
``results_paper.md`` (tables laid out like the paper's) and ``plots/`` (Dice against noise level,
validation Dice against epoch) are rewritten from every finished cell of the ``--out`` folder, see
:mod:`scripts.bench_report`; keep one folder per data set and profile.

    python -m scripts.benchmark --dataset_dir ../shared/data/acdc --profile cpu \\
        --noise clean,a70b10 --losses dicece --methods baseline,self_cleansing --out runs/bench
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from scripts.bench_report import tail_dice, write_report
from scripts.checkpointing import latest_checkpoint
from scripts.registry import METHODS, NOISE, PROFILES, method_configs, radius_scale


def cell_name(data: str, noise: str, loss: str, method: str, seed: int) -> str:
    return f"{data}-{noise}-{loss}-{method}-s{seed}"


class Children:
    """The bundle runs a grid is waiting on, one child process each, however many run at once.

    A grid that is stopped (Ctrl-C, SIGTERM, a failed cell) stops every one of them, including those other threads
    wait on, instead of leaving them to train on unseen, and starts no other."""

    def __init__(self, grace: float = 30.0):
        self.grace = grace
        self._live: dict[subprocess.Popen, Path] = {}
        self._lock = threading.Lock()
        self._stopped = False

    def run(self, cmd: list[str], log: Path) -> float:
        """Run ``cmd`` with its output appended to ``log``; returns its wall time in seconds."""
        start = time.perf_counter()
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            with self._lock:
                if self._stopped:
                    raise RuntimeError(f"the grid was stopped before this command started: {' '.join(cmd)}")
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
                self._live[proc] = log
            try:
                returncode = proc.wait()
            except BaseException:
                self.stop()
                raise
            finally:
                with self._lock:
                    self._live.pop(proc, None)
        if returncode != 0:
            raise RuntimeError(f"command failed ({returncode}), see {log}: {' '.join(cmd)}")
        return time.perf_counter() - start

    def stop(self) -> None:
        """Terminate every live child, kill those still running ``grace`` seconds later, and log each in its
        cell's log."""
        with self._lock:
            self._stopped = True
            live = dict(self._live)
        for proc in live:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + self.grace
        for proc, log in live.items():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with open(log, "a") as f:
                f.write(f"stopped: {' '.join(proc.args)}\n")


def _exit_on_sigterm(signum, frame):
    # SIGTERM's default action ends the process without unwinding, which would skip Children.stop; a second
    # SIGTERM (e.g. `timeout` passing on the one it got) must not interrupt that stop half-way
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def _read_dice(csv_file: Path) -> dict:
    with open(csv_file) as f:
        rows = list(csv.DictReader(f))
    classes = [k for k in rows[0] if k != "volume"]
    return {c: sum(float(r[c]) for r in rows) / len(rows) for c in classes}


def _last_round(path: Path) -> dict:
    if not path.exists():
        return {}
    with open(path) as f:
        rows = list(csv.DictReader(f))
    keep = ("filter_precision", "filter_recall", "dice_pseudo_vs_clean", "dice_manual_vs_clean",
            "noisy_dice_pseudo_vs_clean", "noisy_dice_manual_vs_clean", "pooled_dice_manual_vs_clean",
            "pooled_dice_pseudo_vs_clean", "pseudo_supervised", "noisy_pooled_dice_manual_vs_clean",
            "noisy_pooled_dice_pseudo_vs_clean", "noisy_pseudo_supervised", "noisy_manual_wrong", "noisy_pseudo_wrong")
    return {k: float(rows[-1][k]) for k in keep if rows and rows[-1].get(k) not in (None, "")}


def _training_state(cell: Path) -> tuple[int, int] | None:
    """(epoch, max_epochs) of the cell's newest state checkpoint, or None when it has none."""
    path = latest_checkpoint(str(cell), "state_checkpoint")
    if path is None:
        return None
    import torch  # here, not at the top: a grid's own process only reads checkpoints, and starts faster without

    # mapped, not read: only the trainer's counters are wanted from a file that holds the network and optimiser too
    trainer = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["trainer"]
    return trainer["iteration"] // trainer["epoch_length"], trainer["max_epochs"]


def _scheduled_epochs(files: list[str], extra_args: list[str]) -> int:
    """The epochs a cell's bundle run is configured for: its configs, then the ``--key value`` pairs of the extra
    arguments, read by Fire's value parser as ``monai.bundle run`` reads them."""
    from fire.parser import DefaultParseValue

    from scripts.bench_common import parse_bundle  # imports MONAI: only when a checkpoint is to be checked

    overrides = {key[2:]: DefaultParseValue(value) for key, value in zip(extra_args[::2], extra_args[1::2])
                 if key.startswith("--")}
    return int(parse_bundle(files, overrides).get_parsed_content("train#trainer#max_epochs"))


def _check_schedule(cell: Path, state: tuple[int, int] | None, files: list[str], extra_args: list[str]) -> None:
    """Refuse a cell trained towards another number of epochs than the grid now asks for (a profile changed since,
    or other overrides): going on, or tabulating it, would mix two schedules in one table."""
    if state is not None and state[1] != (epochs := _scheduled_epochs(files, extra_args)):
        raise ValueError(f"{cell} was trained towards {state[1]} epochs, this grid asks for {epochs}: run the grid "
                         f"into another --out (one folder per profile and bundle version)")


def run_cell(out: Path, name: str, configs: list[str], overrides: dict, extra_args: list[str],
             children: Children | None = None) -> dict:
    cell = out / name
    result_file = cell / "result.json"
    override_file = cell / "overrides.json"
    files = ["configs/train.json", *configs, str(override_file)]
    state = _training_state(cell)
    finished = result_file.exists()
    if not finished:  # a finished cell keeps the overrides it was trained with
        cell.mkdir(parents=True, exist_ok=True)
        override_file.write_text(json.dumps({**overrides, "output_dir": str(cell), "ckpt_dir": str(cell / "models"),
                                             "run_name": name}, indent=2))
    _check_schedule(cell, state, files, extra_args)
    if finished:
        return json.loads(result_file.read_text())
    log = cell / "log.txt"
    train_cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(files), *extra_args]
    children = children if children is not None else Children()
    result = {"cell": name, **overrides.get("_meta", {})}
    if state is None:
        # no state checkpoint: the cell starts from scratch, and curves of an attempt that never reached the end of
        # its first epoch must not mix into the rerun
        for stale in ("history.csv", "cleansing_rounds.csv"):
            (cell / stale).unlink(missing_ok=True)
        result["train_seconds"] = round(children.run(train_cmd, log), 1)
    elif state[0] < state[1]:
        # an interrupted cell goes on from its newest state checkpoint; the bundle's resume repeats the
        # uninterrupted run bit for bit on CPU (tests/test_resume.py) and trims its CSVs to the checkpoint's epoch
        # its wall time covers only part of the training, so it has none, and the row says where it went on
        children.run([*train_cmd, "--resume", "True"], log)
        result["resumed_from_epoch"] = state[0]
    else:  # trained to the end, stopped before or during its evaluations
        result["resumed_from_epoch"] = state[0]
    for tag, ckpt in (("B", "model.pt"), ("L", "model_final.pt")):
        eval_dir = cell / f"eval_{tag}"
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str([*files, "configs/evaluate.json"]),
               "--eval_ckpt", str(cell / "models" / ckpt), "--eval_dir", str(eval_dir), *extra_args]
        children.run(cmd, log)
        for cls, value in _read_dice(eval_dir / "dice_per_volume.csv").items():
            result[f"{tag}_{cls}"] = round(value, 4)
    result.update(_last_round(cell / "cleansing_rounds.csv"))
    tmp = result_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, result_file)
    return result


def table_order(rows: list[dict]) -> list[dict]:
    """Rows in table order: data set, noise level as in ``NOISE``, loss, method as registered, variants by name,
    seed. Rows read back from a CSV carry their seed as text, so the seed is compared as a number."""
    noise_rank = {n: i for i, n in enumerate(NOISE)}
    method_rank = {m: i for i, m in enumerate(METHODS)}

    def key(r):
        base = r.get("method", "").split("@")[0]  # a sweep's settings sit beside their method
        return (r.get("data", ""), noise_rank.get(r.get("noise"), len(NOISE)), r.get("noise", ""),
                r.get("loss", ""), method_rank.get(base, len(METHODS)), r.get("method", ""), int(r.get("seed", 0)))

    return sorted(rows, key=key)


def finished_cells(out: Path) -> list[dict]:
    """The ``result.json`` rows of every finished cell in ``out``, in table order: the tables show every cell a
    folder holds, not only those of the latest command, so a grid run in several commands still ends in one set of
    tables. ``L_tail`` is read from the cell's ``history.csv`` here, not stored, so every cell has it however old."""
    rows = [json.loads(f.read_text()) for f in sorted(Path(out).glob("*/result.json"))]
    for row in rows:
        tail = tail_dice(Path(out) / row["cell"] / "history.csv")
        if tail is not None:
            row["L_tail"] = tail
    return table_order(rows)


def write_csv(path: Path, rows: list[dict]) -> None:
    """Every column of every row; the cell's identity first, the numbers after, absent values left empty."""
    columns = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("cell", "data", "noise", "loss",
                                                                           "method", "seed"), k))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def export_rows(results: list[dict], export: Path) -> int:
    """Write the folder's rows to ``export`` (a docs table's CSV). Rows already in ``export`` for cells this folder
    does not hold are kept, so a table assembled from grids run in different folders (or whose run folder is gone)
    is updated, not truncated; a cell present in both takes the folder's row. Returns how many rows were kept."""
    ours = {r["cell"] for r in results}
    kept = []
    if export.exists():
        with open(export, newline="") as f:
            kept = [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f) if r.get("cell") not in ours]
    export.parent.mkdir(parents=True, exist_ok=True)
    write_csv(export, table_order([*results, *kept]))
    return len(kept)


def write_tables(out: Path, results: list[dict]) -> None:
    """results.csv with every column, and results.md: one table per noise level and loss, B and L per class."""
    if not results:
        return
    write_csv(out / "results.csv", results)
    classes = [k[2:] for k in results[0] if k.startswith("B_")]
    lines = []
    for data in sorted({r["data"] for r in results}):
        for loss in sorted({r["loss"] for r in results}):
            for noise in [n for n in NOISE if any(r["noise"] == n for r in results)]:
                rows = [r for r in results if r["data"] == data and r["loss"] == loss and r["noise"] == noise]
                if not rows:
                    continue
                lines += [f"\n### {data}, {noise}, loss {loss}\n",
                          "| method | seeds | " + " | ".join(f"{c} B | {c} L" for c in classes)
                          + " | L tail | train s |",
                          "|---|---|" + "---|---|" * len(classes) + "---|---|"]
                for method in dict.fromkeys(r["method"] for r in rows):
                    mr = [r for r in rows if r["method"] == method]
                    cells = []
                    for c in classes:
                        for tag in "BL":
                            vals = [r[f"{tag}_{c}"] for r in mr]
                            cells.append(f"{100 * sum(vals) / len(vals):.2f}")
                    tails = [r["L_tail"] for r in mr if r.get("L_tail") not in (None, "")]
                    # a mean over some seeds only would read as the row's: shown only when every seed has one
                    cells.append(f"{100 * sum(map(float, tails)) / len(tails):.2f}" if len(tails) == len(mr) else "–")
                    secs = [r["train_seconds"] for r in mr if "train_seconds" in r]  # a resumed cell has none
                    secs = f"{sum(secs) / len(secs):.0f}" if len(secs) == len(mr) else "–"
                    lines.append(f"| {method} | {len(mr)} | " + " | ".join(cells) + f" | {secs} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _tabulate(out: Path, results: list[dict]) -> None:
    write_tables(out, results)
    try:
        write_report(out, results)
    except Exception as err:  # a figure must never stop a long grid; the cells and results.csv are safe
        print(f"warning: results_paper.md / plots not updated: {err!r}", file=sys.stderr)


def _run_grid(parser: argparse.ArgumentParser, args: argparse.Namespace, out: Path) -> list[dict]:
    """Train the grid's cells the folder lacks, tabulating after each; returns every finished cell's row."""
    out.mkdir(parents=True, exist_ok=True)
    noise_radius = args.radius_scale if args.radius_scale is not None else radius_scale(args.data, args.profile)
    extra = [a for a in args.extra if a != "--"]
    if args.setting is not None and (not extra or not re.fullmatch(r"[A-Za-z0-9._]+", args.setting)):
        parser.error("--setting names the overrides given after --: give both, the name in letters, digits, '.' "
                     "and '_'")
    grid = [(n, lo, m, int(s)) for n in args.noise.split(",") for lo in args.losses.split(",")
            for m in args.methods.split(",") for s in args.seeds.split(",")]
    for noise, _, method, _ in grid:
        if noise not in NOISE or method_configs(method) is None:
            parser.error(f"unknown noise '{noise}' or method '{method}'")
    cells = []
    for noise, loss, method, seed in grid:
        tabulated = method if args.setting is None else f"{method}@{args.setting}"
        name = cell_name(args.data, noise, loss, tabulated, seed)
        level = NOISE[noise]
        overrides = {
            "seed": seed,
            "train_loss#kind": loss,
            "label_noise": None if level is None else {**level, "seed": seed, "radius_scale": noise_radius},
            "_meta": {"data": args.data, "noise": noise, "loss": loss, "method": tabulated, "seed": seed},
        }
        if args.setting is not None:
            overrides["_meta"]["overrides"] = " ".join(extra)
        if args.dataset_dir:
            overrides["dataset_dir"] = args.dataset_dir
        cells.append((name, [*PROFILES[(args.data, args.profile)], *method_configs(method)], overrides))
    try:
        from tqdm import tqdm

        progress = tqdm(total=len(cells), desc="benchmark", unit="cell", disable=None)  # no bar when not a terminal
    except ImportError:  # pragma: no cover - tqdm is a requirement, but the grid must not depend on a bar
        progress = None
    children = Children()
    results = finished_cells(out)
    # cells run in threads that each wait on their bundle run's child process; the main thread only tabulates
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        pending = {pool.submit(run_cell, out, name, configs, overrides, extra, children)
                   for name, configs, overrides in cells}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()  # a failed cell stops the grid, as it did when cells ran one by one
                    if progress is not None:
                        progress.update()
                results = finished_cells(out)
                _tabulate(out, results)
        except BaseException:
            for future in pending:  # before the stop, so that no thread it frees starts a cell
                future.cancel()
            children.stop()
            raise
        finally:
            if progress is not None:
                progress.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="acdc", choices=sorted({d for d, _ in PROFILES}))
    parser.add_argument("--dataset_dir", default=None,
                        help="data folder (ACDC layout, flat) or a dataset.json; default: the data config's own")
    parser.add_argument("--profile", default="cpu", choices=sorted({p for _, p in PROFILES}))
    parser.add_argument("--noise", default="clean,a70b10", help=f"comma list of {list(NOISE)}")
    parser.add_argument("--losses", default="dicece", help="comma list of dice,dicece")
    parser.add_argument("--methods", default="baseline,self_cleansing", help=f"comma list of {list(METHODS)}")
    parser.add_argument("--seeds", default="0", help="comma list of seeds")
    parser.add_argument("--out", default="runs/benchmark")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cells trained at once, each its own process (give each a thread budget, e.g. "
                             "OMP_NUM_THREADS=1 with as many jobs as cores)")
    parser.add_argument("--radius_scale", type=float, default=None,
                        help="scale of the noise disk radius (default: the profile's in-plane scale)")
    parser.add_argument("--export", default=None,
                        help="also write the folder's rows here (e.g. docs/results/<table>.csv), the numbers behind a "
                             "docs table; rows of that file for cells the folder does not hold are kept")
    parser.add_argument("--export_only", action="store_true",
                        help="train nothing: rewrite the folder's tables and report from the cells it holds and, "
                             "with --export, write their rows; the grid options are ignored")
    parser.add_argument("--setting", default=None,
                        help="a name for the overrides after -- (e.g. lambda0.35): the cells are named and tabulated "
                             "as <method>@<setting>, so that the settings of a sensitivity sweep share one folder")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="further bundle overrides, after --")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    out = Path(args.out)
    if args.export_only:  # an export after a grid run elsewhere must not start the cells the folder lacks
        results = finished_cells(out) if out.is_dir() else []
        if not results:
            parser.error(f"--export_only: {out} holds no finished cell (no */result.json)")
        _tabulate(out, results)  # cells copied into the folder by hand join its tables
    else:
        results = _run_grid(parser, args, out)
    if args.export:
        kept = export_rows(results, Path(args.export))
        print(f"exported: {args.export} ({kept} rows of cells outside {out} kept)")
    print(f"results: {out / 'results.csv'}, {out / 'results.md'}, {out / 'results_paper.md'}, {out / 'plots'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
