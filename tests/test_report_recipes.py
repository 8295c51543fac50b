"""The recipes of the verification and report chapters: pure helpers on hand-built tables, and the cached
verification tables on the smoke profile."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ubwlib.cache import Cache
from ubwlib.experiments import get_profile
from ubwlib.experiments.report import report_seeds, seed_variance
from ubwlib.experiments.verification import (
    false_positive_table,
    independent_seeds,
    power_curve,
    scenario_table,
    verification_classes,
)
from ubwlib.verify import VerificationSettings
from ubwlib.watermarks import WatermarkKey

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def test_seed_variance_hand_computed():
    runs = pd.DataFrame([
        {"method": "UBW-P", "seed": s, "eval set": "whole test set", "BA": ba, "ASR-A": asr, "ASR-C": asr, "D_p": dp}
        for s, ba, asr, dp in [(0, 0.90, 0.40, 1.0), (1, 0.92, 0.50, 1.2), (2, 0.91, 0.60, 1.4)]
    ])
    var = seed_variance(runs)
    row = var.loc[("UBW-P", "whole test set")]
    assert row[("BA", "mean")] == pytest.approx(91.0)
    assert row[("ASR-A", "mean")] == pytest.approx(50.0)
    assert row[("ASR-A", "std")] == pytest.approx(10.0)          # ddof 1: sqrt((100 + 0 + 100) / 2)
    assert row[("D_p", "min")] == pytest.approx(1.0) and row[("D_p", "max")] == pytest.approx(1.4)
    assert row[("seeds", "n")] == 3


def test_seeds_and_classes():
    P = get_profile("smoke")
    assert report_seeds(P, 3) == [P.seed, P.seed + 1, P.seed + 2]
    assert independent_seeds(P, 2) == [P.seed + 1, P.seed + 2]        # the report's extra seeds: trained once
    from ubwlib.experiments.runs import release

    assert verification_classes(release(P, "ubw-p").key) is None
    # a source-specific key: its source class, from its settings
    ubwc = WatermarkKey(method="ubw-c", settings={"source": 3}, tensors={}, image_shape=(1, 28, 28),
                        classes=tuple("abcdefghij"), dataset="d", seed=0)
    assert verification_classes(ubwc) == [3]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return Cache(tmp_path_factory.mktemp("cache"))


def test_scenario_table_smoke(cache):
    P = get_profile("smoke")
    S = VerificationSettings(m=20)
    t = scenario_table(P, "ubw-p", settings=S, cache=cache, progress=False)
    assert list(t.index) == ["Independent-T", "Independent-M", "Malicious"]
    assert t["p-value"].between(0, 1).all() and (t["m"] == 20).all()
    n_entries = len(cache.entries())
    again = scenario_table(P, "ubw-p", settings=S, cache=cache, progress=False)
    pd.testing.assert_frame_equal(t, again)
    assert len(cache.entries()) == n_entries                          # served from the cache


def test_false_positives_and_power_smoke(cache):
    P = get_profile("smoke")
    S = VerificationSettings(m=10)
    fp = false_positive_table(P, "ubw-p", n_triggers=2, n_models=2, settings=S, cache=cache, progress=False)
    assert len(fp) == 4
    assert (fp["scenario"] == ["Independent-T"] * 2 + ["Independent-M"] * 2).all()
    power = power_curve(P, "ubw-p", ms=(3, 5), repeats=4, settings=S, cache=cache, progress=False)
    assert set(power["scenario"]) == {"Malicious", "Independent-M"}
    assert len(power) == 2 * 2 * 4 * 2 and set(power["test"]) == {"t-test", "label-only"}
    assert power["p-value"].between(0, 1).all()
    assert (power["flagged"] == (power["p-value"] < S.alpha)).all()
    t_rows, l_rows = power[power["test"] == "t-test"], power[power["test"] == "label-only"]
    assert not math.isnan(np.asarray(t_rows["Delta P"], float).mean())
    # the label-only p-value by hand: P(Binomial(m, 1/2) >= flips)
    for _, r in l_rows.iterrows():
        m, k = int(r["m"]), int(r["flips"])
        assert 0 <= k <= m
        assert r["p-value"] == pytest.approx(sum(math.comb(m, i) for i in range(k, m + 1)) / 2**m)


def test_forgery_table_smoke(cache):
    from ubwlib.experiments.verification import forgery_table

    P = get_profile("smoke")
    S = VerificationSettings(m=10)
    t = forgery_table(P, "ubw-p", n_models=2, steps=5, settings=S, cache=cache, progress=False)
    assert len(t) == 2 and list(t.columns) == ["Delta P", "p-value", "verdict", "label-only p-value",
                                               "label-only verdict", "commitment accepts"]
    assert t["p-value"].between(0, 1).all() and t["label-only p-value"].between(0, 1).all()
    assert not t["commitment accepts"].any()  # no forged key opens the owner's commitment
    n = len(cache.entries())
    pd.testing.assert_frame_equal(t, forgery_table(P, "ubw-p", n_models=2, steps=5, settings=S, cache=cache,
                                                   progress=False))
    assert len(cache.entries()) == n
