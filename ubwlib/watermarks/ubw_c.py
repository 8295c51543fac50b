"""UBW-C (Section 3.4): the clean-label untargeted watermark, crafted by bi-level optimisation.

Upper level (Eq. 6): on triggered source-class images ``x'`` (the white-black square resized to 8x8, pasted at a
random position) with their true labels ``y``, *ascend* ``L_t = CE(f(x'), y) + lambda * mean H(softmax f(x'))``:
wrong and dispersed predictions. Lower level (Eq. 7): the model is trained on the released dataset. The poisons
(the ``gamma * N`` training samples of any class with the largest gradient norm, labels unchanged) get
sample-specific perturbations within ``eps`` whose training gradient matches ``grad_w(-L_t)``
(:mod:`ubwlib.watermarks.gradient_matching`). By Theorem 1, raising the sample-wise dispersibility D_s (the
entropy term) also raises the class-wise one, so the mini-batch-friendly D_s is all the objective needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data import ImageDataset
from .base import check_rate, check_target, poison_count, register
from .gradient_matching import GradientMatchingSettings, GradientMatchingWatermark
from .patch import resized_square

__all__ = ["UBWCSettings", "UBWC"]


@dataclass(frozen=True)
class UBWCSettings:
    poisoning_rate: float = 0.1
    """gamma: exactly round(gamma * N) poisons, from any class."""
    source: int = 0
    """Source class whose triggered images define the target objective (the public code: 0)."""
    lam: float = 2.0
    """lambda of Eq. 6 (``beta`` in the public code): weight of the prediction entropy."""
    patch_size: int = 8
    """Side of the test-time trigger: the white-black square resized (bilinear) to this size."""
    n_source: int | None = None
    """Source-class training images used for the target gradient (None: all of them)."""
    poison_classes: str = "all"
    """Where the poisons come from: ``all`` classes (the paper), the ``source`` class only, or the ``other``
    classes only (a lever of this book's study)."""
    crafting: GradientMatchingSettings = field(default_factory=GradientMatchingSettings)

    def __post_init__(self) -> None:
        check_rate(self.poisoning_rate)
        if self.lam < 0:
            raise ValueError(f"lam (lambda) must be >= 0, got {self.lam}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.poison_classes not in ("all", "source", "other"):
            raise ValueError(f"poison_classes must be 'all', 'source' or 'other', got {self.poison_classes!r}")


@register
class UBWC(GradientMatchingWatermark):
    """UBW-C: clean labels, sample-specific perturbations, an untargeted and dispersible backdoor."""

    name = "ubw-c"
    targeted = False
    Settings = UBWCSettings

    def _pool(self, train_set: ImageDataset):
        s = self.settings
        count = poison_count(s.poisoning_rate, len(train_set))
        if s.poison_classes == "all":
            return None, count
        in_source = train_set.labels == check_target(s.source, train_set.num_classes)
        pool = torch.nonzero(in_source if s.poison_classes == "source" else ~in_source).flatten()
        if count > len(pool):
            raise ValueError(f"{count} poisons do not fit into the {len(pool)} samples of poison_classes="
                             f"{s.poison_classes!r}; lower poisoning_rate or choose poison_classes='all'")
        return pool, count

    def _patch(self, channels: int, generator: torch.Generator) -> torch.Tensor:
        return resized_square(channels, self.settings.patch_size)

    def _target_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """-(CE + lambda * mean entropy): its gradient is the direction the victim's training should take."""
        logp = F.log_softmax(logits, dim=1)
        entropy = -(logp.exp() * logp).sum(1).mean()
        return -(F.nll_loss(logp, labels) + self.settings.lam * entropy)
