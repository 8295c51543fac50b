"""Watermarks (poison generators G): one interface, one poisoned-dataset type.

>>> from ubwlib.watermarks import get_watermark, trigger
>>> wm = get_watermark("ubw-p", poisoning_rate=0.1)
>>> released = wm.watermark(train_set, seed=0)          # WatermarkedDataset
>>> triggered = trigger(test_images, released.key)      # test-time trigger from the key alone
"""

from .base import (
    REGISTRY,
    Watermark,
    WatermarkedDataset,
    WatermarkKey,
    get_watermark,
    poison_count,
    register,
    trigger,
)
from .evaluate import evaluate, evaluation_mask
from .label_consistent import LabelConsistent, LabelConsistentSettings, pgd_perturb
from .patch import UBWP, BadNets, BadNetsSettings, Blended, BlendedSettings, UBWPSettings, blend, square_trigger
from .gradient_matching import GradientMatchingSettings
from .sleeper_agent import SleeperAgent, SleeperAgentSettings
from .ubw_c import UBWC, UBWCSettings
from .wanet import WaNet, WaNetSettings, warp, warp_field

__all__ = [
    "REGISTRY",
    "Watermark",
    "WatermarkedDataset",
    "WatermarkKey",
    "get_watermark",
    "poison_count",
    "register",
    "trigger",
    "evaluate",
    "evaluation_mask",
    "BadNets",
    "BadNetsSettings",
    "Blended",
    "BlendedSettings",
    "UBWP",
    "UBWPSettings",
    "GradientMatchingSettings",
    "SleeperAgent",
    "SleeperAgentSettings",
    "UBWC",
    "UBWCSettings",
    "WaNet",
    "WaNetSettings",
    "LabelConsistent",
    "LabelConsistentSettings",
    "pgd_perturb",
    "blend",
    "square_trigger",
    "warp",
    "warp_field",
]
