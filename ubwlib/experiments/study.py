"""What makes UBW-C survive training from scratch: the recipe study (issue 9).

Each row of the study is one UBW-C release on the ``study`` profile with one lever of gradient matching changed
(:data:`LEVERS`), and victims trained from scratch on it with seeds that no crafting model used; beside them, the
benign model and the random-noise control (the same poisons, 0 crafting steps) with the same victim seeds. Sleeper
Agent and Label-Consistent under the adopted recipe check the shared mechanisms.

Everything goes through the cache (releases, crafting checkpoints, victims, evaluations), so ``make study`` is
resumable and a second run only reads. The finished table is stored with its provenance under
``results/study/`` (:func:`store_study`), and the book reads that file (:func:`load_stored_study`) instead of
recomputing a study that costs more than a cold build can afford.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..cache import Cache, settings_hash
from .core import (benign_model, cached_evaluation, cached_table, fingerprint, key_digest, load_data, trained_model,
                   trained_models)
from .profiles import Profile, get_profile
from .provenance import provenance
from .runs import crafting_budget, method_settings, release, source_class, victim_seed
from ..train import predict

__all__ = ["LEVERS", "COMBINATIONS", "CHECKS", "CHECK_LEVERS", "study_rows", "study_row", "study_table", "victim_trajectory", "store_study",
           "load_stored_study", "best_row", "RESULTS_DIR",
           "surrogate_fine_tune", "fine_tune_table", "FINE_TUNE_ROWS", "FINE_TUNE_LRS", "FINE_TUNE_ON",
           "poisons_alone_table", "POISONS_ALONE_ROWS", "POISONS_ALONE_TRAINING",
           "trigger_learnability", "learnability_table", "LEARNABILITY_AMPLITUDES",
           "LEARNABILITY_KINDS", "LEARNABILITY_LONGER", "LEARNABILITY_PAPER", "LEARNABILITY_PAPER_EPOCHS",
           "TEST_AMPLITUDES", "AMPLITUDE_ROWS", "BACKGROUND_SHARE", "background_share", "amplitude_response",
           "amplitude_table", "TRIGGER_SHARE_METHODS", "trigger_shares"]

RESULTS_DIR = Path(__file__).resolve().parents[2] / "results" / "study"
STUDY_FILE = "ubwc-study"

#: One lever at a time, each against "single surrogate" (the public code's structure at the study budget: one
#: surrogate whose retrainings reuse its seed). Values: overrides of the crafting settings
#: (:class:`~ubwlib.watermarks.GradientMatchingSettings`) under ``crafting``, of UBW-C's own settings at the top.
LEVERS: dict[str, dict] = {
    "single surrogate, reused seed": {"crafting": {"fresh_seeds": False}},
    "fresh seed per retraining": {"crafting": {"fresh_seeds": True}},
    "trigger init (not in the paper)": {"crafting": {"fresh_seeds": False, "init": "trigger"}},
    "trigger init, 0 steps (faint trigger alone)": {"crafting": {"fresh_seeds": False, "init": "trigger",
                                                                 "steps": 0}},
    "eps 32/255": {"crafting": {"fresh_seeds": False, "eps": 32 / 255}},
    "training-stage snapshots 1/4 1/2 3/4 1 (not in the paper)": {
        "crafting": {"fresh_seeds": False, "stages": (0.25, 0.5, 0.75, 1.0)}},
    "poisons outside the source class": {"crafting": {"fresh_seeds": False}, "poison_classes": "other"},
    "poisons from the source class only": {"crafting": {"fresh_seeds": False}, "poison_classes": "source"},
    "ensemble of 2": {"crafting": {"fresh_seeds": False, "ensemble": 2}},
    "4-epoch schedule (the default profile's)": {"crafting": {"fresh_seeds": False},
                                                 "profile": {"train": {"epochs": 4}}},
    "ResNet-18 x1/8, 4 epochs (the default profile's model)": {
        "crafting": {"fresh_seeds": False},
        "profile": {"model": "resnet18-cifar", "width": 0.125, "train": {"epochs": 4}}},

    "contrast 1: what the trigger adds (not in the paper)": {"crafting": {"fresh_seeds": False, "contrast": 1.0}},
    "l2 matching: size as well as direction (not in the paper)": {"crafting": {"fresh_seeds": False,
                                                                              "matching": "l2"}},
    "trainer's augmentation": {"crafting": {"fresh_seeds": False, "augment": "trainer"}},
    "retrain every 10 steps (3 retrainings)": {"crafting": {"fresh_seeds": False, "retrain_every": 10}},
    "2 restarts (best held-out)": {"crafting": {"fresh_seeds": False, "restarts": 2}},
    "random poisons": {"crafting": {"fresh_seeds": False, "selection": "random"}},
    "no retraining": {"crafting": {"fresh_seeds": False, "retrain_every": 0}},
    "lambda 0 (no entropy term)": {"crafting": {"fresh_seeds": False}, "lam": 0.0},
    "2x steps": {"crafting": {"fresh_seeds": False, "steps": 80, "retrain_every": 40}},
    "victims trained 4x longer (64 epochs; same release)": {"crafting": {"fresh_seeds": False},
                                                            "victim": {"train": {"epochs": 64}}},
    "source-like poisons (not in the paper)": {"crafting": {"fresh_seeds": False, "selection": "source-like"}},

}
REFERENCE = "single surrogate, reused seed"
#: The levers that lowered the held-out passenger loss, together; then the source-like poisons with the trigger.
COMBINATIONS: dict[str, dict] = {
    "fresh seeds + eps 32/255 + training-stage snapshots": {
        "crafting": {"fresh_seeds": True, "eps": 32 / 255, "stages": (0.25, 0.5, 0.75, 1.0)}},
    "contrast 1 + poisons outside the source class": {"crafting": {"fresh_seeds": False, "contrast": 1.0},
                                                      "poison_classes": "other"},
    "contrast 1 + eps 32/255": {"crafting": {"fresh_seeds": False, "contrast": 1.0, "eps": 32 / 255}},
    "l2 matching + contrast 1": {"crafting": {"fresh_seeds": False, "contrast": 1.0, "matching": "l2"}},
    # after the trigger-learnability check (learnability_table): poisons a victim needs the trigger for
    "source-like poisons + trigger init": {"crafting": {"fresh_seeds": False, "selection": "source-like",
                                                        "init": "trigger"}},
    "source-like poisons + trigger init + eps 32/255": {
        "crafting": {"fresh_seeds": False, "selection": "source-like", "init": "trigger", "eps": 32 / 255}},
    "source-like poisons + trigger init + eps 64/255": {
        "crafting": {"fresh_seeds": False, "selection": "source-like", "init": "trigger", "eps": 64 / 255}},
    "source-like poisons + trigger init + eps 64/255, 0 steps": {
        "crafting": {"fresh_seeds": False, "selection": "source-like", "init": "trigger", "eps": 64 / 255,
                     "steps": 0}},
    "source-like poisons + trigger init + contrast 1": {
        "crafting": {"fresh_seeds": False, "selection": "source-like", "init": "trigger", "contrast": 1.0}},
    "source-like poisons + trigger init + eps 64/255 + contrast 1": {
        "crafting": {"fresh_seeds": False, "selection": "source-like", "init": "trigger", "eps": 64 / 255,
                     "contrast": 1.0}},
}
#: The other gradient-matching watermark and Label-Consistent, with the profile's (adopted) recipe.
CHECKS = ("sleeper-agent", "label-consistent")
#: The shared mechanism under a lever: (method, lever) per row name.
CHECK_LEVERS: dict[str, tuple[str, dict]] = {
    "sleeper-agent, contrast 1 (not in the paper)": ("sleeper-agent", {"crafting": {"contrast": 1.0}}),
}
METRICS = ("ASR-A", "ASR-C", "D_p", "BA", "source clean accuracy", "ASR (targeted)")


def _resolve(profile: Profile, lever: dict | str | None) -> tuple[Profile, dict, Profile]:
    """(profile, UBW-C release overrides, the victims' profile) of a lever: a dict of settings (its ``profile``
    entry changes the model or schedule of everything, its ``victim`` entry only the victims' and their benign
    baselines'), ``"noise"`` (the noise control: 0 crafting steps) or None (the profile's own recipe)."""
    if lever == "noise":
        return profile, _overrides(profile, {"crafting": {"steps": 0}}), profile
    lever = dict(lever or {})
    victim = lever.pop("victim", None)
    if "profile" in lever:  # a row on another model or schedule
        profile = get_profile(profile, **lever.pop("profile"))
    return profile, _overrides(profile, lever), (get_profile(profile, **victim) if victim else profile)


def _overrides(profile: Profile, lever: dict) -> dict:
    lever = {k: v for k, v in lever.items() if k != "profile"}
    crafting = dataclasses.replace(crafting_budget(profile), **lever.pop("crafting", {}))
    return {"crafting": crafting, **lever}


def _victims(profile: Profile, seed: int, victims: int) -> list[int]:
    return [victim_seed(seed) + i for i in range(victims)]


def _summary(rows: list[dict], extra: dict) -> dict:
    out = dict(extra)
    for k in METRICS:
        vals = np.array([r.get(k, math.nan) for r in rows], dtype=float)
        if np.isnan(vals).all():
            continue
        out[k] = float(vals.mean())
        out[f"{k} std"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
        out[f"{k} per victim"] = " / ".join(f"{v:.3f}" for v in vals)
    out["victims"] = len(rows)
    return out


def _row_models(profile: Profile, name: str, lever: dict | str | None, method: str, seed: int, victims: int,
                cache: Cache | None, progress: bool) -> tuple:
    """(release profile, victims' profile, release or None, watermark key, victims) of a study row; the benign
    model's row (``lever`` None) has no release: its key is the trigger of the UBW-C release with the study's
    crafting settings, its victims the benign models of the same seeds."""
    victim_profile = profile
    if lever is not None:
        profile, overrides, victim_profile = _resolve(profile, lever)
    seeds = _victims(profile, seed, victims)
    if lever is None:
        key = release(profile, "ubw-c", seed, cache, progress, **_overrides(profile, {})).key
        return profile, victim_profile, None, key, [benign_model(victim_profile, seed=s, cache=cache,
                                                                 progress=progress) for s in seeds]
    if method == "label-consistent":  # no crafting settings: the profile's recipe
        overrides = {}
    released = release(profile, method, seed, cache, progress, **overrides)
    models = [trained_model(victim_profile, released.dataset, seed=s, cache=cache, progress=progress, desc=name)
              for s in seeds]
    return profile, victim_profile, released, released.key, models


def study_row(profile: Profile, name: str, lever: dict | None, *, method: str = "ubw-c", seed: int | None = None,
              victims: int = 2, cache: Cache | None = None, progress: bool = True) -> dict:
    """One row: ``lever`` (None: the benign model; ``"noise"``: the noise control) released with ``seed``, then
    ``victims`` models trained from scratch on it (seeds :func:`victim_seed` onwards; a lever's ``victim`` entry
    overrides the profile for the victims and their benign baselines only, e.g. a longer schedule), evaluated on
    the triggered
    test images of the source class (targeted methods: their targeted ASR there; Label-Consistent: all non-target
    test images)."""
    seed = profile.seed if seed is None else seed
    t0 = time.perf_counter()
    profile, victim_profile, released, key, models = _row_models(profile, name, lever, method, seed, victims, cache,
                                                                 progress)
    data = load_data(profile)
    extra: dict = {"row": name, "method": "no attack" if lever is None else method}
    if released is not None:
        report = released.report or {}
        hist = report.get("history")
        if hist is not None and len(hist):
            last = hist[hist["step"] == hist["step"].max()]
            extra["crafting loss"] = float(last["passenger loss"].min())
            held = hist["held-out passenger loss"].dropna() if "held-out passenger loss" in hist else []
            if len(held):
                extra["held-out loss (start)"] = float(held.iloc[0])
                extra["held-out loss (end)"] = float(held.iloc[-1])
        secs = report.get("seconds") or {}
        extra["release seconds"] = float(sum(v for v in secs.values() if isinstance(v, (int, float))))
    source = source_class(key)
    rows = [cached_evaluation(m, data.test, key, source_class=source, seed=seed, cache=cache) for m in models]
    if source is not None:  # a watermark keeps the clean source images: ASR-A alone cannot tell it from damage
        clean_src = data.test.images[data.test.labels == source]
        for r, m in zip(rows, models):
            r["source clean accuracy"] = float((predict(m.model, clean_src) == source).float().mean())
    if lever is not None:  # the benign models of the same seeds (and of this row's profile) under the same trigger
        benign = [cached_evaluation(benign_model(victim_profile, seed=s, cache=cache, progress=progress), data.test, key,
                                    source_class=source, seed=seed, cache=cache)
                  for s in _victims(profile, seed, victims)]
        extra["benign ASR-A"] = float(np.mean([r["ASR-A"] for r in benign]))
    extra["seconds (this call)"] = time.perf_counter() - t0
    return _summary(rows, extra)


def best_row(table: pd.DataFrame, ba_points: float = 0.03) -> str | None:
    """The UBW-C row with the highest source-class ASR-A among those whose BA stays within ``ba_points`` of the
    benign model's (a recipe that wrecks the model is no watermark); None when there is none."""
    ubwc = table[table["method"] == "ubw-c"]
    if "benign model" in table.index:
        ubwc = ubwc[ubwc["BA"] >= table.loc["benign model", "BA"] - ba_points]
    return ubwc["ASR-A"].idxmax() if len(ubwc) else None


def victim_trajectory(profile: Profile, lever: dict | str | None = None, *, seed: int | None = None,
                      cache: Cache | None = None, progress: bool = True) -> pd.DataFrame:
    """Alignment along a victim's training (cached): UBW-C released with ``lever`` (None: the profile's own
    recipe; ``"noise"``: the noise control), then the first victim trained from scratch, measured before the first
    epoch and after each: its learning rate, the passenger loss of the released poisons and of the same images
    unperturbed against *its own* target gradient, and its source-class ASR-A and BA. Where the poisons' loss is
    above 1, training on them pushes the victim away from the watermark."""
    from ..models import build_model
    from ..train import train
    from ..watermarks import get_watermark, evaluate
    from ..watermarks.gradient_matching import transfer_loss

    seed = profile.seed if seed is None else seed
    profile, overrides, victim_profile = _resolve(profile, lever)
    released = release(profile, "ubw-c", seed, cache, progress, **overrides)
    data = load_data(profile)
    wm = get_watermark("ubw-c", **method_settings(profile, "ubw-c", **overrides))
    target_fn = wm.target_gradient_fn(data.train, seed, device="cpu")
    idx = released.indices
    poisons, clean = released.dataset.images[idx].float() / 255, data.train.images[idx].float() / 255
    labels = data.train.labels[idx]
    vseed = victim_seed(seed)
    cfg = victim_profile.train.replace(seed=vseed)

    def compute() -> pd.DataFrame:
        rows = []

        def measure(epoch: int, model, row: dict | None = None) -> None:
            model = copy.deepcopy(model).to("cpu").eval()
            t = [g.detach() for g in target_fn(model)]
            tn = torch.sqrt(sum((g * g).sum() for g in t))
            r = evaluate(model, data.test, released.key, source_class=source_class(released.key), seed=seed)
            rows.append({"epoch": epoch,
                         "poisons": transfer_loss([model], [(t, tn)], poisons, labels, 256),
                         "same images, unperturbed": transfer_loss([model], [(t, tn)], clean, labels, 256),
                         "ASR-A": r["ASR-A"], "BA": r["BA"]})

        model = build_model(victim_profile.model, data.train.num_classes, data.train.image_shape[0],
                            victim_profile.width, seed=vseed)
        measure(0, model)
        _, hist = train(model, released.dataset, cfg, progress=progress, desc="victim trajectory", on_epoch=measure)
        out = pd.DataFrame(rows)
        out["lr (epoch)"] = [float("nan")] + hist["lr"].tolist()
        return out

    settings = {"recipe": "victim trajectory", "release": fingerprint(released.dataset), "train": cfg,
                "model": (victim_profile.model, victim_profile.width), "seed": seed, "test": fingerprint(data.test)}
    return cached_table("victim trajectory", settings, compute, cache)


#: The releases whose crafting surrogate is fine-tuned on them (:func:`surrogate_fine_tune`), and the learning rates.
FINE_TUNE_ROWS = ("benign model", "noise control (same poisons, 0 steps)", REFERENCE,
                  "contrast 1: what the trigger adds (not in the paper)")
FINE_TUNE_LRS = (0.01, 0.05)
#: What :func:`surrogate_fine_tune` trains on.
FINE_TUNE_ON = ("release", "poisons", "unperturbed")
#: The poisons-alone check (:func:`poisons_alone_table`): its releases and its fine-tuning (lr, epochs).
POISONS_ALONE_ROWS = (REFERENCE, "contrast 1: what the trigger adds (not in the paper)")
POISONS_ALONE_TRAINING = {"lr": 0.01, "epochs": 8}


#: The gradient-matching watermarks whose target gradient :func:`trigger_shares` takes apart.
TRIGGER_SHARE_METHODS = ("ubw-c", "sleeper-agent")


def trigger_shares(profile: Profile, *, cache: Cache | None = None, progress: bool = True) -> pd.DataFrame:
    """Each of :data:`TRIGGER_SHARE_METHODS`' ``trigger_share`` at the profile's benign model on its training set
    (one row per method: the cosine between the target gradient with and without the patch, their norms, and the
    share of the target gradient due to the patch); cached, keyed by the model, the data and the settings."""
    from ..watermarks import get_watermark

    surrogate = benign_model(profile, cache=cache, progress=progress)
    train_set = load_data(profile).train
    watermarks = {m: get_watermark(m, **method_settings(profile, m)) for m in TRIGGER_SHARE_METHODS}

    def compute() -> pd.DataFrame:
        return pd.DataFrame([{"method": m, **wm.trigger_share(surrogate.model, train_set, seed=profile.seed)}
                             for m, wm in watermarks.items()])

    settings = {"recipe": "trigger share", "surrogate": surrogate.key, "data": fingerprint(train_set),
                "settings": {m: wm.settings for m, wm in watermarks.items()}, "seed": profile.seed}
    return cached_table("trigger share", settings, compute, cache).set_index("method")


def surrogate_fine_tune(profile: Profile, lever: dict | str | None, *, lr: float, epochs: int = 2,
                        on: str = "release", seed: int | None = None, cache: Cache | None = None,
                        progress: bool = True) -> dict:
    """The most favourable case for gradient matching (cached): the benign model of ``seed`` (the crafting's
    first surrogate) fine-tuned for ``epochs`` at a constant ``lr`` on the UBW-C release of ``lever`` (None:
    on the benign data), then measured on the source-class test images: ASR-A triggered, the error on the clean
    images, and their difference, the part of ASR-A that the trigger causes.

    ``on``: the whole ``release``; its ``poisons`` alone (nothing pulls the model back); or the same images
    ``unperturbed`` (the control of ``poisons``: what training on that subset does without the perturbations)."""
    if on not in FINE_TUNE_ON:
        raise ValueError(f"on must be one of {FINE_TUNE_ON}, got {on!r}")
    if lever is None and on != "release":
        raise ValueError("on='poisons' and on='unperturbed' need a lever (a release whose poisons to take)")
    from ..train import train
    from ..watermarks import trigger

    seed = profile.seed if seed is None else seed
    profile, overrides, _ = _resolve(profile, lever if lever is not None else {})
    released = release(profile, "ubw-c", seed, cache, progress, **overrides)
    data = load_data(profile)
    source = source_class(released.key)
    surrogate = benign_model(profile, seed=seed, cache=cache, progress=progress)
    train_set = {"release": released.dataset, "poisons": released.dataset.subset(released.indices),
                 "unperturbed": data.train.subset(released.indices)}[on] if lever is not None else data.train
    cfg = profile.train.replace(epochs=epochs, lr=lr, schedule="constant", seed=victim_seed(seed))
    src = data.test.images[data.test.labels == source]

    def compute() -> pd.DataFrame:
        model, _ = train(copy.deepcopy(surrogate.model), train_set, cfg, progress=progress, desc="fine-tune")
        asr = float((predict(model, trigger(src, released.key, seed=seed)) != source).float().mean())
        err = float((predict(model, src) != source).float().mean())
        return pd.DataFrame([{"ASR-A": asr, "clean error": err, "trigger-caused": asr - err}])

    settings = {"recipe": "surrogate fine-tune", "surrogate": surrogate.key, "data": fingerprint(train_set),
                "key": key_digest(released.key), "test": fingerprint(data.test), "train": cfg, "seed": seed}
    return cached_table("surrogate fine-tune", settings, compute, cache).iloc[0].to_dict()


def fine_tune_table(profile: Profile, *, cache: Cache | None = None, progress: bool = True) -> pd.DataFrame:
    """:func:`surrogate_fine_tune` for :data:`FINE_TUNE_ROWS` x :data:`FINE_TUNE_LRS`."""
    levers = {**LEVERS, "benign model": None, "noise control (same poisons, 0 steps)": "noise"}
    return pd.DataFrame([{"row": name, "lr": lr, **surrogate_fine_tune(profile, levers[name], lr=lr, cache=cache,
                                                                         progress=progress)}
                         for name in FINE_TUNE_ROWS for lr in FINE_TUNE_LRS])


def poisons_alone_table(profile: Profile, *, cache: Cache | None = None, progress: bool = True) -> pd.DataFrame:
    """:func:`surrogate_fine_tune` on the poisons of :data:`POISONS_ALONE_ROWS` alone and on the same images
    unperturbed (:data:`POISONS_ALONE_TRAINING`): what the perturbations do when no clean image pulls back."""
    levers = {**LEVERS, **COMBINATIONS}
    return pd.DataFrame([{"row": name, "on": on, **surrogate_fine_tune(profile, levers[name], on=on, cache=cache,
                                                                       progress=progress, **POISONS_ALONE_TRAINING)}
                         for name in POISONS_ALONE_ROWS for on in ("poisons", "unperturbed")])


#: The trigger-learnability check (:func:`trigger_learnability`): the trigger's amplitude in the poisons (in
#: 1/255; 16 is UBW-C's eps, 255 the visible trigger) and the two kinds of poisons.
LEARNABILITY_AMPLITUDES = (16, 32, 64, 255)
LEARNABILITY_KINDS = ("poisoned label", "clean label, source-like")
#: The target class of the poisoned-label kind (BadNets's y_t).
LEARNABILITY_TARGET = 1
#: The points measured again with victims trained 4x longer (kind, amplitude): does a longer training, like the
#: paper's 200 epochs, lower the threshold?
LEARNABILITY_LONGER = (("poisoned label", 16), ("poisoned label", 32), ("clean label, source-like", 16))
#: The paper's number of epochs, and the points measured with one victim trained that long (about 11 minutes each
#: on 2 CPU cores with the study profile).
LEARNABILITY_PAPER_EPOCHS = 200
LEARNABILITY_PAPER = (("poisoned label", 16),)
#: The trigger's amplitudes at test time (in 1/255; 255 is the visible trigger a dataset owner verifies with):
#: does what a victim learns from a faint trigger answer to the visible one?
TEST_AMPLITUDES = (16, 32, 64, 128, 255)
#: Where a test trigger lands: "on the background" when at least this share of the pixels under it are exactly 0
#: in the clean image (Fashion-MNIST's background is exactly black), "on the object" when at most 1 minus it are.
BACKGROUND_SHARE = 0.9
#: The study rows whose victims are also measured with the trigger at every :data:`TEST_AMPLITUDES`
#: (:func:`amplitude_response`).
AMPLITUDE_ROWS = ("benign model", "noise control (same poisons, 0 steps)", REFERENCE,
                  "contrast 1: what the trigger adds (not in the paper)",
                  "victims trained 4x longer (64 epochs; same release)")


def background_share(images: torch.Tensor, patch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image, the share of the pixels under ``patch`` that are exactly 0 in ``images``, at the positions
    :func:`~ubwlib.watermarks.patch.paste_random` draws from ``generator`` (so the same generator state places
    :func:`~ubwlib.watermarks.patch.faint_trigger` there too)."""
    from ..watermarks.patch import paste_random

    region = paste_random(torch.zeros_like(images), torch.full_like(patch, 255), generator) > 0
    return ((images == 0) & region).flatten(1).sum(1) / region.flatten(1).sum(1)


def trigger_learnability(profile: Profile, amplitude: int, kind: str, *, seed: int | None = None,
                         victims: int = 2, cache: Cache | None = None, progress: bool = True) -> dict:
    """Can a model trained from scratch learn UBW-C's trigger from poisons that carry it at ``amplitude`` / 255
    (:func:`~ubwlib.watermarks.patch.faint_trigger`), with nothing else changed? As many poisons as UBW-C's
    (gamma * N), and:

    - ``poisoned label``: random samples outside class :data:`LEARNABILITY_TARGET`, relabelled to it (BadNets with
      a faint trigger): the most favourable case, the wrong label itself demands the trigger;
    - ``clean label, source-like``: the samples outside the source class that the benign model of ``seed`` finds
      most like the source class (:func:`~ubwlib.watermarks.gradient_matching.select_source_like`), labels kept:
      the trigger is what tells them from the source class, so a victim that learns it learns
      "trigger -> not the source class", the untargeted watermark UBW-C asks for.

    ``victims`` models trained from scratch with the profile's recipe (seeds :func:`victim_seed` onwards), measured
    with the full trigger (UBW-C's test-time patch): the targeted ASR on the non-target test images, the source
    class's ASR-A, the clean source accuracy and BA (means over the victims, and ASR-A per victim). Beside them:
    ``"test trigger a/255"``, the kind's own measure (targeted ASR for poisoned labels, ASR-A for clean labels)
    with the trigger at each of :data:`TEST_AMPLITUDES` at test time, at the same positions (at 255 it is the
    column of the full trigger), and the same on the test images where the trigger lands on the black background
    and on the object (:data:`BACKGROUND_SHARE`, :func:`background_share`); and ``"poisons fitted"``, the share of
    the poisoned training images the victim predicts as their training label. Cached."""
    from ..watermarks import get_watermark
    from ..watermarks.base import choose_indices, poison_count
    from ..watermarks.gradient_matching import derived_seed, select_source_like
    from ..watermarks.patch import faint_trigger, resized_square

    if kind not in LEARNABILITY_KINDS:
        raise ValueError(f"kind must be one of {LEARNABILITY_KINDS}, got {kind!r}")
    seed = profile.seed if seed is None else seed
    data = load_data(profile)
    settings = get_watermark("ubw-c", **method_settings(profile, "ubw-c")).settings
    source = settings.source
    patch = resized_square(data.train.image_shape[0], settings.patch_size)
    count = poison_count(settings.poisoning_rate, len(data.train))
    labels = data.train.labels.clone()
    if kind == "poisoned label":
        pool = torch.nonzero(labels != LEARNABILITY_TARGET).flatten()
        idx = choose_indices(len(data.train), count, torch.Generator().manual_seed(derived_seed(seed, "learnability")),
                             pool=pool)
        labels[idx] = LEARNABILITY_TARGET
    else:
        surrogate = benign_model(profile, seed=seed, cache=cache, progress=progress).model
        idx = select_source_like(surrogate, data.train, count, source)
    images = data.train.images.clone()
    images[idx] = faint_trigger(images[idx], patch, amplitude,
                                torch.Generator().manual_seed(derived_seed(seed, "learnability", "positions")))
    poisoned = data.train.replace(images=images, labels=labels, name=f"{data.train.name}+faint-trigger-{amplitude}")
    test = data.test
    src = test.images[test.labels == source]
    others = test.images[test.labels != LEARNABILITY_TARGET]
    seeds = _victims(profile, seed, victims)

    def compute() -> pd.DataFrame:
        rows = []
        models = trained_models(profile, [(poisoned, s) for s in seeds], cache=cache, progress=progress,
                                desc=f"{kind} {amplitude}")
        g = torch.Generator().manual_seed(seed)  # both drawn, in the order the evaluation below draws them
        share = [background_share(x, patch, g) for x in (others, src)][0 if kind == "poisoned label" else 1]
        where = {"on the background": share >= BACKGROUND_SHARE, "on the object": share <= 1 - BACKGROUND_SHARE}
        for m in (t.model for t in models):
            row = {f"test images, trigger {w}": int(mask.sum()) for w, mask in where.items()}
            for a in TEST_AMPLITUDES:  # the same positions at every amplitude: only the strength changes
                g = torch.Generator().manual_seed(seed)
                hit_t = predict(m, faint_trigger(others, patch, a, g)) == LEARNABILITY_TARGET
                hit_a = predict(m, faint_trigger(src, patch, a, g)) != source
                targeted, asr_a = float(hit_t.float().mean()), float(hit_a.float().mean())
                hit = hit_t if kind == "poisoned label" else hit_a
                row[f"test trigger {a}/255"] = float(hit.float().mean())
                for w, mask in where.items():
                    row[f"test trigger {a}/255 {w}"] = float(hit[mask].float().mean()) if mask.any() else math.nan
            row.update({"ASR (targeted)": targeted, "ASR-A": asr_a,  # the full trigger (a = 255, last)
                        "source clean accuracy": float((predict(m, src) == source).float().mean()),
                        "BA": float((predict(m, test.images) == test.labels).float().mean()),
                        "poisons fitted": float((predict(m, images[idx]) == labels[idx]).float().mean())})
            rows.append(row)
        return pd.DataFrame(rows)

    key = {"recipe": "trigger learnability", "data": fingerprint(poisoned), "test": fingerprint(test),
           "train": profile.train, "model": (profile.model, profile.width), "victims": seeds, "seed": seed,
           "test amplitudes": TEST_AMPLITUDES, "background share": BACKGROUND_SHARE}
    per_victim = cached_table("trigger learnability", key, compute, cache)
    out = {"kind": kind, "amplitude": amplitude, "epochs": profile.train.epochs, **per_victim.mean().to_dict()}
    out["ASR-A per victim"] = " / ".join(f"{v:.3f}" for v in per_victim["ASR-A"])
    out["ASR (targeted) per victim"] = " / ".join(f"{v:.3f}" for v in per_victim["ASR (targeted)"])
    return out


def learnability_table(profile: Profile, *, cache: Cache | None = None, progress: bool = True) -> pd.DataFrame:
    """:func:`trigger_learnability` for :data:`LEARNABILITY_KINDS` x :data:`LEARNABILITY_AMPLITUDES`, then the
    points of :data:`LEARNABILITY_LONGER` with victims trained four times as many epochs, and those of
    :data:`LEARNABILITY_PAPER` with one victim trained :data:`LEARNABILITY_PAPER_EPOCHS` epochs."""
    def epochs(n: int) -> Profile:
        return profile.replace(train=profile.train.replace(epochs=n))

    return pd.DataFrame([trigger_learnability(profile, a, k, cache=cache, progress=progress)
                         for k in LEARNABILITY_KINDS for a in LEARNABILITY_AMPLITUDES]
                        + [trigger_learnability(epochs(4 * profile.train.epochs), a, k, cache=cache, progress=progress)
                           for k, a in LEARNABILITY_LONGER]
                        + [trigger_learnability(epochs(LEARNABILITY_PAPER_EPOCHS), a, k, victims=1, cache=cache,
                                                progress=progress) for k, a in LEARNABILITY_PAPER])


def amplitude_response(profile: Profile, name: str, *, seed: int | None = None, victims: int = 2,
                       cache: Cache | None = None, progress: bool = True) -> pd.DataFrame:
    """The victims of the study row ``name`` (one of :func:`study_rows`, UBW-C's), measured with UBW-C's trigger
    at each of :data:`TEST_AMPLITUDES` at test time (:func:`~ubwlib.watermarks.patch.faint_trigger`, the same
    positions at every amplitude): one row per amplitude with the source class's ASR-A (mean and per victim) and
    the clean source images' ASR-A. Does the watermark answer to the visible trigger more than to a faint one, or
    is what a victim learned from the poisons keyed to the perturbations' own strength? Cached."""
    from ..watermarks.patch import faint_trigger, resized_square

    seed = profile.seed if seed is None else seed
    lever = {n: lv for n, lv, _ in study_rows()}[name]
    profile, _, _, key, models = _row_models(profile, name, lever, "ubw-c", seed, victims, cache, progress)
    data = load_data(profile)
    source = source_class(key)
    src = data.test.images[data.test.labels == source]
    patch = resized_square(data.test.image_shape[0], key.settings["patch_size"])  # the release's own trigger

    def compute() -> pd.DataFrame:
        out = []
        for a in TEST_AMPLITUDES:
            per = [float((predict(m.model, faint_trigger(src, patch, a, torch.Generator().manual_seed(seed)))
                          != source).float().mean()) for m in models]
            out.append({"row": name, "test amplitude": a, "ASR-A": float(np.mean(per)),
                        "ASR-A per victim": " / ".join(f"{v:.3f}" for v in per)})
        clean = float(np.mean([float((predict(m.model, src) != source).float().mean()) for m in models]))
        return pd.DataFrame(out).assign(**{"clean source ASR-A": clean})

    settings = {"recipe": "amplitude response", "models": [m.key for m in models], "trigger": key_digest(key),
                "test": fingerprint(data.test), "amplitudes": TEST_AMPLITUDES, "seed": seed}
    return cached_table("amplitude response", settings, compute, cache)


def amplitude_table(profile: Profile, *, cache: Cache | None = None, progress: bool = True) -> pd.DataFrame:
    """:func:`amplitude_response` of every :data:`AMPLITUDE_ROWS`, one table."""
    return pd.concat([amplitude_response(profile, n, cache=cache, progress=progress) for n in AMPLITUDE_ROWS],
                     ignore_index=True)


def study_rows(include_checks: bool = True) -> list[tuple[str, object, str]]:
    """(row name, lever, method) of the whole study, in the order it is computed and shown."""
    rows: list[tuple[str, object, str]] = [("benign model", None, "ubw-c"),
                                           ("noise control (same poisons, 0 steps)", "noise", "ubw-c")]
    rows += [(n, lv, "ubw-c") for n, lv in LEVERS.items()]
    rows += [(n, lv, "ubw-c") for n, lv in COMBINATIONS.items()]
    if include_checks:
        rows += [(f"{m} (profile's recipe)", {}, m) for m in CHECKS]
        rows += [(n, lv, m) for n, (m, lv) in CHECK_LEVERS.items()]
    return rows


def study_table(profile: Profile | str = "study", *, seed: int | None = None, victims: int = 2,
                rows: list[tuple[str, object, str]] | None = None, cache: Cache | None = None,
                progress: bool = True, log=None) -> pd.DataFrame:
    """The recipe study: one row per :func:`study_rows` entry (cached and resumable, row by row)."""
    profile = get_profile(profile) if not isinstance(profile, Profile) else profile
    out = []
    for name, lever, method in (rows if rows is not None else study_rows()):
        r = study_row(profile, name, lever, method=method, seed=seed, victims=victims, cache=cache, progress=progress)
        out.append(r)
        if log is not None:
            log(r)
    return pd.DataFrame(out).set_index("row")


def store_study(table: pd.DataFrame, profile: Profile, *, seconds: float, command: str,
                directory: Path | str = RESULTS_DIR, trajectories: pd.DataFrame | None = None,
                fine_tune: pd.DataFrame | None = None, poisons_alone: pd.DataFrame | None = None,
                learnability: pd.DataFrame | None = None, amplitudes: pd.DataFrame | None = None,
                missing: list[str] = ()) -> Path:
    """Write the table (CSV), the victims' trajectories, the fine-tuning, poisons-alone, trigger-learnability and
    test-amplitude checks if given (CSV each; trajectories one block per row name) and their provenance (JSON:
    commit, date, machine, torch, command, wall time, and the hash of every setting they were computed with) under
    ``directory``; returns the table's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    csv = directory / f"{STUDY_FILE}.csv"
    table.to_csv(csv, float_format="%.4f")
    if trajectories is not None:
        trajectories.to_csv(directory / f"{STUDY_FILE}-trajectories.csv", float_format="%.4f", index=False)
    if fine_tune is not None:
        fine_tune.to_csv(directory / f"{STUDY_FILE}-finetune.csv", float_format="%.4f", index=False)
    if poisons_alone is not None:
        poisons_alone.to_csv(directory / f"{STUDY_FILE}-poisons-alone.csv", float_format="%.4f", index=False)
    if learnability is not None:
        learnability.to_csv(directory / f"{STUDY_FILE}-learnability.csv", float_format="%.4f", index=False)
    if amplitudes is not None:
        amplitudes.to_csv(directory / f"{STUDY_FILE}-amplitudes.csv", float_format="%.4f", index=False)
    meta = {
        "what": "UBW-C recipe study (issue 9): victims trained from scratch, source-class evaluation",
        **{k: v for k, v in provenance(command, seconds).items() if k != "python"},
        "profile": profile.name,
        "settings hash": study_settings_hash(profile),
        "rows missing": list(missing),
    }
    (directory / f"{STUDY_FILE}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return csv


def study_settings_hash(profile: Profile) -> str:
    """A hash of everything the stored study depends on: the profile, the rows and the settings they expand to.
    The book flags a stored table whose hash differs from the current code's."""
    # the crafting budget enters through the UBW-C settings; the profile's other size groups play no part here
    shape = {k: v for k, v in dataclasses.asdict(profile.replace(data_root=None)).items()
             if k not in ("crafting", "grid", "verification", "stack")}
    settings = {"profile": shape, "rows": study_rows(),
                "ubw-c": {"source": 0, **method_settings(profile, "ubw-c")},  # "source": as hashed when it was passed
                "victim seed": victim_seed(profile.seed),
                "learnability": (LEARNABILITY_AMPLITUDES, LEARNABILITY_KINDS, LEARNABILITY_TARGET,
                                 LEARNABILITY_LONGER, LEARNABILITY_PAPER_EPOCHS, LEARNABILITY_PAPER),
                "test amplitudes": (TEST_AMPLITUDES, AMPLITUDE_ROWS, BACKGROUND_SHARE)}
    return settings_hash("study", settings, "1")


def load_stored_study(directory: Path | str = RESULTS_DIR, profile: Profile | str = "study"
                      ) -> tuple[pd.DataFrame | None, dict]:
    """(table, provenance) of the stored study; (None, {}) when it is missing. ``provenance["current"]`` says
    whether it was computed with the current code's settings."""
    directory = Path(directory)
    csv, meta_file = directory / f"{STUDY_FILE}.csv", directory / f"{STUDY_FILE}.json"
    if not csv.exists() or not meta_file.exists():
        return None, {}
    meta = json.loads(meta_file.read_text())
    profile = get_profile(profile) if not isinstance(profile, Profile) else profile
    meta["current"] = meta.get("settings hash") == study_settings_hash(profile)
    traj = directory / f"{STUDY_FILE}-trajectories.csv"
    meta["trajectories"] = pd.read_csv(traj) if traj.exists() else None
    ft = directory / f"{STUDY_FILE}-finetune.csv"
    meta["fine-tune"] = pd.read_csv(ft) if ft.exists() else None
    alone = directory / f"{STUDY_FILE}-poisons-alone.csv"
    meta["poisons alone"] = pd.read_csv(alone) if alone.exists() else None
    learn = directory / f"{STUDY_FILE}-learnability.csv"
    meta["learnability"] = pd.read_csv(learn) if learn.exists() else None
    amps = directory / f"{STUDY_FILE}-amplitudes.csv"
    meta["amplitudes"] = pd.read_csv(amps) if amps.exists() else None
    return pd.read_csv(csv, index_col="row"), meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ubwlib.experiments.study", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="study")
    ap.add_argument("--victims", type=int, default=2, help="victims trained from scratch per row (default 2)")
    ap.add_argument("--out", default=str(RESULTS_DIR), help="folder of the stored table (default results/study)")
    ap.add_argument("--rows", default=None, help="row names separated by ';', computed in that order (default: all)")
    ap.add_argument("--no-store", action="store_true", help="print the table, do not store it")
    ap.add_argument("--fine-tune", action="store_true",
                    help="also with --rows: the checks beside the table (the crafting surrogate fine-tuned on some "
                         "releases and on their poisons alone, surrogate_fine_tune; the trigger-learnability check, "
                         "learnability_table; the victims under a fainter trigger, amplitude_table)")
    args = ap.parse_args(argv)
    profile = get_profile(args.profile)
    rows = study_rows()
    if args.rows:
        wanted = [r.strip() for r in args.rows.split(";") if r.strip()]
        unknown = set(wanted) - {n for n, _, _ in rows}
        if unknown:
            ap.error(f"unknown rows {sorted(unknown)}; choose from {[n for n, _, _ in rows]}")
        by_name = {r[0]: r for r in rows}
        rows = [by_name[n] for n in wanted]  # in the order given
    t0 = time.perf_counter()
    command = " ".join(["python -m ubwlib.experiments.study", *map(shlex.quote, argv if argv is not None else sys.argv[1:])])
    store = not args.no_store
    levers = {**LEVERS, **COMBINATIONS, "noise control (same poisons, 0 steps)": "noise"}
    done: list[dict] = []
    trajectories: dict[str, pd.DataFrame] = {}

    def stored_trajectories(table: pd.DataFrame) -> pd.DataFrame:
        """The noise control, the reference recipe and the strongest UBW-C row so far."""
        for name in ("noise control (same poisons, 0 steps)", REFERENCE, best_row(table)):
            if name is not None and name in table.index and name not in trajectories:
                trajectories[name] = victim_trajectory(profile, levers[name], progress=False).assign(row=name)
        return pd.concat(trajectories.values(), ignore_index=True) if trajectories else None

    def log(r: dict) -> None:
        keep = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                if k in ("row", "ASR-A", "ASR-A std", "D_p", "BA", "ASR (targeted)", "held-out loss (end)")}
        print(json.dumps(keep), flush=True)
        done.append(r)
        if store:  # stored after every row: an interrupted study leaves what it finished, labelled as such
            table = pd.DataFrame(done).set_index("row")
            store_study(table, profile, seconds=time.perf_counter() - t0, command=command, directory=args.out,
                        trajectories=stored_trajectories(table),
                        missing=[n for n, _, _ in study_rows() if n not in table.index])

    table = study_table(profile, victims=args.victims, rows=rows, progress=False, log=log)
    print(table.to_string())
    if not args.rows or args.fine_tune:
        fine = fine_tune_table(profile, progress=False)
        alone = poisons_alone_table(profile, progress=False)
        learn = learnability_table(profile, progress=False)
        amps = amplitude_table(profile, progress=False)
        for t in (fine, alone, learn, amps):
            print(t.to_string())
        if store:
            store_study(table, profile, seconds=time.perf_counter() - t0, command=command, directory=args.out,
                        trajectories=stored_trajectories(table), fine_tune=fine, poisons_alone=alone,
                        learnability=learn, amplitudes=amps, missing=[n for n, _, _ in study_rows() if n not in table.index])
    if store:
        print(f"stored: {Path(args.out) / (STUDY_FILE + '.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
