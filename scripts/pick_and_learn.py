"""Pick-and-Learn (Zhu et al., MICCAI 2019): a quality-awareness network looks at each (image, label) pair of a
batch and the per-sample segmentation losses are weighted by its scores, normalised over the batch.

``quality_weights`` is the math (scores to batch weights that sum to one); :class:`QualityNet` the scorer;
:class:`PickAndLearnPrepareBatch` and :class:`PickAndLearnLoss` put both into an ordinary ``SupervisedTrainer``
step (configs/methods/pick_and_learn.json).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.engines import PrepareBatch
from torch import nn

from scripts.engine import HybridPrepareBatch

__all__ = ["QualityNet", "quality_weights", "PickAndLearnPrepareBatch", "PickAndLearnLoss"]


def quality_weights(scores: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
    """Batch weights from quality scores (B,): ``softmax(scale * tanh(scores))`` over the batch.

    The weights are positive and sum to one over the batch; ``tanh`` bounds how far one sample can dominate: the
    largest weight is at most ``exp(2 * scale)`` times the smallest. This bound is the paper's overfitting control
    module, the nonlinearity between the quality score and the softmax.
    """
    if scores.dim() != 1:
        scores = scores.reshape(scores.shape[0])
    return torch.softmax(scale * torch.tanh(scores), dim=0)


class QualityNet(nn.Module):
    """The quality-awareness module: strided conv-BN-ReLU blocks over the image concatenated with the one-hot
    label, global average pooling and a linear layer giving one score per sample."""

    def __init__(self, in_channels: int = 1, num_classes: int = 4, features: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        self.num_classes = int(num_classes)
        label_channels = 1 if self.num_classes <= 2 else self.num_classes
        layers, c = [], in_channels + label_channels
        for f in features:
            layers += [nn.Conv2d(c, f, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(f), nn.ReLU(inplace=True)]
            c = f
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, 1)

    def encode_label(self, label: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) class indices to the network's label channels (one binary channel for 2 classes)."""
        if self.num_classes <= 2:
            return (label > 0).float()
        return F.one_hot(label[:, 0].long().clamp(0, self.num_classes - 1), self.num_classes).movedim(-1, 1).float()

    def forward(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        x = torch.cat([image, self.encode_label(label)], dim=1)
        return self.head(self.body(x).mean(dim=(2, 3)))[:, 0]


class PickAndLearnPrepareBatch(PrepareBatch):
    """``(image, target)`` with the image appended to the label channels, so the loss can score each pair:
    ``target = [label, image]`` (MONAI's trainer hands the loss only the prediction and the target)."""

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        image, label = HybridPrepareBatch()(batchdata, device, non_blocking, **kwargs)
        return image, torch.cat([label[:, :1], image.to(label.dtype)], dim=1)


class PickAndLearnLoss(nn.Module):
    """``Σ_i w_i · L(ŷ_i, y_i)`` with ``w = quality_weights(Q(x_i, y_i))``; trained jointly with the segmentation
    network (the optimiser holds the quality network's parameters too), so the quality network learns to move
    weight away from samples whose labels the segmentation network cannot fit.

    Returns per-sample values ``B · w_i · L_i``, whose batch mean (what ``SupervisedTrainer`` takes) is the
    weighted sum. The last batch's weights are kept in ``last_weights`` for inspection.

    Args:
        loss: the per-sample segmentation loss (``scripts.losses.SegmentationLoss``).
        quality_net: a :class:`QualityNet`.
        image_channels: channels of the image in the target (after the one label channel).
        scale: see :func:`quality_weights`.
    """

    def __init__(self, loss: nn.Module, quality_net: nn.Module, image_channels: int = 1, scale: float = 2.0):
        super().__init__()
        self.loss, self.quality_net = loss, quality_net
        self.image_channels, self.scale = int(image_channels), float(scale)
        self.last_weights: torch.Tensor | None = None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.shape[1] != 1 + self.image_channels:
            raise ValueError(f"target needs [label, image] channels (1 + {self.image_channels}), got "
                             f"{target.shape[1]}: use scripts.pick_and_learn.PickAndLearnPrepareBatch")
        label, image = target[:, :1], target[:, 1:]
        per_sample = self.loss(logits, label)
        weights = quality_weights(self.quality_net(image, label), self.scale)
        self.last_weights = weights.detach()
        return per_sample * weights * per_sample.shape[0]
