"""How far a drawn contour lies from the predicted one, as a per-slice statistic for the label filter.

A label drawn too wide or too tight (boundary noise: a structure dilated or eroded by a few pixels) disagrees with a
reasonable prediction on one side of the contour only, all the way round. The network's own errors on a correct
label fall on both sides and cancel in the area. So the net area difference of a structure divided by the length of
its contour reads the mean displacement of the drawn contour, in pixels, and stays near zero for a correct label
however imperfect the prediction. The label filter's refit judges the drawn labels by it
(``LabelFilter(refit_statistic="contour_offset")``), where their loss overlaps with that of correct labels
(docs/README.md, *Left atrium*).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["contour_length", "contour_offset"]


def contour_length(mask: torch.Tensor) -> torch.Tensor:
    """(N,) the number of pixels of each (N, H, W) mask with a 4-neighbour outside it; the image border does not
    count as outside. It runs a little short of the perimeter (64 pixels for a disc of radius 12, whose perimeter is
    75), so a displacement reads a little long."""
    m = torch.as_tensor(mask).to(torch.bool)
    p = F.pad(m[:, None].to(torch.float32), (1, 1, 1, 1), value=1.0)[:, 0] > 0.5
    interior = m & p[:, :-2, 1:-1] & p[:, 2:, 1:-1] & p[:, 1:-1, :-2] & p[:, 1:-1, 2:]
    return (m & ~interior).flatten(1).sum(1).to(torch.float32)


def contour_offset(prediction: torch.Tensor, label: torch.Tensor, num_classes: int,
                   chunk: int = 256) -> torch.Tensor:
    """(N,) float64: per slice, the mean over the foreground classes of ``|area(label) - area(prediction)|``
    divided by the longer of the two contours, in pixels (0 for a class absent from both).

    Args:
        prediction: (N, H, W) integer class map of the network.
        label: (N, H, W) integer class map to judge (the manual label); values outside ``1..num_classes-1`` count
            as background.
        num_classes: classes including background (2 for a binary task).
        chunk: slices per step, to bound memory.
    """
    prediction, label = torch.as_tensor(prediction), torch.as_tensor(label)
    if prediction.ndim != 3 or prediction.shape != label.shape:
        raise ValueError(f"prediction and label must be (N, H, W) of one shape, got {tuple(prediction.shape)} and "
                         f"{tuple(label.shape)}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes}")
    n = prediction.shape[0]
    out = torch.zeros(n, dtype=torch.float64)
    for start in range(0, n, chunk):
        p, y = prediction[start:start + chunk].long(), label[start:start + chunk].long()
        total = torch.zeros(p.shape[0], dtype=torch.float64)
        for k in range(1, int(num_classes)):
            pk, yk = p == k, y == k
            area = (yk.flatten(1).sum(1) - pk.flatten(1).sum(1)).abs().double()
            length = torch.maximum(contour_length(pk), contour_length(yk)).double().clamp(min=1.0)
            total += area / length
        out[start:start + chunk] = total / (int(num_classes) - 1)
    return out
