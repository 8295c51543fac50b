"""Recipes of the ownership-verification chapter (Proposition 1, Tables 3-4, false positives, power).

Every table is cached (keyed by the models' cache keys, the watermark key's trigger and the settings), so that a
warm rebuild recomputes nothing. UBW-C and Sleeper Agent are verified on test images of their source class (the
class their watermark is built for); the other methods on all classes (non-target classes for targeted ones).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pandas as pd
import torch

from ..train import predict_proba
from ..verify import (
    DEFAULT_P0,
    SCENARIOS,
    VerificationSettings,
    decide,
    independent_key,
    label_pvalue,
    paired_ttest,
    verify,
)
from ..watermarks import trigger
from .core import benign_model, benign_models, cached_table, key_digest, load_data
from .profiles import Profile
from .runs import run, source_class

__all__ = ["VERIFY_METHODS", "verification_classes", "scenario_table",
           "false_positive_table", "power_curve", "independent_seeds", "verification_settings", "forgery_table"]

VERIFY_METHODS = ("ubw-p", "ubw-c")
#: How :func:`ubwlib.verify.verify` draws its images (part of the cached tables' keys): "seeded order" queries the
#: candidates in a seeded random order until m are correctly classified (before: every candidate was queried).
VERIFY_DRAW = "seeded order"


def verification_settings(profile: Profile, m: int | None = None) -> VerificationSettings:
    """The settings of the verification chapter (and of the report, which reads its cached tables): the paper's
    tau = 0.25 and alpha = 0.01 with the profile's m (``profile.verification.m``, the paper's 100 by default);
    ``m`` overrides."""
    return VerificationSettings(m=m or profile.verification.m)


def verification_classes(key) -> list[int] | None:
    """The test classes whose images are queried for a watermark key: its source class for a source-specific
    watermark (:func:`~ubwlib.experiments.runs.source_class`), else None (every class)."""
    source = source_class(key)
    return None if source is None else [source]


def independent_seeds(profile: Profile, count: int) -> list[int]:
    """Seeds of the independently trained benign models (the profile's seed is the watermark's own)."""
    return [profile.seed + 1 + i for i in range(count)]


def scenario_table(profile: Profile, method: str, seed: int | None = None,
                   settings: VerificationSettings = VerificationSettings(), cache=None,
                   progress: bool = True) -> pd.DataFrame:
    """Tables 3/4 on the profile: Delta P, p-value and verdict of Independent-T (watermarked model, another
    trigger of the same kind), Independent-M (the benign model, the true trigger) and Malicious."""
    seed = profile.seed if seed is None else seed
    wm_run = run(profile, method, seed, cache, progress)
    benign = benign_model(profile, seed=seed, cache=cache, progress=progress)
    test = load_data(profile).test
    key = wm_run.released.key
    s = dataclasses.asdict(settings)

    def compute() -> pd.DataFrame:
        other = independent_key(key, key.seed + 1)
        cases = [(SCENARIOS[0], wm_run.trained.model, other), (SCENARIOS[1], benign.model, key),
                 (SCENARIOS[2], wm_run.trained.model, key)]
        rows = [verify(model, test, k, seed=seed, classes=verification_classes(key), scenario=name, **s).row()
                for name, model, k in cases]
        return pd.DataFrame(rows).set_index("scenario")

    return cached_table("verification-scenarios", {"method": method, "model": wm_run.trained.key,
                                                   "benign": benign.key, "key": key_digest(key), "seed": seed,
                                                   "settings": s, "draw": VERIFY_DRAW}, compute, cache)


def false_positive_table(profile: Profile, method: str, n_triggers: int = 8, n_models: int = 3,
                         seed: int | None = None, settings: VerificationSettings = VerificationSettings(),
                         cache=None, progress: bool = True) -> pd.DataFrame:
    """Independent cases that must *not* be flagged: the watermarked model queried with ``n_triggers`` other
    triggers of the same kind (Independent-T), and ``n_models`` benign models trained with other seeds (and
    the profile's own benign model) queried with the true trigger (Independent-M). One row per case."""
    seed = profile.seed if seed is None else seed
    wm_run = run(profile, method, seed, cache, progress)
    key = wm_run.released.key
    test = load_data(profile).test
    model_seeds = [seed, *independent_seeds(profile, n_models - 1)]
    models = benign_models(profile, model_seeds, cache, progress)
    s = dataclasses.asdict(settings)
    classes = verification_classes(key)

    def compute() -> pd.DataFrame:
        rows = []
        for i in range(n_triggers):
            other = independent_key(key, key.seed + 1 + i)
            r = verify(wm_run.trained.model, test, other, seed=seed + i, classes=classes, scenario=SCENARIOS[0], **s)
            rows.append({"case": f"watermarked model, independent trigger #{i + 1}", **r.row()})
        for j, (bm, bm_seed) in enumerate(zip(models, model_seeds)):
            r = verify(bm.model, test, key, seed=seed + j, classes=classes, scenario=SCENARIOS[1], **s)
            rows.append({"case": f"benign model #{j + 1} (seed {bm_seed}), true trigger", **r.row()})
        return pd.DataFrame(rows).set_index("case")

    return cached_table("verification-false-positives",
                        {"method": method, "model": wm_run.trained.key, "benign": [m.key for m in models],
                         "key": key_digest(key), "n_triggers": n_triggers, "seed": seed, "settings": s,
                         "draw": VERIFY_DRAW},
                        compute, cache)


def power_curve(profile: Profile, method: str, ms=(3, 5, 10, 20, 50, 100), repeats: int = 50,
                seed: int | None = None, settings: VerificationSettings = VerificationSettings(), cache=None,
                progress: bool = True, p0: float = DEFAULT_P0) -> pd.DataFrame:
    """p-value and verdict against the number of queries m, for Malicious and Independent-M, over ``repeats``
    random draws of m correctly classified test images per m, for two tests on the same draws (column ``test``):
    the paper's t-test on probabilities, and the label-only test (:func:`ubwlib.verify.label_pvalue`: how many of
    the m images the trigger flips, against a flip rate ``p0`` allowed to an innocent model) for endpoints that
    return only the top label.

    Each model is queried once on every candidate image, clean and triggered; the draws then subsample those
    probabilities (exactly what :func:`ubwlib.verify.verify` computes for a draw, without re-querying)."""
    seed = profile.seed if seed is None else seed
    wm_run = run(profile, method, seed, cache, progress)
    benign = benign_model(profile, seed=seed, cache=cache, progress=progress)
    key = wm_run.released.key
    test = load_data(profile).test
    classes = verification_classes(key)

    def compute() -> pd.DataFrame:
        mask = torch.ones(len(test), dtype=torch.bool)
        if classes is not None:
            mask = torch.isin(test.labels, torch.tensor(classes))
        if key.target is not None:
            mask &= test.labels != key.target
        images, labels = test.images[mask], test.labels[mask]
        triggered = trigger(images, key, seed=None)
        rows = []
        for name, model in (("Malicious", wm_run.trained.model), ("Independent-M", benign.model)):
            probs, probs_trig = predict_proba(model, images), predict_proba(model, triggered)
            correct = (probs.argmax(1) == labels).nonzero().flatten()
            rows_idx = torch.arange(len(labels))
            pb = probs[rows_idx, labels].double().numpy()
            pp = probs_trig[rows_idx, labels].double().numpy()
            flipped = (probs_trig.argmax(1) != labels).numpy()
            gen = torch.Generator().manual_seed(seed)
            for m in ms:
                if m > len(correct):
                    continue
                for rep in range(repeats):
                    pick = correct[torch.randperm(len(correct), generator=gen)[:m]].numpy()
                    _, p = paired_ttest(pb[pick], pp[pick], settings.tau)
                    rows.append({"scenario": name, "test": "t-test", "m": m, "repeat": rep, "p-value": p,
                                 "Delta P": float(np.mean(pb[pick] - pp[pick])),
                                 "flagged": decide(p, settings.alpha)})
                    flips = int(flipped[pick].sum())
                    p_l = label_pvalue(flips, m, p0)
                    rows.append({"scenario": name, "test": "label-only", "m": m, "repeat": rep, "p-value": p_l,
                                 "flips": flips, "flagged": decide(p_l, settings.alpha)})
        return pd.DataFrame(rows)

    return cached_table("verification-power",
                        {"method": method, "model": wm_run.trained.key, "benign": benign.key, "key": key_digest(key),
                         "ms": list(ms), "repeats": repeats, "seed": seed, "p0": p0,
                         "settings": dataclasses.asdict(settings)}, compute, cache)


def forgery_table(profile: Profile, method: str, n_models: int = 3, steps: int = 100, seed: int | None = None,
                  settings: VerificationSettings = VerificationSettings(), cache=None,
                  progress: bool = True) -> pd.DataFrame:
    """Forged ownership claims against innocent models (cached): for each of ``n_models`` benign models (the
    profile's and independent seeds), a forger who knows the method and its trigger geometry but not the key
    optimises a pattern on the public training images to lower that model's true-class probability
    (:func:`ubwlib.forgery.forge_key`, ``steps`` Adam steps), then runs the t-test and the label-only test with it.
    ``commitment accepts`` says whether the forged key matches the owner's commitment made at release time
    (:func:`ubwlib.publish.commit`; it never should)."""
    from ..forgery import forge_key
    from ..publish import check_commitment, commit
    from ..verify import verify_labels

    seed = profile.seed if seed is None else seed
    wm_run = run(profile, method, seed, cache, progress)
    key = wm_run.released.key
    data = load_data(profile)
    model_seeds = [seed, *independent_seeds(profile, n_models - 1)]
    models = benign_models(profile, model_seeds, cache, progress)
    s = dataclasses.asdict(settings)
    classes = verification_classes(key)
    # the owner's commitment, published with the dataset (a fixed salt here, so that the table is reproducible)
    salt = hashlib.sha256(f"owner's salt, kept private until a dispute; seed {seed}".encode()).digest()
    commitment, _ = commit(key, salt)

    def compute() -> pd.DataFrame:
        rows = []
        for j, (bm, bm_seed) in enumerate(zip(models, model_seeds)):
            forged = forge_key(bm.model, data.train.images, data.train.labels, key, steps=steps,
                               seed=derived_forgery_seed(seed, j))
            r = verify(bm.model, data.test, forged, seed=seed + j, classes=classes, scenario="forged", **s)
            lab = verify_labels(bm.model, data.test, forged, m=settings.m, alpha=settings.alpha, seed=seed + j,
                                classes=classes)
            rows.append({"case": f"innocent model #{j + 1} (seed {bm_seed}), forged key", "Delta P": r.delta_p,
                         "p-value": r.p_value, "verdict": r.verdict, "label-only p-value": lab.p_value,
                         "label-only verdict": lab.verdict,
                         "commitment accepts": check_commitment(forged, salt, commitment)})
        return pd.DataFrame(rows).set_index("case")

    return cached_table("verification-forgery",
                        {"method": method, "benign": [m.key for m in models], "key": key_digest(key),
                         "steps": steps, "seed": seed, "settings": s, "draw": VERIFY_DRAW}, compute, cache)


def derived_forgery_seed(seed: int, j: int) -> int:
    """The forger's seed for the j-th innocent model (distinct from every training seed of the profile)."""
    return 50_000 + 100 * int(seed) + j
