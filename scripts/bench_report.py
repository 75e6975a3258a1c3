"""Figures and paper-style tables of a benchmark grid (:mod:`scripts.benchmark`), rebuilt from the cells'
``result.json`` rows and ``history.csv`` files every time the grid runs, so they always show every finished cell.

* ``results_paper.md``: per data set and training loss, one table laid out like the paper's Tables 2-3 (noise level,
  method, B-model and L-model Dice per class and their average), the best value of each noise level in bold; and,
  where the Table-4 ablations ran, a table laid out like Table 4.
* :func:`seed_table`: one row per cell and one mean row per method, from a docs table's CSV (``python -m
  scripts.bench_report docs/results/collapse.csv --classes RV,Myo,LV`` prints it), so docs' per-seed tables are
  rendered from their committed numbers, not typed.
* ``plots/dice_vs_noise_<data>_<loss>.png``: mean Dice (B-model and L-model) against the noise level, per method.
* ``plots/val_dice_<data>_<noise>_<loss>.png``: validation Dice against epoch, per method (mean over seeds).
"""

from __future__ import annotations

import csv
from pathlib import Path

from scripts.registry import NOISE

__all__ = ["write_report", "paper_tables", "seed_table", "noise_label", "method_label"]

# how methods are named in the paper's tables; others keep their key
METHOD_LABELS = {
    "baseline": "Baseline",
    "pick_and_learn": "PL",
    "confident_learning": "CL",
    "jocor": "JoCoR",
    "superpixel": "SP",
    "pick_and_learn_dice": "PL (soft Dice)",
    "jocor_train_loss": "JoCoR (train loss)",
    "superpixel_train_loss": "SP (train loss)",
    "jocor_per_class": "JoCoR (train loss, per class)",
    "superpixel_per_class": "SP (train loss, per class)",
    "self_cleansing": "Ours (bundle default)",
    "self_cleansing_paper": "Ours (paper recipe)",
    "ablation_lcm": "Baseline+LCM",
    "ablation_lcm_pred": "Baseline+LCM (pred)",
    "ablation_lcm_avg": "Baseline+LCM (avg)",
    "oracle_drop_noisy": "Oracle: noisy slices dropped",
    "oracle_fix_boundary": "Oracle: boundary noise given clean labels",
    "oracle_after_warmup": "Oracle from the first round: boundary noise given clean labels",
    "oracle_filter": "Oracle filter, the default's targets",
}
# The paper's Table 3 (ACDC, 500 epochs at full resolution), Average columns, B-model / L-model in %. Its rows
# come in blocks of six (Baseline, PL, CL, JoCoR, SP, Ours) per noise level, beta = 5 first, then beta = 10.
PAPER_TABLE3 = {
    "clean": {"baseline": (79.68, 77.12)},
    "a30b5": {"baseline": (77.80, 61.37), "pick_and_learn": (76.83, 69.76), "confident_learning": (79.04, 66.31),
              "jocor": (78.11, 68.16), "superpixel": (78.21, 72.44), "ours": (80.33, 76.07)},
    "a50b5": {"baseline": (77.99, 60.48), "pick_and_learn": (77.01, 70.93), "confident_learning": (78.53, 65.68),
              "jocor": (78.75, 68.08), "superpixel": (78.04, 68.83), "ours": (80.01, 76.30)},
    "a70b5": {"baseline": (73.84, 45.14), "pick_and_learn": (69.01, 62.36), "confident_learning": (74.84, 55.26),
              "jocor": (75.01, 59.48), "superpixel": (75.04, 67.81), "ours": (76.41, 73.69)},
    "a30b10": {"baseline": (76.12, 48.29), "pick_and_learn": (73.28, 68.49), "confident_learning": (76.02, 59.74),
               "jocor": (73.25, 64.89), "superpixel": (75.73, 68.04), "ours": (76.76, 71.57)},
    "a50b10": {"baseline": (62.98, 22.45), "pick_and_learn": (67.60, 45.34), "confident_learning": (62.04, 44.35),
               "jocor": (66.31, 36.64), "superpixel": (67.39, 55.53), "ours": (78.00, 68.24)},
    "a70b10": {"baseline": (55.61, 27.21), "pick_and_learn": (71.96, 40.56), "confident_learning": (60.79, 35.52),
               "jocor": (65.05, 32.79), "superpixel": (62.58, 55.94), "ours": (75.14, 70.48)},
}
# the paper's "Ours" is its recipe; the bundle's default is compared with the same row
PAPER_KEY = {"self_cleansing": "ours", "self_cleansing_paper": "ours", "pick_and_learn_dice": "pick_and_learn",
             "jocor_train_loss": "jocor", "superpixel_train_loss": "superpixel", "jocor_per_class": "jocor",
             "superpixel_per_class": "superpixel"}
# Table 4's rows, in its order: the full method is the paper recipe (LCM + LFM)
ABLATION_ROWS = [("baseline", "Baseline"), ("ablation_lcm", "Baseline+LCM"),
                 ("ablation_lcm_pred", "Baseline+LCM (pred)"), ("ablation_lcm_avg", "Baseline+LCM (avg)"),
                 ("self_cleansing_paper", "Baseline+LCM+LFM")]


def noise_label(noise: str) -> str:
    """``clean`` → ``Noise-free``; ``a70b10`` → ``α = 70%, β = 10``."""
    if noise == "clean":
        return "Noise-free"
    if noise.startswith("a") and "b" in noise:
        a, b = noise[1:].split("b", 1)
        return f"α = {a}%, β = {b}"
    return noise


def method_label(method: str) -> str:
    """The table name of a method key; a sweep's ``<method>@<setting>`` keeps its setting in brackets."""
    base, _, setting = method.partition("@")
    label = METHOD_LABELS.get(base, base)
    return f"{label} [{setting}]" if setting else label


def _noise_order(noises) -> list[str]:
    known = [n for n in NOISE if n in noises]
    return known + sorted(n for n in noises if n not in NOISE)


def _classes(results: list[dict]) -> list[str]:
    keys = dict.fromkeys(k[2:] for r in results for k in r if k.startswith("B_"))
    return [k for k in keys if k != "mean"]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _average(row: dict, tag: str, classes: list[str]) -> float | None:
    """The mean Dice of a cell: the per-volume mean the evaluation wrote, else the mean over classes."""
    if f"{tag}_mean" in row:
        return float(row[f"{tag}_mean"])
    vals = [float(row[f"{tag}_{c}"]) for c in classes if f"{tag}_{c}" in row]
    return _mean(vals)


def _summary(rows: list[dict], classes: list[str]) -> dict:
    """Mean over seeds of every column of the table (in %)."""
    out = {"seeds": len(rows)}
    for tag in "BL":
        for c in classes:
            vals = [100 * float(r[f"{tag}_{c}"]) for r in rows if f"{tag}_{c}" in r]
            out[f"{tag}_{c}"] = _mean(vals)
        avgs = [a for a in (_average(r, tag, classes) for r in rows) if a is not None]
        out[f"{tag}_avg"] = _mean([100 * a for a in avgs])
    return out


def _fmt(value, best: bool) -> str:
    if value is None:
        return "–"
    text = f"{value:.2f}"
    return f"**{text}**" if best else text


def paper_tables(results: list[dict]) -> str:
    """The Markdown of ``results_paper.md``."""
    if not results:
        return ""
    classes = _classes(results)
    columns = [*classes, "avg"]
    lines = ["# Benchmark results laid out like the paper's tables",
             "",
             "Dice (%) per class and their average (per volume, then averaged over volumes), B-model (best "
             "validation epoch) and L-model (last epoch), mean over the seeds run. Bold: the best value of each "
             "noise level (not marked for noise-free rows)."]
    for data in sorted({r["data"] for r in results}):
        for loss in sorted({r["loss"] for r in results if r["data"] == data}):
            sub = [r for r in results if r["data"] == data and r["loss"] == loss]
            head = " | ".join(f"{'Average' if c == 'avg' else c} B | {'Average' if c == 'avg' else c} L"
                              for c in columns)
            lines += ["", f"## {data}, training loss {loss}", "",
                      f"| Noise level | Method | seeds | {head} | time ×Baseline |",
                      "|---|---|---|" + "---|---|" * len(columns) + "---|"]
            for noise in _noise_order({r["noise"] for r in sub}):
                rows = [r for r in sub if r["noise"] == noise]
                methods = list(dict.fromkeys(r["method"] for r in rows))
                stats = {m: _summary([r for r in rows if r["method"] == m], classes) for m in methods}
                best = {}
                if noise != "clean" and len(methods) > 1:
                    for tag in "BL":
                        for c in columns:
                            vals = [s[f"{tag}_{c}"] for s in stats.values() if s[f"{tag}_{c}"] is not None]
                            best[f"{tag}_{c}"] = max(vals) if vals else None
                for i, m in enumerate(methods):
                    s = stats[m]
                    cells = []
                    for c in columns:
                        for tag in "BL":
                            v = s[f"{tag}_{c}"]
                            cells.append(_fmt(v, v is not None and v == best.get(f"{tag}_{c}")))
                    label = noise_label(noise) if i == 0 else ""
                    ratio = _time_ratio(rows, m)
                    cells.append("–" if ratio is None else f"{ratio:.2f}")
                    lines.append(f"| {label} | {method_label(m)} | {s['seeds']} | " + " | ".join(cells) + " |")
            lines += _ablation_table(sub, classes)
            if data == "acdc":
                lines += _beside_paper(sub, classes)
    return "\n".join(lines) + "\n"


def seed_table(rows: list[dict], classes: list[str] | None = None) -> str:
    """Markdown of every cell in ``rows`` (in their order) and then, per data set, loss, noise and method, the mean
    over its seeds: Dice per class and mean, B-model and L-model, ``L_tail`` and the last round's filter precision /
    recall where the cell has them. ``rows`` are ``result.json`` rows or rows read back from an exported CSV."""
    if not rows:
        return ""
    classes = classes or _classes(rows)
    head = " | ".join(f"{c} {t}" for c in classes for t in "BL")
    lines = [f"| loss | labels | method | seed | {head} | mean B | mean L | L tail | filter P / R |",
             "|" + "---|" * (8 + 2 * len(classes))]

    def pct(v):
        return "" if v in (None, "") else f"{100 * float(v):.2f}"

    for r in rows:
        dice = " | ".join(pct(r.get(f"{t}_{c}")) for c in classes for t in "BL")
        pr = (f"{float(r['filter_precision']):.2f} / {float(r['filter_recall']):.2f}"
              if r.get("filter_precision") not in (None, "") and r.get("filter_recall") not in (None, "") else "")
        lines.append(f"| {r['loss']} | {noise_label(r['noise'])} | {method_label(r['method'])} | {r['seed']} | "
                     f"{dice} | **{pct(_average(r, 'B', classes))}** | **{pct(_average(r, 'L', classes))}** | "
                     f"{pct(r.get('L_tail'))} | {pr} |")
    def group(r):  # a CSV may hold several data sets; their cells are never averaged together
        return r.get("data", ""), r["loss"], r["noise"], r["method"]

    for key in dict.fromkeys(group(r) for r in rows):
        _, loss, noise, method = key
        mine = [r for r in rows if group(r) == key]
        s = _summary(mine, classes)
        dice = " | ".join(_fmt(s[f"{t}_{c}"], False) for c in classes for t in "BL")
        tails = [100 * float(r["L_tail"]) for r in mine if r.get("L_tail") not in (None, "")]
        tail = _fmt(_mean(tails), False) if tails else ""
        seeds = f"{s['seeds']} seed" + "s" * (s["seeds"] != 1)
        lines.append(f"| {loss} | {noise_label(noise)} | {method_label(method)}, mean of {seeds} | | "
                     f"{dice} | {_fmt(s['B_avg'], True)} | {_fmt(s['L_avg'], True)} | {tail} | |")
    return "\n".join(lines) + "\n"


def _time_ratio(rows: list[dict], method: str) -> float | None:
    """Mean training wall time of ``method`` over that of the Baseline, over the seeds both ran (same data, loss and
    noise level). Only meaningful when the cells ran under the same load, e.g. one after another in one grid."""
    def seconds(m):
        return {r["seed"]: float(r["train_seconds"]) for r in rows if r["method"] == m and "train_seconds" in r}

    mine, base = seconds(method), seconds("baseline")
    seeds = sorted(set(mine) & set(base))
    if not seeds:
        return None
    return sum(mine[s] for s in seeds) / sum(base[s] for s in seeds)


def _beside_paper(rows: list[dict], classes: list[str]) -> list[str]:
    """Average Dice of each measured method beside the paper's Table 3 row of the same method and noise level."""
    out = []
    for noise in _noise_order({r["noise"] for r in rows}):
        paper = PAPER_TABLE3.get(noise)
        if paper is None:
            continue
        at = [r for r in rows if r["noise"] == noise]
        methods = [m for m in dict.fromkeys(r["method"] for r in at) if PAPER_KEY.get(m, m) in paper]
        if not methods:
            continue
        out += ["", f"### Beside the paper's Table 3 (ACDC), {noise_label(noise)}", "",
                "| Method | measured B | measured L | paper B | paper L |", "|---|---|---|---|---|"]
        for m in methods:
            s = _summary([r for r in at if r["method"] == m], classes)
            pb, pl = paper[PAPER_KEY.get(m, m)]
            out.append(f"| {method_label(m)} | {_fmt(s['B_avg'], False)} | {_fmt(s['L_avg'], False)} | "
                       f"{pb:.2f} | {pl:.2f} |")
    return out


def _ablation_table(rows: list[dict], classes: list[str]) -> list[str]:
    """Table 4's layout for each noise level where at least one ablation ran."""
    out = []
    for noise in _noise_order({r["noise"] for r in rows}):
        at = [r for r in rows if r["noise"] == noise]
        if not any(r["method"].startswith("ablation_") for r in at):
            continue
        out += ["", f"### Ablation (Table 4 layout), {noise_label(noise)}", "", "| Components | B-model | L-model |",
                "|---|---|---|"]
        for key, label in ABLATION_ROWS:
            mine = [r for r in at if r["method"] == key]
            if mine:
                s = _summary(mine, classes)
                out.append(f"| {label} | {_fmt(s['B_avg'], False)} | {_fmt(s['L_avg'], False)} |")
    return out


def _read_history(path: Path) -> dict[int, float]:
    if not path.exists():
        return {}
    with open(path) as f:
        rows = list(csv.DictReader(f))
    out = {}
    for r in rows:
        if r.get("val_mean_dice") not in (None, ""):
            out[int(r["epoch"])] = float(r["val_mean_dice"])  # a resumed run's later row for an epoch wins
    return out


TAIL_EVALUATIONS = 4


def tail_dice(history: Path, n: int = TAIL_EVALUATIONS) -> float | None:
    """Mean validation Dice of a run's last ``n`` evaluations, or None when it logged fewer.

    The L-model is one evaluation, and on a small validation set two evaluations a few epochs apart can differ by
    several points; this reading of the end of training is reported beside it (column ``L_tail``) so that single
    cells can be compared. It is the same whole-volume validation Dice as the B-model's selection."""
    curve = _read_history(history)
    if len(curve) < n:
        return None
    return round(sum(curve[e] for e in sorted(curve)[-n:]) / n, 4)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_dice_vs_noise(plots: Path, results: list[dict], classes: list[str]) -> list[Path]:
    import matplotlib.pyplot as plt

    written = []
    for data in sorted({r["data"] for r in results}):
        for loss in sorted({r["loss"] for r in results if r["data"] == data}):
            sub = [r for r in results if r["data"] == data and r["loss"] == loss]
            noises = _noise_order({r["noise"] for r in sub})
            fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
            for ax, tag, title in zip(axes, "BL", ("B-model (best validation epoch)", "L-model (last epoch)")):
                for m in dict.fromkeys(r["method"] for r in sub):
                    xs, ys = [], []
                    for i, n in enumerate(noises):
                        v = _summary([r for r in sub if r["method"] == m and r["noise"] == n], classes)[f"{tag}_avg"]
                        if v is not None:
                            xs.append(i)
                            ys.append(v)
                    if xs:
                        ax.plot(xs, ys, marker="o", label=method_label(m))
                ax.set_xticks(range(len(noises)))
                ax.set_xticklabels([noise_label(n) for n in noises], rotation=30, ha="right")
                ax.set_title(title)
                ax.set_xlabel("noise level")
                ax.grid(alpha=0.3)
            axes[0].set_ylabel("mean Dice (%)")
            axes[1].legend(fontsize=8, loc="best")
            fig.suptitle(f"{data}, training loss {loss}")
            written.append(_save(fig, plots / f"dice_vs_noise_{data}_{loss}.png"))
    return written


def _plot_val_curves(out: Path, plots: Path, results: list[dict]) -> list[Path]:
    import matplotlib.pyplot as plt

    written = []
    groups = dict.fromkeys((r["data"], r["noise"], r["loss"]) for r in results)
    for data, noise, loss in groups:
        sub = [r for r in results if (r["data"], r["noise"], r["loss"]) == (data, noise, loss)]
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = 0
        for m in dict.fromkeys(r["method"] for r in sub):
            curves = [_read_history(out / r["cell"] / "history.csv") for r in sub if r["method"] == m]
            curves = [c for c in curves if c]
            if not curves:
                continue
            epochs = sorted(set.intersection(*(set(c) for c in curves)))
            ax.plot(epochs, [100 * sum(c[e] for c in curves) / len(curves) for e in epochs], label=method_label(m))
            drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation mean Dice (%)")
        ax.set_title(f"{data}, {noise_label(noise)}, training loss {loss}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, plots / f"val_dice_{data}_{noise}_{loss}.png"))
    return written


def write_report(out: Path, results: list[dict]) -> list[Path]:
    """Write ``results_paper.md`` and the plots for ``results`` (rows of finished cells) into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    if not results:
        return []
    classes = _classes(results)
    table = out / "results_paper.md"
    table.write_text(paper_tables(results))
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    return [table, *_plot_dice_vs_noise(plots, results, classes), *_plot_val_curves(out, plots, results)]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Print a docs table's per-seed Markdown from its CSV.")
    parser.add_argument("csv", help="a CSV written by `python -m scripts.benchmark --export`")
    parser.add_argument("--classes", default=None,
                        help="comma-separated class names in table order (default: as the CSV's columns come)")
    args = parser.parse_args(argv)
    path = Path(args.csv)
    if not path.is_file():
        parser.error(f"{path}: no such file")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows, columns = list(reader), reader.fieldnames or []
    lacking = [c for c in ("loss", "noise", "method", "seed") if c not in columns]
    if lacking or not rows:
        parser.error(f"{path}: not a benchmark export (" + (f"no column {', '.join(lacking)}" if lacking
                                                              else "no rows") + ")")
    classes = args.classes.split(",") if args.classes else None
    missing = [c for c in classes or [] if not any(f"B_{c}" in r for r in rows)]
    if missing:
        parser.error(f"{path}: no B_<class> column for {', '.join(missing)}")
    print(seed_table(rows, classes), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
