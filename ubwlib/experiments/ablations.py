"""Recipes of the "Ablations" chapter (the paper's Figures 4 and 5).

- Figure 4: BA and ASR of UBW-P and UBW-C against the poisoning rate gamma (:func:`gamma_sweep`);
- Figure 5: D_p and ASR of UBW-C against lambda, the weight of the entropy term of Eq. 6 (:func:`lambda_sweep`);
- the paper's claims about both, checked on the measured curves (:func:`ablation_claims`).

Every point is an ordinary run, the same as :func:`~ubwlib.experiments.runs.run` with the setting changed, and
shares its cache
entries (release, trained model); its evaluation row is cached too (keyed by the model's cache key, the trigger
and the test set), so a warm rebuild only reads the cache. The grids depend on the profile
(``profile.grid``, an :class:`~ubwlib.experiments.profiles.AblationGrid`): each UBW-C point crafts its own gradient-matching poisons, minutes on the default profile, so the
default grid is small. The points gamma = 0.1 and lambda = 2 are the paper's settings, i.e. the Table 1 runs, and
cost nothing once the UBW-C chapter has run.

UBW-C is evaluated on the triggered test images of its source class (``source_row``: the class its target
objective is built from, as in the public code), UBW-P on all triggered test images (``row``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..cache import Cache
from ..watermarks import UBWCSettings, WatermarkKey
from .core import TrainedModel, benign_model, cached_evaluation, load_data
from .paper import METHOD_LABELS
from .profiles import AblationGrid, Profile
from .runs import Run, release, run_many, source_class

__all__ = [
    "METRICS",
    "ablation_grid",
    "with_grid",
    "gamma_sweep",
    "lambda_sweep",
    "benign_baseline",
    "ablation_claims",
    "TABLE1_GAMMA",
    "TABLE1_LAMBDA",
]

#: The UBW-C settings of Table 1 (the lambda sweep runs at this gamma, the gamma sweep at this lambda).
TABLE1_GAMMA = UBWCSettings().poisoning_rate
TABLE1_LAMBDA = UBWCSettings().lam

def with_grid(profile: Profile, gammas=None, lambdas=None) -> Profile:
    """``profile`` with its ablation grid overridden (``gammas`` and ``lambdas`` as :func:`ablation_grid` reads
    them): a chapter run with another grid is another profile, so its stored tables say so."""
    if gammas is None and lambdas is None:
        return profile
    g = ablation_grid(profile, gammas, lambdas)
    return profile.replace(grid=AblationGrid(ubw_p_gammas=g["gammas"]["ubw-p"], ubw_c_gammas=g["gammas"]["ubw-c"],
                                             lambdas=g["lambdas"]))


#: Columns of a sweep row taken from the evaluation (rates as fractions).
METRICS = ("BA", "ASR-A", "ASR-C", "D_p", "D_s (triggered)")


def _floats(values, what: str) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        values = (values,)
    out = tuple(float(v) for v in values)  # 2 and 2.0 must give the same cache key
    if not out:
        raise ValueError(f"{what}: the grid is empty")
    if len(set(out)) != len(out):
        raise ValueError(f"{what}: repeated values in {out}")
    return tuple(sorted(out))


def _gammas_for(gammas, methods: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """``gammas`` as {method: sorted gammas}: one sequence for every method, or a mapping per method."""
    if isinstance(gammas, Mapping):
        missing = [m for m in methods if m not in gammas]
        if missing:
            raise ValueError(f"no gammas for {missing}; given for {sorted(gammas)}")
        return {m: _floats(gammas[m], f"gammas[{m!r}]") for m in methods}
    return {m: _floats(gammas, "gammas") for m in methods}


def ablation_grid(profile: Profile, gammas=None, lambdas=None) -> dict:
    """The sweep grid of ``profile`` (its :class:`~ubwlib.experiments.profiles.AblationGrid`):
    ``{"gammas": {"ubw-p": (...), "ubw-c": (...)}, "lambdas": (...)}``.

    ``gammas`` overrides the gammas of every method (a sequence) or of some methods (a mapping, merged into the
    profile's); ``lambdas`` overrides the lambdas. Values are returned as sorted tuples of floats."""
    g = profile.grid.gammas()
    if isinstance(gammas, Mapping):
        g.update(gammas)
    elif gammas is not None:
        g = {m: gammas for m in g}
    return {"gammas": {m: _floats(v, f"gammas[{m!r}]") for m, v in g.items()},
            "lambdas": _floats(profile.grid.lambdas if lambdas is None else lambdas, "lambdas")}


def _evaluation(trained: TrainedModel, key: WatermarkKey, source_class: int | None, seed: int, profile: Profile,
                cache: Cache | None) -> dict:
    """``evaluate`` of a trained model under a trigger (cached: :func:`~ubwlib.experiments.core.cached_evaluation`)."""
    return cached_evaluation(trained, load_data(profile).test, key, source_class=source_class, seed=seed, cache=cache)


def _point(point: Run) -> dict:
    """One point of a sweep: a :class:`~ubwlib.experiments.runs.Run` (from :func:`~ubwlib.experiments.runs.run_many`:
    the same releases, trained models and cache entries as :func:`~ubwlib.experiments.runs.run`), evaluated on the
    source class where the watermark has one (``source_row``), else as its ``row``."""
    r = point.row if point.source_row is None else point.source_row
    return {"poisons": len(point.released.indices), **{k: float(r[k]) for k in METRICS}, "eval set": r["eval set"],
            "n eval": int(r["n eval"])}


def gamma_sweep(profile: Profile, methods=("ubw-p", "ubw-c"), gammas=None, seed: int | None = None,
                cache: Cache | None = None, progress: bool = True) -> pd.DataFrame:
    """Figure 4: one run per (method, gamma), everything else at the paper's settings (UBW-C: lambda = 2).

    ``gammas``: None (the profile's grid, :func:`ablation_grid`), one sequence for every method, or a mapping
    {method: gammas}. Rows (method, Method, gamma, poisons, BA, ASR-A, ASR-C, D_p, D_s (triggered), eval set,
    n eval), rates as fractions; ``poisons`` is the number of poisoned training samples, round(gamma * N).
    Each point is :func:`~ubwlib.experiments.runs.run` with
    ``poisoning_rate=gamma``, evaluated as their ``row``, or as ``source_row`` for UBW-C and Sleeper Agent (the
    source class)."""
    methods = tuple(methods)
    if gammas is None:
        grid = ablation_grid(profile)["gammas"]
        missing = [m for m in methods if m not in grid]
        if missing:
            raise ValueError(f"the profile's grid has gammas for {sorted(grid)} only; pass gammas= for {missing}")
        per_method = {m: grid[m] for m in methods}
    else:
        per_method = _gammas_for(gammas, methods)
    specs = [(m, seed, {"poisoning_rate": g}) for m in methods for g in per_method[m]]
    points = run_many(profile, specs, cache, progress)
    return pd.DataFrame([{"method": m, "Method": METHOD_LABELS.get(m, m), "gamma": o["poisoning_rate"], **_point(p)}
                         for (m, _, o), p in zip(specs, points)])


def lambda_sweep(profile: Profile, lambdas=None, gamma: float = TABLE1_GAMMA, seed: int | None = None,
                 cache: Cache | None = None, progress: bool = True) -> pd.DataFrame:
    """Figure 5: one UBW-C run per lambda (the weight of the entropy term of Eq. 6) at poisoning rate ``gamma``
    (Table 1's 0.1), evaluated on the source class. ``lambdas``: None for the profile's grid.

    Rows (lam, gamma, poisons, BA, ASR-A, ASR-C, D_p, D_s (triggered), eval set, n eval), rates as fractions."""
    lambdas = ablation_grid(profile)["lambdas"] if lambdas is None else _floats(lambdas, "lambdas")
    gamma = float(gamma)
    points = run_many(profile, [("ubw-c", seed, {"poisoning_rate": gamma, "lam": lam}) for lam in lambdas], cache,
                      progress)
    return pd.DataFrame([{"lam": lam, "gamma": gamma, **_point(p)} for lam, p in zip(lambdas, points)])


def benign_baseline(profile: Profile, methods=("ubw-p", "ubw-c"), seed: int | None = None,
                    cache: Cache | None = None, progress: bool = True) -> pd.DataFrame:
    """What each method's trigger does *without* the watermark: the benign model evaluated like the sweeps
    (UBW-P's trigger on all test images, UBW-C's on the source class). One row per method (index ``method``).

    UBW-C's trigger is read from the key of its Table 1 release (the same trigger for every gamma and lambda:
    the resized square pasted at random positions drawn from the seed), which this crafts if not cached."""
    seed = profile.seed if seed is None else seed
    benign = benign_model(profile, seed=seed, cache=cache, progress=progress)
    rows = []
    for m in methods:
        key = release(profile, m, seed, cache, progress).key
        r = _evaluation(benign, key, source_class(key), seed, profile, cache)
        rows.append({"method": m, "Method": f"benign model, {METHOD_LABELS.get(m, m)} trigger",
                     **{k: float(r[k]) for k in METRICS}, "eval set": r["eval set"], "n eval": int(r["n eval"])})
    return pd.DataFrame(rows).set_index("method")


# ------------------------------------------------------------------------------------------------------------
# claims
# ------------------------------------------------------------------------------------------------------------


def _spearman(x, y) -> float:
    """Spearman's rank correlation (average ranks for ties); nan when either side is constant."""
    rx = pd.Series(np.asarray(x, dtype=float)).rank().to_numpy()
    ry = pd.Series(np.asarray(y, dtype=float)).rank().to_numpy()
    if len(rx) < 2 or np.ptp(rx) == 0 or np.ptp(ry) == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _nats(v: float) -> str:
    return f"{v:.3f}"


def _points(v: float) -> str:
    return f"{100 * v:.1f} points"


def _grows(x, y, margin: float, fmt, fmt_diff, xname: str) -> tuple[str, bool]:
    """"y grows with x": y at the largest x exceeds y at the smallest x by more than ``margin``, and Spearman's
    rho(x, y) > 0 (the curve rises overall, not only at its ends)."""
    order = np.argsort(np.asarray(x, dtype=float))
    x, y = np.asarray(x, dtype=float)[order], np.asarray(y, dtype=float)[order]
    if len(x) < 2:
        return "needs at least two grid points", False
    rho = _spearman(x, y)
    ok = bool(y[-1] - y[0] > margin and rho > 0)
    path = " -> ".join(fmt(v) for v in y)
    return (f"{path} ({xname} = {', '.join(f'{v:g}' for v in x)}); rise {fmt_diff(y[-1] - y[0])} "
            f"(needs > {fmt_diff(margin)}), rho = {rho:.2f} (needs > 0)", ok)


def ablation_claims(gamma_df: pd.DataFrame | None, lambda_df: pd.DataFrame | None,
                    baseline: pd.DataFrame | None = None, *, asr_rise: float = 0.02, ba_tol: float = 0.01,
                    high_at: float = 0.03, high_frac: float = 0.5, ref_gamma: float = 0.1, dp_rise: float = 0.05,
                    asr_band: float = 0.10) -> pd.DataFrame:
    """The paper's Section 7 claims on the measured sweeps: one row per claim (index ``claim``; columns
    ``evidence`` and ``holds``). Claims of Figure 4 are made per method present in ``gamma_df``; those of
    Figure 5 only when ``lambda_df`` is given. Rates are fractions; definitions, with their tolerances:

    - "ASR-A grows with gamma": ASR-A at the largest gamma exceeds ASR-A at the smallest by more than
      ``asr_rise`` (2 points) *and* Spearman's rho(gamma, ASR-A) > 0;
    - "BA falls with gamma": BA at the largest gamma <= BA at the smallest + ``ba_tol`` (1 point), i.e. "BA does
      not rise beyond noise": the drop the paper shows is small, and differences of a few tenths of a point between
      short runs are noise;
    - "ASR-A already high at gamma = 0.03": at the smallest gamma >= ``high_at`` in the grid, ASR-A is at least
      ``high_frac`` (50%) of its value at ``ref_gamma`` (0.1; the largest gamma if 0.1 is not in the grid);
      left out when the grid has no gamma >= ``high_at``. With ``baseline`` (:func:`benign_baseline`, index
      method), both ASR-As are first reduced by the benign model's ASR-A under the same trigger (what the trigger
      does without a watermark), so that a flat curve at the benign level does not count as "high"; the claim
      then also needs a positive excess at ``ref_gamma``;
    - "D_p grows with lambda": as "grows" above with margin ``dp_rise`` (0.05 nats), from the smallest lambda
      (0 in every grid) to the largest;
    - "ASR-A barely moves with lambda": max - min of ASR-A over the lambdas <= ``asr_band`` (10 points).
    """
    rows = []
    if gamma_df is not None and len(gamma_df):
        for m, d in gamma_df.groupby("method", sort=False):
            label = METHOD_LABELS.get(m, m)
            d = d.sort_values("gamma")
            ev, ok = _grows(d["gamma"], d["ASR-A"], asr_rise, _pct, _points, "gamma")
            rows.append((f"{label}: ASR-A grows with gamma", ev, ok))
            if len(d) < 2:
                rows.append((f"{label}: BA falls with gamma", "needs at least two grid points", False))
            else:
                first, last = d.iloc[0], d.iloc[-1]
                rows.append((f"{label}: BA falls with gamma",
                             f"{_pct(first['BA'])} at gamma {first['gamma']:g} -> {_pct(last['BA'])} at "
                             f"{last['gamma']:g} (may rise by at most {_points(ba_tol)})",
                             bool(last["BA"] <= first["BA"] + ba_tol + 1e-12)))
            at = d[d["gamma"] >= high_at - 1e-12]
            if len(at):
                low = at.iloc[0]
                near_ref = d[np.isclose(d["gamma"], ref_gamma)]
                ref = near_ref.iloc[0] if len(near_ref) else d.iloc[-1]
                base = float(baseline.loc[m, "ASR-A"]) if baseline is not None and m in baseline.index else 0.0
                lo, hi = low["ASR-A"] - base, ref["ASR-A"] - base
                ratio = lo / hi if hi > 0 else math.nan
                ev = f"{_pct(low['ASR-A'])} at gamma {low['gamma']:g} vs {_pct(ref['ASR-A'])} at gamma {ref['gamma']:g}"
                if base:
                    ev += f"; over the benign model's {_pct(base)}: {100 * lo:+.1f} vs {100 * hi:+.1f} points"
                rows.append((f"{label}: ASR-A already high at gamma = {high_at:g}",
                             f"{ev}; ratio {ratio:.0%} (needs >= {high_frac:.0%})",
                             bool(hi > 0 and ratio >= high_frac)))
    if lambda_df is not None and len(lambda_df):
        d = lambda_df.sort_values("lam")
        ev, ok = _grows(d["lam"], d["D_p"], dp_rise, _nats, _nats, "lambda")
        rows.append(("UBW-C: D_p grows with lambda", ev, ok))
        spread = float(d["ASR-A"].max() - d["ASR-A"].min())
        rows.append(("UBW-C: ASR-A barely moves with lambda",
                     f"{' -> '.join(_pct(v) for v in d['ASR-A'])} (lambda = {', '.join(f'{v:g}' for v in d['lam'])})"
                     f"; max - min = {_points(spread)} (needs <= {_points(asr_band)})",
                     bool(spread <= asr_band + 1e-12)))
    return pd.DataFrame(rows, columns=["claim", "evidence", "holds"]).set_index("claim")
