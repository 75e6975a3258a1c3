"""Ignite handlers that show a run: per-epoch metrics, cleansing rounds (log, CSV, TensorBoard, pictures), per-volume
Dice and a progress bar.

CSV files are appended to row by row so a resumed run keeps adding to them; when a run resumes, the rows written
after its checkpoint are dropped first.
"""

from __future__ import annotations

import csv
import logging
import os
import sys

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from scripts.engine import CleansingEvents
from scripts.filtering import CLEANSE
from scripts.handlers import CleansingRound, SelfCleansing
from scripts.metrics import noisy_slices
from scripts.slice_pass import eval_mode
from scripts.sources import GridPrototypes

__all__ = ["CleansingLogger", "DiceReport", "MetricsHistory", "CleansingImages", "TrainingProgress", "loss_value",
           "round_losses"]


def _trim_csv(path: str | None, epoch: int) -> int:
    """Drop the rows of ``path`` written after ``epoch`` (atomically); returns how many were dropped.

    A run killed after a CSV row but before its checkpoint repeats that epoch when resumed; without the trim the
    file would hold the epoch twice. A fresh run (epoch 0) in an old output folder starts a fresh file.
    """

    if path is None or not os.path.exists(path):
        return 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    keep = [r for r in rows if r.get("epoch") not in (None, "") and int(float(r["epoch"])) <= epoch]
    if len(keep) == len(rows):
        return 0
    _rewrite_csv(path, fields, keep)
    return len(rows) - len(keep)


def _rewrite_csv(path: str, fields: list[str], rows: list[dict]) -> None:
    """Replace ``path`` by ``rows`` under the header ``fields``, atomically, so a crash mid-write loses nothing."""

    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _trim_on_start(engine: Engine, path: str | None, logger: logging.Logger) -> None:
    if idist.get_rank() == 0:
        dropped = _trim_csv(path, engine.state.epoch)
        if dropped:
            logger.info(f"{path}: dropped {dropped} row(s) after epoch {engine.state.epoch}, where this run starts")


def _append_csv(path: str, row: dict) -> None:
    """Append one row, writing the header when the file is new; a resumed run keeps adding to the same file.

    A column that first appears in a later row (validation every n-th epoch adds its metrics from epoch n on)
    widens the header, earlier rows left empty there, so no value is ever written under no name.
    """

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fields = None
    if os.path.exists(path):
        with open(path, newline="") as f:
            fields = next(csv.reader(f), None)
    if fields is not None and any(k not in fields for k in row):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        fields = fields + [k for k in row if k not in fields]
        _rewrite_csv(path, fields, rows)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields or list(row), restval="")
        if fields is None:
            writer.writeheader()
        writer.writerow(row)


class CleansingLogger:
    """Log each round's Clean/Noisy counts and, when clean labels are known, how good the filter and Y' are;
    optionally as TensorBoard scalars too."""

    def __init__(self, summary_writer=None, log_dir: str | None = None, csv_file: str | None = None) -> None:
        self.writer = summary_writer
        self.log_dir = log_dir
        self.csv_file = csv_file
        self.logger = logging.getLogger(self.__class__.__name__)

    def attach(self, engine: Engine) -> None:
        if self.writer is None and self.log_dir is not None and idist.get_rank() == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self.log_dir)
        engine.add_event_handler(Events.STARTED, _trim_on_start, self.csv_file, self.logger)
        engine.add_event_handler(CleansingEvents.LABELS_CLEANSED, self)

    def __call__(self, engine: Engine) -> None:
        rnd: CleansingRound = engine.state.cleansing
        s = rnd.summary
        msg = (f"cleansing round {rnd.index} (epoch {rnd.epoch}): Y clean/noisy {s['manual_clean']}/{s['manual_noisy']}"
               f", Y' clean/noisy {s['pseudo_clean']}/{s['pseudo_noisy']}; kept manual {s['kept_manual']}, kept "
               f"pseudo {s['kept_pseudo']}, cleansed {s['cleansed']}")
        if s["manual_filter_status"] != "ok":
            msg += f"; GMM-1: {s['manual_filter_status']}"
        elif "gmm1_separation" in s:
            msg += f"; GMM-1 separation {s['gmm1_separation']:.2f}"
        if s.get("gmm1_saturated"):
            msg += (f" ({s['gmm1_saturated']} saturated losses Noisy, GMM-1 fitted to the others; the first fit's "
                    f"separation {s.get('gmm1_loss_separation', float('nan')):.2f})")
        if "filter_precision" in s:
            msg += (f"; filter precision {s['filter_precision']:.3f} recall {s['filter_recall']:.3f}; Dice vs clean:"
                    f" Y {s['dice_manual_vs_clean']:.3f}, Y' {s['dice_pseudo_vs_clean']:.3f}, "
                    f"prediction {s['dice_pred_vs_clean']:.3f}")
        self.logger.info(msg)
        if self.csv_file is not None and idist.get_rank() == 0:
            _append_csv(self.csv_file, {"round": rnd.index, **s})
        if self.writer is not None:
            for key, value in s.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(f"cleansing/{key}", value, rnd.epoch)
            self.writer.flush()


class DiceReport:
    """Write per-volume, per-class Dice of an evaluator's metric to a CSV and log the per-class means.

    Reads the details MONAI's ``MeanDice`` keeps (``engine.state.metric_details``) and the source file names of
    the evaluated images, so a row names the volume it scores.
    """

    def __init__(self, metric_name: str, class_names: list[str], output_file: str, image_key: str = "image") -> None:
        self.metric_name, self.class_names, self.output_file = metric_name, list(class_names), output_file
        self.image_key = image_key
        self.names: list[str] = []
        self.logger = logging.getLogger(self.__class__.__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.names.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._names)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _names(self, engine: Engine) -> None:
        for item in engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]:
            meta = getattr(item[self.image_key], "meta", {})
            name = meta.get("filename_or_obj", f"volume_{len(self.names)}")
            self.names.extend(name if isinstance(name, (list, tuple)) else [name])

    def __call__(self, engine: Engine) -> None:

        details = engine.state.metric_details.get(self.metric_name)
        if details is None:
            raise RuntimeError(f"metric '{self.metric_name}' kept no per-volume details (save_details=False?)")
        scores = torch.as_tensor(details).float().cpu()
        if scores.shape[1] != len(self.class_names):
            raise ValueError(f"{scores.shape[1]} classes scored, but class_names has {len(self.class_names)}")
        if idist.get_rank() != 0:
            return
        os.makedirs(os.path.dirname(self.output_file) or ".", exist_ok=True)
        tmp = f"{self.output_file}.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["volume", *self.class_names, "mean"])
            for name, row in zip(self.names, scores):
                writer.writerow([name, *(f"{v:.4f}" for v in row.tolist()), f"{row.nanmean().item():.4f}"])
        os.replace(tmp, self.output_file)
        means = scores.nanmean(0)
        text = ", ".join(f"{n} {m:.4f}" for n, m in zip(self.class_names, means.tolist()))
        self.logger.info(f"Dice over {scores.shape[0]} volumes: {text}, mean {means.nanmean().item():.4f}")
        self.logger.info(f"per-volume Dice written to {self.output_file}")
        engine.state.class_dice = dict(zip(self.class_names, means.tolist()))


class MetricsHistory:
    """One line per epoch on the console and in a CSV: the mean training loss, the evaluator's metrics and the λ
    weights, so a run's curves can be read without TensorBoard. Attach to the trainer after
    ``ValidationHandler``."""

    def __init__(self, evaluator: Engine, output_file: str, output_key: str = "loss") -> None:
        self.evaluator, self.output_file, self.output_key = evaluator, output_file, output_key
        self.losses: list[float] = []
        self.validated = False
        self.logger = logging.getLogger(self.__class__.__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, _trim_on_start, self.output_file, self.logger)
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.losses.clear())
        self.evaluator.add_event_handler(Events.COMPLETED, self._mark_validated)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        item = output[0] if isinstance(output, list) else output
        value = item[self.output_key]
        self.losses.append(float(value.detach() if torch.is_tensor(value) else value))

    def _mark_validated(self, _: Engine) -> None:
        self.validated = True

    def __call__(self, engine: Engine) -> None:
        # an epoch without validation leaves its metric cells empty rather than repeating the last reading, so a
        # curve drawn from the file has a point where validation ran and nowhere else
        fresh, self.validated = self.validated, False
        metrics = (getattr(self.evaluator.state, "metrics", None) or {}) if fresh else {}
        row = {"epoch": engine.state.epoch, "train_loss": sum(self.losses) / max(1, len(self.losses)),
               "lambda1": getattr(engine.state, "lambda1", 1.0), "lambda2": getattr(engine.state, "lambda2", 0.0)}
        row.update({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        text = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "lambda1", "lambda2"))
        self.logger.info(f"epoch {engine.state.epoch}/{engine.state.max_epochs}: {text}")
        if idist.get_rank() == 0:
            _append_csv(self.output_file, row)


class CleansingImages:
    """Write pictures of each cleansing round to ``output_dir`` as PNG (and to TensorBoard when a writer is given):
    the GMM fits over the loss histograms, grid representation maps of a few cleansed samples (Fig. 3 of the
    paper) and those samples' labels before and after cleansing (Fig. 7). The numbers behind the GMM figure go to
    ``round_XX_losses.csv``, one row per sample, so a filter can be studied again without retraining.

    Args:
        cleansing: the :class:`SelfCleansing` handler whose rounds are drawn (its network, data and store).
        output_dir: folder for ``round_XX_*.png``.
        n_examples: cleansed samples shown per round (the first ones in id order: the same slices every round
            while they stay cleansed, so rounds can be compared).
        every: draw every n-th round only.
    """

    def __init__(self, cleansing: SelfCleansing, output_dir: str, n_examples: int = 4, every: int = 1,
                 class_names: list[str] | None = None, summary_writer=None) -> None:
        self.cleansing, self.output_dir, self.n_examples, self.every = cleansing, output_dir, n_examples, every
        self.class_names = class_names
        self.writer = summary_writer

    def attach(self, engine: Engine) -> None:
        if not self.cleansing.enabled or idist.get_rank() != 0:
            return
        engine.add_event_handler(CleansingEvents.LABELS_CLEANSED, self)

    def _emit(self, name: str, rgb, epoch: int) -> None:

        from scripts.figures import save_png

        os.makedirs(self.output_dir, exist_ok=True)
        save_png(rgb, os.path.join(self.output_dir, f"{name}.png"))
        if self.writer is not None:
            self.writer.add_image(name.split("_", 2)[-1], rgb, epoch, dataformats="HWC")

    @torch.no_grad()
    def _degree_maps(self, image: torch.Tensor, prediction: torch.Tensor) -> list[torch.Tensor]:
        # the figure shows the paper's representation degree whatever the round's source is
        source = self.cleansing.source
        grid = source if isinstance(source, GridPrototypes) else GridPrototypes()
        with eval_mode(self.cleansing.network) as (net,):
            image = image[None].to(next(net.parameters()).device)
            _, features = self.cleansing.slice_pass.forward(net, image, features=True)
        return grid.degree_maps(features[0].cpu(), prediction, self.cleansing.num_classes)

    def __call__(self, engine: Engine) -> None:
        from scripts.figures import gmm_figure, pseudo_label_figure, representation_figure

        rnd: CleansingRound = engine.state.cleansing
        if (rnd.index - 1) % self.every:
            return
        tag = f"round_{rnd.index:02d}"
        ds = self.cleansing.dataset
        clean = ds.clean_labels() if hasattr(ds, "clean_labels") else None
        manual = ds.labels()
        true_noisy = noisy_slices(manual, clean) if clean is not None else None
        if rnd.manual_filter.extra.get("statistic") == "contour_offset":
            # the refit's parameters describe the contour offsets, so they are drawn over those
            figure = gmm_figure(rnd.contour_offset, rnd.manual_filter, "GMM-1 refit on contour offset", true_noisy,
                                xlabel="normalised contour offset")
        else:
            figure = gmm_figure(rnd.manual_loss, rnd.manual_filter, "GMM-1 on L(ŷ, y)", true_noisy)
        self._emit(f"{tag}_gmm_manual", figure, rnd.epoch)
        _rewrite_csv(os.path.join(self.output_dir, f"{tag}_losses.csv"), *round_losses(rnd, true_noisy))
        ids = torch.nonzero(rnd.actions == CLEANSE).flatten()[: self.n_examples]
        if len(ids) == 0:
            return
        images = torch.stack([ds.data[i]["image"][0] for i in ids.tolist()])
        names = self.class_names or [f"class {c}" for c in range(1, self.cleansing.num_classes)]
        first = int(ids[0])
        self._emit(f"{tag}_representation", representation_figure(
            images[0], self._degree_maps(ds.data[first]["image"], rnd.prediction[first].long()), names), rnd.epoch)
        rows = {}
        if clean is not None:
            rows["clean"] = clean[ids]
        rows.update({"manual": manual[ids], "prediction": rnd.prediction[ids], "pseudo (LCM)": rnd.candidates[ids]})
        self._emit(f"{tag}_pseudo_labels", pseudo_label_figure(images, rows), rnd.epoch)


def round_losses(rnd: CleansingRound, true_noisy: torch.Tensor | None = None) -> tuple[list[str], list[dict]]:
    """One row per sample of a round: its losses against Y and Y', the clean posteriors of GMM-1 and GMM-2, the
    action taken and, when the clean labels are known, whether its manual label is truly noisy."""
    columns = {"manual_loss": rnd.manual_loss, "pseudo_loss": rnd.pseudo_loss,
               "manual_clean_prob": rnd.manual_filter.clean_prob, "pseudo_clean_prob": rnd.pseudo_clean_prob,
               "action": rnd.actions}
    if rnd.contour_offset is not None:
        columns["contour_offset"] = rnd.contour_offset
    if true_noisy is not None:
        columns["truly_noisy"] = true_noisy
    columns = {k: v.tolist() for k, v in columns.items()}
    fields = ["sample", *columns]
    return fields, [{"sample": i, **{k: v[i] for k, v in columns.items()}} for i in range(len(rnd.actions))]


def loss_value(output, key: str = "loss") -> float:
    """The training loss of an iteration's output as a float, for the handlers that log it: the trainer's output
    is one dictionary, or a list of them when it decollates."""
    item = output[0] if isinstance(output, list) else output
    return float(item[key])


class TrainingProgress:
    """A progress bar over each epoch's iterations showing the running loss (Ignite's ``ProgressBar``, attached
    with an output transform, which a handler list cannot pass on its own).

    Shown only when standard error is a terminal: written to a log file, each update would be another line of
    carriage returns, and the epoch's summary lines already say what the bar said."""

    def __init__(self, output_key: str = "loss", persist: bool = False) -> None:
        self.output_key, self.persist = output_key, persist

    def attach(self, engine: Engine) -> None:
        from ignite.handlers import ProgressBar

        if idist.get_rank() != 0 or not sys.stderr.isatty():
            return
        key = self.output_key
        ProgressBar(persist=self.persist).attach(engine, output_transform=lambda out: {key: loss_value(out, key)})
