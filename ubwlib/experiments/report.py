"""Recipes of the reproduction report: the seed-variance table and the claim rows.

Everything here reads results that the other chapters computed (and cached): calling the same recipes again
loads them. Only the extra seeds of :func:`seed_variance` train something new.
"""

from __future__ import annotations

import pandas as pd

from .clean_label import CLEAN_LABEL_METHODS
from .paper import METHOD_LABELS
from .profiles import Profile
from .watermarking import method_run

__all__ = ["REPORT_METHODS", "report_seeds", "seed_runs", "seed_variance", "claim_row", "reproduction_claims"]

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
    for m in methods:
        for s in seeds:
            run = method_run(profile, m, s, cache, progress)
            rows.append({"method": METHOD_LABELS.get(m, m), "seed": s, "eval set": "whole test set",
                         **{k: run.row[k] for k in HEADLINE}})
            if m in CLEAN_LABEL_METHODS and getattr(run, "source_row", None) is not None:
                rows.append({"method": METHOD_LABELS.get(m, m), "seed": s, "eval set": "source class",
                             **{k: run.source_row[k] for k in HEADLINE}})
    return pd.DataFrame(rows)


def seed_variance(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation (ddof 1) and range over seeds of each headline number, per method and
    evaluation set (rates in %)."""
    df = runs.copy()
    for c in ("BA", "ASR-A", "ASR-C"):
        df[c] = df[c] * 100
    g = df.groupby(["method", "eval set"], sort=False)[list(HEADLINE)]
    out = pd.concat({"mean": g.mean(), "std": g.std(ddof=1), "min": g.min(), "max": g.max()}, axis=1)
    out = out.swaplevel(0, 1, axis=1)[[(h, s) for h in HEADLINE for s in ("mean", "std", "min", "max")]]
    out[("seeds", "n")] = g.size()
    return out


def claim_row(claim: str, paper: str, ours: str, holds: bool | None, source: str) -> dict:
    """One row of the report: the paper's claim and evidence, our number, the verdict and which chapter holds
    the evidence. ``holds=None``: not measured on this profile."""
    verdict = "not measured" if holds is None else ("holds" if holds else "does not hold")
    return {"claim": claim, "paper's evidence": paper, "ours": ours, "verdict": verdict, "chapter": source}


def reproduction_claims(t1: pd.DataFrame, src: pd.DataFrame, scenarios: dict, ablation: pd.DataFrame,
                        fine_tuning: dict, pruning: dict) -> pd.DataFrame:
    """One row per claim of the paper's Section 5 (the reference's section 7), from the other chapters' tables:
    ``t1`` (:func:`~ubwlib.experiments.watermarking.table1`, all methods), ``src``
    (:func:`~ubwlib.experiments.watermarking.source_table`), ``scenarios`` (method -> Tables 3/4,
    :func:`~ubwlib.experiments.verification.scenario_table`), ``ablation``
    (:func:`~ubwlib.experiments.ablations.ablation_claims`), ``fine_tuning`` and ``pruning`` (method -> the
    defenses chapter's tables). Rows are numbered from 1."""
    ft, pr, scen, abl = fine_tuning, pruning, scenarios, ablation
    rows = []

    # Table 1: UBW-P on par with the targeted poisoned-label watermarks
    ubwp, targeted = t1.loc["UBW-P"], t1.loc[["BadNets", "Blended", "WaNet"]]
    rows.append(claim_row(
        "UBW-P's BA is on par with the targeted watermarks' (within 2 points of the lowest)",
        "Table 1: 90.59 vs 90.48-91.61",
        f"{_pct(ubwp['BA'])} vs {_pct(targeted['BA'].min())}-{_pct(targeted['BA'].max())}",
        ubwp["BA"] >= targeted["BA"].min() - 0.02, "UBW-P"))
    rows.append(claim_row(
        "UBW-P's ASR-A is on par with the targeted watermarks' (within 10 points of the lowest)",
        "Table 1: 92.30 vs 95.50-100", f"{_pct(ubwp['ASR-A'])} vs {_pct(targeted['ASR-A'].min())}",
        ubwp["ASR-A"] >= targeted["ASR-A"].min() - 0.10, "UBW-P"))
    rows.append(claim_row(
        "UBW-P's D_p is more than 10x every poisoned-label baseline's",
        "Table 1: 2.2548 vs at most 0.1979", f"{ubwp['D_p']:.3f} vs at most {targeted['D_p'].max():.3f}",
        bool((ubwp["D_p"] > 10 * targeted["D_p"]).all()), "UBW-P"))

    # Table 1: UBW-C best among the clean-label watermarks
    u_src, sa_src = src.loc["UBW-C"], src.loc["Sleeper Agent"]
    lc = t1.loc["Label-Consistent"]
    rows.append(claim_row(
        "UBW-C has the highest ASR-A among the clean-label watermarks",
        "Table 1: 89.80 vs LC 96.00 (CIFAR-10), SA 70.60; Table 2: 74 vs 30 and 6",
        f"source class {_pct(u_src['ASR-A'])} vs LC {_pct(lc['ASR-A'])}, SA {_pct(sa_src['ASR-A'])}",
        u_src["ASR-A"] > max(lc["ASR-A"], sa_src["ASR-A"]), "UBW-C"))
    rows.append(claim_row(
        "UBW-C's D_p exceeds the other clean-label watermarks'",
        "Table 1: 1.2641 vs 0.9280 and 1.0082", f"{u_src['D_p']:.3f} vs LC {lc['D_p']:.3f}, SA {sa_src['D_p']:.3f}",
        u_src["D_p"] > max(lc["D_p"], sa_src["D_p"]), "UBW-C"))

    # Tables 3-4: verification
    for m, name in (("ubw-p", "UBW-P"), ("ubw-c", "UBW-C")):
        sc = scen[m]
        paper_p = "1e-36" if m == "ubw-p" else "1e-14"
        rows.append(claim_row(
            f"{name}: Malicious is flagged (p < 0.01)", f"Table {3 if m == 'ubw-p' else 4}: p = {paper_p}",
            f"p = {sc.loc['Malicious', 'p-value']:.2e}", sc.loc["Malicious", "p-value"] < 0.01, "verification"))
        indep = sc.loc[["Independent-T", "Independent-M"], "p-value"]
        rows.append(claim_row(
            f"{name}: both independent scenarios have p >> 0.05", "Tables 3-4: p >= 0.9556",
            f"p = {indep.iloc[0]:.3f} (T), {indep.iloc[1]:.3f} (M)", bool((indep > 0.05).all()), "verification"))

    # Figures 4-5: ablations (claims evaluated by ubwlib.experiments.ablations.ablation_claims)
    for claim, r in abl.iterrows():
        rows.append(claim_row(claim, "Figures 4-5", str(r["evidence"]), bool(r["holds"]), "ablations"))

    # Figures 6-7: defenses
    for m, name in (("ubw-p", "UBW-P"), ("ubw-c", "UBW-C")):
        last = ft[m].iloc[-1]
        rows.append(claim_row(f"{name}: ASR-A stays above 55% after fine-tuning", "Figure 6",
                              f"{_pct(last['ASR-A'])} after {int(last['epoch'])} epochs", last["ASR-A"] > 0.55,
                              "defenses"))
        high = pr[m][pr[m]["rate"] >= 0.7]
        rows.append(claim_row(f"{name}: ASR-A stays above 50% under high pruning rates (>= 0.7)", "Figure 7",
                              f"min {_pct(high['ASR-A'].min())} at rates "
                              f"{high['rate'].min():.1f}-{high['rate'].max():.1f} "
                              f"(BA there: {_pct(high['BA'].min())}-{_pct(high['BA'].max())}; "
                              "ASR-A counts any error, so "
                              "a pruned-to-death model also 'holds', see the defenses chapter's benign reference)",
                              bool((high["ASR-A"] > 0.5).all()), "defenses"))


    out = pd.DataFrame(rows)
    out.index = range(1, len(out) + 1)
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"
