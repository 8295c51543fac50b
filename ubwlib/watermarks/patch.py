"""Patch and blend watermarks: BadNets, Blended and UBW-P share one mechanism.

A trigger is a pattern ``t`` (uint8, C x H x W) and a per-pixel weight ``alpha`` (C x H x W in [0, 1]):
``G(x) = round((1 - alpha) * x + alpha * t)``. BadNets replaces pixels (alpha = 1 on the patch, 0 elsewhere),
Blended mixes them (alpha = 0.2 on the patch), UBW-P uses BadNets' trigger with random labels.

The default pattern is the paper's 3x3 "white-black square" in the bottom-right corner, rows
(0,0,1), (0,1,0), (1,0,1) x 255, the same in every channel. ``pattern="noise"`` is a full-image pattern
(uniform noise drawn from the watermark's seed) for the blended attack's original form.

Another trigger of the same kind (:meth:`~ubwlib.watermarks.Watermark.redraw`, the Independent-T trigger):
:func:`redraw_pattern` for pattern/alpha keys (these watermarks and Label-Consistent), :func:`redraw_patch`
for patch keys (UBW-C, Sleeper Agent).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import ImageDataset
from .base import (
    Watermark,
    WatermarkedDataset,
    WatermarkKey,
    check_rate,
    check_redraw,
    check_target,
    choose_indices,
    draw_different,
    poison_count,
    redrawn_key,
    register,
)

__all__ = [
    "SQUARE",
    "faint_trigger",
    "square_trigger",
    "noise_trigger",
    "blend",
    "resized_square",
    "paste_random",
    "NOISE_SEED_OFFSET",
    "random_binary_like",
    "random_resized_square_like",
    "redraw_pattern",
    "redraw_patch",
    "PatchSettings",
    "BadNetsSettings",
    "BlendedSettings",
    "UBWPSettings",
    "BadNets",
    "Blended",
    "UBWP",
]

#: The paper's 3x3 white-black square (1 = white).
SQUARE = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.uint8)
PATTERNS = ("square", "noise")
#: A ``pattern="noise"`` watermark with seed ``s`` draws its noise from seed ``s + NOISE_SEED_OFFSET`` (a stream
#: apart from the one that picks the poisoned samples).
NOISE_SEED_OFFSET = 7919


def square_trigger(image_shape: tuple[int, int, int], alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(pattern, alpha) of the 3x3 white-black square in the bottom-right corner of a C x H x W image."""
    c, h, w = image_shape
    if h < 3 or w < 3:
        raise ValueError(f"images must be at least 3x3 for the square trigger, got {h}x{w}")
    pattern = torch.zeros(image_shape, dtype=torch.uint8)
    pattern[:, -3:, -3:] = SQUARE * 255
    weight = torch.zeros(image_shape, dtype=torch.float32)
    weight[:, -3:, -3:] = alpha
    return pattern, weight


def noise_trigger(image_shape: tuple[int, int, int], alpha: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pattern, alpha) of a full-image uniform-noise pattern drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randint(0, 256, image_shape, dtype=torch.uint8, generator=g)
    return pattern, torch.full(image_shape, float(alpha))


def blend(images: torch.Tensor, pattern: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``round((1 - alpha) * x + alpha * pattern)`` on a uint8 batch, vectorised. Pixels with alpha = 0 are
    untouched and pixels with alpha = 1 become the pattern exactly."""
    x = images.float()
    out = torch.lerp(x, pattern.float().expand_as(x), alpha.expand_as(x))
    out = out.round_().clamp_(0, 255).to(torch.uint8)
    keep = alpha == 0
    if keep.any():
        out = torch.where(keep.expand_as(x), images, out)
    return out


def resized_square(channels: int, size: int = 8) -> torch.Tensor:
    """The white-black square resized to ``size`` x ``size`` (bilinear), uint8, C x size x size (UBW-C's trigger)."""
    sq = torch.nn.functional.interpolate(SQUARE.float()[None, None] * 255, size=(size, size), mode="bilinear",
                                         align_corners=False)
    return sq[0].round().clamp(0, 255).to(torch.uint8).expand(channels, size, size).contiguous()


def paste_random(images: torch.Tensor, patch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Paste ``patch`` (C x p x q) at a random position (fully inside, drawn per image from ``generator``) into
    each image; vectorised, returns a new tensor. uint8 images and patch for the watermarks; float ones work the
    same way and the result is differentiable in ``patch`` (a forger's optimised patch)."""
    n, c, h, w = images.shape
    p, q = patch.shape[-2:]
    if p > h or q > w:
        raise ValueError(f"a {p}x{q} patch does not fit into {h}x{w} images")
    dev = images.device
    ys = torch.randint(0, h - p + 1, (n,), generator=generator).to(dev)
    xs = torch.randint(0, w - q + 1, (n,), generator=generator).to(dev)
    rows = (ys[:, None] + torch.arange(p, device=dev)).view(n, 1, p, 1)
    cols = (xs[:, None] + torch.arange(q, device=dev)).view(n, 1, 1, q)
    out = images.clone()
    out[torch.arange(n, device=dev).view(n, 1, 1, 1), torch.arange(c, device=dev).view(1, c, 1, 1),
        rows, cols] = patch.to(dev).expand(n, c, p, q)
    return out


def faint_trigger(images: torch.Tensor, patch: torch.Tensor, amplitude: int, generator: torch.Generator
                  ) -> torch.Tensor:
    """uint8 ``images`` with ``patch`` pasted at a random position (:func:`paste_random`,
    positions from ``generator``), the change to every pixel clipped to ``amplitude`` (in 1/255): 255 pastes the
    patch itself, 16 is the faint copy a perturbation within eps = 16/255 can carry."""
    if not 1 <= amplitude <= 255:
        raise ValueError(f"amplitude must be in [1, 255] (in 1/255), got {amplitude}")
    pasted = paste_random(images, patch, generator).short()
    change = (pasted - images.short()).clamp_(-amplitude, amplitude)
    return (images.short() + change).clamp_(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------- another trigger of the same kind
def random_binary_like(original: torch.Tensor, region: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random {0, 255} uint8 pattern on ``region`` (bool, ``original``'s shape; ``original`` elsewhere), the same
    in every channel when ``original`` and ``region`` are; never equal to ``original``."""
    shared = bool((original == original[:1]).all()) and bool((region == region[:1]).all())

    def draw(g: torch.Generator) -> torch.Tensor:
        shape = (1, *original.shape[1:]) if shared else tuple(original.shape)
        bits = (torch.randint(0, 2, shape, generator=g) * 255).to(torch.uint8).expand_as(original)
        return torch.where(region, bits, original).contiguous()

    return draw_different(draw, original, generator, "binary pattern")


def random_resized_square_like(original: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """UBW-C's kind of patch: a random 3x3 binary square resized (bilinear, as :func:`resized_square`) to the
    size of ``original`` (C x p x q), the same in every channel; never equal to ``original``."""
    c, p, q = original.shape

    def draw(g: torch.Generator) -> torch.Tensor:
        grid = torch.randint(0, 2, (1, 1, 3, 3), generator=g).float() * 255
        sq = torch.nn.functional.interpolate(grid, size=(p, q), mode="bilinear", align_corners=False)
        return sq[0].round().clamp(0, 255).to(torch.uint8).expand(c, p, q).contiguous()

    return draw_different(draw, original, generator, "resized binary patch")


def redraw_pattern(key: WatermarkKey, seed: int) -> WatermarkKey:
    """``key`` (with ``pattern`` and ``alpha`` tensors) with another pattern drawn from ``seed``; ``alpha`` kept.

    A ``pattern="noise"`` key gets the noise that the watermark draws from ``seed`` (:func:`noise_trigger` with
    ``seed + NOISE_SEED_OFFSET``; should it equal the key's own, uniform noise from a generator seeded with
    ``seed``); any other key a random binary (0/255) pattern on the pixels the trigger covers (``alpha > 0``;
    :func:`random_binary_like` with a generator seeded with ``seed``). Used by :meth:`Watermark.redraw` of
    BadNets, Blended, UBW-P and Label-Consistent after :func:`~ubwlib.watermarks.base.check_redraw`."""
    gen = torch.Generator().manual_seed(seed)
    pattern, alpha = key.tensors["pattern"].cpu(), key.tensors["alpha"].cpu()
    if key.settings.get("pattern") == "noise":
        new, _ = noise_trigger(tuple(pattern.shape), 1.0, seed + NOISE_SEED_OFFSET)
        if torch.equal(new, pattern):
            new = draw_different(lambda g: torch.randint(0, 256, pattern.shape, dtype=torch.uint8, generator=g),
                                 pattern, gen, "noise pattern")
    else:
        new = random_binary_like(pattern, (alpha > 0).expand_as(pattern), gen)
    return redrawn_key(key, seed, pattern=new.to(pattern.dtype))


def redraw_patch(key: WatermarkKey, seed: int) -> WatermarkKey:
    """``key`` (with a C x p x q ``patch`` tensor) with another patch drawn from ``seed``.

    A binary (0/255) patch (Sleeper Agent's random patch; UBW-C's square at sizes where resizing keeps it
    binary) gets a random binary patch of the same size (:func:`random_binary_like`), any other (UBW-C's
    resized square) a random 3x3 binary square resized the same way (:func:`random_resized_square_like`), from
    a generator seeded with ``seed``. Used by :meth:`Watermark.redraw` of UBW-C and Sleeper Agent."""
    gen = torch.Generator().manual_seed(seed)
    patch = key.tensors["patch"].cpu()
    if bool(((patch == 0) | (patch == 255)).all()):
        new = random_binary_like(patch, torch.ones_like(patch, dtype=torch.bool), gen)
    else:
        new = random_resized_square_like(patch, gen)
    return redrawn_key(key, seed, patch=new.to(patch.dtype))


@dataclass(frozen=True)
class PatchSettings:
    """Settings shared by the patch/blend watermarks."""

    poisoning_rate: float = 0.1
    """gamma = |D_s| / |D|: exactly round(gamma * N) samples are modified."""
    pattern: str = "square"
    """``square`` (the paper's 3x3 white-black square, bottom-right) or ``noise`` (full-image noise)."""
    alpha: float = 1.0
    """Blend weight of the pattern (1 = pixels replaced)."""

    def __post_init__(self) -> None:
        check_rate(self.poisoning_rate)
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha!r}")


@dataclass(frozen=True)
class BadNetsSettings(PatchSettings):
    target: int = 1
    """Target label y_t (the paper: 1)."""


@dataclass(frozen=True)
class BlendedSettings(PatchSettings):
    alpha: float = 0.2
    """The public toolbox's blend weight."""
    target: int = 1


@dataclass(frozen=True)
class UBWPSettings(PatchSettings):
    """UBW-P: BadNets' trigger; each poisoned sample's label is drawn uniformly from all K classes."""


class _PatchWatermark(Watermark):
    def _trigger_tensors(self, image_shape: tuple[int, int, int], seed: int) -> dict[str, torch.Tensor]:
        s = self.settings
        if s.pattern == "square":
            pattern, alpha = square_trigger(image_shape, s.alpha)
        else:
            pattern, alpha = noise_trigger(image_shape, s.alpha, seed + NOISE_SEED_OFFSET)
        return {"pattern": pattern, "alpha": alpha}

    def _new_labels(self, old: torch.Tensor, num_classes: int, gen: torch.Generator) -> torch.Tensor:
        return torch.full_like(old, self.settings.target)

    def watermark(self, train_set: ImageDataset, seed: int = 0) -> WatermarkedDataset:
        self._check_train_set(train_set)
        k = train_set.num_classes
        target = check_target(self.settings.target, k) if self.targeted else None
        gen = torch.Generator().manual_seed(seed)
        idx = choose_indices(len(train_set), poison_count(self.settings.poisoning_rate, len(train_set)), gen)
        tensors = self._trigger_tensors(train_set.image_shape, seed)
        images = train_set.images.clone()
        images[idx] = blend(images[idx], tensors["pattern"], tensors["alpha"])
        labels = train_set.labels.clone()
        labels[idx] = self._new_labels(labels[idx], k, gen)
        return self._release(train_set, images, labels, idx, tensors, seed, target)

    @classmethod
    def apply(cls, images: torch.Tensor, key: WatermarkKey, generator: torch.Generator | None = None) -> torch.Tensor:
        return blend(images, key.tensors["pattern"], key.tensors["alpha"])

    @classmethod
    def redraw(cls, key: WatermarkKey, seed: int) -> WatermarkKey:
        """Another pattern at the same place with the same blend weights (:func:`redraw_pattern`): random binary
        on the trigger's pixels, or the noise drawn from ``seed`` for ``pattern="noise"``."""
        return redraw_pattern(key, check_redraw(cls, key, seed, ("pattern", "alpha")))


@register
class BadNets(_PatchWatermark):
    """BadNets (Gu et al.): the square replaces the corner pixels; poisoned labels -> y_t."""

    name = "badnets"
    label_type = "poisoned"
    targeted = True
    Settings = BadNetsSettings


@register
class Blended(_PatchWatermark):
    """Blended (Chen et al.): x' = (1 - a) x + a t with the square as t and a = 0.2; labels -> y_t."""

    name = "blended"
    label_type = "poisoned"
    targeted = True
    Settings = BlendedSettings


@register
class UBWP(_PatchWatermark):
    """UBW-P (Section 3.3): BadNets' trigger, each poisoned label drawn uniformly from {0..K-1} once (it
    equals the true label for about 1/K of them)."""

    name = "ubw-p"
    label_type = "poisoned"
    targeted = False
    Settings = UBWPSettings

    def _new_labels(self, old: torch.Tensor, num_classes: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, num_classes, old.shape, generator=gen, dtype=old.dtype)
