"""Recipes of the "Dispersibility" chapter: worked examples, Lemma 1 on random probability sets and on a model."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .. import metrics
from ..cache import Cache
from ..train import predict_proba
from .core import benign_model, load_data
from .profiles import Profile

__all__ = ["worked_examples", "random_probability_sets", "lemma1_table", "model_dispersibility"]


def worked_examples(num_classes: int = 10, per_class: int = 100) -> pd.DataFrame:
    """D_p of four kinds of triggered predictions on a balanced set (``per_class`` images per class):

    - targeted: every triggered image goes to class 1 (BadNets' ideal) -> D_p = 0;
    - source-to-target pairs: class j goes to class (j+1) mod K -> D_p = 0 (still deterministic);
    - half-targeted: half of each class goes to class 1, the rest stays -> D_p = ln 2 (except class 1);
    - untargeted: each class's predictions spread uniformly over the K classes -> D_p = ln K.
    """
    k, n = num_classes, per_class
    if n % k or n % 2:
        raise ValueError(f"per_class must be a multiple of num_classes ({k}) and of 2, got {n}")
    labels = np.repeat(np.arange(k), n)
    half = np.where(np.arange(n) < n // 2, 1, np.arange(k)[:, None]).reshape(-1)
    cases = {
        "targeted (all -> 1)": np.full(k * n, 1),
        "pairs (j -> j+1)": (labels + 1) % k,
        "half -> 1, half correct": half,
        "uniform over K": np.tile(np.arange(k), n),
    }
    rows = []
    for name, pred in cases.items():
        rows.append({
            "predictions of triggered images": name,
            "D_p": metrics.prediction_dispersibility(pred, labels, k),
            "ASR-A": metrics.asr_all(pred, labels),
        })
    out = pd.DataFrame(rows)
    out["D_p / ln K"] = out["D_p"] / math.log(k)
    return out


def random_probability_sets(n_sets: int = 1000, seed: int = 0, max_samples: int = 60, max_classes: int = 12):
    """Yield ``(kind, probs, labels)``: random N x K probability matrices with random class labels.

    Kinds: Dirichlet rows with concentration from very peaked (0.05) to flat (20); one-hot rows; rows with
    exact zeros; and rows that are identical within each class (where Lemma 1 is an equality).
    """
    rng = np.random.default_rng(seed)
    kinds = ("dirichlet", "one-hot", "sparse", "equal within class")
    for i in range(n_sets):
        kind = kinds[i % len(kinds)]
        n = int(rng.integers(1, max_samples + 1))
        k = int(rng.integers(2, max_classes + 1))
        n_cls = int(rng.integers(1, min(k, n) + 1))
        labels = rng.integers(0, n_cls, size=n)
        if kind == "dirichlet":
            probs = rng.dirichlet(np.full(k, 10 ** rng.uniform(-1.3, 1.3)), size=n)
        elif kind == "one-hot":
            probs = np.eye(k)[rng.integers(0, k, size=n)]
        elif kind == "sparse":
            probs = rng.dirichlet(np.ones(k), size=n) * (rng.random((n, k)) < 0.4)
            probs[np.arange(n), rng.integers(0, k, size=n)] += 1e-3
            probs /= probs.sum(1, keepdims=True)
        else:
            per_class = rng.dirichlet(np.ones(k), size=n_cls)
            probs = per_class[labels]
        yield kind, probs, labels


def lemma1_table(n_sets: int = 1000, seed: int = 0) -> pd.DataFrame:
    """D_s, D_c and their gap for :func:`random_probability_sets` (one row per set)."""
    rows = []
    for kind, probs, labels in random_probability_sets(n_sets, seed):
        rows.append({
            "kind": kind,
            "N": len(labels),
            "K": probs.shape[1],
            "D_s": metrics.sample_dispersibility(probs),
            "D_c": metrics.class_dispersibility(probs, labels),
            "gap": metrics.dispersibility_gap(probs, labels),
        })
    return pd.DataFrame(rows)


def model_dispersibility(profile: Profile, cache: Cache | None = None, progress: bool = True) -> dict:
    """The benign model of the profile on its (clean) test set: BA, D_s, D_c, D_p, and a per-class table.

    Returns ``{"trained": TrainedModel, "summary": DataFrame (one row), "per_class": DataFrame,
    "entropies": ndarray (entropy of each test prediction)}``.
    """
    data = load_data(profile)
    trained = benign_model(profile, cache=cache, progress=progress)
    test = data.test
    probs = predict_proba(trained.model, test.images).numpy().astype(np.float64)
    labels = test.labels.numpy()
    pred = probs.argmax(1)
    k = test.num_classes
    summary = pd.DataFrame([{
        "BA": metrics.benign_accuracy(pred, labels),
        "D_s": metrics.sample_dispersibility(probs),
        "D_c": metrics.class_dispersibility(probs, labels),
        "D_c - D_s": metrics.dispersibility_gap(probs, labels),
        "D_p (clean predictions)": metrics.prediction_dispersibility(pred, labels, k),
        "ln K": math.log(k),
    }])
    ent = metrics.entropy(probs)
    per_class = []
    for j in range(k):
        m = labels == j
        if not m.any():
            continue
        per_class.append({
            "class": test.classes[j],
            "mean H(f(x)) (sample-wise)": float(ent[m].mean()),
            "H(mean f(x)) (class-wise)": float(metrics.entropy(probs[m].mean(0))),
            "accuracy": float((pred[m] == j).mean()),
        })
    return {"trained": trained, "summary": summary, "per_class": pd.DataFrame(per_class), "entropies": ent}
