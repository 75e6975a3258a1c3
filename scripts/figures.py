"""Pictures of a cleansing round: the GMM fit over the loss histogram (Fig. 2), grid representation maps (Fig. 3)
and pseudo-label examples (Fig. 7). Each function takes tensors and returns an RGB array (H, W, 3) uint8, so it can
go to a PNG file and to TensorBoard alike.

The image panels are composed as one array with NumPy and placed on the figure as they are; matplotlib only adds
the names. A grid of sixteen axes took most of a round's drawing time, and the figures are drawn every round."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # figures are written to files; never open a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from scripts.filtering import FilterResult, normalise_losses  # noqa: E402
from scripts.ignore_index import IGNORE_INDEX  # noqa: E402

__all__ = ["gmm_figure", "representation_figure", "pseudo_label_figure", "label_overlay", "degree_panel", "mosaic",
           "save_png"]

# RV, Myo, LV; further classes cycle through these
CLASS_COLOURS = ((0.2, 0.4, 1.0), (1.0, 0.2, 0.2), (1.0, 0.6, 0.0))
CLASS_ALPHA = 0.55
UNSUPERVISED_COLOUR, UNSUPERVISED_ALPHA = (0.55, 0.55, 0.55), 0.6
GAP = 2  # white pixels between the panels of a mosaic
PANEL_PIXELS = 180  # shown height of one panel, reached by a whole enlargement factor
MARGIN = 10  # pixels around a mosaic without names


def _to_rgb(fig) -> np.ndarray:
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


def save_png(rgb: np.ndarray, path: str) -> None:
    plt.imsave(path, rgb)


def _unit_grey(image: torch.Tensor) -> np.ndarray:
    """The image scaled to [0, 1] by its own range (as ``imshow`` would), as (H, W, 3)."""
    x = image.detach().float().cpu().numpy()
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return np.repeat(x[..., None], 3, axis=-1)


def label_overlay(image: torch.Tensor, label: torch.Tensor) -> np.ndarray:
    """The image in grey with each class blended in its colour and the unsupervised pixels (255) in grey;
    float (H, W, 3) in [0, 1]."""
    if image.shape != label.shape:
        raise ValueError(f"image {tuple(image.shape)} and label {tuple(label.shape)} differ in shape")
    rgb = _unit_grey(image)
    lab = label.detach().cpu().numpy()
    for value in np.unique(lab).tolist():
        if value == 0:
            continue
        if value == IGNORE_INDEX:
            colour, alpha = UNSUPERVISED_COLOUR, UNSUPERVISED_ALPHA
        else:
            colour, alpha = CLASS_COLOURS[(value - 1) % len(CLASS_COLOURS)], CLASS_ALPHA
        where = lab == value
        rgb[where] = (1 - alpha) * rgb[where] + alpha * np.asarray(colour)
    return rgb


def mosaic(panels: list[list[np.ndarray]]) -> np.ndarray:
    """Rows of equally sized (H, W, 3) panels in one array, with white gaps between them."""
    h, w, _ = panels[0][0].shape
    n_rows, n_cols = len(panels), max(len(row) for row in panels)
    out = np.ones((n_rows * (h + GAP) - GAP, n_cols * (w + GAP) - GAP, 3), dtype=np.float32)
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            if panel.shape != (h, w, 3):
                raise ValueError(f"panel ({r}, {c}) has shape {panel.shape}, expected {(h, w, 3)}")
            out[r * (h + GAP): r * (h + GAP) + h, c * (w + GAP): c * (w + GAP) + w] = panel
    return out


def _show_panels(panels: list[list[np.ndarray]], row_names=(), column_names=()) -> np.ndarray:
    """The panels' mosaic enlarged by a whole factor (each panel about ``PANEL_PIXELS`` high) and placed pixel for
    pixel on a figure (``figimage``, so nothing is resampled), with the names on the left and on top."""
    h, w, _ = panels[0][0].shape
    scale = max(1, round(PANEL_PIXELS / h))
    image = mosaic(panels)
    # uint8 RGBA is what the renderer takes as it is; float input would be normalised and converted on every draw
    rgba = np.concatenate([(image * 255).round().astype(np.uint8), np.full((*image.shape[:2], 1), 255, np.uint8)], -1)
    big = np.repeat(np.repeat(rgba, scale, axis=0), scale, axis=1)
    height, width = big.shape[:2]
    left, top, margin = (90 if row_names else MARGIN), (24 if column_names else MARGIN), MARGIN
    fig_w, fig_h = width + left + margin, height + top + margin
    fig = plt.figure(figsize=(fig_w / 100, fig_h / 100), dpi=100)
    fig.figimage(big, xo=left, yo=margin, origin="upper")
    for r, name in enumerate(row_names):
        y = margin + height - (r * (h + GAP) + h / 2) * scale
        fig.text((left - 6) / fig_w, y / fig_h, name, ha="right", va="center", fontsize=8)
    for c, name in enumerate(column_names):
        x = left + (c * (w + GAP) + w / 2) * scale
        fig.text(x / fig_w, (margin + height + 4) / fig_h, name, ha="center", va="bottom", fontsize=8)
    return _to_rgb(fig)


def gmm_figure(losses: torch.Tensor, result: FilterResult, title: str, true_noisy: torch.Tensor | None = None,
               xlabel: str = "normalised per-sample loss"):
    """Histogram of the normalised losses (or of the statistic the mixture was fitted on, named by ``xlabel``) with
    the two fitted Gaussians; split by the true flags when known.
    Drawn as filled outlines: one polygon per group draws much faster than a rectangle per bin."""
    x = normalise_losses(losses).numpy()
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.14, top=0.9)
    bins = np.linspace(0, 1, 41)
    if true_noisy is not None:
        flags = true_noisy.numpy().astype(bool)
        ax.hist([x[~flags], x[flags]], bins=bins, stacked=True, density=True, color=["tab:green", "tab:red"],
                alpha=0.6, label=["truly clean", "truly noisy"], histtype="stepfilled")
    else:
        ax.hist(x, bins=bins, density=True, color="tab:gray", alpha=0.6, label="samples", histtype="stepfilled")
    if result.status == "ok":
        grid = np.linspace(0, 1, 200)
        pdfs = np.asarray(result.component_pdfs(grid))
        for pdf, name, colour in zip(pdfs, ("clean component", "noisy component"), ("green", "red")):
            ax.plot(grid, pdf, color=colour, lw=2, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(f"{title} ({result.status}): {int(result.clean.sum())} clean / {int((~result.clean).sum())} noisy",
                 fontsize=9)
    ax.legend(fontsize=7)
    return _to_rgb(fig)


def degree_panel(degree: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """A (g, g) grid map with values in [0, 1] in the jet colours, each cell spread over the pixels of an image of
    ``shape`` that it covers (nearest cell); float (H, W, 3)."""
    h, w = shape
    d = degree.detach().float().cpu().numpy()
    rows, cols = np.arange(h) * d.shape[0] // h, np.arange(w) * d.shape[1] // w
    return matplotlib.colormaps["jet"](np.clip(d[np.ix_(rows, cols)], 0, 1))[..., :3].astype(np.float32)


def representation_figure(image: torch.Tensor, degree_maps: list[torch.Tensor], names: list[str]) -> np.ndarray:
    """The image beside each class's normalised representation degree D on the grid (Eq. 5)."""
    panels = [_unit_grey(image), *(degree_panel(d, tuple(image.shape)) for d in degree_maps)]
    return _show_panels([panels], column_names=["image", *(f"D, {n}" for n in names)])


def pseudo_label_figure(images: torch.Tensor, rows: dict[str, torch.Tensor]) -> np.ndarray:
    """One column per sample, one row per label map (e.g. clean, manual, prediction, pseudo) over the image;
    unsupervised pixels (255) in grey."""
    panels = [[label_overlay(images[c], maps[c]) for c in range(images.shape[0])] for maps in rows.values()]
    return _show_panels(panels, row_names=list(rows))
