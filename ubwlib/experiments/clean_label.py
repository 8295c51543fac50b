"""Recipes for the clean-label watermarks (Label-Consistent, Sleeper Agent, UBW-C).

Their releases are expensive (PGD, gradient matching), so the released poisons are cached like trained models,
keyed by every setting, the seed, the content of the training set and of the surrogate; gradient matching
checkpoints through the cache and resumes after an interruption. Each starts from the profile's benign model
(cached) as its surrogate; the victim is then trained from scratch on the release by the ordinary trainer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import math
import time

import pandas as pd
import torch

from ..cache import Cache, table_from_data, table_to_data
from ..watermarks import GradientMatchingSettings, WatermarkedDataset, WatermarkKey, get_watermark, trigger
from ..watermarks.gradient_matching import derived_seed, per_sample_grad_norms
from .core import (
    TrainedModel,
    benign_model,
    cached_evaluation,
    default_cache,
    fingerprint,
    load_data,
    trained_model,
)
from .profiles import Profile

__all__ = ["CLEAN_LABEL_METHODS", "SOURCE_CLASS", "VICTIM_SEED_OFFSET", "victim_seed", "crafting_budget", "clean_label_settings", "clean_label_release",
           "CleanLabelRun", "clean_label_run", "noise_control_run", "perturbation_rows", "perturbation_stats",
           "crafting_curves"]

CLEAN_LABEL_METHODS = ("label-consistent", "sleeper-agent", "ubw-c")
SOURCE_CLASS = 0
VERSION = "2"

#: Gradient-matching budgets per profile (the paper profile uses the public code's: 250 steps, retrain every 50).
#: The victim of a clean-label release is trained with ``seed + VICTIM_SEED_OFFSET``: a seed that no model of the
#: crafting used (the surrogate is the benign model of ``seed``; the other crafting models have derived seeds).
VICTIM_SEED_OFFSET = 1000


def victim_seed(seed: int) -> int:
    """The seed of the model trained from scratch on a clean-label release crafted with ``seed``."""
    return int(seed) + VICTIM_SEED_OFFSET


def crafting_budget(profile: Profile) -> GradientMatchingSettings:
    """The gradient-matching settings of a profile: its model, the schedule of (re)training the surrogate and
    the crafting budget, all from the profile's :class:`~ubwlib.experiments.profiles.CraftingBudget`."""
    b = profile.crafting
    schedule = {"pretrain": profile.train, "retrain": profile.train} if b.schedule == "profile" else {}
    return dataclasses.replace(GradientMatchingSettings(), model=profile.model, width=profile.width, **schedule,
                               steps=b.steps, retrain_every=b.retrain_every, precision=b.precision,
                               held_out=b.held_out, diagnostic_every=b.diagnostic_every,
                               checkpoint_every=b.checkpoint_every)


def clean_label_settings(profile: Profile, method: str, **overrides) -> dict:
    """Keyword settings of ``method`` on ``profile`` (crafting budget included), with ``overrides``."""
    if method in ("sleeper-agent", "ubw-c"):
        settings = {"crafting": crafting_budget(profile), "source": SOURCE_CLASS}
    elif method == "label-consistent":
        settings = {"surrogate_model": profile.model, "surrogate_width": profile.width, "surrogate_train": profile.train}
    else:
        raise ValueError(f"{method!r} is not a clean-label method; choose one of {CLEAN_LABEL_METHODS}")
    settings.update(overrides)
    return settings


def surrogate_grad_norms(profile: Profile, seed: int | None = None, cache: Cache | None = None,
                         progress: bool = True) -> tuple[torch.Tensor, float]:
    """Per-sample gradient norms of the profile's training set under its benign model (the surrogate every
    gradient-matching release starts from), computed once and cached: Sleeper Agent, UBW-C and every point of
    an ablation sweep with the same seed select their poisons from the same pass. Returns the norms and the
    seconds the pass took when it was computed."""
    cache = cache or default_cache()
    seed = profile.seed if seed is None else seed
    data = load_data(profile)
    surrogate = benign_model(profile, seed=seed, cache=cache, progress=progress)

    def compute():
        t0 = time.perf_counter()
        norms = per_sample_grad_norms(surrogate.model, data.train.images, data.train.labels)
        return {"norms": norms}, {"seconds": time.perf_counter() - t0}

    entry = cache.get_or_compute("norms", {"surrogate": surrogate.key, "data": fingerprint(data.train)}, VERSION,
                                 compute)
    return entry.tensors["norms"], float(entry.data["seconds"])


#: Crafting settings added after releases were cached: at these values they leave a release's cache key as it
#: was (the crafting they describe is the one those releases ran).
_ADDED_AT_DEFAULT = {"stages": (1.0,), "contrast": 0.0, "matching": "cosine"}
_ADDED_TOP_AT_DEFAULT = {"poison_classes": "all"}


def _key_settings(settings) -> dict:
    out = dataclasses.asdict(settings)
    for k, default in _ADDED_TOP_AT_DEFAULT.items():
        if k in out and out[k] == default:
            del out[k]
    crafting = out.get("crafting")
    if isinstance(crafting, dict):
        for k, default in _ADDED_AT_DEFAULT.items():
            if k in crafting and (tuple(crafting[k]) if isinstance(default, tuple) else crafting[k]) == default:
                del crafting[k]
    return out


def clean_label_release(profile: Profile, method: str, seed: int | None = None, cache: Cache | None = None,
                        progress: bool = True, **overrides) -> WatermarkedDataset:
    """The profile's training set watermarked by a clean-label ``method`` (cached; crafting resumable)."""
    cache = cache or default_cache()
    seed = profile.seed if seed is None else seed
    data = load_data(profile)
    surrogate = benign_model(profile, seed=seed, cache=cache, progress=progress)
    wm = get_watermark(method, **clean_label_settings(profile, method, **overrides))
    key_settings = {
        "method": method,
        "settings": _key_settings(wm.settings),
        "seed": seed,
        "data": fingerprint(data.train),
        "surrogate": surrogate.key,
    }

    def compute():
        kwargs = {"progress": progress}
        norm_seconds = None
        if method == "label-consistent":
            kwargs.pop("progress")
        else:
            kwargs["checkpoint"] = cache.checkpoint("crafting", key_settings, VERSION)
            kwargs["monitor_set"] = data.test
            kwargs["grad_norms"], norm_seconds = surrogate_grad_norms(profile, seed, cache, progress)
            kwargs.update(_crafting_models(profile, wm.settings.crafting, seed, cache, progress))
        released = wm.watermark(data.train, seed, surrogate=surrogate.model, **kwargs)
        if "checkpoint" in kwargs:
            kwargs["checkpoint"].clear()  # the finished release is cached below; its checkpoint is not needed
        idx = released.indices
        tensors = {"indices": idx, "poisons": released.dataset.images[idx],
                   **{f"key.{k}": v for k, v in released.key.tensors.items()}}
        report = released.report or {}
        payload = {"key": {"settings": released.key.settings, "target": released.key.target},
                   "history": table_to_data(report["history"]) if "history" in report else None,
                   "retrains": table_to_data(report["retrains"]) if "retrains" in report else None,
                   "seconds": {**(report.get("seconds") or {}),
                               **({"gradient norms (shared pass)": norm_seconds} if norm_seconds is not None
                                  else {})}}
        return tensors, payload

    entry = cache.get_or_compute("release", key_settings, VERSION, compute)
    t = entry.tensors
    images = data.train.images.clone()
    images[t["indices"]] = t["poisons"]
    key = WatermarkKey(method=method, settings=entry.data["key"]["settings"],
                       tensors={k[4:]: v for k, v in t.items() if k.startswith("key.")},
                       image_shape=data.train.image_shape, classes=data.train.classes, dataset=data.train.name,
                       seed=seed, target=entry.data["key"]["target"])
    report = {"cached": entry.hit, "seconds": entry.data.get("seconds")}
    for name in ("history", "retrains"):
        if entry.data.get(name) is not None:
            report[name] = table_from_data(entry.data[name])
    released = data.train.replace(images=images, name=f"{data.train.name}+{method}")
    return WatermarkedDataset(released, t["indices"], key, report=report)


def _crafting_models(profile: Profile, gm: GradientMatchingSettings, seed: int, cache: Cache, progress: bool) -> dict:
    """The extra ensemble members and the held-out models of a crafting run, from the model cache (they are
    benign models of derived seeds, shared by every release crafted with ``seed``), when the crafting trains
    them with the profile's own model and schedule; else ``craft`` trains them."""
    if (gm.model, gm.width, gm.pretrain) != (profile.model, profile.width, profile.train):
        return {}
    train_set = load_data(profile).train

    def model(s: int):
        return trained_model(profile, train_set, seed=s, cache=cache, progress=progress, desc="crafting model").model

    return {"members": [model(derived_seed(seed, "member", i)) for i in range(1, gm.ensemble)],
            "held_out_models": [model(derived_seed(seed, "held-out", j)) for j in range(gm.held_out)]}


@dataclass(frozen=True)
class CleanLabelRun:
    method: str
    released: WatermarkedDataset
    trained: TrainedModel
    row: dict
    """Evaluation on the whole test set (non-target classes for targeted methods)."""
    source_row: dict | None
    """Evaluation on the source class (Sleeper Agent, UBW-C)."""


def clean_label_run(profile: Profile, method: str, seed: int | None = None, cache: Cache | None = None,
                    progress: bool = True, **overrides) -> CleanLabelRun:
    """Release, train the victim from scratch on it (cached; seed :func:`victim_seed`, unused by the crafting),
    evaluate on the whole test set and the source class."""
    seed = profile.seed if seed is None else seed
    released = clean_label_release(profile, method, seed, cache, progress, **overrides)
    trained = trained_model(profile, released.dataset, seed=victim_seed(seed), cache=cache, progress=progress,
                            desc=method)
    test = load_data(profile).test
    row = cached_evaluation(trained, test, released.key, seed=seed, cache=cache)
    source_row = None
    if method in ("sleeper-agent", "ubw-c"):
        source_row = cached_evaluation(trained, test, released.key, source_class=SOURCE_CLASS, seed=seed,
                                       cache=cache)
    return CleanLabelRun(method, released, trained, row, source_row)


def noise_control_run(profile: Profile, seed: int | None = None, cache: Cache | None = None,
                      progress: bool = True) -> CleanLabelRun:
    """The control of UBW-C: the same poisons (same selection, same labels) with its random initial perturbation
    (uniform in the eps-ball, seeded) and *no* crafting step, then a victim trained from scratch like every other.
    What UBW-C does beyond this row is what the gradient matching adds; what this row does beyond the benign model
    is what any perturbation of these poisons does."""
    budget = dataclasses.replace(crafting_budget(profile), steps=0)
    return clean_label_run(profile, "ubw-c", seed, cache, progress, crafting=budget)


def perturbation_rows(profile: Profile, method: str, n: int = 8, seed: int | None = None, **overrides) -> dict:
    """For a figure: the first ``n`` poisons of a clean-label release, benign and released, and the absolute
    difference (uint8 units) to be shown magnified; also the true labels (kept by every clean-label method)."""
    released = clean_label_release(profile, method, seed, progress=False, **overrides)
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
        rel = clean_label_release(profile, m, seed, progress=False)
        wm = get_watermark(m, **clean_label_settings(profile, m))
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
