"""Recipes of the reproduction report: the seed-variance table (the claims: :mod:`ubwlib.experiments.claims`).

Everything here reads results that the other chapters computed (and cached): calling the same recipes again
loads them. Only the extra seeds of :func:`seed_variance` train something new.
"""

from __future__ import annotations

import pandas as pd

from .paper import METHOD_LABELS
from .profiles import Profile
from .runs import run_many

__all__ = ["REPORT_METHODS", "report_seeds", "seed_runs", "seed_variance"]

REPORT_METHODS = ("ubw-p", "ubw-c")
HEADLINE = ("BA", "ASR-A", "ASR-C", "D_p")


def report_seeds(profile: Profile, count: int = 3) -> list[int]:
    """The profile's seed and the next ``count - 1`` (the benign models of these seeds are the independent
    models of the verification chapter, so they are trained once)."""
    return [profile.seed + i for i in range(count)]


def seed_runs(profile: Profile, methods=REPORT_METHODS, seeds=None, cache=None, progress: bool = True) -> pd.DataFrame:
    """One row per (method, seed, evaluation set): the headline numbers of Table 1 (rates as fractions).

    Each seed changes everything random: the poisoned subset, UBW-P's labels, the surrogate and the crafting of
    UBW-C, the victim's initialisation and data order."""
    seeds = report_seeds(profile) if seeds is None else list(seeds)
    rows = []
    specs = [(m, s) for m in methods for s in seeds]
    for (m, s), r in zip(specs, run_many(profile, specs, cache, progress)):
        rows.append({"method": METHOD_LABELS.get(m, m), "seed": s, "eval set": "whole test set",
                     **{k: r.row[k] for k in HEADLINE}})
        if r.source_row is not None:
            rows.append({"method": METHOD_LABELS.get(m, m), "seed": s, "eval set": "source class",
                         **{k: r.source_row[k] for k in HEADLINE}})
    return pd.DataFrame(rows)


def seed_variance(seed_rows: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation (ddof 1) and range over seeds of each headline number, per method and
    evaluation set (rates in %)."""
    df = seed_rows.copy()
    for c in ("BA", "ASR-A", "ASR-C"):
        df[c] = df[c] * 100
    g = df.groupby(["method", "eval set"], sort=False)[list(HEADLINE)]
    out = pd.concat({"mean": g.mean(), "std": g.std(ddof=1), "min": g.min(), "max": g.max()}, axis=1)
    out = out.swaplevel(0, 1, axis=1)[[(h, s) for h in HEADLINE for s in ("mean", "std", "min", "max")]]
    out[("seeds", "n")] = g.size()
    return out
