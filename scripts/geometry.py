"""The input geometry a network was trained at, saved beside its weights.

A network trained on slices zoomed by 0.5 and z-scored per volume segments garbage when it is applied at native
scale or to HU-windowed slices, and nothing in the output says so. :class:`Geometry` is a small object that the
checkpoint handlers save with the model (``save_dict={"model": ..., "geometry": ...}``) and that
``CheckpointLoader`` hands the saved record back to: :meth:`Geometry.load_state_dict` compares the record with the
geometry of the config that loads it and refuses a mismatch, naming the checkpoint and every differing key.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["Geometry", "CheckGeometry", "load_weights"]


def _read(checkpoint: str | Path) -> dict:
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint ({err})") from err


def load_weights(checkpoint: str | Path) -> dict:
    """The network's state dict from a bundle checkpoint: ``{"model": ..., "geometry": ...}`` as the bundle saves
    it, or a bare state dict as older versions did."""
    state = _read(checkpoint)
    return state["model"] if isinstance(state, dict) and "model" in state else state


class Geometry:
    """What the network sees: in-plane zoom (or resize target), intensity normalisation and output channels.

    Args:
        scale: in-plane zoom factor applied to every slice before the network (0.5 halves each side).
        resize: in-plane size every slice is resized to instead of zoomed (CT), or ``None``.
        intensity: name of the intensity normalisation (``"zscore"``, ``"hu[-70, 180]"``, ...).
        out_channels: output channels of the network.
    """

    def __init__(self, scale: float = 1.0, resize: Sequence[int] | None = None, intensity: str = "zscore",
                 out_channels: int | None = None) -> None:
        self.record = {
            "scale": float(scale),
            "resize": None if resize is None else [int(s) for s in resize],
            "intensity": str(intensity),
            "out_channels": None if out_channels is None else int(out_channels),
        }

    def state_dict(self) -> dict:
        return dict(self.record)

    def load_state_dict(self, state: dict) -> None:
        self.check(state)

    def check(self, state: dict, source: str = "the checkpoint") -> None:
        """Refuse weights trained at another geometry, naming ``source``; a key the saved record lacks is not
        checked."""
        diffs = [f"{k}: trained with {state[k]!r}, this config has {v!r}"
                 for k, v in self.record.items() if k in state and state[k] != v]
        if diffs:
            raise ValueError(
                f"{source} was trained at another input geometry ({'; '.join(diffs)}). Merge the data configs the "
                f"model was trained with, e.g. \"['configs/inference.json','configs/acdc.json',"
                f"'configs/acdc_cpu.json']\", or pass the matching --scale / --resize."
            )

    def __repr__(self) -> str:
        return f"Geometry({self.record})"


class CheckGeometry:
    """Refuse, when the engine starts and before any output is written, a checkpoint trained at another geometry.

    ``CheckpointLoader`` loads the weights; this handler reads the geometry record saved beside them and hands it
    to :meth:`Geometry.check`. A checkpoint without a record (a bare state dict) is loaded with a warning.
    """

    def __init__(self, checkpoint: str, geometry: Geometry) -> None:
        self.checkpoint, self.geometry = str(checkpoint), geometry

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine=None) -> None:
        state = _read(self.checkpoint)
        if not (isinstance(state, dict) and "geometry" in state):
            logger.warning(f"{self.checkpoint} records no input geometry; assuming it matches {self.geometry}")
            return
        self.geometry.check(state["geometry"], self.checkpoint)
