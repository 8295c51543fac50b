"""Recipes of the watermark chapters: watermark the profile's training set, train on it (cached), evaluate.

``table1(profile)`` builds the rows of the paper's Table 1 (No Attack + one row per watermark) on the profile's
dataset; ``stored.three_columns`` puts them beside the paper's numbers and the stored full-scale ones.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .. import metrics
from ..cache import Cache
from ..data import ImageDataset
from ..train import predict, predict_proba
from ..watermarks import get_watermark, trigger
from .clean_label import CLEAN_LABEL_METHODS, noise_control_run
from .core import benign_model, cached_evaluation, cached_table, fingerprint, key_digest, load_data
from .paper import METHOD_LABELS
from .profiles import Profile
from .runs import Run, crafting_budget, release, run_many, source_class

__all__ = [
    "calibration_table",
    "POISONED_LABEL_METHODS",
    "ALL_METHODS",
    "source_table",
    "noise_control_table",
    "no_attack_row",
    "table1",
    "triggered_confusion",
    "settings_table",
    "gallery_images",
    "as_percent",
]

POISONED_LABEL_METHODS = ("badnets", "blended", "wanet", "ubw-p")
#: Table 1's eight watermarks in the paper's order (No Attack is added by :func:`table1`).
ALL_METHODS = POISONED_LABEL_METHODS + CLEAN_LABEL_METHODS


def no_attack_row(profile: Profile, seed: int | None = None, cache: Cache | None = None, progress: bool = True) -> dict:
    trained = benign_model(profile, seed=seed, cache=cache, progress=progress)
    test = load_data(profile).test
    ba = cached_table("benign accuracy", {"model": trained.key, "test": fingerprint(test)},
                      lambda: pd.DataFrame([{"BA": metrics.benign_accuracy(predict(trained.model, test.images),
                                                                           test.labels)}]), cache).iloc[0]["BA"]
    ba = float(ba)
    return {"method": "no-attack", "labels": "", "targeted": False, "BA": ba, "ASR-A": math.nan, "ASR-C": math.nan,
            "D_p": math.nan, "D_s (triggered)": math.nan, "ASR (targeted)": math.nan, "eval set": "test, clean",
            "n eval": len(test)}


def table1(profile: Profile, methods=POISONED_LABEL_METHODS, seed: int | None = None, cache: Cache | None = None,
           progress: bool = True) -> pd.DataFrame:
    """Rows of Table 1 on the profile's dataset (rates as fractions), No Attack first."""
    rows = [no_attack_row(profile, seed, cache, progress)]
    rows += [r.row for r in run_many(profile, [(m, seed) for m in methods], cache, progress)]
    df = pd.DataFrame(rows)
    df.insert(0, "Method", df["method"].map(METHOD_LABELS).fillna(df["method"]))
    return df.set_index("Method")


def source_table(profile: Profile, methods=("sleeper-agent", "ubw-c"), seed: int | None = None,
                 cache: Cache | None = None, progress: bool = True) -> pd.DataFrame:
    """The source-specific watermarks evaluated on the triggered test images of the source class only (the
    public code's evaluation set); after each, the benign model with the same trigger on the same images
    (what the trigger does without the watermark)."""
    seed = profile.seed if seed is None else seed
    test = load_data(profile).test
    benign = benign_model(profile, seed=seed, cache=cache, progress=progress)
    rows = []
    for m, r in zip(methods, run_many(profile, [(m, seed) for m in methods], cache, progress)):
        label = METHOD_LABELS.get(m, m)
        rows.append({"Method": label, **r.source_row})
        base = cached_evaluation(benign, test, r.released.key, source_class=source_class(r.released.key), seed=seed,
                                 cache=cache)
        rows.append({"Method": f"benign model, {label} trigger", **base, "method": "no-attack"})
    return pd.DataFrame(rows).set_index("Method")


def noise_control_table(profile: Profile, seed: int | None = None, cache: Cache | None = None,
                        progress: bool = True) -> pd.DataFrame:
    """UBW-C on the triggered source-class test images beside its two baselines: the benign model under the same
    trigger, and the same poisons with random noise and no crafting step
    (:func:`~ubwlib.experiments.clean_label.noise_control_run`)."""
    src = source_table(profile, ("ubw-c",), seed, cache, progress)
    control = noise_control_run(profile, seed, cache, progress)
    rows = {"benign model": src.loc["benign model, UBW-C trigger"].to_dict(),
            "same poisons, random noise (0 crafting steps)": control.source_row,
            f"UBW-C ({crafting_budget(profile).steps} crafting steps)": src.loc["UBW-C"].to_dict()}
    return pd.DataFrame(list(rows.values()), index=list(rows))


def triggered_confusion(run: Run, test_set: ImageDataset, seed: int | None = None,
                        cache: Cache | None = None) -> pd.DataFrame:
    """Row-normalised confusion matrix (true class x predicted class) of the triggered test images (cached under
    the model, the trigger and the test set)."""
    key = run.released.key

    def compute() -> pd.DataFrame:
        images = trigger(test_set.images, key, seed=seed)
        pred = predict(run.trained.model, images).numpy()
        cm = metrics.confusion_matrix(pred, test_set.labels.numpy(), test_set.num_classes).astype(np.float64)
        return pd.DataFrame(cm / np.maximum(cm.sum(1, keepdims=True), 1))

    cm = cached_table("triggered confusion",
                      {"model": run.trained.key, "test": fingerprint(test_set), "seed": seed,
                       "trigger": key_digest(key)}, compute, cache).to_numpy(np.float64)
    return pd.DataFrame(cm, index=pd.Index(test_set.classes, name="true class"),
                        columns=pd.Index(test_set.classes, name="predicted on triggered image"))


def calibration_table(run: Run, test_set: ImageDataset, seed: int | None = None,
                      cache: Cache | None = None) -> pd.DataFrame:
    """How sure the watermarked model is on the clean and on the triggered test images: the mean probability of
    the true class, the mean top probability and the sample dispersibility D_s (mean entropy, nats) of its softmax
    outputs (cached under the model, the trigger and the test set)."""
    key = run.released.key
    rows = ["mean probability of the true class", "mean top probability", "D_s (mean entropy, nats)"]

    def compute() -> pd.DataFrame:
        true = test_set.labels
        out = {}
        for name, images in (("clean test images", test_set.images),
                             ("triggered test images", trigger(test_set.images, key, seed=seed))):
            probs = predict_proba(run.trained.model, images)
            out[name] = [probs[np.arange(len(true)), true].mean().item(), probs.max(1).values.mean().item(),
                         metrics.sample_dispersibility(probs.double().numpy())]
        return pd.DataFrame(out)

    table = cached_table("calibration", {"model": run.trained.key, "test": fingerprint(test_set), "seed": seed,
                                         "trigger": key_digest(key)}, compute, cache)
    return table.set_axis(rows)


def settings_table(methods=POISONED_LABEL_METHODS, **overrides) -> pd.DataFrame:
    """Each method's settings (the paper's defaults), one row per (method, setting)."""
    rows = []
    for m in methods:
        wm = get_watermark(m, **overrides.get(m, {}))
        for k, v in wm.settings_dict().items():
            rows.append({"method": METHOD_LABELS.get(m, m), "setting": k, "value": v})
    return pd.DataFrame(rows).set_index(["method", "setting"])


def gallery_images(profile: Profile, methods=POISONED_LABEL_METHODS, n: int = 4, seed: int | None = None):
    """For Figure 3: ``n`` benign training images and their watermarked versions per method.

    Returns ``(benign: uint8 N x C x H x W, {method: (images, labels_released)}, benign_labels)`` using, for
    each method, the first ``n`` poisoned samples of that method's released dataset."""
    data = load_data(profile).train
    out = {}
    for m in methods:
        rel = release(profile, m, seed)
        idx = rel.indices[:n]
        out[m] = (data.images[idx], rel.dataset.images[idx], data.labels[idx], rel.dataset.labels[idx])
    return out


def as_percent(df: pd.DataFrame, cols=("BA", "ASR-A", "ASR-C", "ASR (targeted)")) -> pd.DataFrame:
    out = df.copy()
    for c in cols:
        if c in out:
            out[c] = out[c] * 100
    return out
