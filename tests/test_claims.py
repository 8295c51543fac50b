"""The claim registry (issue 10): each claim of the paper coded once, checked on hand-built tables, and the gate."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from ubwlib.book import chapter_paths
from ubwlib.experiments import get_profile
from ubwlib.experiments.claims import CLAIMS, GATED_PROFILES, claim_inputs, claims_for, evaluate, gate
from ubwlib.experiments.stored import TABLES

BY_ID = {c.id: c for c in CLAIMS}


def _t1(ubwp_asr=0.9, ubwp_dp=2.0, targeted_dp=(0.0, 0.01, 0.19), ba=(0.92, 0.91, 0.91, 0.90, 0.905)):
    rows = ["No Attack", "BadNets", "Blended", "WaNet", "UBW-P"]
    return pd.DataFrame({"BA": list(ba), "ASR-A": [math.nan, 1.0, 1.0, 0.95, ubwp_asr],
                         "D_p": [math.nan, *targeted_dp, ubwp_dp]}, index=pd.Index(rows, name="Method"))


def test_registry_is_well_formed():
    assert len({c.id for c in CLAIMS}) == len(CLAIMS)
    book = {p.stem for p in chapter_paths()}
    for c in CLAIMS:
        assert c.chapter in book and c.text and c.paper and c.inputs, c.id
        assert set(c.inputs) <= set(TABLES), c.id
        assert set(c.gaps) <= {"smoke", "default", "lite", "study", "full", "paper"}, c.id
    assert GATED_PROFILES == ("default", "lite")
    assert set(claim_inputs()) == {i for c in CLAIMS for i in c.inputs}
    # the claims that used to be coded twice with different bars are coded once, with the paper's bar
    assert "10x" in BY_ID["ubw-p/dp-10x"].text and ">= 0.7" in BY_ID["ubw-p/pruning"].text
    with pytest.raises(ValueError, match="chapters with claims"):
        claims_for("intro", get_profile("smoke"))


def test_ubwp_claims_hand_computed():
    chosen = [BY_ID[i] for i in ("ubw-p/asr-a", "ubw-p/dp", "ubw-p/dp-10x", "ubw-p/ba-on-par", "ubw-p/asr-on-par",
                                 "poisoned-label/ba-cost")]
    out = evaluate({"ubw_p/table1": _t1()}, chosen)
    assert list(out.index) == [c.id for c in chosen]
    assert (out["verdict"] == "holds").all(), out
    assert out.loc["ubw-p/dp-10x", "ours"] == "2.000 vs at most 0.190"
    assert out.loc["ubw-p/asr-a", "ours"] == "90.0%"
    # 10x, not 5x: a baseline at 0.21 breaks it; and the other bars, one at a time
    out = evaluate({"ubw_p/table1": _t1(targeted_dp=(0.0, 0.01, 0.21))}, chosen)
    assert out.loc["ubw-p/dp-10x", "verdict"] == "does not hold"
    out = evaluate({"ubw_p/table1": _t1(ubwp_asr=0.79, ubwp_dp=1.79, ba=(0.95, 0.91, 0.91, 0.90, 0.87))}, chosen)
    assert out.loc[["ubw-p/asr-a", "ubw-p/dp", "ubw-p/ba-on-par", "ubw-p/asr-on-par", "poisoned-label/ba-cost"],
                   "verdict"].eq("does not hold").all()


def test_known_gaps_and_the_gate(capsys):
    chosen = [BY_ID["ubw-p/asr-a"], BY_ID["ubw-p/dp-10x"]]
    weak = {"ubw_p/table1": _t1(ubwp_asr=0.5)}
    out = evaluate(weak, chosen, get_profile("default"))
    assert out.loc["ubw-p/asr-a", "verdict"] == "does not hold" and "short schedule" in out.loc["ubw-p/asr-a",
                                                                                                 "known gap"]
    # the CPU profiles share the gaps they both miss for the same cause (each measured by a cold build)
    assert evaluate(weak, chosen, "lite").loc["ubw-p/asr-a", "known gap"] == out.loc["ubw-p/asr-a", "known gap"]
    assert gate(out, "default") == ["ubw-p/asr-a"]  # a known gap: printed, not fatal
    assert "MISSED: UBW-P's ASR-A is high (>= 80%): ours 50.0%" in capsys.readouterr().out
    # an unexplained miss fails the gated profile only
    broken = evaluate({"ubw_p/table1": _t1(targeted_dp=(0.0, 0.5, 0.19))}, chosen, get_profile("default"))
    with pytest.raises(AssertionError, match="10x"):
        gate(broken, get_profile("default"))
    assert gate(broken, get_profile("smoke")) == ["ubw-p/dp-10x"]
    # a gap belongs to its profile: the same miss on another profile is not excused
    assert evaluate(weak, chosen, "full").loc["ubw-p/asr-a", "known gap"] == ""


def test_the_dp_ratio_gap_needs_ubwp_below_and_the_baselines_not_above_the_paper():
    """On the default profile UBW-P's D_p is below the paper's (a known gap); the ratio's miss is excused only while
    that is its cause: UBW-P below 1.8 and every baseline at or below the paper's highest (WaNet, 0.1979)."""
    claim = [BY_ID["ubw-p/dp-10x"]]
    measured = evaluate({"ubw_p/table1": _t1(ubwp_dp=1.238, targeted_dp=(0.0018, 0.0782, 0.156))}, claim, "default")
    assert measured.loc["ubw-p/dp-10x", "ours"] == "1.238 vs at most 0.156"
    assert measured.loc["ubw-p/dp-10x", "verdict"] == "does not hold"
    assert gate(measured, "default") == ["ubw-p/dp-10x"]  # a known gap: printed, not fatal
    for ubwp, baselines in ((1.238, (0.0, 0.01, 0.21)), (1.9, (0.0, 0.01, 0.195))):
        out = evaluate({"ubw_p/table1": _t1(ubwp_dp=ubwp, targeted_dp=baselines)}, claim, "default")
        assert out.loc["ubw-p/dp-10x", "known gap"] == ""  # another cause: not excused
        with pytest.raises(AssertionError, match="10x"):
            gate(out, "default")


def test_ubwp_independent_t_is_excused_only_while_the_watermark_answers_to_the_corner():
    """On the default profile the UBW-P model answers to most random patterns in the trigger's corner (a cold build
    drew an Independent-T trigger it answered to: p = 9.1e-08, 6 of 8 such triggers flagged, no benign model):
    the scenario's miss is excused only while the false-positive table shows that cause."""
    claim = [BY_ID["ubw-p/independent-t"]]
    scen = pd.DataFrame({"p-value": [9.1e-08, 1.0, 1e-60]},
                        index=pd.Index(["Independent-T", "Independent-M", "Malicious"], name="scenario"))

    def fp(triggers, benign):
        verdicts = [("Independent-T", v) for v in triggers] + [("Independent-M", v) for v in benign]
        return pd.DataFrame({"scenario": [s for s, _ in verdicts],
                             "verdict": ["watermarked" if v else "not watermarked" for _, v in verdicts]},
                            index=pd.MultiIndex.from_tuples([("ubw-p", f"case {i}") for i in range(len(verdicts))],
                                                            names=["method", "case"]))

    def measured(triggers, benign):
        return evaluate({"verification/scenarios-ubw-p": scen, "verification/false-positives": fp(triggers, benign)},
                        claim, "default")

    out = measured([1, 1, 0, 1, 1, 0, 1, 1], [0, 0, 0])  # the cold build's table
    assert out.loc["ubw-p/independent-t", "ours"] == "p = 0.000"
    assert out.loc["ubw-p/independent-t", "verdict"] == "does not hold"
    assert "same corner" in out.loc["ubw-p/independent-t", "known gap"]
    assert gate(out, "default") == ["ubw-p/independent-t"]  # printed, not fatal
    for triggers, benign in (([1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0]),  # only this draw: another cause
                             ([1, 1, 1, 1, 0, 0, 0, 0], [0, 1, 0])):  # an innocent model accused too
        other = measured(triggers, benign)
        assert other.loc["ubw-p/independent-t", "known gap"] == ""
        with pytest.raises(AssertionError, match="Independent-T"):
            gate(other, "default")
    assert measured([1] * 8, [0] * 3).loc["ubw-p/independent-t", "known gap"]  # half or more: the cause holds
    assert evaluate({"verification/scenarios-ubw-p": scen, "verification/false-positives": fp([1] * 8, [0] * 3)},
                    claim, "smoke").loc["ubw-p/independent-t", "known gap"] == ""  # no gap on another profile


def test_an_excuse_with_a_condition():
    """UBW-P's fine-tuning gap on the default profile excuses a miss only when ASR-A was already below the bar."""
    claim = [BY_ID["ubw-p/fine-tuning"]]

    def ft(before, after):
        return pd.DataFrame({"method": ["ubw-p", "ubw-p"], "epoch": [0, 10], "ASR-A": [before, after]})

    below = evaluate({"defenses/fine-tuning": ft(0.5, 0.4)}, claim, "default")
    assert below.loc["ubw-p/fine-tuning", "verdict"] == "does not hold" and below.loc["ubw-p/fine-tuning", "known gap"]
    assert below.loc["ubw-p/fine-tuning", "ours"] == "40.0% after 10 epochs (before 50.0%)"
    removed = evaluate({"defenses/fine-tuning": ft(0.9, 0.4)}, claim, "default")  # the defense removed it
    assert removed.loc["ubw-p/fine-tuning", "known gap"] == ""
    with pytest.raises(AssertionError):
        gate(removed, "default")
    assert evaluate({"defenses/fine-tuning": ft(0.9, 0.6)}, claim, "default").loc["ubw-p/fine-tuning",
                                                                                  "verdict"] == "holds"


def test_verification_and_ablation_claims_hand_built():
    scen = pd.DataFrame({"p-value": [0.97, 1.0, 1e-20], "verdict": ["not watermarked"] * 2 + ["watermarked"]},
                        index=pd.Index(["Independent-T", "Independent-M", "Malicious"], name="scenario"))
    fp = pd.DataFrame({"scenario": ["Independent-T", "Independent-T", "Independent-M"],
                       "verdict": ["watermarked", "not watermarked", "not watermarked"]},
                      index=pd.MultiIndex.from_tuples([("ubw-p", "t1"), ("ubw-p", "t2"), ("ubw-p", "m1")],
                                                      names=["method", "case"]))
    chosen = [c for c in CLAIMS if c.id.startswith("ubw-p/") and c.chapter == "verification"]
    out = evaluate({"verification/scenarios-ubw-p": scen, "verification/false-positives": fp}, chosen)
    assert out.loc["ubw-p/malicious", "ours"] == "p = 1.00e-20" and out.loc["ubw-p/malicious", "verdict"] == "holds"
    assert out.loc["ubw-p/no-trigger-flagged", "ours"] == "1 of 2 flagged"
    assert out.loc["ubw-p/no-trigger-flagged", "verdict"] == "does not hold"
    assert out.loc["ubw-p/no-benign-flagged", "verdict"] == "holds"
    abl = pd.DataFrame({"evidence": ["rises"], "holds": [True]}, index=["UBW-P: ASR-A grows with gamma"])
    out = evaluate({"ablations/claims": abl}, [c for c in CLAIMS if c.chapter == "ablations"])
    assert out.loc[out["claim"] == "UBW-P: ASR-A grows with gamma", "verdict"].item() == "holds"
    assert (out.loc[out["claim"] != "UBW-P: ASR-A grows with gamma", "verdict"] == "not measured").all()
    with pytest.raises(ValueError, match="the claims need the tables"):
        evaluate({}, chosen)
