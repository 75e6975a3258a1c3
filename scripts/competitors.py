"""Pieces the competitor methods (Pick-and-Learn, Confident Learning, JoCoR, superpixel-guided) share: a pass of one
or more networks over the training slices and the two-network inferer of the co-training methods. The checkpoint
of their extra modules is :class:`scripts.checkpointing.ModuleState`.

Each method is a config merged over ``configs/train.json`` (``configs/methods/*.json``); see docs/competitors.md.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from scripts.slice_pass import SlicePass

__all__ = ["TwinInferer", "predict_slices", "split_logits"]


def __getattr__(name: str):
    # configs written for bundle versions up to 0.6.0 name the checkpoint handler here
    if name == "ModuleState":
        warnings.warn("scripts.competitors.ModuleState is now scripts.checkpointing.ModuleState; the old name will "
                      "be removed", DeprecationWarning, stacklevel=2)
        from scripts.checkpointing import ModuleState

        return ModuleState
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def predict_slices(networks: list[nn.Module], dataset, ids: list[int] | None = None, batch_size: int = 32,
                   device=None) -> torch.Tensor:
    """Class probabilities (N, C, H, W) of the training slices ``ids`` (default: all), in eval mode and without
    augmentation, averaged over ``networks`` (:meth:`scripts.slice_pass.SlicePass.probabilities`)."""
    return SlicePass(batch_size).probabilities(networks, dataset, ids, device)
