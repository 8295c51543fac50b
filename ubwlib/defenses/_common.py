"""Argument checks and helpers shared by the defenses (not part of the public API)."""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..data import ImageDataset
from ..train import resolve_device

#: ``evaluate(model) -> dict`` of metrics, as the defenses take it.
Evaluate = Callable[[nn.Module], Mapping[str, Any]]

#: Slack for products like ``0.3 * 10`` that land a hair below an integer in floating point.
FLOOR_EPS = 1e-9


def check_real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    return value


def check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return int(value)


def as_images(images: torch.Tensor | ImageDataset, name: str = "images") -> torch.Tensor:
    """uint8 (or float in [0, 1]) N x C x H x W images from a tensor or an ImageDataset."""
    if isinstance(images, ImageDataset):
        return images.images
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or an ImageDataset; got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{name} must be N x C x H x W; got shape {tuple(images.shape)}")
    return images


def model_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return resolve_device(device)
    p = next(model.parameters(), None)
    if p is None:
        p = next(model.buffers(), None)
    return p.device if p is not None else resolve_device(None)


def evaluate_row(evaluate: Evaluate, model: nn.Module, reserved: Iterable[str]) -> dict[str, Any]:
    """``evaluate(model)`` with the model in eval mode, checked: a dict without the ``reserved`` column names."""
    model.eval()
    out = evaluate(model)
    if not isinstance(out, Mapping):
        raise TypeError(f"evaluate(model) must return a dict of metrics; got {type(out).__name__}")
    clash = sorted(set(out) & set(reserved))
    if clash:
        raise ValueError(f"evaluate(model) returned reserved column names {clash}; rename them")
    return dict(out)
