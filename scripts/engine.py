"""Trainer wiring: the batch preparation that hands the pseudo-label to the hybrid loss, and cleansing events."""

from __future__ import annotations

import torch
from ignite.engine import EventEnum
from monai.data import MetaTensor
from monai.engines import PrepareBatch, default_prepare_batch

from scripts.flags import as_flag

__all__ = ["AttachHandler", "CleansingEvents", "HybridPrepareBatch"]


class CleansingEvents(EventEnum):
    """One cleansing round, in order. Handlers read the round's data from ``engine.state.cleansing``."""

    ROUND_STARTED = "cleansing_round_started"
    LOSSES_COLLECTED = "cleansing_losses_collected"
    LABELS_FILTERED = "cleansing_labels_filtered"
    LABELS_CLEANSED = "cleansing_labels_cleansed"


class HybridPrepareBatch(PrepareBatch):
    """Return ``(image, target)`` where the target stacks the manual label and, when the batch carries one, the
    pseudo-label along the channel axis, for :class:`scripts.losses.HybridLoss`.

    Without a ``pseudo`` key (the Baseline, or before any store is attached) this is MONAI's default. Tensors
    are handed on as plain ``torch.Tensor``: a MetaTensor input would route every operation of the network's
    forward and backward through Python-level meta data handling, which training does not need.

    Args:
        slice_flags: with a pseudo-label, also stack as a third channel the classes the sample's whole manual
            slice states, as the bits of :func:`scripts.losses.class_bits` (the ``classes_known`` key of
            :class:`scripts.data.SliceDataset`), constant over the patch. A patch drawn away from the structures of
            a labelled slice is as empty as a patch of a missed slice; only this tells them apart for
            ``HybridLoss(ignore_empty_manual=True)`` and ``absent_unknown_manual``. When the batch also carries
            ``pseudo_known`` (the classes Y' states, see :class:`scripts.data.SliceDataset`), that goes in a
            fourth channel, for ``HybridLoss(cleansed_absent_unknown=True)``.
    """

    def __init__(self, slice_flags: bool = False) -> None:
        self.slice_flags = as_flag(slice_flags, "slice_flags")

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        image, label = (_plain(t) for t in default_prepare_batch(batchdata, device, non_blocking, **kwargs))
        pseudo = batchdata.get("pseudo") if isinstance(batchdata, dict) else None
        if pseudo is None:
            return image, label
        pseudo = _plain(pseudo).to(device=device, non_blocking=non_blocking, **kwargs)
        channels = [label, pseudo.to(label.dtype)]
        if self.slice_flags:
            if "classes_known" not in batchdata:
                raise KeyError("HybridPrepareBatch(slice_flags=True) needs a 'classes_known' key in the batch, "
                               "which scripts.data.SliceDataset adds when a pseudo-label store is attached")
            for key in [k for k in ("classes_known", "pseudo_known") if k in batchdata]:
                bits = torch.as_tensor(_plain(batchdata[key]), device=label.device).to(label.dtype)
                channels.append(bits.reshape(-1, *[1] * (label.ndim - 1)).expand_as(label))
        return image, torch.cat(channels, dim=1)


class AttachHandler:
    """Attach a handler that is defined elsewhere in the config.

    ``{"_target_": "scripts.engine.AttachHandler", "handler": "@train#cleansing"}`` puts the handler that other items
    refer to (``@train#cleansing``) into ``train#handlers`` as a component dict rather than a bare reference string:
    MONAI Label's bundle trainer reads every entry of that list as a dict before it inserts its CheckpointLoader.
    """

    def __init__(self, handler) -> None:
        if not callable(getattr(handler, "attach", None)):
            raise TypeError(f"{type(handler).__name__} has no attach(engine) method: it is not an engine handler")
        self.handler = handler

    def attach(self, engine) -> None:
        self.handler.attach(engine)


def _plain(t):
    return t.as_tensor() if isinstance(t, MetaTensor) else t
