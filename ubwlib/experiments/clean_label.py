"""Recipes particular to the clean-label watermarks (Label-Consistent, Sleeper Agent, UBW-C): UBW-C's noise
control, the perturbations they release, and the crafting curves of gradient matching. Their releases and runs
are the ordinary ones (:func:`~ubwlib.experiments.runs.release`, :func:`~ubwlib.experiments.runs.run`).
"""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import torch

from ..watermarks import WatermarkedDataset, WatermarkKey, get_watermark, trigger
from .core import load_data
from .profiles import Profile
from .runs import Run, crafting_budget, method_settings, release, run

__all__ = ["CLEAN_LABEL_METHODS", "noise_control_run", "noise_control_spec", "perturbation_rows", "perturbation_stats",
           "crafting_curves"]

#: The clean-label watermarks of Table 1, in the paper's order.
CLEAN_LABEL_METHODS = ("label-consistent", "sleeper-agent", "ubw-c")


def noise_control_run(profile: Profile, seed: int | None = None, cache=None, progress: bool = True) -> Run:
    """The control of UBW-C: the same poisons (same selection, same labels) with its random initial perturbation
    (uniform in the eps-ball, seeded) and *no* crafting step, then a victim trained from scratch like every other.
    What UBW-C does beyond this row is what the gradient matching adds; what this row does beyond the benign model
    is what any perturbation of these poisons does."""
    method, seed, overrides = noise_control_spec(profile, seed)
    return run(profile, method, seed, cache, progress, **overrides)


def noise_control_spec(profile: Profile, seed: int | None = None) -> tuple[str, int | None, dict]:
    """The noise control of :func:`noise_control_run` as a :func:`~ubwlib.experiments.runs.run_many` spec
    (``"ubw-c"`` with 0 crafting steps), so that its victim trains beside the others."""
    return "ubw-c", seed, {"crafting": dataclasses.replace(crafting_budget(profile), steps=0)}


def perturbation_rows(profile: Profile, method: str, n: int = 8, seed: int | None = None, **overrides) -> dict:
    """For a figure: the first ``n`` poisons of a clean-label release, benign and released, and the absolute
    difference (uint8 units) to be shown magnified; also the true labels (kept by every clean-label method)."""
    released = release(profile, method, seed, progress=False, **overrides)
    train = load_data(profile).train
    idx = released.indices[:n]
    before, after = train.images[idx], released.dataset.images[idx]
    diff = (after.to(torch.int16) - before.to(torch.int16)).abs().to(torch.uint8)
    return {"benign": before, "released": after, "|delta|": diff, "labels": train.labels[idx]}


def perturbation_stats(profile: Profile, methods=CLEAN_LABEL_METHODS, seed: int | None = None) -> pd.DataFrame:
    """Per clean-label release: poisons, labels changed (must be 0), the largest |delta| in uint8 units against
    the method's budget, the mean |delta|, and pixels outside [0, 255] (impossible for uint8: a type check)."""
    train = load_data(profile).train
    rows = []
    for m in methods:
        rel = release(profile, m, seed, progress=False)
        wm = get_watermark(m, **method_settings(profile, m))
        s = wm.settings
        eps = s.crafting.eps if hasattr(s, "crafting") else s.eps
        idx = rel.indices
        diff = rel.dataset.images[idx].to(torch.int16) - train.images[idx].to(torch.int16)
        if m == "label-consistent":
            # the square is pasted on top of the PGD perturbation: measure the budget outside it
            diff = diff * (~_square_mask(rel.key, train.image_shape)).to(torch.int16)
        changed = rel.dataset.labels != train.labels
        untouched = torch.ones(len(train), dtype=torch.bool)
        untouched[idx] = False
        rows.append({
            "method": m, "poisons": len(idx), "labels changed": int(changed.sum()),
            "images changed outside the poisons": int((rel.dataset.images[untouched] != train.images[untouched])
                                                       .flatten(1).any(1).sum()),
            "max |delta| (uint8)": int(diff.abs().max()) if len(idx) else 0,
            "budget eps (uint8)": math.ceil(255 * eps - 1e-9),
            "mean |delta| (uint8)": float(diff.abs().float().mean()) if len(idx) else 0.0,
        })
    return pd.DataFrame(rows).set_index("method")


def _square_mask(key: WatermarkKey, shape) -> torch.Tensor:
    """Pixels that Label-Consistent's pasted square replaces (True there), from its key."""
    blank = torch.zeros((1, *shape), dtype=torch.uint8)
    full = torch.full((1, *shape), 255, dtype=torch.uint8)
    return (trigger(blank, key)[0] != blank[0]) | (trigger(full, key)[0] != full[0])


def crafting_curves(released: WatermarkedDataset) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(passenger loss per step, one row per (re)trained surrogate) of a gradient-matching release."""
    report = released.report or {}
    if "history" not in report:
        raise ValueError(f"{released.key.method} has no crafting curves (only gradient-matching methods do)")
    return report["history"], report["retrains"]
