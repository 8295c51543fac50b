"""Sleeper Agent (Souri et al., NeurIPS 2022): a clean-label *targeted* backdoor crafted by gradient matching.

Poisons are target-class samples (the largest gradient norms), labels unchanged; their perturbations (eps 16/255)
make training mimic the gradient of "patched source images -> target class". The test trigger is an 8x8 random
binary patch (drawn from the seed, stored in the key) pasted at a random position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data import ImageDataset
from .base import check_rate, check_target, class_capped_count, register
from .gradient_matching import GradientMatchingSettings, GradientMatchingWatermark

__all__ = ["SleeperAgentSettings", "SleeperAgent"]


@dataclass(frozen=True)
class SleeperAgentSettings:
    poisoning_rate: float = 0.1
    """gamma, capped at the size of the target class (only its samples can be poisoned)."""
    source: int = 0
    target: int = 1
    patch_size: int = 8
    n_source: int | None = None
    """Source-class training images used for the target gradient (None: all of them)."""
    crafting: GradientMatchingSettings = field(default_factory=GradientMatchingSettings)

    def __post_init__(self) -> None:
        check_rate(self.poisoning_rate)
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.source == self.target:
            raise ValueError(f"source and target must differ, both are {self.source}")


@register
class SleeperAgent(GradientMatchingWatermark):
    name = "sleeper-agent"
    targeted = True
    Settings = SleeperAgentSettings

    @property
    def _target_label(self) -> int:  # type: ignore[override]
        return self.settings.target

    def _pool(self, train_set: ImageDataset):
        check_target(self.settings.target, train_set.num_classes)
        pool, _requested, used = class_capped_count(train_set, self.settings.target, self.settings.poisoning_rate,
                                                    "sleeper-agent")
        return pool, used

    def _patch(self, channels: int, generator: torch.Generator) -> torch.Tensor:
        p = self.settings.patch_size
        return (torch.randint(0, 2, (channels, p, p), generator=generator) * 255).to(torch.uint8)

    def _target_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """CE towards the target label: the victim's training should descend it."""
        return F.cross_entropy(logits, labels)
