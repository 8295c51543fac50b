"""The profile chosen for a machine by its measured speed (``UBW_PROFILE=auto``, ``make book``)."""

from __future__ import annotations

import json

import pytest

from ubwlib.cli import main as cli_main
from ubwlib.experiments import get_profile
from ubwlib.experiments.choice import (BUILD_MINUTES, CANDIDATES, REFERENCES, choose, chosen_profile, predict,
                                       probe_rate, record_path)
from ubwlib.experiments.profiles import PROFILES


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UBW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("UBW_BUILD_MINUTES", raising=False)
    monkeypatch.delenv("UBW_PROFILE", raising=False)


class Rates:
    """A stand-in for probe_rate: ``factor`` x each reference machine's rate, counting the calls."""

    def __init__(self, factor: float) -> None:
        self.factor, self.calls = factor, []

    def __call__(self, profile, device=None) -> float:
        self.calls.append(profile.name)
        return REFERENCES[profile.name].rate * self.factor


def test_prediction_scales_the_reference_build_by_the_speed_ratio():
    ref = REFERENCES["default"]
    assert predict("default", ref.rate) == pytest.approx(ref.seconds)
    assert predict("default", ref.rate / 2) == pytest.approx(2 * ref.seconds)
    assert predict("lite", REFERENCES["lite"].rate * 4) == pytest.approx(REFERENCES["lite"].seconds / 4)
    with pytest.raises(ValueError, match="no reference"):
        predict("paper", 100.0)
    with pytest.raises(ValueError, match="> 0"):
        predict("default", 0.0)


def test_the_candidates_are_the_default_profile_then_a_cheaper_one():
    assert CANDIDATES[0] == "default" and set(CANDIDATES) <= set(REFERENCES) <= set(PROFILES)
    assert BUILD_MINUTES == 20
    lite, default = PROFILES["lite"], PROFILES["default"]
    # the same experiments (data, seeds, grid, crafting budget, verification counts): only the model and its epochs
    same = ("dataset", "train_size", "test_size", "seeds", "crafting", "grid", "verification")
    assert all(getattr(lite, f) == getattr(default, f) for f in same)
    assert (lite.model, lite.width) != (default.model, default.width)
    assert REFERENCES["lite"].seconds < REFERENCES["default"].seconds


def test_a_fast_machine_builds_the_default_profile():
    # 4x the reference machine: the default build is predicted at a quarter of its reference
    rates = Rates(4.0)
    c = choose(candidates=CANDIDATES, rate=rates)
    assert c.profile == "default" and rates.calls == ["default"]  # lite is not even measured
    assert c.predicted_minutes["default"] == pytest.approx(REFERENCES["default"].seconds / 4 / 60)
    assert "fits the budget of 20 minutes" in c.reason()


def test_a_slow_machine_builds_the_cheaper_profile_and_says_why():
    ref_d, ref_l = REFERENCES["default"], REFERENCES["lite"]
    factor = 1.0
    # chosen so that lite fits and default does not, whatever the reference numbers are
    budget = (ref_l.seconds + ref_d.seconds) / 2 / 60
    c = choose(budget, rate=Rates(factor))
    assert c.profile == "lite"
    assert c.predicted_minutes == pytest.approx({"default": ref_d.seconds / 60, "lite": ref_l.seconds / 60})
    assert "`UBW_PROFILE=default make book` builds it anyway" in c.reason()


def test_when_nothing_fits_the_fastest_is_chosen():
    c = choose(1.0, rate=Rates(1.0))
    assert c.profile == min(c.predicted_minutes, key=c.predicted_minutes.get) == "lite"
    assert "no candidate fits the budget of 1 minutes, so the fastest" in c.reason()


def test_the_choice_is_recorded_and_reused_until_something_it_depends_on_changes():
    first = Rates(1.0)
    c1 = choose(30.0, rate=first)
    assert record_path().is_file() and json.loads(record_path().read_text())["profile"] == c1.profile
    again = Rates(100.0)  # a noisy second measurement would choose differently: it is not taken
    assert choose(30.0, rate=again) == c1 and again.calls == []
    assert choose(30.0, rate=again, measure=True).profile == "default" and again.calls == ["default"]
    other_budget = Rates(1.0)
    choose(31.0, rate=other_budget)
    assert other_budget.calls  # another budget measures again


def test_the_choice_is_measured_under_the_cache_lock_and_a_choice_made_meanwhile_is_taken(monkeypatch):
    """Two chapters starting at once both ask for the choice: the one that waited for the lock takes the other's."""
    from ubwlib.cache import Cache

    first = choose(candidates=CANDIDATES, rate=Rates(0.5))
    recorded = record_path().read_text()
    record_path().unlink()
    real, entered = Cache.computing, []

    def computing(self):
        entered.append(self.root)
        record_path().write_text(recorded)  # what the other process recorded while this one waited
        return real(self)

    monkeypatch.setattr(Cache, "computing", computing)
    rates = Rates(4.0)
    again = choose(candidates=CANDIDATES, rate=rates)
    assert entered == [record_path().parent.parent] and rates.calls == [] and again == first
    assert choose(candidates=CANDIDATES, rate=rates, measure=True).profile == "default"  # measure: measures anyway


def test_the_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("UBW_BUILD_MINUTES", "1e6")
    assert choose(rate=Rates(1.0)).budget_minutes == 1e6
    monkeypatch.setenv("UBW_BUILD_MINUTES", "twenty")
    with pytest.raises(ValueError, match="UBW_BUILD_MINUTES must be a number of minutes"):
        choose(rate=Rates(1.0))
    with pytest.raises(ValueError, match="> 0 minutes"):
        choose(0.0, rate=Rates(1.0))
    with pytest.raises(ValueError, match="candidates must be among"):
        choose(20.0, candidates=("default", "paper"), rate=Rates(1.0))


def test_auto_names_the_chosen_profile_and_why(monkeypatch):
    choose(1.0, rate=Rates(1.0))  # record: lite, nothing fits 1 minute
    monkeypatch.setenv("UBW_BUILD_MINUTES", "1")
    monkeypatch.setenv("UBW_PROFILE", "auto")
    p = get_profile()
    assert p.name == "lite" and p == PROFILES["lite"].replace(description=p.description)
    assert p.description.startswith(PROFILES["lite"].description) and "Chosen for this machine" in p.description
    assert get_profile("auto", seeds=(0,)).seeds == (0,)  # overrides apply to the chosen profile
    assert chosen_profile().name == "lite"


def test_the_sphinx_extension_keys_the_pages_by_the_chosen_profile(monkeypatch):
    from ubwlib.sphinx_ext import book_profile

    choose(1.0, rate=Rates(1.0))
    monkeypatch.setenv("UBW_BUILD_MINUTES", "1")
    monkeypatch.setenv("UBW_PROFILE", "auto")
    assert book_profile() == "lite"
    monkeypatch.setenv("UBW_PROFILE", "default")
    assert book_profile() == "default"


def test_probe_rate_measures_the_profiles_model():
    rate = probe_rate(PROFILES["smoke"], steps=2, warmup=1, min_seconds=0.0, device="cpu")
    assert rate > 0
    with pytest.raises(ValueError, match="steps must be >= 1"):
        probe_rate(PROFILES["smoke"], steps=0)
    with pytest.raises(ValueError, match="min_seconds"):
        probe_rate(PROFILES["smoke"], min_seconds=-1.0)


def test_the_cli_prints_the_recorded_choice(capsys):
    choose(1.0, rate=Rates(1.0))
    assert cli_main(["profile", "--budget", "1", "--name"]) == 0
    assert capsys.readouterr().out.strip() == "lite"
    assert cli_main(["profile", "--budget", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("profile: lite\n") and "images/s here" in out and "recorded in" in out
