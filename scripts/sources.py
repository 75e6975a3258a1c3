"""Where a cleansed slice's candidate label comes from: the pseudo-label sources of a cleansing round.

A source is one small object with one method, ``candidates(features, prediction, num_classes)``: the round's
eval-mode features (B, C, H, W) and predicted class maps (B, H, W) in, candidate labels (B, H, W) uint8 out.
:class:`~scripts.handlers.SelfCleansing` takes one as its ``source`` component, so a new source is a new class
and a config change (``train#cleansing#source``), not a branch in the handler. The four here are the paper's
Table 4: its grid prototypes, one averaged prototype, the prediction itself, and none at all.
(:func:`scripts.schedule.by_schedule` can pick one of two from the length of the schedule.)
"""

from __future__ import annotations

import torch

from scripts.ignore_index import IGNORE_INDEX
from scripts.prototypes import cleanse_batch, effective_grid, grid_features, representation_degree

__all__ = ["PseudoLabelSource", "GridPrototypes", "AveragedPrototype", "Prediction", "NoPseudoLabel"]


class PseudoLabelSource:
    """Base of the sources; subclasses implement :meth:`candidates`."""

    def candidates(self, features: torch.Tensor, prediction: torch.Tensor, num_classes: int) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{self.__class__.__name__}({args})"


class _Prototypes(PseudoLabelSource):
    mode = ""

    def __init__(self, mu: float = 0.7, component_fraction: float = 0.1, hole_fraction: float = 0.1) -> None:
        if not 0.0 <= component_fraction < 1.0 or not 0.0 <= hole_fraction < 1.0:
            raise ValueError(f"component_fraction and hole_fraction are fractions of a class's area in [0, 1), got "
                             f"{component_fraction} and {hole_fraction}")
        self.mu, self.component_fraction, self.hole_fraction = float(mu), component_fraction, hole_fraction

    def _lcm(self, features: torch.Tensor) -> dict:
        return dict(mu=self.mu, min_fraction=self.component_fraction, hole_fraction=self.hole_fraction)

    def candidates(self, features: torch.Tensor, prediction: torch.Tensor, num_classes: int) -> torch.Tensor:
        out = cleanse_batch(features, prediction, num_classes=num_classes, mode=self.mode, **self._lcm(features))
        return out.to(torch.uint8)


class GridPrototypes(_Prototypes):
    """The paper's LCM (Eq. 4-6): representative grid cells of each predicted region are its prototypes, and a
    pixel takes the class whose prototypes it resembles most, if that similarity exceeds ``mu``; small components
    and holes are then removed.

    Args:
        grid: cells per side; ``None`` (default) takes a quarter of the slice side, the paper's 64 at 256×256. It
            must divide the slice size.
        sigma: the representation degree a cell needs to be a prototype (Eq. 5).
        mu: the similarity a pixel needs to take a foreground class (Eq. 6).
        component_fraction, hole_fraction: components and enclosed holes smaller than this fraction of their
            class's area are removed or filled.
    """

    mode = "grid"

    def __init__(self, grid: int | None = None, sigma: float = 0.7, mu: float = 0.7,
                 component_fraction: float = 0.1, hole_fraction: float = 0.1) -> None:
        super().__init__(mu, component_fraction, hole_fraction)
        if grid is not None and int(grid) < 1:
            raise ValueError(f"grid must be a positive number of cells per side, got {grid}")
        self.grid, self.sigma = grid, float(sigma)

    def grid_for(self, height: int, width: int) -> int:
        return effective_grid(self.grid if self.grid is not None else max(1, height // 4), height, width)

    def _lcm(self, features: torch.Tensor) -> dict:
        return dict(super()._lcm(features), sigma=self.sigma, grid=self.grid_for(*features.shape[-2:]))

    def degree_maps(self, features: torch.Tensor, prediction: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
        """Per foreground class, the (grid, grid) representation degree of Eq. 5 of one slice, min-max scaled over
        the region's cells (what the round's representation figure shows); ``features`` (C, H, W)."""
        h, w = prediction.shape
        g = self.grid_for(h, w)
        maps = []
        for c in range(1, num_classes):
            cells, inside = grid_features(features.float(), prediction == c, g)
            degree = representation_degree(cells, inside)
            if inside.any():
                d = degree[inside]
                degree = torch.where(inside, (degree - d.min()) / (d.max() - d.min()).clamp_min(1e-12), degree)
            maps.append(degree.reshape(g, g))
        return maps


class AveragedPrototype(_Prototypes):
    """Table 4's "avg" variant: one prototype per class, the mean feature over its predicted region."""

    mode = "avg"


class Prediction(PseudoLabelSource):
    """The network's eval-mode prediction itself, as it is (Table 4's "pred" variant); the bundle's default,
    where the target rules then keep only what prediction and manual label agree on."""

    def candidates(self, features: torch.Tensor, prediction: torch.Tensor, num_classes: int) -> torch.Tensor:
        if prediction.numel() and int(prediction.max()) >= num_classes:
            raise ValueError(f"prediction holds class {int(prediction.max())}, num_classes is {num_classes}")
        return prediction.to(torch.uint8)


class NoPseudoLabel(PseudoLabelSource):
    """No candidate at all: a slice to cleanse carries no supervision (the label filter alone, without LCM)."""

    def candidates(self, features: torch.Tensor, prediction: torch.Tensor, num_classes: int) -> torch.Tensor:
        return torch.full(prediction.shape, IGNORE_INDEX, dtype=torch.uint8, device=prediction.device)
