"""Recipes for the clean-label watermarks (Label-Consistent, Sleeper Agent, UBW-C).

Their releases are expensive (PGD, gradient matching), so the released poisons are cached like trained models,
keyed by every setting, the seed, the content of the training set and of the surrogate; gradient matching
checkpoints through the cache and resumes after an interruption. Each starts from the profile's benign model
(cached) as its surrogate; the victim is then trained from scratch on the release by the ordinary trainer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..cache import Cache, table_from_data, table_to_data
from ..watermarks import GradientMatchingSettings, WatermarkedDataset, WatermarkKey, evaluate, get_watermark
from .core import TrainedModel, benign_model, default_cache, fingerprint, load_data, trained_model
from .profiles import Profile

__all__ = ["CLEAN_LABEL_METHODS", "SOURCE_CLASS", "crafting_budget", "clean_label_settings", "clean_label_release",
           "CleanLabelRun", "clean_label_run"]

CLEAN_LABEL_METHODS = ("label-consistent", "sleeper-agent", "ubw-c")
SOURCE_CLASS = 0
VERSION = "1"

#: Gradient-matching budgets per profile (the paper profile uses the public code's: 250 steps, retrain every 50).
_BUDGETS = {
    "smoke": dict(steps=4, retrain_every=2, checkpoint_every=2),
    "default": dict(steps=20, retrain_every=10, checkpoint_every=5),
    "paper": dict(),
}


def crafting_budget(profile: Profile) -> GradientMatchingSettings:
    """The gradient-matching settings of a profile: its model, its schedule for (re)training the surrogate,
    and the crafting budget (steps, retraining period)."""
    budget = _BUDGETS.get(profile.name, {})
    base = GradientMatchingSettings()
    extra = {} if profile.name == "paper" else {"pretrain": profile.train, "retrain": profile.train, "precision": "auto"}
    return dataclasses.replace(base, model=profile.model, width=profile.width, **extra, **budget)


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
        "settings": dataclasses.asdict(wm.settings),
        "seed": seed,
        "data": fingerprint(data.train),
        "surrogate": surrogate.key,
    }

    def compute():
        kwargs = {"progress": progress}
        if method == "label-consistent":
            kwargs.pop("progress")
        else:
            kwargs["checkpoint"] = cache.checkpoint("crafting", key_settings, VERSION)
            kwargs["monitor_set"] = data.test
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
                   "seconds": report.get("seconds")}
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
    """Release, train the victim from scratch on it (cached), evaluate on the whole test set and the source class."""
    seed = profile.seed if seed is None else seed
    released = clean_label_release(profile, method, seed, cache, progress, **overrides)
    trained = trained_model(profile, released.dataset, seed=seed, cache=cache, progress=progress, desc=method)
    test = load_data(profile).test
    row = evaluate(trained.model, test, released, seed=seed)
    source_row = None
    if method in ("sleeper-agent", "ubw-c"):
        source_row = evaluate(trained.model, test, released, source_class=SOURCE_CLASS, seed=seed)
    return CleanLabelRun(method, released, trained, row, source_row)
