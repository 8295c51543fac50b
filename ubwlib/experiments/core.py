"""Cached recipes shared by every chapter: the profile's data, and models trained on a given training set.

A trained model is cached under a hash of everything that decides its weights: the model name, width,
number of classes and channels, every ``TrainConfig`` field, the seed, the content of the training set
(images and labels) and a version string that is bumped when the recipe changes. A rebuilt book with a
warm cache therefore loads every model instead of retraining it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import lru_cache

import pandas as pd
from torch import nn

from ..cache import Cache, load_state_dict_tensors, state_dict_tensors, table_from_data, table_to_data
from ..data import DatasetSplits, ImageDataset, load_dataset
from ..models import build_model
from ..train import TrainConfig, resolve_device, resolve_precision, train_many
from ..watermarks.base import dataset_fingerprint
from .profiles import Profile

__all__ = ["VERSIONS", "NUMERICS", "TrainedModel", "fingerprint", "load_data", "trained_model", "trained_models",
           "benign_model",
           "benign_models", "default_cache", "computed_with",
           "cached_table", "cached_evaluation", "key_digest"]

#: Bump the version of a recipe when its method changes: every cached result of the old version is ignored.
VERSIONS = {
    "model": "1",
    "table": "1",
}

#: The generation of ubwlib's numerics, part of every recipe's cache key (:func:`computed_with`). Bump it when a
#: change makes the same settings compute other numbers (a new draw: another layout, kernel or summation order), so
#: that no cache serves results of the old numerics beside new ones. "2": the small CNN's channels-last weights and
#: the eval-mode batch norm as an affine map under autograd changed the numbers of the same settings, and a cache
#: filled before them went on serving its models: a build on such a cache took a stale benign model, and its
#: gradient norms, 7 of 9 releases and 16 of 35 tables differed from a cold build's of the same code. "3": the
#: ResNets' channels-last weights (the default profile's single trainings, crafting and evaluations on a CPU); the
#: small CNN's numbers (the lite and study profiles) and models trained side by side are bit-equal to "2"'s.
NUMERICS = "3"


def default_cache() -> Cache:
    """The cache of the recipes (``$UBW_CACHE`` or ``~/.cache/ubwlib``), in the context of :func:`computed_with`."""
    return Cache(context=computed_with())


def computed_with() -> dict[str, str]:
    """What every recipe's result depends on besides its settings, which say ``precision="auto"``: the device type
    and the precision ``auto`` resolves to there (``UBW_DEVICE``, ``UBW_PRECISION`` and the CPU decide it). Part of
    every key of :func:`default_cache`, so that a model trained in bfloat16 is not served to a float32 run (after
    ``UBW_PRECISION=fp32``, or on another CPU sharing the folder), and :data:`NUMERICS`, so that results of older
    numerics are not served to this code."""
    dev = resolve_device(None)
    return {"device": dev.type, "precision": resolve_precision("auto", dev), "numerics": NUMERICS}


def fingerprint(dataset: ImageDataset) -> str:
    """sha256 of a dataset's images, labels and class names (its content, not its name): the one a watermark
    key binds (:func:`ubwlib.watermarks.base.dataset_fingerprint`), here the key of cached results."""
    return dataset_fingerprint(dataset)


@lru_cache(maxsize=8)
def _load_splits(spec: str, root: str | None) -> DatasetSplits:
    return load_dataset(spec, root=root)


def load_data(profile: Profile) -> DatasetSplits:
    """The profile's train/test splits (stratified subsets of ``train_size``/``test_size``, seeded). Like the
    full splits, they are made once per process and shared (datasets are immutable): a chapter asks for them
    dozens of times, and each call would otherwise copy the subsets and hash them again as cache keys."""
    return _subsets(profile.dataset, profile.data_root, profile.train_size, profile.test_size, profile.subset_seed)


@lru_cache(maxsize=8)
def _subsets(spec: str, root: str | None, train_size: int | None, test_size: int | None, seed: int) -> DatasetSplits:
    full = _load_splits(spec, root)
    tr, te = full.train, full.test
    if train_size is not None and train_size < len(tr):
        tr = tr.stratified_subset(train_size, seed=seed)
    if test_size is not None and test_size < len(te):
        te = te.stratified_subset(test_size, seed=seed + 1)
    return DatasetSplits(tr, te)


@dataclass(frozen=True)
class TrainedModel:
    model: nn.Module
    history: pd.DataFrame
    cached: bool
    """True when the weights were loaded from the cache (no training happened)."""
    key: str

    @property
    def train_seconds(self) -> float:
        return float(self.history["seconds"].sum()) if "seconds" in self.history else 0.0


def trained_model(
    profile: Profile,
    train_set: ImageDataset,
    *,
    seed: int | None = None,
    cache: Cache | None = None,
    progress: bool = True,
    desc: str = "train",
) -> TrainedModel:
    """The profile's model trained on ``train_set`` with the profile's schedule (from the cache when possible)."""
    return trained_models(profile, [(train_set, seed)], cache=cache, progress=progress, desc=desc)[0]


def trained_models(
    profile: Profile,
    jobs: list[tuple[ImageDataset, int | None]],
    *,
    cache: Cache | None = None,
    progress: bool = True,
    desc: str = "train",
) -> list[TrainedModel]:
    """:func:`trained_model` for each ``(train_set, seed)`` of ``jobs`` (seed None: the profile's). Those not in the
    cache are trained ``profile.stack`` at a time side by side (:func:`ubwlib.train.train_many`; datasets of one
    size), then cached one by one under the same keys as :func:`trained_model`'s."""
    cache = cache or default_cache()
    specs = []
    for train_set, seed in jobs:
        seed = profile.seed if seed is None else seed
        cfg = profile.train.replace(seed=seed)
        settings = {
            "model": profile.model,
            "width": profile.width,
            "num_classes": train_set.num_classes,
            "in_channels": train_set.image_shape[0],
            "train": dataclasses.asdict(cfg),
            "data": fingerprint(train_set),
        }
        specs.append((train_set, cfg, settings))

    def make(train_set: ImageDataset, cfg: TrainConfig) -> nn.Module:
        return build_model(profile.model, train_set.num_classes, train_set.image_shape[0], profile.width,
                           seed=cfg.seed)

    keys = [cache.path_for("model", settings, VERSIONS["model"]).name for _, _, settings in specs]
    first = {}  # cache key -> its first job (a model asked twice is trained once)
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    entries = {}

    def missing(candidates) -> list[int]:
        """The jobs among ``candidates`` whose model is not in the cache (the others' entries are kept)."""
        out = []
        for i in candidates:
            entry = cache.get("model", specs[i][2], VERSIONS["model"])
            if entry is None:
                out.append(i)
            else:
                entries[keys[i]] = entry
        return out

    todo = missing(first.values())
    if todo:
        # one computation at a time in this cache: another process may have trained some while this one waited
        with cache.computing():
            todo = missing(todo)
            # side by side only what can share a pass: datasets of one size, image shape and number of classes
            groups: dict[tuple, list[int]] = {}
            for i in todo:
                d = specs[i][0]
                groups.setdefault((len(d), tuple(d.image_shape), d.num_classes), []).append(i)
            stack = max(1, profile.stack)
            for members in groups.values():
                for start in range(0, len(members), stack):
                    chunk = members[start : start + stack]
                    t0 = time.perf_counter()
                    results = train_many([make(specs[i][0], specs[i][1]) for i in chunk],
                                         [specs[i][0] for i in chunk], [specs[i][1] for i in chunk],
                                         progress=progress, desc=desc)
                    share = (time.perf_counter() - t0) / len(chunk)  # each model's part of the pass
                    for i, (model, hist) in zip(chunk, results):
                        entries[keys[i]] = cache.put("model", specs[i][2], VERSIONS["model"],
                                                     state_dict_tensors(model), {"history": table_to_data(hist)},
                                                     overwrite=cache.enabled and not cache.reads_enabled,
                                                     seconds=share)
    trained = {keys[i] for i in todo}
    out = []
    for (train_set, cfg, _), k in zip(specs, keys):
        entry = entries[k]
        model = make(train_set, cfg)
        load_state_dict_tensors(model, entry.tensors)
        model.to(resolve_device(None)).eval()
        out.append(TrainedModel(model, table_from_data(entry.data["history"]), bool(entry.hit) and k not in trained,
                                entry.path.name))
    return out


def benign_model(profile: Profile, seed: int | None = None, cache: Cache | None = None,
                 progress: bool = True) -> TrainedModel:
    """'No Attack': the profile's model trained on the benign training set."""
    return trained_model(profile, load_data(profile).train, seed=seed, cache=cache, progress=progress,
                         desc="benign")


def benign_models(profile: Profile, seeds, cache: Cache | None = None, progress: bool = True) -> list[TrainedModel]:
    """:func:`benign_model` for each seed; those not cached train side by side (:func:`trained_models`)."""
    train_set = load_data(profile).train
    return trained_models(profile, [(train_set, s) for s in seeds], cache=cache, progress=progress, desc="benign")


def cached_table(name: str, settings: dict, compute, cache: Cache | None = None) -> pd.DataFrame:
    """A results table (e.g. a defense curve) computed once per ``settings`` and then read from the cache, so
    that a warm rebuild of the book recomputes nothing. ``settings`` must name everything the table depends on
    (models by their cache keys, data by fingerprint)."""
    cache = cache or default_cache()
    entry = cache.get_or_compute("table", {"name": name, **settings}, VERSIONS["table"],
                                 lambda: (None, {"table": table_to_data(compute())}))
    return table_from_data(entry.data["table"])


def key_digest(key) -> dict:
    """Everything that defines a watermark key (its trigger), for the settings of a cache entry; the cache
    hashes the tensors."""
    return {"method": key.method, "settings": key.settings, "tensors": dict(key.tensors), "seed": key.seed,
            "target": key.target}


def cached_evaluation(trained: TrainedModel, test: ImageDataset, key, *, source_class: int | None = None,
                      seed: int = 0, cache: Cache | None = None) -> dict:
    """:func:`ubwlib.watermarks.evaluate` of a trained model under a watermark key, cached under the model's cache
    key (which covers its training data), the trigger, the test set and the evaluation settings: a warm rebuild
    of the book runs no inference for its tables."""
    from ..watermarks import evaluate

    settings = {"recipe": "evaluate", "model": trained.key,
                "trigger": key_digest(key),
                "test": fingerprint(test), "source_class": source_class, "seed": seed}
    df = cached_table("evaluation", settings,
                      lambda: pd.DataFrame([evaluate(trained.model, test, key, source_class=source_class, seed=seed)]),
                      cache)
    row = df.iloc[0].to_dict()
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
