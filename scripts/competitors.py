"""Pieces the competitor methods (Pick-and-Learn, Confident Learning, JoCoR, superpixel-guided) share: a checkpoint
for the modules the bundle's own training state does not list, a pass of one or more networks over the training
slices, and the two-network inferer of the co-training methods.

Each method is a config merged over ``configs/train.json`` (``configs/methods/*.json``); see docs/competitors.md.
"""

from __future__ import annotations

import glob
import logging
import os
import re

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from torch import nn

from scripts.losses import probabilities
from scripts.network import unwrap

__all__ = ["ModuleState", "TwinInferer", "predict_slices", "split_logits"]


class ModuleState:
    """Checkpoint extra modules (a second network, a quality network) every ``interval`` epochs next to the
    bundle's ``state_*.pt``, and restore them on ``--resume true``.

    Attach it *after* :class:`scripts.checkpointing.TrainingState` (configs append it with ``+train#handlers``): the
    trainer's epoch is restored by then, and the extra checkpoint of that same epoch is loaded; a missing or
    mismatched one is an error rather than a silent restart of half the model.
    """

    def __init__(self, save_dir: str, save_dict: dict, resume: bool = False, prefix: str = "extra",
                 interval: int = 1) -> None:
        self.save_dir, self.save_dict, self.resume = save_dir, dict(save_dict), resume
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
        from ignite.handlers import Checkpoint, DiskSaver

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


class TwinInferer:
    """Training-time inferer of the co-training methods: runs the trainer's network and its ``peer`` on the same
    batch and returns both logits concatenated along the channel axis (``split_logits`` undoes it). The peer
    follows the trainer network's train/eval mode."""

    def __init__(self, peer: nn.Module) -> None:
        self.peer = peer

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:
        self.peer.train(network.training)
        return torch.cat([network(inputs, *args, **kwargs), self.peer(inputs, *args, **kwargs)], dim=1)


def split_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two networks' logits from :class:`TwinInferer`'s output."""
    if logits.shape[1] % 2:
        raise ValueError(f"expected the channels of two networks, got {logits.shape[1]}")
    c = logits.shape[1] // 2
    return logits[:, :c], logits[:, c:]


@torch.no_grad()
def predict_slices(networks: list[nn.Module], dataset, ids: list[int] | None = None, batch_size: int = 32,
                   device=None) -> torch.Tensor:
    """Class probabilities (N, C, H, W) of the training slices ``ids`` (default: all), in eval mode and without
    augmentation, averaged over ``networks``. A one-channel (sigmoid) output becomes two columns (bg, fg)."""
    nets = [unwrap(n) for n in networks]
    modes = [n.training for n in nets]
    for n in nets:
        n.eval()
    device = device or next(nets[0].parameters()).device
    ids = list(range(len(dataset.data))) if ids is None else list(ids)
    out = []
    try:
        for start in range(0, len(ids), batch_size):
            image = torch.stack([dataset.data[i]["image"] for i in ids[start : start + batch_size]]).to(device)
            probs = 0
            for n in nets:
                p = probabilities(n(image).float())
                if p.shape[1] == 1:
                    p = torch.cat([1 - p, p], 1)
                probs = probs + p / len(nets)
            out.append(probs.cpu())
    finally:
        for n, m in zip(nets, modes):
            n.train(m)
    return torch.cat(out) if out else torch.zeros(0)
