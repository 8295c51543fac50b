"""Figures shared by several chapters (matplotlib/seaborn, imported lazily)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

__all__ = ["image_grid", "confusion_heatmaps"]


def _to_hwc(img: torch.Tensor) -> np.ndarray:
    arr = img.detach().cpu().numpy()
    return arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))


def image_grid(rows: dict[str, torch.Tensor], titles: list[str] | None = None, scale: float = 1.6,
               cmap: str = "gray", magnify: dict[str, float] | None = None):
    """A grid of uint8 images: one row per entry of ``rows`` (label -> N x C x H x W), N columns.

    ``magnify`` maps a row label to a factor for difference images (shown as |values| x factor, clipped)."""
    import matplotlib.pyplot as plt

    labels = list(rows)
    ncol = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(labels), ncol, figsize=(scale * ncol, scale * len(labels)), squeeze=False)
    for r, lab in enumerate(labels):
        imgs = rows[lab]
        for c in range(ncol):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(imgs):
                arr = _to_hwc(imgs[c])
                if magnify and lab in magnify:
                    arr = np.clip(np.abs(arr.astype(np.float32)) * magnify[lab], 0, 255).astype(np.uint8)
                ax.imshow(arr, cmap=cmap if arr.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
            else:
                ax.axis("off")
            if c == 0:
                ax.set_ylabel(lab, rotation=0, ha="right", va="center", fontsize=9)
            if r == 0 and titles and c < len(titles):
                ax.set_title(titles[c], fontsize=8)
    fig.tight_layout()
    return fig


def confusion_heatmaps(matrices: dict[str, pd.DataFrame], suptitle: str | None = None, annotate: bool = False):
    """Side-by-side seaborn heatmaps of row-normalised confusion matrices (true x predicted)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    n = len(matrices)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.4), squeeze=False)
    for ax, (title, cm) in zip(axes[0], matrices.items()):
        sns.heatmap(cm, ax=ax, vmin=0, vmax=1, cmap="viridis", cbar=ax is axes[0, -1], square=True,
                    annot=annotate, fmt=".2f", annot_kws={"fontsize": 6})
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("predicted (triggered)")
        ax.set_ylabel("true class" if ax is axes[0, 0] else "")
        ax.tick_params(labelsize=7)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig
