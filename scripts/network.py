"""Residual U-Net segmentation backbone (Table 1 of the deep self-cleansing paper, Sec. 2.1).

Reading of Table 1
------------------
Table 1 leaves several details open (where down-sampling happens in Residual_block_3, where the skip
connections enter, what the residual shortcuts span). The reading used here, with ``channels=(c0, c1, c2, c3)``
defaulting to ``(16, 32, 64, 128)`` and an input of H x W (256 x 256 in the paper):

Every ``Residual_block`` is a *resampling layer* (the stride-2 conv or the transposed conv of the table) plus a
*residual unit* made of the table's remaining stride-1 3x3 convs. A residual unit is post-activation (ResNet v1
style): ``act(body(x) + shortcut(x))`` where ``body`` is conv-norm-act for all convs except the last, which is
conv-norm only, and ``shortcut`` is the identity, or a 1x1 conv + norm where the channel counts differ. In the
decoder, the up-sampled tensor is concatenated with the encoder output of the same resolution before the residual
unit; this is what makes the table's widths add up (128 = 64 + 64 in RB4, 64 = 32 + 32 in RB5, 32 = 16 + 16 in
Conv_2). Every conv except the very last is followed by the norm layer and the activation.

==================  ==========  ==========================================================================
row                 output      layers here (channels for the default ``channels``)
==================  ==========  ==========================================================================
Conv_1              H           conv 3x3, in -> 16, stride 1                                 -> e0 (16)
Residual_block_1    H/2         conv 2x2, 16 -> 32, stride 2; residual unit [conv 3x3, 32 -> 32], identity
                                shortcut                                                     -> e1 (32)
Residual_block_2    H/4         conv 2x2, 32 -> 64, stride 2; residual unit [conv 3x3, 64 -> 64], identity
                                shortcut                                                     -> e2 (64)
Residual_block_3    H/8         conv 3x3, 64 -> 64, **stride 2** (the table's stride 1 contradicts its
                                32x32 output, so the first conv is taken as the down-sampling one);
                                residual unit [conv 3x3, 64 -> 128; conv 3x3, 128 -> 128], 1x1 projection
                                shortcut 64 -> 128                                           -> b (128)
Residual_block_4    H/4         transposed conv 2x2, 128 -> 64, stride 2; concat with e2 -> 128 channels;
                                residual unit [3 x conv 3x3, 128 -> 128], identity shortcut  -> d2 (128)
Residual_block_5    H/2         transposed conv 2x2, 128 -> 32, stride 2; concat with e1 -> 64 channels;
                                residual unit [conv 3x3, 64 -> 64], identity shortcut        -> d1 (64)
Residual_block_6    H           residual unit [conv 3x3, 64 -> 64] at H/2, identity shortcut; then
                                transposed conv 2x2, 64 -> 16, stride 2, + norm, + act       -> f (16)
Conv_2              H           concat act(f) with e0 -> 32 channels; conv 3x3, 32 -> 32; conv 3x3,
                                32 -> head (2, or 4 x out_channels); conv 1x1 -> out_channels (no norm, no act)
(Sigmoid)                       not applied: ``forward`` returns logits
==================  ==========  ==========================================================================

In general: RB3's unit is [c3, c3], RB4's is 3 x [2*c2], RB5's is [2*c1], RB6's is [2*c1], Conv_2's first conv
has 2*c0 channels; the transposed convs produce c2, c1 and c0 channels.

The table's Residual_block_6 lists the transposed conv *last*, so in that block the residual unit runs at H/2
before the up-sampling, mirroring RB4/RB5 where the up-sampling comes first.

The paper's output is "Conv 1x1, 1; Sigmoid" for binary segmentation. Here the 1x1 conv has ``out_channels``
outputs and no activation: losses and post-processing apply sigmoid (one channel) or softmax (several channels),
which is numerically safer than taking logs of probabilities. The 2-channel conv before it keeps 2 channels for
a binary (one-channel) output and becomes ``4 * out_channels`` channels for a multi-class one (``head_channels``
overrides): with only ``out_channels`` ReLU channels the 4-class head learned so slowly on ACDC that training on
noisy labels settled on predicting background everywhere.

Feature map for label cleansing
-------------------------------
``forward_features`` also returns the output of Residual_block_6, the (B, c0, H, W) map that the prototype-based
label-cleansing module compares with cosine similarities (paper Eqs. 4-6). By default
(``features_pre_activation=True``) it is the normalised transposed-conv output *before* the block's final
activation: after a ReLU every component is non-negative, so the cosine similarity of any two feature vectors is
>= 0 and the range that separates target from background pixels is squeezed into [0, 1], with many exact zeros.
The signed pre-activation map spans [-1, 1]. ``features_pre_activation=False`` returns the activated map (what
Conv_2 consumes) instead. Either way the decoder itself sees the same tensors, so the flag does not change the
logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.utils import get_act_layer
from torch import nn

__all__ = ["ResidualUNet", "unwrap"]

def _conv(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    norm,
    act,
    dropout: float = 0.0,
    strides: int = 1,
    transposed: bool = False,
) -> Convolution:
    # Kernel-2 convs need explicit zero padding: MONAI's "same" padding is undefined for even kernels.
    padding = 0 if kernel_size == 2 else (kernel_size - 1) // 2
    return Convolution(
        spatial_dims,
        in_channels,
        out_channels,
        strides=strides,
        kernel_size=kernel_size,
        act=act,
        norm=norm,
        dropout=dropout if dropout > 0 else None,
        # A per-channel bias right before a normalisation layer is cancelled by it.
        bias=norm is None,
        is_transposed=transposed,
        padding=padding,
        output_padding=0 if transposed else None,
    )


class _ResidualUnit(nn.Module):
    """Stride-1 3x3 conv stack with a shortcut, activated after the addition."""

    def __init__(
        self, spatial_dims: int, in_channels: int, channels: Sequence[int], norm, act, dropout: float
    ) -> None:
        super().__init__()
        layers = []
        width = in_channels
        for i, out in enumerate(channels):
            last = i == len(channels) - 1
            layers.append(_conv(spatial_dims, width, out, 3, norm, None if last else act, dropout))
            width = out
        self.body = nn.Sequential(*layers)
        self.shortcut: nn.Module = (
            nn.Identity() if width == in_channels else _conv(spatial_dims, in_channels, width, 1, norm, None)
        )
        self.act = get_act_layer(act)
        self.out_channels = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class _DownBlock(nn.Module):
    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        down_channels: int,
        down_kernel: int,
        unit_channels: Sequence[int],
        norm,
        act,
        dropout: float,
    ) -> None:
        super().__init__()
        self.down = _conv(spatial_dims, in_channels, down_channels, down_kernel, norm, act, strides=2)
        self.unit = _ResidualUnit(spatial_dims, down_channels, unit_channels, norm, act, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unit(self.down(x))


class _UpBlock(nn.Module):
    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        up_channels: int,
        skip_channels: int,
        unit_channels: Sequence[int],
        norm,
        act,
        dropout: float,
    ) -> None:
        super().__init__()
        self.up = _conv(spatial_dims, in_channels, up_channels, 2, norm, act, strides=2, transposed=True)
        self.unit = _ResidualUnit(spatial_dims, up_channels + skip_channels, unit_channels, norm, act, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.unit(torch.cat([self.up(x), skip], dim=1))


class ResidualUNet(nn.Module):
    """Residual U-Net of Table 1; see the module docstring for the layer-by-layer reading.

    Args:
        spatial_dims: 2 for slices (the paper's setting); 3 also works, with all sizes divisible by 8.
        in_channels: input channels.
        out_channels: number of logit channels: 1 for binary (sigmoid) segmentation, the number of classes
            including background for softmax segmentation.
        channels: widths (c0, c1, c2, c3) of Conv_1, Residual_block_1, Residual_block_2 and Residual_block_3.
        norm: MONAI norm spec (name or (name, kwargs)), or None.
        act: MONAI activation spec (name or (name, kwargs)).
        dropout: dropout probability inside the residual units; 0 disables it.
        features_pre_activation: return Residual_block_6's map before (True) or after (False) its final
            activation from ``forward_features``.

    Spatial sizes must be divisible by 8: eager calls raise ``ValueError`` otherwise, a TorchScript-compiled
    copy raises ``torch.jit.Error`` with the same message.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        norm="batch",
        act="relu",
        dropout: float = 0.0,
        features_pre_activation: bool = True,
        head_channels: int | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if len(channels) != 4 or any(int(c) < 1 for c in channels):
            raise ValueError(f"channels must be four positive widths (c0, c1, c2, c3), got {tuple(channels)}.")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels} and {out_channels}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        c0, c1, c2, c3 = (int(c) for c in channels)
        self.spatial_dims = spatial_dims
        # Three stride-2 stages; read from the instance because TorchScript cannot see module globals.
        self.size_divisor = 8
        self.out_channels = out_channels
        self.feature_channels = c0
        self.features_pre_activation = bool(features_pre_activation)

        self.conv_1 = _conv(spatial_dims, in_channels, c0, 3, norm, act)
        self.residual_block_1 = _DownBlock(spatial_dims, c0, c1, 2, [c1], norm, act, dropout)
        self.residual_block_2 = _DownBlock(spatial_dims, c1, c2, 2, [c2], norm, act, dropout)
        self.residual_block_3 = _DownBlock(spatial_dims, c2, c2, 3, [c3, c3], norm, act, dropout)
        self.residual_block_4 = _UpBlock(spatial_dims, c3, c2, c2, [2 * c2] * 3, norm, act, dropout)
        self.residual_block_5 = _UpBlock(spatial_dims, 2 * c2, c1, c1, [2 * c1], norm, act, dropout)
        self.residual_block_6_unit = _ResidualUnit(spatial_dims, 2 * c1, [2 * c1], norm, act, dropout)
        # The activation is kept outside the transposed conv so that its input can be returned as features.
        self.residual_block_6_up = _conv(spatial_dims, 2 * c1, c0, 2, norm, None, strides=2, transposed=True)
        self.residual_block_6_act = get_act_layer(act)
        if hasattr(self.residual_block_6_act, "inplace"):
            # An in-place activation would overwrite the pre-activation features handed out to the caller.
            self.residual_block_6_act.inplace = False
        # the table's two-channel bottleneck serves a one-channel sigmoid output; a C-class softmax squeezed
        # through C ReLU channels learned so slowly that, on noisy labels, it settled on all-background
        head = int(head_channels) if head_channels is not None else (2 if out_channels == 1 else 4 * out_channels)
        self.conv_2 = nn.Sequential(
            _conv(spatial_dims, 2 * c0, 2 * c0, 3, norm, act),
            _conv(spatial_dims, 2 * c0, head, 3, norm, act),
            Convolution(spatial_dims, head, out_channels, kernel_size=1, conv_only=True, bias=True),
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"ResidualUNet expects a (batch, channels, {self.spatial_dims} spatial dims) input, "
                f"got shape {list(x.shape)}."
            )
        for size in x.shape[2:]:
            if size % self.size_divisor != 0:
                raise ValueError(
                    f"ResidualUNet needs every spatial size divisible by 8 (three stride-2 down-samplings), "
                    f"got input shape {list(x.shape)}; pad or crop the input."
                )

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_input(x)
        e0 = self.conv_1(x)
        e1 = self.residual_block_1(e0)
        e2 = self.residual_block_2(e1)
        b = self.residual_block_3(e2)
        d2 = self.residual_block_4(b, e2)
        d1 = self.residual_block_5(d2, e1)
        pre = self.residual_block_6_up(self.residual_block_6_unit(d1))
        post = self.residual_block_6_act(pre)
        logits = self.conv_2(torch.cat([post, e0], dim=1))
        if self.features_pre_activation:
            return logits, pre
        return logits, post

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (B, out_channels, *spatial); no sigmoid/softmax applied."""
        return self._run(x)[0]

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, Residual_block_6 features of shape (B, c0, *spatial) at the input resolution)."""
        return self._run(x)


def unwrap(network: nn.Module) -> nn.Module:
    """The network inside a ``DistributedDataParallel`` or ``DataParallel`` wrapper, or the network itself."""
    return getattr(network, "module", network)
