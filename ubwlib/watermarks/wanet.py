"""WaNet (Nguyen and Tran, ICLR 2021): a smooth, fixed image warp as the trigger.

The warping field follows the public toolbox: a k x k control grid drawn from U(-1, 1), divided by its mean
absolute value, upsampled bicubically to H x W (``align_corners=True``); the sampling grid is
``clamp((identity + s * field / H) * grid_rescale, -1, 1)`` and images are warped with
``torch.nn.functional.grid_sample(..., align_corners=True)``. The field is drawn once from the watermark's
seed and stored in the key, so training and test use the same warp.

Noise mode (optional): another ``cross_ratio * gamma * N`` samples are warped with the field plus random
per-sample noise (``U(-1, 1) / H``) and keep their true labels, so the model learns that only the exact
warp is the trigger.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import ImageDataset
from .base import (
    Watermark,
    WatermarkedDataset,
    WatermarkKey,
    check_rate,
    check_redraw,
    check_target,
    draw_different,
    poison_count,
    redrawn_key,
    register,
)

__all__ = ["WaNetSettings", "WaNet", "warp_field", "warp"]


@dataclass(frozen=True)
class WaNetSettings:
    poisoning_rate: float = 0.1
    target: int = 1
    k: int = 4
    """Size of the control grid (toolbox default 4; the UBW-P WaNet script used 16)."""
    s: float = 0.5
    """Strength of the warp."""
    grid_rescale: float = 1.0
    noise_mode: bool = False
    cross_ratio: float = 2.0
    """Noise mode: number of noise samples = cross_ratio * number of poisoned samples."""

    def __post_init__(self) -> None:
        check_rate(self.poisoning_rate)
        if self.k < 2:
            raise ValueError(f"k (control grid size) must be >= 2, got {self.k}")
        if not self.s > 0:
            raise ValueError(f"s (warp strength) must be > 0, got {self.s}")
        if self.cross_ratio < 0:
            raise ValueError(f"cross_ratio must be >= 0, got {self.cross_ratio}")


def warp_field(height: int, width: int, k: int, s: float, grid_rescale: float, generator: torch.Generator) -> torch.Tensor:
    """The 1 x H x W x 2 sampling grid of WaNet (x, y order, in [-1, 1])."""
    ins = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
    ins = ins / ins.abs().mean()
    noise = F.interpolate(ins, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    ys = torch.linspace(-1, 1, height)
    xs = torch.linspace(-1, 1, width)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    identity = torch.stack((gx, gy), dim=2)[None]
    return torch.clamp((identity + s * noise / height) * grid_rescale, -1, 1)


def warp(images: torch.Tensor, grid: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Warp uint8 images with a 1 x H x W x 2 grid (or one grid per image); returns uint8."""
    out = torch.empty_like(images)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].float().div_(255)
        g = grid if grid.shape[0] == 1 else grid[start : start + chunk]
        y = F.grid_sample(x, g.expand(len(x), -1, -1, -1), mode="bilinear", padding_mode="zeros", align_corners=True)
        out[start : start + chunk] = y.mul_(255).round_().clamp_(0, 255).to(torch.uint8)
    return out


@register
class WaNet(Watermark):
    """WaNet: warped images labelled y_t; optional noise mode."""

    name = "wanet"
    label_type = "poisoned"
    targeted = True
    Settings = WaNetSettings

    def watermark(self, train_set: ImageDataset, seed: int = 0) -> WatermarkedDataset:
        self._check_train_set(train_set)
        s = self.settings
        target = check_target(s.target, train_set.num_classes)
        n = len(train_set)
        _, h, w = train_set.image_shape
        gen = torch.Generator().manual_seed(seed)
        grid = warp_field(h, w, s.k, s.s, s.grid_rescale, gen)
        n_poison = poison_count(s.poisoning_rate, n)
        order = torch.randperm(n, generator=gen)
        idx = order[:n_poison].sort().values
        images = train_set.images.clone()
        labels = train_set.labels.clone()
        images[idx] = warp(images[idx], grid)
        labels[idx] = target
        noise_idx = torch.empty(0, dtype=torch.long)
        if s.noise_mode and s.cross_ratio > 0:
            n_noise = min(int(round(s.cross_ratio * n_poison)), n - n_poison)
            noise_idx = order[n_poison : n_poison + n_noise].sort().values
            jitter = (torch.rand(len(noise_idx), h, w, 2, generator=gen) * 2 - 1) / h
            images[noise_idx] = warp(images[noise_idx], torch.clamp(grid + jitter, -1, 1))
        return self._release(train_set, images, labels, idx, {"grid": grid}, seed, target, noise_idx)

    @classmethod
    def apply(cls, images: torch.Tensor, key: WatermarkKey, generator: torch.Generator | None = None) -> torch.Tensor:
        return warp(images, key.tensors["grid"])

    @classmethod
    def redraw(cls, key: WatermarkKey, seed: int) -> WatermarkKey:
        """Another warping field: :func:`warp_field` with the key's ``k``, ``s`` and ``grid_rescale`` from a
        generator seeded with ``seed`` (drawn again should it equal the key's own)."""
        seed = check_redraw(cls, key, seed, ("grid",))
        grid = key.tensors["grid"].cpu()
        try:
            settings = key.settings
            k, strength, rescale = int(settings["k"]), float(settings["s"]), float(settings.get("grid_rescale", 1.0))
        except KeyError as exc:
            raise NotImplementedError(f"the {key.method} key's settings lack {exc}; cannot draw another warping "
                                      "field") from None
        _, h, w = key.image_shape

        def draw(g: torch.Generator) -> torch.Tensor:
            return warp_field(h, w, k, strength, rescale, g).to(grid.dtype)

        new = draw_different(draw, grid, torch.Generator().manual_seed(seed), "warping field")
        return redrawn_key(key, seed, grid=new)
