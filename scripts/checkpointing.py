"""The whole training state as one checkpoint, so an interrupted run resumes where it stopped and goes on as an
uninterrupted run would: the trainer, the random generators (global and per transform) and the B-model record."""

from __future__ import annotations

import glob
import logging
import os
import random
import re

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver

from scripts.flags import as_flag

__all__ = ["RandomStates", "BestModelState", "TrainingState", "ModuleState", "latest_checkpoint"]


def latest_checkpoint(save_dir: str, prefix: str = "state") -> str | None:
    """The ``<prefix>_<epoch>.pt`` file of ``save_dir`` with the highest epoch, or ``None``."""
    files = glob.glob(os.path.join(save_dir, f"{prefix}_*.pt"))

    def epoch(path):
        m = re.search(r"_(\d+)\.pt$", path)
        return int(m.group(1)) if m else -1

    return max(files, key=epoch) if files else None


def _randomizables(transform) -> list:
    """Every MONAI ``Randomizable`` in a (nested) transform chain, in a fixed order."""
    from monai.transforms import Randomizable

    found = [transform] if isinstance(transform, Randomizable) else []
    if found:
        # a dictionary transform may draw from a wrapped array transform's generator (RandCropByPosNegLabeld's
        # cropper picks the patch centres), which then needs saving too
        found += [v for _, v in sorted(vars(transform).items()) if isinstance(v, Randomizable) and v is not transform]
    for t in getattr(transform, "transforms", None) or ():
        found += _randomizables(t)
    return found


class RandomStates:
    """The random generators of this process as a checkpointable object, so a resumed run draws the same
    augmentations and shuffles as an uninterrupted one.

    Besides the global torch, NumPy and Python generators this holds the private generator of each random MONAI
    transform in ``transform``: with ``num_workers=0`` those generators are seeded once and then run on across
    epochs, so a resumed run would otherwise repeat the first epoch's flips.
    """

    def __init__(self, transform=None) -> None:
        self.transforms = _randomizables(transform) if transform is not None else []

    def state_dict(self) -> dict:
        return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "transforms": [t.R.get_state() for t in self.transforms]}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        saved = state.get("transforms", [])
        if len(saved) != len(self.transforms):
            raise ValueError(f"the checkpoint holds {len(saved)} random transform states, this run has "
                             f"{len(self.transforms)} random transforms: was it made with other training transforms?")
        for t, r in zip(self.transforms, saved):
            t.R.set_state(r)


class BestModelState:
    """The evaluator's best metric so far and the key-metric saver's record of the B-model, as one checkpointable
    object: without it a resumed run forgets the best score and its next validation replaces ``model.pt``
    whatever its Dice."""

    def __init__(self, evaluator: Engine, saver=None) -> None:
        self.evaluator, self.saver = evaluator, saver

    def _checkpoint(self):
        # MONAI's CheckpointSaver restores its key-metric record (load_state_dict) but does not expose it for
        # saving; the record is the Ignite Checkpoint it wraps
        return getattr(self.saver, "_key_metric_checkpoint", None)

    def state_dict(self) -> dict:
        state = {"best_metric": self.evaluator.state.best_metric,
                 "best_metric_epoch": self.evaluator.state.best_metric_epoch}
        if self._checkpoint() is not None:
            state["saved"] = self._checkpoint().state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        if "saved" in state and self._checkpoint() is not None:
            self.saver.load_state_dict(state["saved"])


class TrainingState:
    """Checkpoint the whole training state (the trainer itself included) every ``interval`` epochs, and resume
    from the latest such checkpoint in ``save_dir`` when ``resume`` is set.

    The trainer cannot be named in the config's own ``save_dict`` (it would reference itself), so it is added
    here when the handler is attached. Files are written by Ignite's ``DiskSaver`` with ``atomic=True``: a write
    goes to a temporary file that is renamed into place, so a kill at any moment leaves the previous checkpoint
    readable. Given the ``evaluator`` (and the ``CheckpointSaver`` that keeps the B-model), the best validation
    score and the saver's record travel in the checkpoint too, so a resumed run replaces ``model.pt`` only with
    a better model, as the uninterrupted run would; given the training ``transform``, its random transforms'
    generators too (see :class:`RandomStates`).
    """

    def __init__(self, save_dir: str, save_dict: dict, interval: int = 1, n_saved: int = 1, resume: bool = False,
                 prefix: str = "state", evaluator: Engine | None = None, best_model_saver=None,
                 transform=None) -> None:
        self.save_dir, self.save_dict, self.interval = save_dir, dict(save_dict), int(interval)
        self.transform = transform
        if evaluator is not None:
            self.save_dict["best_model"] = BestModelState(evaluator, best_model_saver)
        self.n_saved, self.resume, self.prefix = n_saved, as_flag(resume, "resume"), prefix
        self.logger = logging.getLogger(self.__class__.__name__)

    def latest(self) -> str | None:
        return latest_checkpoint(self.save_dir, self.prefix)

    def attach(self, engine: Engine) -> None:
        objects = {**self.save_dict, "trainer": engine, "rng": RandomStates(self.transform)}
        path = None
        if self.resume:
            path = self.latest()
            if path is None:
                self.logger.info(f"no {self.prefix}_*.pt in {self.save_dir}: starting from scratch")
            else:
                max_epochs = engine.state.max_epochs
                Checkpoint.load_objects(objects, torch.load(path, map_location="cpu", weights_only=False))
                # the checkpoint carries the old run's max_epochs; the run being resumed decides how far to go
                if max_epochs is not None and engine.state.epoch >= max_epochs:
                    raise ValueError(f"{path} is at epoch {engine.state.epoch}, the run asks for {max_epochs} "
                                     f"epochs: nothing to resume (raise --epochs to train further)")
                engine.state.max_epochs = max_epochs
                self.logger.info(f"resumed from {path} at epoch {engine.state.epoch}")
        if idist.get_rank() == 0:
            saver = DiskSaver(self.save_dir, require_empty=False, atomic=True)
            checkpoint = Checkpoint(objects, saver, filename_prefix=self.prefix, n_saved=self.n_saved,
                                    global_step_transform=lambda e, _: e.state.epoch)
            if path is not None:
                # the resumed file is this run's newest checkpoint: it is rotated out like any other
                checkpoint.load_state_dict({"_saved": [(engine.state.epoch, os.path.basename(path))]})
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), checkpoint)


class ModuleState:
    """Checkpoint extra modules (a second network, a quality network) every ``interval`` epochs next to the
    bundle's ``state_*.pt``, and restore them on ``--resume True``.

    Attach it *after* :class:`TrainingState` (configs append it with ``+train#handlers``): the
    trainer's epoch is restored by then, and the extra checkpoint of that same epoch is loaded; a missing or
    mismatched one is an error rather than a silent restart of half the model.
    """

    def __init__(self, save_dir: str, save_dict: dict, resume: bool = False, prefix: str = "extra",
                 interval: int = 1) -> None:
        self.save_dir, self.save_dict, self.resume = save_dir, dict(save_dict), as_flag(resume, "resume")
        self.prefix, self.interval = prefix, int(interval)
        self.logger = logging.getLogger(self.__class__.__name__)

    def files(self) -> dict[int, str]:
        out = {}
        for path in glob.glob(os.path.join(self.save_dir, f"{self.prefix}_*.pt")):
            m = re.search(r"_(\d+)\.pt$", path)
            if m:
                out[int(m.group(1))] = path
        return out

    def attach(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        if self.resume and epoch > 0:
            path = self.files().get(epoch)
            if path is None:
                raise FileNotFoundError(f"resuming at epoch {epoch}, but {self.save_dir} has no {self.prefix}_*_"
                                        f"{epoch}.pt holding {sorted(self.save_dict)}")
            Checkpoint.load_objects(self.save_dict, torch.load(path, map_location="cpu", weights_only=False))
            self.logger.info(f"restored {sorted(self.save_dict)} from {path}")
        if idist.get_rank() == 0:
            saver = DiskSaver(self.save_dir, require_empty=False, atomic=True)
            checkpoint = Checkpoint(self.save_dict, saver, filename_prefix=self.prefix, n_saved=1,
                                    global_step_transform=lambda e, _: e.state.epoch)
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), checkpoint)
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self._drop_older)

    def _drop_older(self, engine: Engine) -> None:
        """A resumed run's new ``Checkpoint`` does not know the files of the run before it: remove them once the
        current epoch's file is written."""
        for epoch, path in self.files().items():
            if epoch < engine.state.epoch:
                os.remove(path)
