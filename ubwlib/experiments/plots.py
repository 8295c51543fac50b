"""Figures shared by several chapters (matplotlib/seaborn, imported lazily)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

__all__ = ["GRID_GAP", "grid_row", "image_grid", "confusion_heatmaps"]


#: Pixels of white between the images of a row of :func:`image_grid`.
GRID_GAP = 2


def grid_row(imgs: torch.Tensor, ncol: int, gap: int = GRID_GAP, magnify: float | None = None) -> np.ndarray:
    """One row of :func:`image_grid` as a single uint8 array: the N (<= ``ncol``) images of ``imgs`` (N x C x H x W)
    side by side, ``gap`` white pixels apart, white where a row has fewer than ``ncol``; H x W' (one channel) or
    H x W' x C. ``magnify``: difference images shown as ``|value| x magnify``, clipped to 255."""
    imgs = imgs.detach().cpu()
    n, ch, h, w = imgs.shape
    if n > ncol:
        raise ValueError(f"a row holds at most ncol={ncol} images; got {n}")
    row = np.full((h, ncol * w + (ncol - 1) * gap, ch), 255, dtype=np.uint8)
    for c in range(n):
        arr = imgs[c].numpy().transpose(1, 2, 0)
        if magnify is not None:
            arr = np.clip(np.abs(arr.astype(np.float32)) * magnify, 0, 255).astype(np.uint8)
        row[:, c * (w + gap):c * (w + gap) + w] = arr
    return row[:, :, 0] if ch == 1 else row


def image_grid(rows: dict[str, torch.Tensor], titles: list[str] | None = None, scale: float = 1.6,
               cmap: str = "gray", magnify: dict[str, float] | None = None):
    """A grid of uint8 images: one row per entry of ``rows`` (label -> N x C x H x W), N columns, the label on
    the left and ``titles`` above the columns.

    ``magnify`` maps a row label to a factor for difference images (shown as |values| x factor, clipped). Each row
    is drawn as one image (:func:`grid_row`): one matplotlib Axes per row, not per picture, which made a 3 x 8
    grid take 0.4 s (most of it creating 24 Axes)."""
    import matplotlib.pyplot as plt

    labels = list(rows)
    ncol = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(labels), 1, figsize=(scale * ncol, scale * len(labels)), squeeze=False)
    for r, lab in enumerate(labels):
        ax = axes[r, 0]
        row = grid_row(rows[lab], ncol, magnify=(magnify or {}).get(lab))
        ax.imshow(row, cmap=cmap if row.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_yticks([])
        ax.set_ylabel(lab, rotation=0, ha="right", va="center", fontsize=9)
        ax.grid(False)
        for side in ax.spines.values():
            side.set_visible(False)
        width = rows[lab].shape[-1]
        if r == 0 and titles:
            ax.set_xticks([c * (width + GRID_GAP) + (width - 1) / 2 for c in range(min(len(titles), ncol))])
            ax.set_xticklabels(titles[:ncol], fontsize=8)
            ax.xaxis.tick_top()
            ax.tick_params(axis="x", length=0)
        else:
            ax.set_xticks([])
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
