"""Tests of ubwlib.experiments.ablations (Figures 4 and 5): the grids, the sweeps on the smoke profile (real
Fashion-MNIST subsets, a private cache per module) and the claims on hand-built sweeps (pure functions).

The sweeps share module-scoped fixtures: two UBW-P points and three UBW-C points (gamma 0.05 and 0.1 at
lambda 2, gamma 0.1 at lambda 0); each UBW-C point crafts gradient-matching poisons on the smoke profile."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from ubwlib.cache import Cache
from ubwlib.data import DataNotFoundError
from ubwlib.experiments import get_profile, load_data
from ubwlib.experiments.ablations import (
    METRICS,
    ablation_claims,
    ablation_grid,
    gamma_sweep,
    lambda_sweep,
)
from ubwlib.experiments.runs import run
from ubwlib.watermarks import poison_count

SMOKE = get_profile("smoke")


# --------------------------------------------------------------------------------------------------
# grids
# --------------------------------------------------------------------------------------------------


def test_grids_per_profile_contain_the_table1_points():
    for name in ("smoke", "default", "lite", "study", "full", "paper"):
        g = ablation_grid(get_profile(name))
        assert set(g) == {"gammas", "lambdas"} and set(g["gammas"]) == {"ubw-p", "ubw-c"}
        for gs in g["gammas"].values():
            assert 0.1 in gs and list(gs) == sorted(gs) and all(0 < x <= 1 for x in gs)
        assert 0.0 in g["lambdas"] and 2.0 in g["lambdas"]
        assert all(isinstance(x, float) for x in g["lambdas"])
    # the default grid is small: few UBW-C points beyond the cached Table 1 run
    d = ablation_grid(get_profile("default"))
    assert len(d["gammas"]["ubw-c"]) - 1 + len(d["lambdas"]) - 1 <= 3
    assert min(x for x in d["gammas"]["ubw-p"] if x >= 0.03) == 0.03


def test_grid_overrides():
    g = ablation_grid(SMOKE, gammas=(0.1, 0.02), lambdas=[3, 0])
    assert g["gammas"] == {"ubw-p": (0.02, 0.1), "ubw-c": (0.02, 0.1)}
    assert g["lambdas"] == (0.0, 3.0)
    g = ablation_grid(SMOKE, gammas={"ubw-c": [0.1]})
    assert g["gammas"]["ubw-c"] == (0.1,) and g["gammas"]["ubw-p"] == SMOKE.grid.ubw_p_gammas
    with pytest.raises(ValueError, match="empty"):
        ablation_grid(SMOKE, lambdas=[])
    with pytest.raises(ValueError, match="repeated"):
        ablation_grid(SMOKE, lambdas=[1, 1.0])
    # the grid belongs to the profile, not to its name: a renamed profile keeps it, a new grid is one field
    assert ablation_grid(SMOKE.replace(name="custom")) == ablation_grid(SMOKE)
    custom = get_profile(SMOKE.replace(name="custom"), grid={"lambdas": (0.5, 1.5)})
    assert ablation_grid(custom) == {"gammas": {"ubw-p": (0.05, 0.1), "ubw-c": (0.05, 0.1)}, "lambdas": (0.5, 1.5)}


def test_gamma_sweep_needs_gammas_for_every_method():
    with pytest.raises(ValueError, match="badnets"):
        gamma_sweep(SMOKE, methods=("badnets",))
    with pytest.raises(ValueError, match="no gammas"):
        gamma_sweep(SMOKE, methods=("ubw-p", "badnets"), gammas={"ubw-p": (0.1,)})


# --------------------------------------------------------------------------------------------------
# sweeps on the smoke profile
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(one_cpu_thread, tmp_path_factory):
    try:
        data = load_data(SMOKE)
    except DataNotFoundError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"Fashion-MNIST not available: {exc}")
    return SMOKE, data, Cache(tmp_path_factory.mktemp("ablations-cache"))


@pytest.fixture(scope="module")
def gamma_df(smoke):
    prof, _, cache = smoke
    return gamma_sweep(prof, gammas={"ubw-p": (0.1, 0.05), "ubw-c": (0.1, 0.05)}, cache=cache, progress=False)


@pytest.fixture(scope="module")
def lambda_df(smoke, gamma_df):
    prof, _, cache = smoke
    return lambda_sweep(prof, lambdas=(2.0, 0.0), cache=cache, progress=False)


def test_gamma_sweep_rows_and_poison_counts(smoke, gamma_df):
    _, data, _ = smoke
    n = len(data.train)
    gammas = [0.05, 0.1, 0.05, 0.1]
    assert list(zip(gamma_df["method"], gamma_df["gamma"])) == list(zip(["ubw-p"] * 2 + ["ubw-c"] * 2, gammas))
    assert list(gamma_df["Method"]) == ["UBW-P", "UBW-P", "UBW-C", "UBW-C"]
    assert list(gamma_df["poisons"]) == [poison_count(g, n) for g in gammas]
    assert list(gamma_df["poisons"]) == [math.floor(g * n + 0.5) for g in gammas] == [100, 200, 100, 200]
    for c in ("BA", "ASR-A"):
        assert gamma_df[c].between(0, 1).all(), c
    assert gamma_df["D_p"].between(0, math.log(10) + 1e-9).all()
    # UBW-P on all test images, UBW-C on the source class
    ubwp, ubwc = gamma_df[gamma_df["method"] == "ubw-p"], gamma_df[gamma_df["method"] == "ubw-c"]
    assert (ubwp["eval set"] == "test, all classes").all() and (ubwp["n eval"] == len(data.test)).all()
    assert ubwc["eval set"].str.startswith("test, source class 0").all()
    assert (ubwc["n eval"] == int((data.test.labels == 0).sum())).all()


def test_the_table1_points_are_the_table1_runs(smoke, gamma_df):
    """gamma = 0.1 (UBW-C: lambda = 2) is each method's default run: same cache entries; the sweep's (cached)
    evaluation equals the run's own (UBW-P: ``row``, UBW-C: ``source_row``)."""
    prof, _, cache = smoke
    ubwc = run(prof, "ubw-c", cache=cache, progress=False)
    ubwp = run(prof, "ubw-p", cache=cache, progress=False)
    assert ubwc.released.report["cached"] and ubwc.trained.cached and ubwp.trained.cached
    for m, expected in (("ubw-c", ubwc.source_row), ("ubw-p", ubwp.row)):
        row = gamma_df[(gamma_df["method"] == m) & (gamma_df["gamma"] == 0.1)].iloc[0]
        for k in (*METRICS, "eval set", "n eval"):
            assert row[k] == pytest.approx(expected[k], nan_ok=True), (m, k)


def test_a_warm_sweep_reads_everything_from_the_cache(smoke, gamma_df, monkeypatch):
    prof, _, cache = smoke
    import ubwlib.watermarks as wm

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(wm, "evaluate", no_evaluation)  # cached_evaluation imports it from here when it runs
    before = len(cache.entries())
    again = gamma_sweep(prof, gammas={"ubw-p": (0.05, 0.1), "ubw-c": (0.05, 0.1)}, cache=cache, progress=False)
    assert len(cache.entries()) == before
    pd.testing.assert_frame_equal(again, gamma_df)


def test_lambda_sweep_rows(smoke, gamma_df, lambda_df):
    _, data, _ = smoke
    assert list(lambda_df["lam"]) == [0.0, 2.0]
    assert (lambda_df["gamma"] == 0.1).all()
    assert (lambda_df["poisons"] == poison_count(0.1, len(data.train))).all()
    assert lambda_df["eval set"].str.startswith("test, source class 0").all()
    # lambda = 2 is the gamma sweep's UBW-C point; lambda = 0 is a different release
    at2 = lambda_df[lambda_df["lam"] == 2.0].iloc[0]
    ubwc = gamma_df[(gamma_df["method"] == "ubw-c") & (gamma_df["gamma"] == 0.1)].iloc[0]
    for k in METRICS:
        assert at2[k] == pytest.approx(ubwc[k], nan_ok=True), k
    claims = ablation_claims(gamma_df, lambda_df)
    assert claims["holds"].map(lambda v: isinstance(v, bool)).all()
    assert "UBW-C: D_p grows with lambda" in claims.index


def test_lambda_changes_the_release(smoke, lambda_df):
    prof, _, cache = smoke
    r0 = run(prof, "ubw-c", cache=cache, progress=False, lam=0.0).released
    r2 = run(prof, "ubw-c", cache=cache, progress=False, lam=2.0).released
    assert r0.report["cached"] and r2.report["cached"]
    assert not (r0.dataset.images == r2.dataset.images).all()


def test_integer_grid_values_hit_the_same_cache_entries(smoke, lambda_df):
    """lambda 2 and 2.0 (and gamma given as an int-free float) give the same cache keys: nothing is recomputed."""
    prof, _, cache = smoke
    before = len(cache.entries())
    again = lambda_sweep(prof, lambdas=[0, 2], cache=cache, progress=False)
    assert len(cache.entries()) == before
    pd.testing.assert_frame_equal(again, lambda_df)


# --------------------------------------------------------------------------------------------------
# claims on hand-built sweeps
# --------------------------------------------------------------------------------------------------


def _gamma(method, gammas, ba, asr):
    return pd.DataFrame({"method": method, "gamma": gammas, "BA": ba, "ASR-A": asr})


def _lam(lams, dp, asr):
    return pd.DataFrame({"lam": lams, "D_p": dp, "ASR-A": asr})


G4 = [0.01, 0.03, 0.05, 0.1]


def test_claims_hold_on_the_papers_shape():
    g = pd.concat([_gamma("ubw-p", G4, [0.91, 0.908, 0.905, 0.90], [0.20, 0.60, 0.80, 0.90]),
                   _gamma("ubw-c", [0.03, 0.1], [0.90, 0.895], [0.55, 0.85])])
    lam = _lam([0.0, 1.0, 2.0, 3.0], [0.9, 1.5, 1.9, 2.1], [0.85, 0.86, 0.84, 0.86])
    c = ablation_claims(g, lam)
    assert list(c.columns) == ["evidence", "holds"] and c.index.name == "claim"
    assert list(c.index) == [
        "UBW-P: ASR-A grows with gamma", "UBW-P: BA falls with gamma", "UBW-P: ASR-A already high at gamma = 0.03",
        "UBW-C: ASR-A grows with gamma", "UBW-C: BA falls with gamma", "UBW-C: ASR-A already high at gamma = 0.03",
        "UBW-C: D_p grows with lambda", "UBW-C: ASR-A barely moves with lambda",
    ]
    assert c["holds"].all(), c
    assert "60.0% at gamma 0.03" in c.loc["UBW-P: ASR-A already high at gamma = 0.03", "evidence"]


def test_claims_fail_on_the_opposite_shape():
    g = _gamma("ubw-p", G4, [0.88, 0.89, 0.90, 0.91], [0.90, 0.80, 0.60, 0.40])  # BA up 3 points, ASR-A down
    lam = _lam([0.0, 2.0, 4.0], [2.0, 1.5, 1.0], [0.2, 0.5, 0.8])  # D_p down, ASR-A moves 60 points
    c = ablation_claims(g, lam)
    high = "UBW-P: ASR-A already high at gamma = 0.03"
    assert not c["holds"].drop(high).any(), c
    assert c.loc[high, "holds"]  # 80% at 0.03 is "high": only the growth claims fail on a falling curve


def test_claims_on_flat_curves():
    """Flat: nothing grows; BA 'falls' within its tolerance; ASR-A stays in its band; 'high' relative to the
    raw value holds trivially, but not relative to a benign model at the same level."""
    g = _gamma("ubw-c", [0.03, 0.1], [0.9, 0.9], [0.15, 0.15])
    lam = _lam([0.0, 2.0, 4.0], [0.6, 0.6, 0.6], [0.15, 0.15, 0.15])
    c = ablation_claims(g, lam)
    assert not c.loc["UBW-C: ASR-A grows with gamma", "holds"]
    assert c.loc["UBW-C: BA falls with gamma", "holds"]
    assert c.loc["UBW-C: ASR-A already high at gamma = 0.03", "holds"]
    assert not c.loc["UBW-C: D_p grows with lambda", "holds"]
    assert c.loc["UBW-C: ASR-A barely moves with lambda", "holds"]
    base = pd.DataFrame({"ASR-A": [0.15]}, index=pd.Index(["ubw-c"], name="method"))
    c = ablation_claims(g, lam, base)
    assert not c.loc["UBW-C: ASR-A already high at gamma = 0.03", "holds"]


def test_claims_tolerances_and_definitions():
    # "grows" needs more than the margin at the ends AND a positive rank correlation
    small = _gamma("ubw-p", [0.05, 0.1], [0.9, 0.9], [0.30, 0.31])  # +1 point: within noise
    assert not ablation_claims(small, None).loc["UBW-P: ASR-A grows with gamma", "holds"]
    dip = _gamma("ubw-p", [0.01, 0.02, 0.03, 0.05, 0.1], [0.9] * 5, [0.30, 0.60, 0.10, 0.05, 0.33])  # rho -0.2
    assert not ablation_claims(dip, None).loc["UBW-P: ASR-A grows with gamma", "holds"]
    # BA may rise by 1 point at most
    up = _gamma("ubw-p", [0.05, 0.1], [0.900, 0.909], [0.2, 0.5])
    assert ablation_claims(up, None).loc["UBW-P: BA falls with gamma", "holds"]
    up = _gamma("ubw-p", [0.05, 0.1], [0.900, 0.915], [0.2, 0.5])
    assert not ablation_claims(up, None).loc["UBW-P: BA falls with gamma", "holds"]
    assert not ablation_claims(up, None, ba_tol=0.0).loc["UBW-P: BA falls with gamma", "holds"]
    # "high at 0.03" uses the smallest gamma >= 0.03 and the value at 0.1, over the baseline when given
    g = _gamma("ubw-p", [0.01, 0.05, 0.1, 0.2], [0.9] * 4, [0.05, 0.30, 0.50, 0.90])
    c = ablation_claims(g, None)
    assert "at gamma 0.05" in c.loc["UBW-P: ASR-A already high at gamma = 0.03", "evidence"]
    assert c.loc["UBW-P: ASR-A already high at gamma = 0.03", "holds"]  # 30 / 50 = 60%
    base = pd.DataFrame({"ASR-A": [0.2]}, index=pd.Index(["ubw-p"], name="method"))
    assert not ablation_claims(g, None, base).loc["UBW-P: ASR-A already high at gamma = 0.03", "holds"]  # 10/30
    low = _gamma("ubw-p", [0.01, 0.02], [0.9] * 2, [0.1, 0.2])
    assert "UBW-P: ASR-A already high at gamma = 0.03" not in ablation_claims(low, None).index
    # ASR-A band over lambda: 10 points
    assert ablation_claims(None, _lam([0, 2], [1.0, 1.2], [0.50, 0.60])).loc[
        "UBW-C: ASR-A barely moves with lambda", "holds"]
    assert not ablation_claims(None, _lam([0, 2], [1.0, 1.2], [0.50, 0.61])).loc[
        "UBW-C: ASR-A barely moves with lambda", "holds"]
    # one point per method: nothing can grow
    one = ablation_claims(_gamma("ubw-p", [0.1], [0.9], [0.5]), _lam([2.0], [1.0], [0.5]))
    assert not one.loc[["UBW-P: ASR-A grows with gamma", "UBW-P: BA falls with gamma",
                        "UBW-C: D_p grows with lambda"], "holds"].any()
    assert ablation_claims(None, None).empty
