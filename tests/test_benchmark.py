"""The benchmark grid's registry, its resumable main loop and its report (paper-style tables and plots), on
cached cells: no training runs here."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from conftest import REPO_ROOT
from scripts import benchmark
from scripts import bench_report
from scripts.bench_report import noise_label, paper_tables, seed_table, write_report

CLASSES = ("RV", "Myo", "LV")


def _parser(configs: list[str]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / c) for c in ["configs/train.json", *configs]])
    return parser


def test_every_registered_method_has_its_configs():
    for method, configs in benchmark.METHODS.items():
        assert all((REPO_ROOT / c).is_file() for c in configs), method
    for name in ("pick_and_learn", "confident_learning", "jocor", "superpixel"):
        parser = _parser(benchmark.METHODS[name])
        assert parser["run_name"] == name
        assert parser["self_cleansing"] is False  # a competitor replaces self-cleansing, it does not add to it


@pytest.mark.parametrize("method, loss, inner", [("jocor_train_loss", "JoCoRLoss", "supervised_loss"),
                                               ("superpixel_train_loss", "SuperpixelJoCoRLoss", "supervised_loss"),
                                               ("jocor_per_class", "JoCoRLoss", "supervised_loss"),
                                               ("superpixel_per_class", "SuperpixelJoCoRLoss", "supervised_loss"),
                                               ("pick_and_learn_dice", "PickAndLearnLoss", "loss")])
def test_loss_variants_of_the_competitors(method, loss, inner):
    parser = _parser(["configs/quick.json", *benchmark.METHODS[method]])
    parser["train_loss#kind"] = "dicece"
    built = parser.get_parsed_content("loss")
    assert type(built).__name__ == loss and parser["self_cleansing"] is False
    # the co-training methods take the table's loss, Pick-and-Learn the soft Dice of its paper whatever the table's
    assert getattr(built, inner).kind == ("dice" if method == "pick_and_learn_dice" else "dicece")
    if hasattr(built, "per_class"):  # the selection's granularity is the method's, not a leftover of another
        assert built.per_class == method.endswith("_per_class")


@pytest.mark.parametrize("method, source", [("ablation_lcm", "GridPrototypes"),
                                            ("ablation_lcm_pred", "Prediction"),
                                            ("ablation_lcm_avg", "AveragedPrototype")])
def test_ablations_are_the_paper_recipe_without_the_filter(method, source):
    cleansing = _parser(benchmark.METHODS[method]).get("train#cleansing")
    assert cleansing["label_filter"]["enabled"] is False
    assert cleansing["source"]["_target_"] == f"scripts.sources.{source}"
    # the rest is configs/paper.json: no target rules, no refresh
    assert cleansing["rules"] == {"_target_": "scripts.targets.TargetRules"}
    assert cleansing["label_filter"]["refresh"] is False


def _result(data, noise, loss, method, seed, level):
    row = {"cell": benchmark.cell_name(data, noise, loss, method, seed), "train_seconds": 10.0, "data": data,
           "noise": noise, "loss": loss, "method": method, "seed": seed}
    for tag, drop in (("B", 0.0), ("L", 0.05)):
        vals = [level - drop - 0.01 * i for i in range(len(CLASSES))]
        row.update({f"{tag}_{c}": v for c, v in zip(CLASSES, vals)})
        row[f"{tag}_mean"] = sum(vals) / len(vals)
    return row


def _cache(out: Path, row: dict, epochs: int = 3) -> None:
    cell = out / row["cell"]
    cell.mkdir(parents=True)
    (cell / "result.json").write_text(json.dumps(row))
    with open(cell / "history.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "train_loss", "lambda1", "lambda2", "val_mean_dice"])
        for e in range(1, epochs + 1):
            writer.writerow([e, 1.0 / e, 1.0, 0.0, row["B_mean"] * e / epochs])


LEVELS = {"baseline": 0.70, "jocor": 0.75, "self_cleansing": 0.80}


def test_benchmark_resumes_from_cached_cells_and_writes_the_report(tmp_path):
    for noise in ("clean", "a30b5"):
        for method, level in LEVELS.items():
            _cache(tmp_path, _result("phantom", noise, "dicece", method, 0, level - (noise != "clean") * 0.1))
    argv = ["--data", "phantom", "--profile", "cpu", "--noise", "clean,a30b5", "--losses", "dicece",
            "--methods", ",".join(LEVELS), "--out", str(tmp_path)]
    assert benchmark.main(argv) == 0  # every cell is cached: nothing trains
    for name in ("results.csv", "results.md", "results_paper.md", "plots/dice_vs_noise_phantom_dicece.png",
                 "plots/val_dice_phantom_clean_dicece.png", "plots/val_dice_phantom_a30b5_dicece.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "plots/dice_vs_noise_phantom_dicece.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "results_paper.md").read_text()
    header = "| Noise level | Method | seeds | RV B | RV L | Myo B | Myo L | LV B | LV L | Average B | Average L |"
    assert header in table
    assert "| α = 30%, β = 5 | Baseline | 1 |" in table
    assert "| Noise-free | Baseline | 1 |" in table


def test_tables_gather_every_finished_cell_of_the_folder(tmp_path):
    _cache(tmp_path, _result("phantom", "clean", "dicece", "baseline", 0, 0.9))  # from an earlier command
    for method, level in LEVELS.items():
        _cache(tmp_path, _result("phantom", "a30b5", "dicece", method, 0, level))
    argv = ["--data", "phantom", "--noise", "a30b5", "--methods", ",".join(LEVELS), "--out", str(tmp_path)]
    assert benchmark.main(argv) == 0
    rows = benchmark.finished_cells(tmp_path)
    assert [(r["noise"], r["method"]) for r in rows] == [("clean", "baseline"), ("a30b5", "baseline"),
                                                          ("a30b5", "self_cleansing"), ("a30b5", "jocor")]
    table = (tmp_path / "results_paper.md").read_text()
    assert "| Noise-free | Baseline | 1 |" in table and "| α = 30%, β = 5 | Baseline | 1 |" in table
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_the_tail_reading_is_the_mean_of_the_last_four_evaluations(tmp_path):
    # 6 epochs whose validation Dice climbs 1/6 of B_mean each: the last four evaluations are epochs 3 to 6
    _cache(tmp_path, _result("phantom", "clean", "dicece", "baseline", 0, 0.9), epochs=6)
    short = _result("phantom", "clean", "dicece", "baseline", 1, 0.9)
    _cache(tmp_path, short, epochs=3)  # fewer evaluations than the reading takes: no value, not a shorter mean
    rows = benchmark.finished_cells(tmp_path)
    b_mean = rows[0]["B_mean"]
    assert rows[0]["L_tail"] == pytest.approx(b_mean * (3 + 4 + 5 + 6) / 6 / 4, abs=1e-4)
    assert "L_tail" not in rows[1]
    benchmark.write_tables(tmp_path, rows)
    table = (tmp_path / "results.md").read_text()
    assert "| L tail | train s |" in table
    assert "| baseline | 2 |" in table and table.rstrip().endswith("| – | 10 |")  # one seed lacks it: no mean
    benchmark.write_tables(tmp_path, rows[:1])
    assert f"| {100 * rows[0]['L_tail']:.2f} | 10 |" in (tmp_path / "results.md").read_text()


def test_a_sweep_setting_names_its_cells_and_rows(tmp_path):
    _cache(tmp_path, _result("phantom", "a30b5", "dicece", "jocor", 0, 0.75))
    _cache(tmp_path, _result("phantom", "a30b5", "dicece", "jocor@lambda0.35", 0, 0.78))
    argv = ["--data", "phantom", "--noise", "a30b5", "--methods", "jocor", "--setting", "lambda0.35",
            "--out", str(tmp_path), "--", "--co_lambda", "0.35"]
    assert benchmark.main(argv) == 0  # the cell of that setting is cached, so nothing trains
    rows = benchmark.finished_cells(tmp_path)
    assert [r["method"] for r in rows] == ["jocor", "jocor@lambda0.35"]
    assert "| JoCoR [lambda0.35] |" in (tmp_path / "results_paper.md").read_text()
    for bad in (["--setting", "x"], ["--setting", "a b", "--", "--co_lambda", "0.3"]):  # no overrides; not a name
        with pytest.raises(SystemExit):
            benchmark.main(["--data", "phantom", "--noise", "a30b5", "--methods", "jocor", "--out", str(tmp_path),
                            *bad])


def test_export_updates_a_tables_csv_without_dropping_rows_of_other_folders(tmp_path):
    out, export = tmp_path / "grid", tmp_path / "docs" / "table.csv"
    out.mkdir()
    export.parent.mkdir()
    earlier = [_result("phantom", "a30b5", "dicece", "jocor", 0, 0.75),  # from a folder that is gone
               _result("phantom", "a30b5", "dicece", "baseline", 0, 0.60)]  # stale: this folder reruns it
    benchmark.write_csv(export, earlier)
    _cache(out, _result("phantom", "a30b5", "dicece", "baseline", 0, 0.70))
    _cache(out, _result("phantom", "a30b5", "dicece", "self_cleansing", 0, 0.80))
    argv = ["--data", "phantom", "--noise", "a30b5", "--methods", "baseline,self_cleansing", "--out", str(out),
            "--export", str(export)]
    assert benchmark.main(argv) == 0  # both cells are cached: nothing trains
    with open(export) as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["baseline", "self_cleansing", "jocor"]  # table order, none lost
    assert float(rows[0]["B_mean"]) == pytest.approx(_result("phantom", "a30b5", "dicece", "baseline", 0, 0.70)
                                                     ["B_mean"])  # the folder's row replaced the stale one
    assert float(rows[2]["L_RV"]) == pytest.approx(earlier[0]["L_RV"])


def test_export_only_trains_nothing_and_refuses_an_empty_folder(tmp_path, monkeypatch):
    out, export = tmp_path / "grid", tmp_path / "table.csv"
    out.mkdir()
    _cache(out, _result("phantom", "a30b5", "dicece", "baseline", 0, 0.70))
    monkeypatch.setattr(benchmark, "run_cell", lambda *a, **k: pytest.fail("--export_only must not train"))
    argv = ["--data", "phantom", "--noise", "a30b5", "--methods", "baseline,jocor", "--out", str(out),
            "--export", str(export), "--export_only"]  # jocor is not in the folder
    assert benchmark.main(argv) == 0
    with open(export) as f:
        assert [r["cell"] for r in csv.DictReader(f)] == ["phantom-a30b5-dicece-baseline-s0"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["phantom-a30b5-dicece-baseline-s0", "plots"]
    with pytest.raises(SystemExit):
        benchmark.main(["--out", str(tmp_path / "nothing"), "--export", str(export), "--export_only"])
    assert not (tmp_path / "nothing").exists()


def test_time_ratio_against_the_baseline_of_the_same_seeds():
    rows = []
    for method, secs in (("baseline", 100.0), ("jocor", 250.0), ("self_cleansing", 104.0)):
        for seed in (0, 1):
            row = _result("acdc", "a70b5", "dicece", method, seed, 0.7)
            row["train_seconds"] = secs * (1 + seed)
            rows.append(row)
    rows.append({**_result("acdc", "a70b5", "dicece", "superpixel", 2, 0.7), "train_seconds": 5.0})
    lines = {line.split("|")[2].strip(): line for line in paper_tables(rows).splitlines() if line.startswith("| ")}
    assert lines["Baseline"].rstrip(" |").endswith("1.00")
    assert lines["JoCoR"].rstrip(" |").endswith("2.50")
    assert lines["Ours (bundle default)"].rstrip(" |").endswith("1.04")
    assert lines["SP"].rstrip(" |").endswith("–")  # no Baseline of seed 2: no ratio


def test_acdc_rows_beside_the_papers_table3():
    rows = [_result("acdc", "a70b10", "dicece", m, 0, 0.6) for m in ("baseline", "self_cleansing", "jocor")]
    rows.append(_result("acdc", "a70b10", "dicece", "agree_fill", 0, 0.6))  # a variant: no paper row
    text = paper_tables(rows)
    table = text[text.index("### Beside the paper's Table 3 (ACDC), α = 70%, β = 10"):].splitlines()
    body = [line for line in table if line.startswith("| ") and "measured" not in line]
    assert body[0] == "| Baseline | 59.00 | 54.00 | 55.61 | 27.21 |"
    assert body[1].startswith("| Ours (bundle default) |") and body[1].endswith("| 75.14 | 70.48 |")
    assert body[2].endswith("| 65.05 | 32.79 |") and len(body) == 3
    assert "Beside the paper" not in paper_tables([_result("phantom", "a70b10", "dicece", "jocor", 0, 0.6)])


def test_paper_table_values_and_best_marks():
    rows = [_result("acdc", "a70b10", "dice", m, s, LEVELS[m] + 0.01 * s) for m in LEVELS for s in (0, 1)]
    rows += [_result("acdc", "clean", "dice", "baseline", 0, 0.9)]
    text = paper_tables(rows)
    lines = {line.split("|")[2].strip(): line for line in text.splitlines() if line.startswith("| α = 70%") or
             line.startswith("|  |")}
    ours = [c.strip() for c in lines["Ours (bundle default)"].split("|")[1:-1]]
    # two seeds averaged: RV B = 100 * (0.80 + 0.81) / 2, the best of the noise level, in bold
    assert ours[2] == "2" and ours[3] == "**80.50**"
    assert ours[-3] == "**79.50**"  # average B-model: mean of 80.5, 79.5, 78.5
    assert ours[-1] == "1.00"  # same training time as the Baseline
    base = [c.strip() for c in lines["Baseline"].split("|")[1:-1]]
    assert base[3] == "70.50"  # not the best: no bold
    noise_free = next(line for line in text.splitlines() if line.startswith("| Noise-free"))
    assert "**" not in noise_free


def test_ablation_table_in_table4_order():
    methods = ["self_cleansing_paper", "ablation_lcm_avg", "baseline", "ablation_lcm", "ablation_lcm_pred"]
    rows = [_result("acdc", "a70b10", "dicece", m, 0, 0.6 + 0.01 * i) for i, m in enumerate(methods)]
    text = paper_tables(rows)
    start = text.index("### Ablation (Table 4 layout), α = 70%, β = 10")
    table = text[start:text.index("### Beside the paper", start)].splitlines()
    labels = [line.split("|")[1].strip() for line in table if line.startswith("| ") and "Components" not in line]
    assert labels == ["Baseline", "Baseline+LCM", "Baseline+LCM (pred)", "Baseline+LCM (avg)", "Baseline+LCM+LFM"]
    assert "| Baseline+LCM+LFM | 59.00 | 54.00 |" in table


def test_report_without_history_and_labels(tmp_path):
    assert noise_label("a50b10") == "α = 50%, β = 10" and noise_label("clean") == "Noise-free"
    row = _result("phantom", "a50b10", "dice", "superpixel", 0, 0.5)
    written = write_report(tmp_path, [row])
    names = sorted(p.name for p in written)
    # no history.csv for the cell: no curve figure, the rest still written
    assert names == ["dice_vs_noise_phantom_dice.png", "results_paper.md"]
    assert write_report(tmp_path, []) == []


def test_noise_radius_follows_the_profiles_scale():
    from scripts.registry import radius_scale

    assert radius_scale("acdc", "cpu") == 0.5 and radius_scale("acdc", "collapse") == 0.25
    assert radius_scale("acdc", "paper") == 1.0 and radius_scale("phantom", "cpu") == 1.0
    assert radius_scale("la", "cpu") == 0.5 and radius_scale("la", "collapse") == 0.25


def _grid_of_sleeping_cells(tmp_path, jobs: int, failing: str = "") -> subprocess.Popen:
    """A benchmark process whose cells each run a child that writes its pid and sleeps (or, for the cell named
    ``failing``, exits with an error): the grid's own loop, threads and stop, without training."""
    # a child takes a second to end on SIGTERM, as a training run writing its last files would
    child = ("import os, pathlib, signal, sys, time; "
             "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1), sys.exit(1))); "
             "pathlib.Path(sys.argv[1]).write_text(str(os.getpid())); "
             "sys.exit(3) if sys.argv[2] == 'fail' else time.sleep(120)")
    grid = f"""
import signal, sys
from scripts import benchmark
def sleeping_cell(out, name, configs, overrides, extra, children):
    cell = out / name
    cell.mkdir(parents=True, exist_ok=True)
    if name == {failing!r}:
        import time; time.sleep(2)  # let the other cells start first
    children.run([sys.executable, "-c", {child!r}, str(cell / "child.pid"), "fail" if name == {failing!r} else ""],
                 cell / "log.txt")
benchmark.run_cell = sleeping_cell
sys.exit(benchmark.main(["--data", "phantom", "--noise", "clean", "--methods", "baseline", "--seeds", "0,1,2",
                         "--jobs", "{jobs}", "--out", {str(tmp_path)!r}]))
"""
    return subprocess.Popen([sys.executable, "-c", grid], cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)


def _child_pids(tmp_path, count: int, proc: subprocess.Popen) -> list[int]:
    deadline = time.monotonic() + 180  # a loaded CI machine takes its time to start the grid's process
    files = sorted(tmp_path.glob("*/child.pid"))
    while len(files) < count or not all(f.read_text() for f in files):
        assert proc.poll() is None and time.monotonic() < deadline, "the cells never started"
        time.sleep(0.1)
        files = sorted(tmp_path.glob("*/child.pid"))
    return [int(f.read_text()) for f in files]


def _assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # ended and reaped, not left training


def test_a_stopped_grid_stops_every_cell_it_is_training(tmp_path):
    """SIGTERM to a grid training two cells at once (--jobs 2) ends both children, logs it in each cell's log,
    starts the third cell never, and exits with 128 + 15, also when a second SIGTERM comes during that stop."""
    proc = _grid_of_sleeping_cells(tmp_path, jobs=2)
    pids = _child_pids(tmp_path, 2, proc)  # two cells train side by side
    time.sleep(0.5)
    assert len(list(tmp_path.glob("*/child.pid"))) == 2  # the third waits for a free job
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)  # as `timeout` passes on its own SIGTERM to a grid it runs
    assert proc.wait(timeout=90) == 128 + signal.SIGTERM
    for pid in pids:
        _assert_gone(pid)
    logs = sorted(tmp_path.glob("*/log.txt"))
    assert len(logs) == 2 and all("stopped:" in log.read_text() for log in logs)
    assert not (tmp_path / "phantom-clean-dicece-baseline-s2").exists()


def test_a_failed_cell_stops_the_cells_beside_it(tmp_path):
    proc = _grid_of_sleeping_cells(tmp_path, jobs=3, failing="phantom-clean-dicece-baseline-s1")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "command failed (3)" in stderr and "phantom-clean-dicece-baseline-s1" in stderr
    for name in ("phantom-clean-dicece-baseline-s0", "phantom-clean-dicece-baseline-s2"):
        _assert_gone(int((tmp_path / name / "child.pid").read_text()))
        assert "stopped:" in (tmp_path / name / "log.txt").read_text()


def test_jobs_must_be_positive(tmp_path):
    with pytest.raises(SystemExit):
        benchmark.main(["--data", "phantom", "--jobs", "0", "--out", str(tmp_path / "grid")])
    assert not (tmp_path / "grid").exists()


class _RecordingChildren:
    """Stands in for the grid's child processes: records each command, writes what an evaluation would."""

    def __init__(self):
        self.commands = []

    def run(self, cmd, log):
        self.commands.append(cmd)
        if "--eval_dir" in cmd:
            eval_dir = Path(cmd[cmd.index("--eval_dir") + 1])
            eval_dir.mkdir(parents=True, exist_ok=True)
            (eval_dir / "dice_per_volume.csv").write_text("volume,RV,Myo,LV\nv1,0.5,0.6,0.7\n")
        return 12.5


@pytest.mark.parametrize("epoch, trains, resumes", [(None, True, False), (3, True, True), (5, False, False)])
def test_an_interrupted_cell_goes_on_from_its_state_checkpoint(tmp_path, epoch, trains, resumes):
    """No state checkpoint: trained from scratch (stale curves removed). One short of the end: resumed with
    --resume True, curves kept. One at the last epoch: only the evaluations run."""
    import torch

    name = "phantom-clean-dicece-baseline-s0"
    cell = tmp_path / name
    cell.mkdir()
    (cell / "history.csv").write_text("epoch,train_loss\n1,0.5\n")
    if epoch is not None:
        torch.save({"trainer": {"epoch_length": 4, "iteration": 4 * epoch, "max_epochs": 5}},
                   cell / f"state_checkpoint_{epoch}.pt")
    children = _RecordingChildren()
    row = benchmark.run_cell(tmp_path, name, [], {"_meta": {"seed": 0}}, ["--epochs", "5"], children)
    training = [c for c in children.commands if "training" in c]
    assert len(training) == trains and ("--resume" in (training[0] if training else [])) == resumes
    assert len(children.commands) == trains + 2  # B- and L-model evaluations whatever the training did
    assert (cell / "history.csv").exists() == (epoch is not None)
    assert row["B_Myo"] == row["L_Myo"] == 0.6 and (cell / "result.json").exists()
    # a cell trained in two parts has no wall time of its own, and says where it went on
    assert ("train_seconds" in row) == (epoch is None) and row.get("resumed_from_epoch") == epoch


def test_a_cell_trained_towards_another_schedule_is_refused(tmp_path):
    """A folder's cell whose checkpoint was trained towards 5 epochs is neither resumed nor tabulated by a grid that
    asks for 7 (a profile changed since): the error names the cell, and nothing runs."""
    import torch

    name = "phantom-clean-dicece-baseline-s0"
    cell = tmp_path / name
    cell.mkdir()
    torch.save({"trainer": {"epoch_length": 4, "iteration": 12, "max_epochs": 5}}, cell / "state_checkpoint_3.pt")
    children = _RecordingChildren()
    with pytest.raises(ValueError, match=f"{name}.*towards 5 epochs.*asks for 7"):
        benchmark.run_cell(tmp_path, name, [], {"_meta": {"seed": 0}}, ["--epochs", "7"], children)
    (cell / "result.json").write_text(json.dumps(_result("phantom", "clean", "dicece", "baseline", 0, 0.8)))
    with pytest.raises(ValueError, match="towards 5 epochs"):  # finished under the old schedule: not tabulated
        benchmark.run_cell(tmp_path, name, [], {"_meta": {"seed": 0}}, ["--epochs", "7"], children)
    assert children.commands == []
    assert benchmark.run_cell(tmp_path, name, [], {"_meta": {"seed": 0}}, ["--epochs", "5"], children)["seed"] == 0


def test_seed_table_from_an_exported_csv_in_the_given_class_order(tmp_path, capsys):
    rows = [_result("acdc", "a70b10", "dicece", m, s, 0.6 + 0.1 * s) for m in ("baseline", "self_cleansing")
            for s in (0, 1)]
    rows[2].update(filter_precision=0.9, filter_recall=0.85, L_tail=0.5)
    export = tmp_path / "grid.csv"
    benchmark.write_csv(export, rows)  # columns come back alphabetical: LV, Myo, RV
    assert bench_report.main([str(export), "--classes", "RV,Myo,LV"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| loss | labels | method | seed | RV B | RV L | Myo B | Myo L | LV B | LV L |")
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[2:]]
    assert len(cells) == 6  # four cells, then one mean row per method
    assert cells[2][2:5] == ["Ours (bundle default)", "0", "60.00"]  # RV B of seed 0
    assert cells[2][-2:] == ["50.00", "0.90 / 0.85"]
    assert cells[3][-1] == ""  # seed 1 has no filter columns
    mean = cells[5]
    assert mean[2] == "Ours (bundle default), mean of 2 seeds" and mean[3] == ""
    # RV B = mean of 0.60 and 0.70; the mean B of a seed is the mean of 0.6, 0.59, 0.58
    assert mean[4] == "65.00" and mean[10] == "**64.00**" and mean[12] == "50.00"
    assert seed_table(rows[:2]) == seed_table(rows[:2], ["RV", "Myo", "LV"])  # result.json rows keep their order
    both = seed_table([*rows[:2], _result("phantom", "a70b10", "dicece", "baseline", 0, 0.9)])
    means = [line for line in both.splitlines() if "mean of" in line]
    assert [m.split("|")[3].strip() for m in means] == ["Baseline, mean of 2 seeds", "Baseline, mean of 1 seed"]


def test_seed_table_refuses_a_missing_file_or_class(tmp_path):
    with pytest.raises(SystemExit):
        bench_report.main([str(tmp_path / "none.csv")])
    export = tmp_path / "grid.csv"
    benchmark.write_csv(export, [_result("acdc", "clean", "dice", "baseline", 0, 0.7)])
    with pytest.raises(SystemExit):
        bench_report.main([str(export), "--classes", "RV,Aorta"])
    for text in ("", "volume,RV\nv1,0.8\n", "cell,loss,noise,method,seed,B_RV\n"):  # empty, foreign, header only
        export.write_text(text)
        with pytest.raises(SystemExit):
            bench_report.main([str(export)])
