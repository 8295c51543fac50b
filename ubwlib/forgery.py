"""Forged ownership claims: a trigger chosen *after the fact* against an innocent model.

The t-test of Proposition 1 asks whether a trigger lowers the true-class probability of a suspicious model by
more than ``tau``. Anyone can search for such a trigger on a model that never saw the protected data: a universal
adversarial patch of the same size and placement as a real watermark's trigger, optimised on public images to
lower the model's true-class probability. :func:`forge_key` builds that forged key (same method, same trigger
geometry, a pattern of the forger's choosing), so the book can measure how often innocent models would be
"flagged" with it, and show that a commitment to the key published with the dataset (:mod:`ubwlib.publish`)
rejects every key made later.

The forger optimises a pattern ``sigmoid(z)`` in [0, 1] with Adam on the mean true-class probability of the
triggered images, in float, with the trigger applied the way the key's method applies it (a blend with the key's
``alpha`` for BadNets, Blended and UBW-P; a patch pasted at a random position per image for UBW-C and Sleeper
Agent). The released pattern is rounded to uint8.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .train import resolve_device
from .watermarks import WatermarkKey
from .watermarks.patch import paste_random

__all__ = ["forge_key", "FORGEABLE"]

#: Key layouts a forger can reproduce: blend triggers (``pattern`` + ``alpha``) and random-position patches.
FORGEABLE = ("blend", "patch")


def _layout(key: WatermarkKey) -> str:
    if {"pattern", "alpha"} <= set(key.tensors):
        return "blend"
    if "patch" in key.tensors:
        return "patch"
    raise NotImplementedError(f"forging a {key.method} key is not supported: its trigger is neither a blend "
                              "(pattern + alpha) nor a random-position patch")


def forge_key(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, template: WatermarkKey, *,
              steps: int = 100, lr: float = 0.1, batch_size: int = 256, seed: int = 0, device=None) -> WatermarkKey:
    """A forged key: ``template``'s method and trigger geometry (where the pattern goes, its blend weight or
    patch size) with a pattern optimised to lower ``model``'s probability of the true label on ``images``
    (uint8, N x C x H x W; the forger's public images, with ``labels``). ``steps`` Adam steps (``lr``) on
    batches of ``batch_size`` drawn with ``seed``; the forged key carries ``seed`` as its own."""
    if not isinstance(template, WatermarkKey):
        raise TypeError(f"template must be a WatermarkKey, got {type(template).__name__}")
    template.check_images(images)
    if len(images) != len(labels) or not len(images):
        raise ValueError(f"images and labels must be non-empty and of the same length, got {len(images)} and "
                         f"{len(labels)}")
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"steps and batch_size must be >= 1 and lr > 0, got {steps}, {batch_size}, {lr}")
    layout = _layout(template)
    dev = resolve_device(device)
    model = model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(int(seed))
    if layout == "blend":
        alpha = template.tensors["alpha"].float().to(dev)
        shape = alpha.shape
    else:
        shape = template.tensors["patch"].shape
    z = (torch.randn(shape, generator=gen) * 0.1).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    try:
        for _ in range(steps):
            idx = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=gen)
            x = images[idx].to(dev).float().div(255)
            y = labels[idx].to(dev)
            pattern = torch.sigmoid(z)
            if layout == "blend":
                xt = torch.lerp(x, pattern.expand_as(x), alpha.expand_as(x))
            else:
                xt = paste_random(x, pattern, gen)
            prob = F.softmax(model(xt).float(), 1).gather(1, y[:, None]).mean()
            opt.zero_grad(set_to_none=True)
            prob.backward()
            opt.step()
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    forged = (torch.sigmoid(z.detach()) * 255).round().clamp(0, 255).to(torch.uint8).cpu()
    tensors = dict(template.tensors)
    if layout == "blend":
        keep = template.tensors["alpha"] == 0
        tensors["pattern"] = torch.where(keep, template.tensors["pattern"], forged)
    else:
        tensors["patch"] = forged
    return dataclasses.replace(template, tensors=tensors, seed=int(seed))
