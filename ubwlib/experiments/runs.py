"""One way to release and run any watermark on a profile: :func:`release` and :func:`run`.

``release(profile, method, seed, **overrides)`` watermarks the profile's training set with ``method`` and the
profile's settings for it (:func:`method_settings`): the poisoned-label watermarks are cheap and memoised in the
process; the clean-label ones (PGD, gradient matching) are expensive, so their poisons are cached on disk like
trained models, keyed by every setting, the seed, the content of the training set and of the surrogate, and
gradient matching checkpoints through the cache and resumes after an interruption. A clean-label release starts
from the profile's benign model of ``seed`` (cached) as its surrogate.

``run(profile, method, seed, **overrides)`` then trains the profile's model from scratch on the release (cached;
for a clean-label release with :func:`victim_seed`, a seed that no model of the crafting used) and evaluates it
on the whole test set (``row``) and, for a source-specific watermark, on its source class (``source_row``). What
is source-specific is read from the key: a key whose settings name a ``source`` class
(:func:`source_class`). ``run_many(profile, specs)`` is :func:`run` for several at once: the releases first, then
the victims not yet cached trained ``profile.stack`` at a time side by side.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..cache import Cache, table_from_data, table_to_data
from ..watermarks import GradientMatchingSettings, WatermarkedDataset, WatermarkKey, get_watermark
from ..watermarks.base import watermark_class
from ..watermarks.gradient_matching import derived_seed, per_sample_grad_norms
from .core import (TrainedModel, benign_model, cached_evaluation, default_cache, fingerprint, load_data, trained_model,
                   trained_models)
from .profiles import Profile

__all__ = [
    "VICTIM_SEED_OFFSET",
    "is_clean_label",
    "victim_seed",
    "source_class",
    "crafting_budget",
    "method_settings",
    "surrogate_grad_norms",
    "release",
    "Run",
    "run",
    "run_many",
]

#: Version of the cached clean-label releases (and of their checkpoints and gradient norms).
VERSION = "2"

#: The victim of a clean-label release is trained with ``seed + VICTIM_SEED_OFFSET``: a seed that no model of the
#: crafting used (the surrogate is the benign model of ``seed``; the other crafting models have derived seeds).
VICTIM_SEED_OFFSET = 1000


def is_clean_label(method: str) -> bool:
    """True for the watermarks that keep every label and perturb images against a surrogate model
    (Label-Consistent, Sleeper Agent, UBW-C): their releases are cached on disk and tested on a victim seed."""
    return watermark_class(method).label_type == "clean"


def victim_seed(seed: int) -> int:
    """The seed of the model trained from scratch on a clean-label release crafted with ``seed``."""
    return int(seed) + VICTIM_SEED_OFFSET


def source_class(key: WatermarkKey) -> int | None:
    """The source class of a source-specific watermark (UBW-C, Sleeper Agent: its settings name one), whose
    triggered test images evaluate it; None for the others (evaluated on all triggered test images)."""
    source = key.settings.get("source")
    return None if source is None else int(source)


def crafting_budget(profile: Profile) -> GradientMatchingSettings:
    """The gradient-matching settings of a profile: its model, the schedule of (re)training the surrogate and
    the crafting budget, all from the profile's :class:`~ubwlib.experiments.profiles.CraftingBudget`."""
    b = profile.crafting
    schedule = {"pretrain": profile.train, "retrain": profile.train} if b.schedule == "profile" else {}
    return dataclasses.replace(GradientMatchingSettings(), model=profile.model, width=profile.width, **schedule,
                               steps=b.steps, retrain_every=b.retrain_every, precision=b.precision,
                               held_out=b.held_out, diagnostic_every=b.diagnostic_every,
                               checkpoint_every=b.checkpoint_every)


def method_settings(profile: Profile, method: str, **overrides) -> dict:
    """Keyword settings of ``method`` on ``profile``, with ``overrides``: what depends on the profile (the crafting
    budget of a gradient-matching watermark, the surrogate of Label-Consistent); the paper's defaults otherwise."""
    settings_type = watermark_class(method).Settings
    fields = {f.name for f in dataclasses.fields(settings_type)}
    settings = {}
    if "crafting" in fields:
        settings["crafting"] = crafting_budget(profile)
    if "surrogate_model" in fields:
        settings.update(surrogate_model=profile.model, surrogate_width=profile.width, surrogate_train=profile.train)
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


def release(profile: Profile, method: str, seed: int | None = None, cache: Cache | None = None,
            progress: bool = True, **overrides) -> WatermarkedDataset:
    """The profile's training set watermarked by ``method`` with :func:`method_settings` (deterministic in
    ``seed``, the profile's by default): memoised in the process for the poisoned-label watermarks, cached on
    disk (crafting resumable) for the clean-label ones."""
    seed = profile.seed if seed is None else seed
    if is_clean_label(method):
        return _crafted_release(profile, method, seed, cache, progress, **overrides)
    return _poisoned_release(profile, method, seed, tuple(sorted(method_settings(profile, method, **overrides)
                                                                 .items())))


@lru_cache(maxsize=16)
def _poisoned_release(profile: Profile, method: str, seed: int, settings: tuple) -> WatermarkedDataset:
    return get_watermark(method, **dict(settings)).watermark(load_data(profile).train, seed=seed)


def _crafted_release(profile: Profile, method: str, seed: int, cache: Cache | None, progress: bool,
                     **overrides) -> WatermarkedDataset:
    cache = cache or default_cache()
    data = load_data(profile)
    surrogate = benign_model(profile, seed=seed, cache=cache, progress=progress)
    wm = get_watermark(method, **method_settings(profile, method, **overrides))
    crafting = getattr(wm.settings, "crafting", None)
    key_settings = {
        "method": method,
        "settings": _key_settings(wm.settings),
        "seed": seed,
        "data": fingerprint(data.train),
        "surrogate": surrogate.key,
    }

    def compute():
        kwargs = {}
        norm_seconds = None
        if crafting is not None:  # gradient matching: checkpointed, shared norms and crafting models
            kwargs["progress"] = progress
            kwargs["checkpoint"] = cache.checkpoint("crafting", key_settings, VERSION)
            kwargs["monitor_set"] = data.test
            kwargs["grad_norms"], norm_seconds = surrogate_grad_norms(profile, seed, cache, progress)
            kwargs.update(_crafting_models(profile, crafting, seed, cache, progress))
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
class Run:
    """One watermark's run on a profile: the release, the model trained from scratch on it, its evaluation."""

    method: str
    released: WatermarkedDataset
    trained: TrainedModel
    row: dict
    """Evaluation on the whole test set (non-target classes for targeted methods)."""
    source_row: dict | None
    """Evaluation on the source class (source-specific watermarks: UBW-C, Sleeper Agent), else None."""


def run(profile: Profile, method: str, seed: int | None = None, cache: Cache | None = None,
        progress: bool = True, **overrides) -> Run:
    """:func:`release`, train the profile's model from scratch on it (cached; a clean-label release's victim
    with :func:`victim_seed`), evaluate on the whole test set and, where the key names one, the source class."""
    seed = profile.seed if seed is None else seed
    released = release(profile, method, seed, cache, progress, **overrides)
    trained = trained_model(profile, released.dataset, seed=_model_seed(method, seed), cache=cache, progress=progress,
                            desc=method)
    return _evaluated(profile, method, seed, released, trained, cache)


def run_many(profile: Profile, specs, cache: Cache | None = None, progress: bool = True) -> list[Run]:
    """:func:`run` for each spec: a method name, ``(method, seed)`` or ``(method, seed, overrides)`` (seed None:
    the profile's). Every release is made first; then the victims not in the cache are trained ``profile.stack``
    at a time side by side (:func:`~ubwlib.experiments.core.trained_models`), under the keys :func:`run` uses."""
    parsed = []
    for spec in specs:
        method, seed, overrides = (spec, None, {}) if isinstance(spec, str) else (*tuple(spec), None, {})[:3]
        if not isinstance(method, str) or not isinstance(overrides or {}, dict):
            raise TypeError(f"each spec must be a method name, (method, seed) or (method, seed, overrides); got {spec!r}")
        parsed.append((method, profile.seed if seed is None else seed, overrides or {}))
    released = [release(profile, m, s, cache, progress, **o) for m, s, o in parsed]
    trained = trained_models(profile, [(r.dataset, _model_seed(m, s)) for (m, s, _), r in zip(parsed, released)],
                             cache=cache, progress=progress, desc="victims")
    return [_evaluated(profile, m, s, r, t, cache) for (m, s, _), r, t in zip(parsed, released, trained)]


def _model_seed(method: str, seed: int) -> int:
    return victim_seed(seed) if is_clean_label(method) else seed


def _evaluated(profile: Profile, method: str, seed: int, released: WatermarkedDataset, trained: TrainedModel,
               cache: Cache | None) -> Run:
    test = load_data(profile).test
    row = cached_evaluation(trained, test, released.key, seed=seed, cache=cache)
    source = source_class(released.key)
    source_row = None if source is None else cached_evaluation(trained, test, released.key, source_class=source,
                                                               seed=seed, cache=cache)
    return Run(method, released, trained, row, source_row)
