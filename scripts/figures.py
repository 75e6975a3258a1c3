"""Pictures of a cleansing round: the GMM fit over the loss histogram (Fig. 2), grid representation maps (Fig. 3)
and pseudo-label examples (Fig. 7). Each function takes tensors and returns an RGB array (H, W, 3) uint8, so it can
go to a PNG file and to TensorBoard alike."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # figures are written to files; never open a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from scripts.filtering import FilterResult, normalise_losses  # noqa: E402

__all__ = ["gmm_figure", "representation_figure", "pseudo_label_figure", "save_png"]

# background transparent, then RV, Myo, LV (and further classes cycle)
LABEL_COLOURS = ListedColormap([(0, 0, 0, 0), (0.2, 0.4, 1.0, 0.55), (1.0, 0.2, 0.2, 0.55), (1.0, 0.6, 0.0, 0.55)])


def _to_rgb(fig) -> np.ndarray:
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


def save_png(rgb: np.ndarray, path: str) -> None:
    plt.imsave(path, rgb)


def gmm_figure(losses: torch.Tensor, result: FilterResult, title: str, true_noisy: torch.Tensor | None = None):
    """Histogram of the normalised losses with the two fitted Gaussians; split by the true flags when known."""
    x = normalise_losses(losses).numpy()
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    bins = np.linspace(0, 1, 41)
    if true_noisy is not None:
        flags = true_noisy.numpy().astype(bool)
        ax.hist([x[~flags], x[flags]], bins=bins, stacked=True, density=True, color=["tab:green", "tab:red"],
                alpha=0.6, label=["truly clean", "truly noisy"])
    else:
        ax.hist(x, bins=bins, density=True, color="tab:gray", alpha=0.6, label="samples")
    if result.status == "ok":
        grid = np.linspace(0, 1, 200)
        pdfs = np.asarray(result.component_pdfs(grid))
        for pdf, name, colour in zip(pdfs, ("clean component", "noisy component"), ("green", "red")):
            ax.plot(grid, pdf, color=colour, lw=2, label=name)
    ax.set_xlabel("normalised per-sample loss")
    ax.set_ylabel("density")
    ax.set_title(f"{title} ({result.status}): {int(result.clean.sum())} clean / {int((~result.clean).sum())} noisy",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _to_rgb(fig)


def representation_figure(image: torch.Tensor, degree_maps: list[torch.Tensor], names: list[str]) -> np.ndarray:
    """The image beside each class's normalised representation degree D on the grid (Eq. 5)."""
    fig, axes = plt.subplots(1, 1 + len(degree_maps), figsize=(2.4 * (1 + len(degree_maps)), 2.6), dpi=100)
    axes = np.atleast_1d(axes)
    axes[0].imshow(image.numpy(), cmap="gray")
    axes[0].set_title("image", fontsize=8)
    for ax, dmap, name in zip(axes[1:], degree_maps, names):
        ax.imshow(dmap.numpy(), cmap="jet", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"D, {name}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return _to_rgb(fig)


def pseudo_label_figure(images: torch.Tensor, rows: dict[str, torch.Tensor]) -> np.ndarray:
    """One column per sample, one row per label map (e.g. clean, manual, prediction, pseudo) over the image."""
    n = images.shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.9 * n, 1.9 * len(rows)), dpi=100, squeeze=False)
    for r, (name, maps) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(images[c].numpy(), cmap="gray")
            lab = maps[c].numpy()
            ax.imshow(np.where(lab == 255, 0, lab), cmap=LABEL_COLOURS, vmin=0, vmax=3, interpolation="nearest")
            if (lab == 255).any():  # unsupervised pixels of an agreement pseudo-label, hatched grey
                ax.imshow(np.ma.masked_where(lab != 255, lab), cmap="Greys", vmin=0, vmax=400, alpha=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    return _to_rgb(fig)
