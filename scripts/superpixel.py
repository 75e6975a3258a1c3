"""Superpixel-guided iterative learning (Li, Gao and He, MICCAI 2021): JoCoR's two networks, with SLIC superpixels
guiding both which pixels are trusted and how labels are refined.

* Selection: each pixel's joint loss is replaced by the mean joint loss of its superpixel before the small-loss
  selection, so a superpixel is kept or dropped as a whole (pixels of one superpixel share intensity and, mostly,
  the true class).
* Refinement: every ``interval`` epochs from ``start_epoch``, the two networks' averaged probabilities are averaged
  again over each superpixel of each training slice; where that mean's top class reaches ``conf_thres`` the whole
  superpixel takes that class, elsewhere the manual label stays. The refined labels live in the bundle's
  pseudo-label store (checkpointed, augmented with the image) and are what the networks learn from.

The math is in :func:`slic_segments`, :func:`superpixel_mean` and :func:`refine_labels`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.engines import PrepareBatch
from skimage.segmentation import slic

from scripts.competitors import predict_slices
from scripts.engine import HybridPrepareBatch
from scripts.jocor import JoCoRLoss
from scripts.store import PseudoLabelStore

__all__ = ["slic_segments", "segment_count", "batch_segments", "superpixel_mean", "refine_labels",
           "SuperpixelPrepareBatch", "SuperpixelJoCoRLoss", "SuperpixelRefinement"]


def slic_segments(image, n_segments: int = 100, compactness: float = 0.1) -> torch.Tensor:
    """SLIC superpixels of one 2D image (H, W) as an int64 tensor of ids 0..S-1 (connected segments).

    The image is min-max scaled to [0, 1] first, so ``compactness`` means the same for any intensity range
    (scikit-image's 2D grey-level SLIC; about 0.1 balances intensity and distance at this scale).
    """
    img = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"expected one 2D image, got shape {img.shape}")
    lo, hi = img.min(), img.max()
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    seg = slic(img, n_segments=n_segments, compactness=compactness, channel_axis=None, start_label=0,
               enforce_connectivity=True)
    return torch.as_tensor(seg, dtype=torch.int64)


def segment_count(shape, pixels_per_segment: float) -> int:
    """How many superpixels SLIC is asked for on an image of ``shape`` (H, W): its area over the target size."""
    return max(1, int(round(shape[0] * shape[1] / pixels_per_segment)))


def batch_segments(images: torch.Tensor, pixels_per_segment: float = 80.0, compactness: float = 0.1
                   ) -> torch.Tensor:
    """:func:`slic_segments` of each (1, H, W) image of a batch: (B, 1, H, W) int64."""
    n = segment_count(images.shape[-2:], pixels_per_segment)
    return torch.stack([slic_segments(im[0], n, compactness) for im in images])[:, None]


def superpixel_mean(values: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Replace every value by the mean over its superpixel, per image.

    Args:
        values: (B, H, W) or (B, C, H, W) float.
        segments: (B, H, W) integer superpixel ids (any non-negative ids; per image).
    Returns:
        the same shape as ``values``.
    """
    squeeze = values.dim() == 3
    v = values[:, None] if squeeze else values
    b, c = v.shape[:2]
    seg = segments.long().reshape(b, -1)
    n_seg = int(seg.max()) + 1 if seg.numel() else 1
    ids = seg + torch.arange(b, device=seg.device)[:, None] * n_seg  # one id range per image
    flat_ids = ids.reshape(-1)
    flat = v.movedim(1, -1).reshape(-1, c).to(torch.float64)
    sums = torch.zeros(b * n_seg, c, dtype=torch.float64, device=v.device).index_add_(0, flat_ids, flat)
    counts = torch.zeros(b * n_seg, dtype=torch.float64, device=v.device).index_add_(
        0, flat_ids, torch.ones_like(flat_ids, dtype=torch.float64))
    means = sums / counts.clamp_min(1)[:, None]
    out = means[flat_ids].reshape(b, -1, c).movedim(-1, 1).reshape(v.shape).to(values.dtype)
    return out[:, 0] if squeeze else out


def refine_labels(label: torch.Tensor, probs: torch.Tensor, segments: torch.Tensor, conf_thres: float = 0.5
                  ) -> torch.Tensor:
    """Superpixel-wise label refinement.

    Args:
        label: (B, H, W) given class indices.
        probs: (B, C, H, W) class probabilities.
        segments: (B, H, W) superpixel ids.
        conf_thres: a superpixel is relabelled when the top class of its mean probability reaches this value.
    Returns:
        (B, H, W): in every confident superpixel all pixels take its top class; the others keep ``label``.
    """
    mean = superpixel_mean(probs.float(), segments)
    conf, cls = mean.max(1)
    return torch.where(conf >= conf_thres, cls.to(label.dtype), label)


class SuperpixelPrepareBatch(PrepareBatch):
    """``(image, [label, refined label, superpixels])``: the batch's SLIC superpixels, computed on the augmented
    images, travel as the last target channel."""

    def __init__(self, pixels_per_segment: float = 80.0, compactness: float = 0.1) -> None:
        self.pixels_per_segment, self.compactness = float(pixels_per_segment), float(compactness)

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        image, target = HybridPrepareBatch()(batchdata, device, non_blocking, **kwargs)
        seg = batch_segments(image.cpu(), self.pixels_per_segment, self.compactness).to(device=target.device,
                                                                                dtype=target.dtype)
        return image, torch.cat([target, seg], 1)


class SuperpixelJoCoRLoss(JoCoRLoss):
    """JoCoR's objective on the refined labels, with the small-loss selection ranking superpixel-mean losses.

    The target is ``[label, refined, superpixels]`` (or ``[label, superpixels]`` before a store is attached).
    """

    def label(self, target: torch.Tensor) -> torch.Tensor:
        return target[:, 1 if target.shape[1] >= 3 else 0].round().long()

    def selection_scores(self, pixel_loss: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return superpixel_mean(pixel_loss, target[:, -1].long())


class SuperpixelRefinement:
    """Every ``interval`` epochs from the end of epoch ``start_epoch`` (run as the next epoch starts), refine the
    manual labels of all training slices with :func:`refine_labels` and write them to the pseudo-label store the
    training batches read.

    Superpixels of the un-augmented slices are computed once and cached (they depend on the image only).

    Args:
        networks: the two networks whose averaged probabilities are used.
        dataset: the training ``SliceDataset``; the store is attached to it.
        store: the bundle's ``PseudoLabelStore`` (checkpointed by the bundle's training state); until the first
            refinement it holds a copy of the manual labels.
    """

    def __init__(self, networks: list, dataset, store: PseudoLabelStore, start_epoch: int, interval: int = 5,
                 conf_thres: float = 0.5, pixels_per_segment: float = 80.0, compactness: float = 0.1,
                 batch_size: int = 32,
                 enabled: bool = True) -> None:
        if interval < 1 or start_epoch < 0:
            raise ValueError(f"need interval >= 1 and start_epoch >= 0, got {interval} and {start_epoch}")
        self.networks, self.dataset, self.store = list(networks), dataset, store
        self.start_epoch, self.interval, self.conf_thres = int(start_epoch), int(interval), float(conf_thres)
        self.pixels_per_segment, self.compactness = float(pixels_per_segment), float(compactness)
        self.batch_size = int(batch_size)
        self.enabled = enabled
        self._segments: torch.Tensor | None = None
        self.logger = logging.getLogger(self.__class__.__name__)

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        self.store.ensure(self.dataset.labels())
        if not self.store.has_pseudo.all():
            # until the first refinement the networks learn from the manual labels
            self.store.labels.copy_(self.dataset.labels())
        self.dataset.store = self.store
        # run at the start of the next epoch rather than at the end of this one: the bundle's training state is
        # saved at the end of an epoch by a handler attached earlier, and a resumed run then redoes the refinement
        # from the restored networks instead of losing it
        engine.add_event_handler(Events.EPOCH_STARTED(event_filter=self._due), self)

    def _due(self, engine: Engine, epoch: int) -> bool:
        done = epoch - 1  # epochs completed
        return done >= self.start_epoch and done > 0 and (done - self.start_epoch) % self.interval == 0

    def segments(self) -> torch.Tensor:
        if self._segments is None:
            n = segment_count(self.dataset.data[0]["image"].shape[-2:], self.pixels_per_segment)
            self._segments = torch.stack([slic_segments(s["image"][0], n, self.compactness).to(torch.int32)
                                          for s in self.dataset.data])
        return self._segments

    def __call__(self, engine: Engine) -> None:
        manual = self.dataset.labels()
        segments = self.segments()
        refined = torch.empty_like(manual)
        for start in range(0, len(manual), self.batch_size):
            ids = list(range(start, min(start + self.batch_size, len(manual))))
            probs = predict_slices(self.networks, self.dataset, ids, self.batch_size)
            refined[ids] = refine_labels(manual[ids], probs, segments[ids], self.conf_thres).to(manual.dtype)
        changed = (refined != manual).flatten(1).any(1)
        summary = {"epoch": engine.state.epoch - 1, "refined_slices": int(changed.sum()),
                   "refined_pixel_fraction": float((refined != manual).float().mean())}
        clean = self.dataset.clean_labels() if hasattr(self.dataset, "clean_labels") else None
        if clean is not None:
            summary["pixel_error_manual"] = float((manual != clean).float().mean())
            summary["pixel_error_refined"] = float((refined != clean).float().mean())
        self.store.record_refinement(refined, changed, summary)
        self.logger.info("superpixel refinement: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else
                                                              f"{k} {v}" for k, v in summary.items()))
