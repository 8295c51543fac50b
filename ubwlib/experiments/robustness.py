"""Recipes of the Defenses chapter: fine-tuning, pruning and STRIP against the watermarked models.

The paper's Section 5.4.2 tests whether UBW survives what a suspect might do to a model trained on the
protected dataset. Each recipe takes a watermark's run on the profile (:func:`~.runs.run`:
released dataset, model trained from scratch on it, cached), applies one defense of :mod:`ubwlib.defenses`
and evaluates the result with the chapter's metrics (:func:`defense_metrics`: BA, ASR-A, ASR-C, D_p, on the
evaluation set of Table 1, the source class for UBW-C and Sleeper Agent). Every table is cached with
:func:`~.core.cached_table` under everything it depends on (model cache key, watermark key, data
fingerprints, settings, seed), so a warm rebuild of the book recomputes nothing.

Two layers:

- model-level functions (:func:`defense_metrics`, :func:`fine_tuning_curve`, :func:`pruning_sweep`,
  :func:`strip_sets`, :func:`strip_row`) take a model and data, never modify the model, and cache nothing;
- cached recipes (:func:`fine_tuning_table`, :func:`pruning_table`, :func:`strip_table`,
  :func:`benign_reference_table`) take a profile and a method.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterable, Sequence

import pandas as pd
import torch
from torch import nn

from ..cache import Cache
from ..data import ImageDataset
from ..defenses import FineTuningSettings, StripSettings, fine_tune, pruning_curve, strip_detect
from ..train import predict
from ..watermarks import WatermarkedDataset, WatermarkKey, evaluate, trigger
from ..watermarks.evaluate import evaluation_mask
from .core import benign_model, cached_table, fingerprint, key_digest, load_data
from .paper import METHOD_LABELS
from .profiles import Profile
from .runs import release, run, source_class

__all__ = [
    "DEFENSE_METHODS",
    "STRIP_METHODS",
    "PRUNING_RATES",
    "PRUNING_LAYER",
    "BENIGN_IMAGES",
    "STRIP_IMAGES",
    "METRICS",
    "VERSION",
    "defense_metrics",
    "benign_sample",
    "fine_tuning_curve",
    "pruning_sweep",
    "strip_sets",
    "strip_row",
    "default_fine_tuning",
    "fine_tuning_table",
    "pruning_table",
    "strip_table",
    "benign_reference_table",
    "defense_settings_table",
]

#: The watermarks whose resistance to fine-tuning and pruning the paper reports (Figures 6 and 7).
DEFENSE_METHODS = ("ubw-p", "ubw-c")
#: STRIP is run on a targeted baseline (BadNets) and both UBW variants.
STRIP_METHODS = ("badnets", "ubw-p", "ubw-c")
#: Figure 7's pruning rates: 0.0, 0.1, ..., 0.9.
PRUNING_RATES = tuple(round(0.1 * i, 1) for i in range(10))
#: The pruned stage: the last convolutional stage, as in classic fine-pruning.
PRUNING_LAYER = "layer4"
#: Benign training images whose mean activations rank the channels (all of them when the set is smaller).
BENIGN_IMAGES = 2000
#: STRIP's clean hold-out (and overlay pool) size, and the number of clean / triggered test inputs.
STRIP_IMAGES = 500
#: The columns :func:`defense_metrics` keeps from :func:`ubwlib.watermarks.evaluate`.
METRICS = ("BA", "ASR-A", "ASR-C", "D_p")
#: Part of every cache key of this module: bump it when a recipe here changes.
VERSION = "1"


# --------------------------------------------------------------------------- model-level helpers
@contextlib.contextmanager
def _same_mode(model: nn.Module):
    """Put ``model`` back in its train/eval mode afterwards (prediction helpers switch it to eval)."""
    was_training = model.training
    try:
        yield model
    finally:
        model.train(was_training)


def _key_of(released: WatermarkedDataset | WatermarkKey) -> WatermarkKey:
    return released.key if isinstance(released, WatermarkedDataset) else released


def defense_metrics(model: nn.Module, test: ImageDataset, released: WatermarkedDataset | WatermarkKey,
                    method: str | None = None, seed: int = 0) -> dict:
    """BA (all clean test images) and ASR-A, ASR-C, D_p (triggered evaluation set) of ``model`` for a watermark.

    ``method`` (default: the key's) picks the evaluation set: the source class for UBW-C and Sleeper Agent
    (:func:`~ubwlib.experiments.runs.source_class` of the key), the non-target classes for targeted methods, all classes otherwise. Rates are
    fractions; ``seed`` goes to the trigger. The model's train/eval mode is left as it was."""
    key = _key_of(released)
    method = key.method if method is None else method
    with _same_mode(model):
        row = evaluate(model, test, key, source_class=source_class(key), seed=seed)
    return {k: row[k] for k in METRICS}


def benign_sample(train: ImageDataset, n: int, seed: int) -> ImageDataset:
    """A stratified, seeded sample of ``n`` benign training images (the whole set when it has at most ``n``)."""
    return train if n >= len(train) else train.stratified_subset(n, seed)


def fine_tuning_curve(model: nn.Module, benign_train: ImageDataset, test: ImageDataset,
                      released: WatermarkedDataset | WatermarkKey, method: str | None = None,
                      settings: FineTuningSettings = FineTuningSettings(), seed: int = 0,
                      progress: bool = False) -> pd.DataFrame:
    """Fine-tune a copy of ``model`` on ``settings.fraction`` of ``benign_train`` (:func:`ubwlib.defenses.fine_tune`);
    one row per epoch ``0..settings.epochs`` (0: before tuning) with :func:`defense_metrics` and the
    tuning loss. ``model`` is not modified."""
    def metrics(m: nn.Module) -> dict:
        return defense_metrics(m, test, released, method, seed)

    _, history = fine_tune(model, benign_train, settings, evaluate=metrics, progress=progress,
                           desc=f"fine-tune {method or _key_of(released).method}")
    return history


def pruning_sweep(model: nn.Module, benign_images: ImageDataset | torch.Tensor, test: ImageDataset,
                  released: WatermarkedDataset | WatermarkKey, method: str | None = None,
                  rates: Iterable[float] = PRUNING_RATES, seed: int = 0, layer: str = PRUNING_LAYER,
                  progress: bool = False) -> pd.DataFrame:
    """Prune copies of ``model`` at each of ``rates`` (the ``layer`` channels with the lowest mean activation on
    ``benign_images``; :func:`ubwlib.defenses.pruning_curve`) and evaluate each with :func:`defense_metrics`.
    Columns: ``rate``, ``channels pruned``, BA, ASR-A, ASR-C, D_p. ``model`` is not modified."""
    def metrics(m: nn.Module) -> dict:
        return defense_metrics(m, test, released, method, seed)

    with _same_mode(model):
        return pruning_curve(model, benign_images, list(rates), metrics, layer=layer, progress=progress)


def strip_sets(train: ImageDataset, test: ImageDataset, key: WatermarkKey, method: str | None = None,
               n: int = STRIP_IMAGES, seed: int = 0) -> tuple[ImageDataset, ImageDataset, torch.Tensor]:
    """STRIP's inputs for one watermark: ``(clean_holdout, clean_test, triggered)``.

    ``clean_holdout``: :func:`benign_sample` of ``n`` training images (the defender's clean set, which is also
    the overlay pool). ``clean_test``: up to ``n`` test images of the method's evaluation set
    (:func:`ubwlib.watermarks.evaluate.evaluation_mask`: non-target classes for targeted methods, the source
    class for UBW-C and Sleeper Agent, all classes otherwise), drawn with ``seed``. ``triggered``: the same
    images with the key's trigger (uint8 tensor)."""
    method = key.method if method is None else method
    holdout = benign_sample(train, n, seed)
    mask, _ = evaluation_mask(test, key, source_class(key))
    pool = mask.nonzero().reshape(-1)
    if len(pool) == 0:
        raise ValueError(f"the evaluation set of {method} is empty in {test.name}")
    g = torch.Generator().manual_seed(int(seed))
    idx = pool[torch.randperm(len(pool), generator=g)[:n]].sort().values
    clean_test = test.subset(idx)
    return holdout, clean_test, trigger(clean_test.images, key, seed=seed)


def strip_row(model: nn.Module, train: ImageDataset, test: ImageDataset, key: WatermarkKey,
              method: str | None = None, settings: StripSettings = StripSettings(), n: int = STRIP_IMAGES,
              seed: int = 0) -> dict:
    """Run STRIP (:func:`ubwlib.defenses.strip_detect`) on :func:`strip_sets`; returns ``n clean``,
    ``n triggered``, ``ASR-A`` (share of the triggered inputs the model misclassifies: whether the trigger
    works on them at all) and strip_detect's ``threshold``, ``detection rate``, ``false rejection rate``,
    ``AUC``, ``entropy clean (mean)``, ``entropy triggered (mean)``. ``model`` is not modified."""
    holdout, clean_test, triggered = strip_sets(train, test, key, method, n, seed)
    with _same_mode(model):
        asr = float((predict(model, triggered) != clean_test.labels).float().mean())
        found = strip_detect(model, holdout, clean_test, triggered, settings)
    return {"n clean": len(clean_test), "n triggered": len(triggered), "ASR-A": asr, **found}


# --------------------------------------------------------------------------- cached recipes
def _run_settings(profile: Profile, run, seed: int) -> dict:
    data = load_data(profile)
    return {
        "recipe": f"robustness/{VERSION}",
        "model": run.trained.key,
        "watermark": key_digest(run.released.key),
        "train": fingerprint(data.train),
        "test": fingerprint(data.test),
        "seed": seed,
    }


def default_fine_tuning(profile: Profile, seed: int | None = None) -> FineTuningSettings:
    """The paper's fine-tuning settings (:class:`~ubwlib.defenses.FineTuningSettings` defaults), with the
    profile's training precision and the experiment's seed (which draws the 10% and the batch order)."""
    seed = profile.seed if seed is None else seed
    return FineTuningSettings(precision=profile.train.precision, seed=seed)


def fine_tuning_table(profile: Profile, method: str, seed: int | None = None,
                      settings: FineTuningSettings | None = None, cache: Cache | None = None,
                      progress: bool = True) -> pd.DataFrame:
    """Figure 6 for one watermark: its model fine-tuned on benign training data, evaluated after every epoch.

    Columns: ``method``, ``epoch`` (0 = before fine-tuning, up to ``settings.epochs``), BA, ASR-A, ASR-C, D_p,
    then the tuning ``loss``, ``train_acc``, ``lr``, ``samples``, ``seconds``. ``settings`` default:
    :func:`default_fine_tuning`. Cached."""
    seed = profile.seed if seed is None else seed
    settings = default_fine_tuning(profile, seed) if settings is None else settings
    if not isinstance(settings, FineTuningSettings):
        raise TypeError(f"settings must be a FineTuningSettings; got {type(settings).__name__}")
    wm_run = run(profile, method, seed, cache, progress)
    data = load_data(profile)

    def compute() -> pd.DataFrame:
        df = fine_tuning_curve(wm_run.trained.model, data.train, data.test, wm_run.released, method, settings, seed,
                               progress)
        df.insert(0, "method", method)
        return df

    key = {**_run_settings(profile, wm_run, seed), "method": method, "fine-tuning": dataclasses.asdict(settings)}
    return cached_table("fine-tuning", key, compute, cache)


def pruning_table(profile: Profile, method: str, rates: Sequence[float] = PRUNING_RATES, seed: int | None = None,
                  cache: Cache | None = None, progress: bool = True, n_benign: int = BENIGN_IMAGES,
                  benign: bool = False) -> pd.DataFrame:
    """Figure 7 for one watermark: its model pruned at each rate (channels of :data:`PRUNING_LAYER` ranked by
    their mean activation on :func:`benign_sample` of ``n_benign`` training images), evaluated.

    ``benign=True`` prunes the benign ('No Attack') model instead and evaluates it with the same trigger and
    evaluation set: what pruning alone does to the ASRs, without any watermark. Columns: ``method``, ``model``
    (``watermarked`` or ``benign``), ``rate``, ``channels pruned``, BA, ASR-A, ASR-C, D_p; one row per rate.
    Cached."""
    seed = profile.seed if seed is None else seed
    rates = [float(r) for r in rates]
    wm_run = run(profile, method, seed, cache, progress)
    trained = benign_model(profile, seed=seed, cache=cache, progress=progress) if benign else wm_run.trained
    data = load_data(profile)

    def compute() -> pd.DataFrame:
        images = benign_sample(data.train, n_benign, seed)
        df = pruning_sweep(trained.model, images, data.test, wm_run.released, method, rates, seed, PRUNING_LAYER,
                           progress)
        df.insert(0, "model", "benign" if benign else "watermarked")
        df.insert(0, "method", method)
        return df

    key = {**_run_settings(profile, wm_run, seed), "model": trained.key, "method": method, "rates": rates,
           "layer": PRUNING_LAYER, "n_benign": n_benign}
    return cached_table("pruning", key, compute, cache)


def strip_table(profile: Profile, methods: Sequence[str] = STRIP_METHODS, settings: StripSettings | None = None,
                n: int = STRIP_IMAGES, seed: int | None = None, cache: Cache | None = None, progress: bool = True,
                reference: bool = True) -> pd.DataFrame:
    """STRIP against each watermarked model: one row per method (index: the method's display name), each
    cached on its own (:func:`strip_row`; columns ``method``, ``model``, ``eval set`` and strip_row's).

    ``reference``: also a last row "No Attack (UBW-P trigger)": the benign model with UBW-P's trigger on
    all test classes, i.e. what STRIP reports when the trigger carries no backdoor (cheap: the benign model is
    trained anyway, and UBW-P's key needs no training). ``settings`` default: :class:`StripSettings` with the
    experiment's seed."""
    seed = profile.seed if seed is None else seed
    settings = StripSettings(seed=seed) if settings is None else settings
    if not isinstance(settings, StripSettings):
        raise TypeError(f"settings must be a StripSettings; got {type(settings).__name__}")
    data = load_data(profile)
    common = {"recipe": f"robustness/{VERSION}", "train": fingerprint(data.train), "test": fingerprint(data.test),
              "seed": seed, "strip": dataclasses.asdict(settings), "n": n}

    def one(label: str, model_kind: str, model: nn.Module, model_key: str, key: WatermarkKey, method: str):
        def compute() -> pd.DataFrame:
            row = strip_row(model, data.train, data.test, key, method, settings, n, seed)
            return pd.DataFrame([{"Method": label, "method": method, "model": model_kind,
                                  "eval set": evaluation_mask(data.test, key, source_class(key))[1], **row}])

        settings_ = {**common, "method": method, "model": model_key, "watermark": key_digest(key)}
        return cached_table("strip", settings_, compute, cache)

    rows = []
    for m in methods:
        r = run(profile, m, seed, cache, progress)
        rows.append(one(METHOD_LABELS.get(m, m), "watermarked", r.trained.model, r.trained.key, r.released.key, m))
    if reference:
        benign = benign_model(profile, seed=seed, cache=cache, progress=progress)
        key = release(profile, "ubw-p", seed).key
        rows.append(one("No Attack (UBW-P trigger)", "benign", benign.model, benign.key, key, "ubw-p"))
    return pd.concat(rows, ignore_index=True).set_index("Method")


def benign_reference_table(profile: Profile, methods: Sequence[str] = DEFENSE_METHODS, seed: int | None = None,
                           cache: Cache | None = None, progress: bool = True) -> pd.DataFrame:
    """The benign ('No Attack') model under each watermark's trigger and evaluation set (:func:`defense_metrics`):
    the ASR-A and ASR-C that the trigger causes without any watermark, the floor the curves of Figures 6 and
    7 should be read against. One row per method (index: display name). Cached."""
    seed = profile.seed if seed is None else seed
    data = load_data(profile)
    benign = benign_model(profile, seed=seed, cache=cache, progress=progress)
    keys = {m: run(profile, m, seed, cache, progress).released.key for m in methods}

    def compute() -> pd.DataFrame:
        rows = [{"Method": METHOD_LABELS.get(m, m), "method": m,
                 **defense_metrics(benign.model, data.test, k, m, seed)} for m, k in keys.items()]
        return pd.DataFrame(rows)

    settings = {"recipe": f"robustness/{VERSION}", "model": benign.key, "test": fingerprint(data.test),
                "seed": seed, "watermarks": {m: key_digest(k) for m, k in keys.items()}}
    return cached_table("benign-reference", settings, compute, cache).set_index("Method")


def defense_settings_table(fine_tuning: FineTuningSettings | None = None, strip: StripSettings | None = None,
                           rates: Sequence[float] = PRUNING_RATES, n_benign: int = BENIGN_IMAGES,
                           n_strip: int = STRIP_IMAGES) -> pd.DataFrame:
    """The settings of the three defenses (defaults: the paper's / the public toolbox's), one row per
    (defense, setting), for the chapter's settings table. Values are strings."""
    ft = FineTuningSettings() if fine_tuning is None else fine_tuning
    st = StripSettings() if strip is None else strip
    rows = [
        ("fine-tuning", "benign training data used", f"{ft.fraction:.0%} (stratified, seeded)"),
        ("fine-tuning", "epochs", ft.epochs),
        ("fine-tuning", "optimiser", "SGD, constant learning rate"),
        ("fine-tuning", "learning rate", ft.lr),
        ("fine-tuning", "momentum", ft.momentum),
        ("fine-tuning", "weight decay", ft.weight_decay),
        ("fine-tuning", "batch size", ft.batch_size),
        ("fine-tuning", "augmentation", "random horizontal flips" if ft.flip else "none"),
        ("pruning", "pruned stage", f"{PRUNING_LAYER} (last convolutional stage), output channels masked"),
        ("pruning", "criterion", "lowest mean activation on benign images"),
        ("pruning", "benign images", f"{n_benign} training images (all when fewer)"),
        ("pruning", "rates", ", ".join(f"{r:g}" for r in rates)),
        ("pruning", "channels pruned", "floor(rate x C)"),
        ("STRIP", "overlays per input (N)", st.n_overlays),
        ("STRIP", "blend", f"(1 - {st.alpha:g}) x + {st.alpha:g} x_overlay"),
        ("STRIP", "threshold", f"{st.frr:.0%} quantile of the clean hold-out entropies (FRR {st.frr:.0%})"),
        ("STRIP", "clean hold-out / overlay pool", f"{n_strip} benign training images"),
        ("STRIP", "test inputs", f"up to {n_strip} clean and the same {n_strip} triggered"),
    ]
    df = pd.DataFrame(rows, columns=["defense", "setting", "value"])
    df["value"] = df["value"].map(str)
    return df.set_index(["defense", "setting"])

