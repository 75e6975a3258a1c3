"""Trainer wiring: the batch preparation that hands the pseudo-label to the hybrid loss, and cleansing events."""

from __future__ import annotations

import torch
from ignite.engine import EventEnum
from monai.engines import PrepareBatch, default_prepare_batch

__all__ = ["CleansingEvents", "HybridPrepareBatch"]


class CleansingEvents(EventEnum):
    """One cleansing round, in order. Handlers read the round's data from ``engine.state.cleansing``."""

    ROUND_STARTED = "cleansing_round_started"
    LOSSES_COLLECTED = "cleansing_losses_collected"
    LABELS_FILTERED = "cleansing_labels_filtered"
    LABELS_CLEANSED = "cleansing_labels_cleansed"


class HybridPrepareBatch(PrepareBatch):
    """Return ``(image, target)`` where the target stacks the manual label and, when the batch carries one, the
    pseudo-label along the channel axis, for :class:`scripts.losses.HybridLoss`.

    Without a ``pseudo`` key (the Baseline, or before any store is attached) this is MONAI's default.
    """

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        pseudo = batchdata.get("pseudo") if isinstance(batchdata, dict) else None
        if pseudo is None:
            return image, label
        pseudo = torch.as_tensor(pseudo).to(device=device, non_blocking=non_blocking, **kwargs)
        return image, torch.cat([torch.as_tensor(label), pseudo.to(label.dtype)], dim=1)
