"""One eval-mode pass of one or more networks over the training slices, without augmentation.

The cleansing round (losses, prediction and features of every slice), the competitors that refine labels from a
network's probabilities, and the round's figures all run this pass; it lives here once so that they see the same
slices, in the same mode, with the same batching.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from scripts.flags import as_flag
from scripts.losses import probabilities
from scripts.network import unwrap

__all__ = ["SlicePass", "eval_mode"]

_FLIPS = ((-1,), (-2,), (-2, -1))


@contextmanager
def eval_mode(*networks: nn.Module):
    """Put the (unwrapped) networks in eval mode and give them back in the mode each had."""
    nets = [unwrap(n) for n in networks]
    modes = [n.training for n in nets]
    for n in nets:
        n.eval()
    try:
        yield nets
    finally:
        for n, m in zip(nets, modes):
            n.train(m)


class SlicePass:
    """Batches of training slices through a network in eval mode.

    Args:
        batch_size: slices per forward pass. On a 2-core CPU the round's pass ran faster at 4-8 slices than at 32
            (docs/experiments.md, Speed).
        flip_average: each output is the mean over the slice and its three flips (left-right, up-down, both),
            mapped back: a steadier prediction at four forward passes per slice. Leave it off where a flip
            changes what a label means (left and right structures with separate labels).
    """

    def __init__(self, batch_size: int = 8, flip_average: bool = False) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.flip_average = int(batch_size), as_flag(flip_average, "slice_pass#flip_average")

    def __repr__(self) -> str:
        return f"SlicePass(batch_size={self.batch_size}, flip_average={self.flip_average})"

    def batches(self, dataset, ids: Sequence[int] | None = None,
                device: torch.device | str = "cpu") -> Iterator[tuple[list[int], torch.Tensor]]:
        """``(ids, images)`` per batch of the data set's stored (unaugmented) slices, images on ``device``."""
        ids = list(range(len(dataset.data))) if ids is None else list(ids)
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            yield chunk, torch.stack([dataset.data[i]["image"] for i in chunk]).to(device)

    def forward(self, network: nn.Module, image: torch.Tensor,
                features: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Float logits and, with ``features``, the feature map (``network.forward_features``) of one batch."""
        def once(x):
            if features:
                logits, feats = network.forward_features(x)
                return logits.float(), feats.float()
            return network(x).float(), None

        logits, feats = once(image)
        if self.flip_average:
            for dims in _FLIPS:
                flipped_logits, flipped_feats = once(image.flip(dims))
                logits = logits + flipped_logits.flip(dims)
                feats = feats + flipped_feats.flip(dims) if features else None
            logits = logits / 4
            feats = feats / 4 if features else None
        return logits, feats

    @torch.no_grad()
    def probabilities(self, networks: Sequence[nn.Module], dataset, ids: Sequence[int] | None = None,
                      device=None) -> torch.Tensor:
        """Class probabilities (N, C, H, W) of the slices ``ids`` (default: all), averaged over ``networks``, on
        the CPU. A one-channel (sigmoid) output becomes two columns (background, foreground)."""
        out = []
        with eval_mode(*networks) as nets:
            device = device or next(nets[0].parameters()).device
            for _, image in self.batches(dataset, ids, device):
                probs = 0
                for net in nets:
                    p = probabilities(self.forward(net, image)[0])
                    if p.shape[1] == 1:
                        p = torch.cat([1 - p, p], 1)
                    probs = probs + p / len(nets)
                out.append(probs.cpu())
        return torch.cat(out) if out else torch.zeros(0)
