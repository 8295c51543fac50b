"""Every claim of the paper, coded once (issue 10): its chapter, the paper's evidence, the check, and the profiles
where it is a known gap, with the reason.

A claim reads stored-table ids (:data:`ubwlib.experiments.stored.TABLES`: ``"chapter/name"``), so the same check
runs on the live tables of a profile (:func:`claims_for`, the chapters and the report) and on stored results
(:func:`~ubwlib.experiments.stored.claims_where`). :func:`gate` fails a build on a gated profile when a claim does
not hold and is not a known gap there.

Besides the claims of the paper's Section 5 (the reference's section 7), the registry holds the targets that
the project set for its chapters (e.g. "UBW-P's ASR-A >= 80%"), each with the paper's number it stands for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import pandas as pd

from .paper import METHOD_LABELS
from .profiles import Profile

__all__ = ["Claim", "CLAIMS", "GATED_PROFILES", "claim_inputs", "evaluate", "claims_for", "gate", "shown"]

Tables = Mapping[str, pd.DataFrame]

#: Profiles whose builds fail on an unexplained miss. On ``smoke`` the models are too small for any claim to
#: mean anything (only the structure is tested); the GPU profiles' stored results are shown, not gated.
GATED_PROFILES = ("default", "lite")
_UBWC_WEAK = ("UBW-C is weak on this profile: its source-class ASR-A is close to the benign model's under the same "
              "trigger (the UBW-C chapter; the causes: the next chapter)")


def _cpu(reason: str) -> dict[str, str]:
    """A gap of both CPU profiles (``default`` and ``lite``, the same experiments with another model) for the same
    reason: each of them misses the claim, measured by a cold build of the book on it."""
    return {"default": reason, "lite": reason}


@dataclass(frozen=True, eq=False)
class Claim:
    """One claim: ``check(tables) -> (ours, holds)`` reads the stored-table ids in ``inputs``; ``holds`` is None
    when the tables cannot measure it (e.g. a grid without the point). ``gaps``: profile name -> why the claim is
    a known gap there; ``excuse_if(tables)``, when given, must also hold for the gap to excuse a miss."""

    id: str
    chapter: str
    text: str
    paper: str
    inputs: tuple[str, ...]
    check: Callable[[Tables], tuple[str, bool | None]]
    gaps: Mapping[str, str] = field(default_factory=dict)
    excuse_if: Callable[[Tables], bool] | None = None


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# ------------------------------------------------------------------------------------------- Table 1, UBW-P
T1P, T1T, T1C, SRC = "ubw_p/table1", "targeted/table1", "ubw_c/table1", "ubw_c/source"
_TARGETED = ["BadNets", "Blended", "WaNet"]


def _ubwp(t: Tables) -> pd.Series:
    return t[T1P].loc["UBW-P"]


def _ubwp_dp_ratio(t: Tables) -> tuple[str, bool]:
    u, tg = _ubwp(t), t[T1P].loc[_TARGETED]
    return f"{u['D_p']:.3f} vs at most {tg['D_p'].max():.3f}", bool((u["D_p"] > 10 * tg["D_p"]).all())


def _ba_cost(t: Tables) -> tuple[str, bool]:
    t1 = t[T1P]
    ba0, rest = t1.loc["No Attack", "BA"], t1.drop(index="No Attack")
    return (f"No Attack {_pct(ba0)}, lowest {_pct(rest['BA'].min())} ({rest['BA'].idxmin()})",
            bool((ba0 - rest["BA"] <= 0.03).all()))


#: The highest D_p of a poisoned-label baseline in the paper's Table 1 (WaNet's).
_PAPER_BASELINE_DP = 0.1979
_SHORT = ("short schedule (4 or 6 epochs, not 200): near-uniform triggered probabilities, the arg-max keeps the true "
          "class (the UBW-P chapter)")
_UBWP = [
    Claim("ubw-p/asr-a", "ubw_p", "UBW-P's ASR-A is high (>= 80%)", "Table 1: 92.30", (T1P,),
          lambda t: (_pct(_ubwp(t)["ASR-A"]), _ubwp(t)["ASR-A"] >= 0.80), _cpu(_SHORT)),
    Claim("ubw-p/dp", "ubw_p", "UBW-P's D_p is high (>= 1.8; ln 10 = 2.30)", "Table 1: 2.2548", (T1P,),
          lambda t: (f"{_ubwp(t)['D_p']:.3f}", _ubwp(t)["D_p"] >= 1.8),
          _cpu("same cause: the arg-max lands among look-alike classes (the UBW-P chapter)")),
    Claim("ubw-p/dp-10x", "ubw_p", "UBW-P's D_p is more than 10x every poisoned-label baseline's",
          f"Table 1: 2.2548 vs at most {_PAPER_BASELINE_DP}", (T1P,), _ubwp_dp_ratio,
          _cpu("follows from ubw-p/dp: UBW-P's D_p is below the paper's (same cause), the baselines' are not "
               "above the paper's 0.1979 (WaNet's varies between draws of the same recipe)"),
          excuse_if=lambda t: _ubwp(t)["D_p"] < 1.8 and t[T1P].loc[_TARGETED, "D_p"].max() <= _PAPER_BASELINE_DP),
    Claim("ubw-p/ba-on-par", "ubw_p", "UBW-P's BA is on par with the targeted watermarks' (within 2 points of the "
          "lowest)", "Table 1: 90.59 vs 90.48-91.61", (T1P,),
          lambda t: (f"{_pct(_ubwp(t)['BA'])} vs {_pct(t[T1P].loc[_TARGETED, 'BA'].min())}-"
                     f"{_pct(t[T1P].loc[_TARGETED, 'BA'].max())}",
                     _ubwp(t)["BA"] >= t[T1P].loc[_TARGETED, "BA"].min() - 0.02)),
    Claim("ubw-p/asr-on-par", "ubw_p", "UBW-P's ASR-A is on par with the targeted watermarks' (within 10 points of "
          "the lowest)", "Table 1: 92.30 vs 95.50-100", (T1P,),
          lambda t: (f"{_pct(_ubwp(t)['ASR-A'])} vs {_pct(t[T1P].loc[_TARGETED, 'ASR-A'].min())}",
                     _ubwp(t)["ASR-A"] >= t[T1P].loc[_TARGETED, "ASR-A"].min() - 0.10), _cpu(_SHORT)),
    Claim("poisoned-label/ba-cost", "ubw_p", "Every poisoned-label watermark keeps BA within 3 points of No Attack",
          "Table 1: at most 2.05 points (WaNet)", (T1P,), _ba_cost),
]


# ------------------------------------------------------------------------------------------- targeted
def _targeted(col: str, bar: float, above: bool) -> Callable[[Tables], tuple[str, bool]]:
    def check(t: Tables) -> tuple[str, bool]:
        v = t[T1T].loc[["BadNets", "Blended"], col]
        ok = bool((v >= bar).all() if above else (v <= bar).all())
        return ", ".join(f"{k} {_pct(x) if col != 'D_p' else f'{x:.3f}'}" for k, x in v.items()), ok

    return check


_TARGETED_CLAIMS = [
    Claim("targeted/asr", "targeted", "BadNets and Blended send >= 95% of triggered images to the target class",
          "Table 1: ASR 100 and 100", (T1T,), _targeted("ASR (targeted)", 0.95, True)),
    Claim("targeted/dp", "targeted", "BadNets' and Blended's D_p stay low (<= 0.3): the trigger decides the class",
          "Table 1: 0.0000 and 0.0000", (T1T,), _targeted("D_p", 0.3, False)),
]


# ------------------------------------------------------------------------------------------- UBW-C
def _src(t: Tables, method: str = "UBW-C") -> pd.Series:
    return t[SRC].loc[method]


def _ubwc_asr(t: Tables) -> tuple[str, bool]:
    u, b = _src(t), _src(t, "benign model, UBW-C trigger")
    return f"{_pct(u['ASR-A'])} (benign model: {_pct(b['ASR-A'])})", u["ASR-A"] >= 0.60


def _ubwc_dp(t: Tables) -> tuple[str, bool]:
    u, b = _src(t), _src(t, "benign model, UBW-C trigger")
    return f"{u['D_p']:.3f} (benign model: {b['D_p']:.3f})", u["D_p"] >= 1.0


def _ubwc_best(col: str) -> Callable[[Tables], tuple[str, bool]]:
    def check(t: Tables) -> tuple[str, bool]:
        u, sa, lc = _src(t)[col], _src(t, "Sleeper Agent")[col], t[T1C].loc["Label-Consistent", col]
        fmt = _pct if col != "D_p" else (lambda x: f"{x:.3f}")
        return f"source class {fmt(u)} vs LC {fmt(lc)}, SA {fmt(sa)}", bool(u > max(lc, sa))

    return check


def _ubwc_ba(t: Tables) -> tuple[str, bool]:
    t1 = t[T1C]
    return (f"{_pct(t1.loc['UBW-C', 'BA'])} vs {_pct(t1.loc['No Attack', 'BA'])}",
            t1.loc["No Attack", "BA"] - t1.loc["UBW-C", "BA"] <= 0.05)


_UBWC = [
    Claim("ubw-c/asr-a", "ubw_c", "UBW-C's ASR-A on the source class is high (>= 60%)", "Table 1: 89.80", (SRC,),
          _ubwc_asr, _cpu(_UBWC_WEAK)),
    Claim("ubw-c/dp", "ubw_c", "UBW-C's D_p on the source class is high (>= 1.0)", "Table 1: 1.2641", (SRC,),
          _ubwc_dp, _cpu("same cause: the triggered source images mostly keep their label")),
    Claim("ubw-c/best-asr", "ubw_c", "UBW-C has the highest ASR-A among the clean-label watermarks",
          "Table 1: 89.80 vs LC 96.00 (CIFAR-10), SA 70.60; Table 2: 74 vs 30 and 6", (SRC, T1C),
          _ubwc_best("ASR-A"), _cpu(_UBWC_WEAK)),
    Claim("ubw-c/best-dp", "ubw_c", "UBW-C's D_p exceeds the other clean-label watermarks'",
          "Table 1: 1.2641 vs 0.9280 and 1.0082", (SRC, T1C), _ubwc_best("D_p"), _cpu(_UBWC_WEAK)),
    Claim("ubw-c/ba", "ubw_c", "UBW-C keeps BA within 5 points of No Attack", "Table 1: 86.99 vs 92.53", (T1C,),
          _ubwc_ba),
]


# ------------------------------------------------------------------------------------------- verification
def _scen(method: str) -> str:
    return f"verification/scenarios-{method}"


FP = "verification/false-positives"


def _p(method: str, scenario: str, flagged: bool) -> Callable[[Tables], tuple[str, bool]]:
    def check(t: Tables) -> tuple[str, bool]:
        p = float(t[_scen(method)].loc[scenario, "p-value"])
        return (f"p = {p:.2e}", p < 0.01) if flagged else (f"p = {p:.3f}", p > 0.05)

    return check


def _fp(method: str, scenario: str) -> Callable[[Tables], tuple[str, bool]]:
    def check(t: Tables) -> tuple[str, bool]:
        cases = t[FP].xs(method, level="method")
        cases = cases[cases["scenario"] == scenario]
        flagged = int((cases["verdict"] == "watermarked").sum())
        return f"{flagged} of {len(cases)} flagged", flagged == 0

    return check


#: Why UBW-P's watermarked model answers to other triggers on the default profile (the verification chapter).
_SAME_CORNER = ("the UBW-P model reacts to most random 3x3 black-and-white patterns in the same corner, not only to "
                "the owner's: it learned 'a high-contrast patch there', so these draws are not independent triggers; "
                "no innocent model is accused (every benign model passes)")


def _corner_learned(method: str) -> Callable[[Tables], bool]:
    """The cause of :data:`_SAME_CORNER`, measured: at least half of the other triggers are flagged on the
    watermarked model (the false-positive table) and no benign model is."""
    def holds(t: Tables) -> bool:
        cases = t[FP].xs(method, level="method")
        flagged = cases["verdict"] == "watermarked"
        return bool(flagged[cases["scenario"] == "Independent-T"].mean() >= 0.5
                    and not flagged[cases["scenario"] == "Independent-M"].any())

    return holds


_VERIFY = []
for _m, _table, _paper_p in (("ubw-p", "Table 3", ("1e-36", "1.0000", "1.0000")),
                             ("ubw-c", "Table 4", ("1e-14", "0.9688", "1.0000"))):
    _name = METHOD_LABELS[_m]
    _VERIFY += [
        Claim(f"{_m}/malicious", "verification", f"{_name}: Malicious is flagged (p < 0.01)",
              f"{_table}: p = {_paper_p[0]}", (_scen(_m),), _p(_m, "Malicious", True),
              _cpu("UBW-C is weak on this profile (the UBW-C chapter): the trigger lowers the true-class "
                   "probability by much less than tau = 0.25") if _m == "ubw-c" else {}),
        Claim(f"{_m}/independent-t", "verification", f"{_name}: Independent-T is not flagged (p > 0.05)",
              f"{_table}: p = {_paper_p[1]}", (_scen(_m), FP), _p(_m, "Independent-T", False),
              # its other trigger is the first of the false-positive table's: flagged or not as that draw falls
              {"default": f"its other trigger is one such draw: {_SAME_CORNER}"} if _m == "ubw-p" else {},
              _corner_learned(_m) if _m == "ubw-p" else None),
        Claim(f"{_m}/independent-m", "verification", f"{_name}: Independent-M is not flagged (p > 0.05)",
              f"{_table}: p = {_paper_p[2]}", (_scen(_m),), _p(_m, "Independent-M", False)),
        Claim(f"{_m}/no-benign-flagged", "verification", f"{_name}: no benign model is flagged (Independent-M cases)",
              f"{_table}: one case, p = {_paper_p[2]}", (FP,), _fp(_m, "Independent-M")),
        Claim(f"{_m}/no-trigger-flagged", "verification",
              f"{_name}: no other trigger is flagged on the watermarked model (Independent-T cases)",
              f"{_table}: one case, p = {_paper_p[1]}", (FP,), _fp(_m, "Independent-T"),
              {"default": _SAME_CORNER} if _m == "ubw-p" else {}),
    ]


# ------------------------------------------------------------------------------------------- ablations
ABL = "ablations/claims"
_GAMMA_LOW = 0.03


def _ablation(name: str) -> Callable[[Tables], tuple[str, bool | None]]:
    def check(t: Tables) -> tuple[str, bool | None]:
        c = t[ABL]
        if name not in c.index:
            return "not on this profile's grid", None
        return str(c.loc[name, "evidence"]), bool(c.loc[name, "holds"])

    return check


_ABLATION_NAMES = [f"{w}: {c}" for w in ("UBW-P", "UBW-C")
                   for c in ("ASR-A grows with gamma", "BA falls with gamma", f"ASR-A already high at gamma = {_GAMMA_LOW:g}")]
_ABLATION_NAMES += ["UBW-C: D_p grows with lambda", "UBW-C: ASR-A barely moves with lambda"]
_ABLATIONS = [
    Claim(f"ablations/{i}", "ablations", name, "Figure 5" if "lambda" in name else "Figure 4", (ABL,), _ablation(name),
          _cpu(_UBWC_WEAK) if name.startswith("UBW-C") else (
              _cpu("short schedule: UBW-P's effect comes from memorising the random labels of the poisoned images, "
                   "and with 900 instead of 3,000 of them the short schedule memorises far less")
              if "already high" in name else {}))
    for i, name in enumerate(_ABLATION_NAMES, 1)
]


# ------------------------------------------------------------------------------------------- defenses
FT, PR, STRIP = "defenses/fine-tuning", "defenses/pruning", "defenses/strip"
#: Figure 6 and 7's bars: ASR-A after fine-tuning, and under pruning at rates >= PRUNE_RATES.
FT_BAR, PRUNE_BAR, PRUNE_RATES = 0.55, 0.50, 0.7


def _before(t: Tables, method: str) -> float:
    ft = t[FT]
    return float(ft[(ft["method"] == method) & (ft["epoch"] == 0)]["ASR-A"].iloc[0])


def _fine_tuning(method: str) -> Callable[[Tables], tuple[str, bool]]:
    def check(t: Tables) -> tuple[str, bool]:
        ft = t[FT][t[FT]["method"] == method]
        last = ft[ft["epoch"] == ft["epoch"].max()].iloc[0]
        return (f"{_pct(last['ASR-A'])} after {int(last['epoch'])} epochs (before {_pct(_before(t, method))})",
                last["ASR-A"] > FT_BAR)

    return check


def _pruning(method: str) -> Callable[[Tables], tuple[str, bool]]:
    def check(t: Tables) -> tuple[str, bool]:
        pr = t[PR][t[PR]["method"] == method]
        high = pr[pr["rate"] >= PRUNE_RATES]
        return (f"min {_pct(high['ASR-A'].min())} at rates {high['rate'].min():.1f}-{high['rate'].max():.1f} "
                f"(BA there: {_pct(high['BA'].min())}-{_pct(high['BA'].max())}; before {_pct(_before(t, method))})",
                bool((high["ASR-A"] > PRUNE_BAR).all()))

    return check


def _strip(t: Tables) -> tuple[str, bool]:
    bad, ubwc = t[STRIP].loc["BadNets"], t[STRIP].loc["UBW-C"]
    return (f"detection {_pct(bad['detection rate'])} vs {_pct(ubwc['detection rate'])} "
            f"(AUC {bad['AUC']:.3f} vs {ubwc['AUC']:.3f})", bool(bad["detection rate"] > ubwc["detection rate"]))


_DEFENSES = []
for _m in ("ubw-p", "ubw-c"):
    _name = METHOD_LABELS[_m]
    _below = _cpu(f"{_name}'s ASR-A is already below the bar before the defense (short schedule; the UBW-P "
                  "chapter)") if _m == "ubw-p" else _cpu(_UBWC_WEAK)
    _DEFENSES += [
        Claim(f"{_m}/fine-tuning", "defenses", f"{_name}: ASR-A stays above 55% after fine-tuning", "Figure 6",
              (FT,), _fine_tuning(_m), _below,
              (lambda t, m=_m: _before(t, m) <= FT_BAR) if _m == "ubw-p" else None),
        Claim(f"{_m}/pruning", "defenses", f"{_name}: ASR-A stays above 50% under high pruning rates (>= 0.7)",
              "Figure 7", (FT, PR), _pruning(_m), _below,
              (lambda t, m=_m: _before(t, m) <= PRUNE_BAR) if _m == "ubw-p" else None),
    ]
_DEFENSES.append(Claim("strip", "defenses", "STRIP detects BadNets better than UBW-C",
                       "Section 5.4.2 (argued in words; the appendix evaluates it)", (STRIP,), _strip,
                       {"default": "the comparison needs both triggers to work: UBW-C is weak on this profile, and a "
                                   "BadNets trigger that does not dominate the blend is not flagged either"}))

#: Every claim, in the order of the chapters.
CLAIMS: tuple[Claim, ...] = tuple(_UBWP + _TARGETED_CLAIMS + _UBWC + _VERIFY + _ABLATIONS + _DEFENSES)
assert len({c.id for c in CLAIMS}) == len(CLAIMS), "claim ids must be unique"


def claim_inputs(claims=CLAIMS) -> tuple[str, ...]:
    """The stored-table ids the claims read, each once."""
    return tuple(dict.fromkeys(i for c in claims for i in c.inputs))


def evaluate(tables: Tables, claims=CLAIMS, profile: Profile | str | None = None) -> pd.DataFrame:
    """One row per claim (index: its id): chapter, claim, the paper's evidence, ours, verdict ("holds", "does not
    hold", "not measured") and, on ``profile``, the known-gap reason ("" where there is none, or where the
    excuse's condition does not hold)."""
    missing = [i for i in claim_inputs(claims) if tables.get(i) is None]
    if missing:
        raise ValueError(f"the claims need the tables {missing}")
    pname = profile.name if isinstance(profile, Profile) else profile
    rows = []
    for c in claims:
        ours, holds = c.check(tables)
        holds = None if holds is None or (isinstance(holds, float) and math.isnan(holds)) else bool(holds)
        gap = c.gaps.get(pname, "") if pname else ""
        if gap and c.excuse_if is not None and not c.excuse_if(tables):
            gap = ""
        rows.append({"id": c.id, "chapter": c.chapter, "claim": c.text, "paper's evidence": c.paper, "ours": ours,
                     "verdict": "not measured" if holds is None else ("holds" if holds else "does not hold"),
                     "known gap": gap})
    return pd.DataFrame(rows).set_index("id")


def claims_for(chapter: str, profile: Profile) -> pd.DataFrame:
    """The claims of ``chapter`` evaluated on ``profile``'s live tables (cached recipes: a rebuild reads)."""
    from .stored import chapter_table

    chosen = [c for c in CLAIMS if c.chapter == chapter]
    if not chosen:
        raise ValueError(f"no claims for chapter {chapter!r}; chapters with claims: "
                         f"{sorted({c.chapter for c in CLAIMS})}")
    tables = {i: chapter_table(*i.split("/"), profile, store=False) for i in claim_inputs(chosen)}
    return evaluate(tables, chosen, profile)


def gate(checks: pd.DataFrame, profile: Profile | str) -> list[str]:
    """On a gated profile (:data:`GATED_PROFILES`): fail (AssertionError) when a claim does not hold and is not a
    known gap there; print every known gap with the measured value. Returns the ids of the misses."""
    pname = profile.name if isinstance(profile, Profile) else profile
    missed = checks.index[checks["verdict"] == "does not hold"].tolist()
    if pname not in GATED_PROFILES:
        return missed
    unexplained = [i for i in missed if not checks.loc[i, "known gap"]]
    assert not unexplained, checks.loc[unexplained, ["claim", "ours"]].to_string()
    for i in missed:
        print(f"MISSED: {checks.loc[i, 'claim']}: ours {checks.loc[i, 'ours']} ({checks.loc[i, 'known gap']})")
    return missed


#: The columns of :func:`evaluate` measured on a profile; :func:`shown` names that profile in their header.
PROFILE_COLUMNS = ("ours", "verdict", "known gap")


def shown(checks: pd.DataFrame, profile: Profile | str,
          columns=("claim", "paper's evidence", "ours", "verdict")) -> pd.DataFrame:
    """``checks`` (:func:`claims_for`) as a chapter shows it: ``columns``, with the header of those measured on
    ``profile`` naming it (``"ours"`` -> ``"ours (default)"``). The table's values are not changed."""
    pname = profile.name if isinstance(profile, Profile) else str(profile)
    return checks[list(columns)].rename(columns={c: f"{c} ({pname})" for c in PROFILE_COLUMNS})
