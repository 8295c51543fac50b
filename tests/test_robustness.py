"""Tests of ubwlib.experiments.robustness (the Defenses chapter's recipes) on the smoke profile.

The smoke profile's watermarked models (BadNets, UBW-P, UBW-C) are trained once into a private cache
folder shared by the module; fine-tuning runs 2 epochs and pruning 3 rates to keep the module short.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import ubwlib.experiments.core as core
import ubwlib.experiments.robustness as rob
from ubwlib.cache import Cache
from ubwlib.defenses import ChannelMask, FineTuningSettings, StripSettings, get_layer, layer_activations, pruned_count
from ubwlib.experiments import get_profile, load_data
from ubwlib.experiments.robustness import (
    DEFENSE_METHODS,
    METRICS,
    PRUNING_RATES,
    STRIP_METHODS,
    benign_reference_table,
    defense_metrics,
    defense_settings_table,
    fine_tuning_curve,
    fine_tuning_table,
    pruning_sweep,
    pruning_table,
    strip_row,
    strip_sets,
    strip_table,
)
from ubwlib.experiments.runs import run as method_run, source_class

P = get_profile("smoke")
FT = FineTuningSettings(epochs=2)
RATES = (0.0, 0.5, 0.9)
N_STRIP = 100
REFERENCE = "No Attack (UBW-P trigger)"


@pytest.fixture(scope="module")
def cache(tmp_path_factory, one_cpu_thread) -> Cache:
    return Cache(tmp_path_factory.mktemp("robustness-cache"))


@pytest.fixture(scope="module")
def data(one_cpu_thread):
    return load_data(P)


@pytest.fixture(scope="module")
def runs(cache):
    return {m: method_run(P, m, cache=cache, progress=False) for m in STRIP_METHODS}


@pytest.fixture(scope="module")
def tables(cache, runs):
    """Every recipe once (cold), in the order the chapter calls them."""
    return {
        "ft": {m: fine_tuning_table(P, m, settings=FT, cache=cache, progress=False) for m in DEFENSE_METHODS},
        "pr": {m: pruning_table(P, m, RATES, cache=cache, progress=False) for m in DEFENSE_METHODS},
        "pr_benign": {m: pruning_table(P, m, RATES, cache=cache, progress=False, benign=True)
                      for m in DEFENSE_METHODS},
        "strip": strip_table(P, STRIP_METHODS, n=N_STRIP, cache=cache, progress=False),
        "reference": benign_reference_table(P, DEFENSE_METHODS, cache=cache, progress=False),
    }


def _table_entries(cache: Cache) -> int:
    return sum(e.namespace == "table" for e in cache.entries())


def _in_unit_interval(df: pd.DataFrame, cols) -> bool:
    block = df[list(cols)]
    return bool((block.isna() | block.ge(0) & block.le(1)).all().all())


# --------------------------------------------------------------------------------------------------
# constants and the evaluation helper
# --------------------------------------------------------------------------------------------------


def test_constants():
    assert DEFENSE_METHODS == ("ubw-p", "ubw-c")
    assert STRIP_METHODS == ("badnets", "ubw-p", "ubw-c")
    assert PRUNING_RATES == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def test_defense_metrics_match_the_runs_rows(runs, data):
    for m, run in runs.items():
        got = defense_metrics(run.trained.model, data.test, run.released, m)
        want = run.source_row if m == "ubw-c" else run.row  # UBW-C: evaluated on the source class
        assert list(got) == list(METRICS)
        for k in METRICS:
            assert got[k] == pytest.approx(want[k], nan_ok=True), (m, k)


# --------------------------------------------------------------------------------------------------
# fine-tuning
# --------------------------------------------------------------------------------------------------


def test_fine_tuning_table_rows_and_ranges(tables, data):
    for m, df in tables["ft"].items():
        assert list(df.columns[:6]) == ["method", "epoch", *METRICS]
        assert (df["method"] == m).all()
        assert df["epoch"].tolist() == [0, 1, 2]
        assert _in_unit_interval(df, ("BA", "ASR-A", "ASR-C"))
        assert df["D_p"].between(0, math.log(data.test.num_classes) + 1e-9).all()
        assert (df["samples"] == len(data.train) // 10).all()                    # 10% of the benign set
        assert math.isnan(df.loc[0, "loss"]) and (df["loss"].iloc[1:] > 0).all()


def test_epoch_zero_is_the_untouched_model(tables, runs, data):
    for m, df in tables["ft"].items():
        want = defense_metrics(runs[m].trained.model, data.test, runs[m].released, m)
        for k in METRICS:
            assert df.loc[0, k] == pytest.approx(want[k], nan_ok=True), (m, k)


def test_default_fine_tuning_is_the_papers():
    s = rob.default_fine_tuning(P)
    assert (s.fraction, s.epochs, s.lr, s.momentum, s.weight_decay, s.batch_size) == (0.1, 10, 0.001, 0.9, 5e-4, 128)
    assert s.seed == P.seed and s.precision == P.train.precision


def test_fine_tuning_cache_key_follows_the_settings(tables, cache):
    before = _table_entries(cache)
    short = fine_tuning_table(P, "ubw-p", settings=FT.replace(epochs=1), cache=cache, progress=False)
    assert _table_entries(cache) == before + 1
    assert short["epoch"].tolist() == [0, 1]
    # the same seeded data order: epoch 1 of a 1-epoch run is epoch 1 of the 2-epoch run
    two = tables["ft"]["ubw-p"]
    for k in ("BA", "ASR-A", "loss"):
        assert short.loc[1, k] == pytest.approx(two.loc[1, k]), k


# --------------------------------------------------------------------------------------------------
# pruning
# --------------------------------------------------------------------------------------------------


def test_pruning_table_rows_and_ranges(tables, runs, data):
    channels = layer_activations(runs["ubw-p"].trained.model, data.train.images[:16], "layer4").numel()
    for key in ("pr", "pr_benign"):
        for m, df in tables[key].items():
            assert list(df.columns) == ["method", "model", "rate", "channels pruned", *METRICS]
            assert (df["method"] == m).all()
            assert (df["model"] == ("benign" if key == "pr_benign" else "watermarked")).all()
            assert df["rate"].tolist() == list(RATES)
            assert df["channels pruned"].tolist() == [pruned_count(r, channels) for r in RATES]
            assert _in_unit_interval(df, ("BA", "ASR-A", "ASR-C"))
    for m in DEFENSE_METHODS:  # rate 0 = the untouched model
        assert tables["pr"][m].loc[0, "BA"] == pytest.approx(tables["ft"][m].loc[0, "BA"])


def test_benign_pruning_uses_the_benign_model(tables):
    ref = tables["reference"]
    for m in DEFENSE_METHODS:
        row0 = tables["pr_benign"][m].iloc[0]
        for k in METRICS:
            assert row0[k] == pytest.approx(ref.set_index("method").loc[m, k], nan_ok=True), (m, k)


# --------------------------------------------------------------------------------------------------
# STRIP
# --------------------------------------------------------------------------------------------------


def test_strip_table_rows_and_ranges(tables, data, runs):
    df = tables["strip"]
    assert list(df.index) == ["BadNets", "UBW-P", "UBW-C", REFERENCE]
    assert df["method"].tolist() == ["badnets", "ubw-p", "ubw-c", "ubw-p"]
    assert df["model"].tolist() == ["watermarked"] * 3 + ["benign"]
    assert _in_unit_interval(df, ("detection rate", "false rejection rate", "AUC", "ASR-A"))
    assert (df["n clean"] == df["n triggered"]).all()
    n_source = int((data.test.labels == source_class(runs["ubw-c"].released.key)).sum())
    assert df["n clean"].tolist() == [N_STRIP, N_STRIP, min(N_STRIP, n_source), N_STRIP]
    k = data.test.num_classes
    assert df[["entropy clean (mean)", "entropy triggered (mean)"]].stack().between(0, math.log(k) + 1e-9).all()


def test_strip_sets_follow_the_evaluation_sets(runs, data):
    for m, run in runs.items():
        key = run.released.key
        holdout, clean, triggered = strip_sets(data.train, data.test, key, m, n=N_STRIP, seed=0)
        assert len(holdout) == N_STRIP and holdout.image_shape == data.train.image_shape
        assert triggered.shape == clean.images.shape and triggered.dtype == torch.uint8
        assert not torch.equal(triggered, clean.images)
        if m == "ubw-c":
            assert source_class(key) == 0 and (clean.labels == 0).all()
        elif key.target is not None:
            assert (clean.labels != key.target).all()
        again = strip_sets(data.train, data.test, key, m, n=N_STRIP, seed=0)
        assert torch.equal(again[1].images, clean.images) and torch.equal(again[2], triggered)  # seeded


# --------------------------------------------------------------------------------------------------
# the cache and the caller's model
# --------------------------------------------------------------------------------------------------


def test_second_calls_are_served_from_the_cache(tables, cache, monkeypatch):
    before = _table_entries(cache)

    def boom(*args, **kwargs):
        raise AssertionError("recomputed instead of read from the cache")

    for name in ("fine_tune", "pruning_curve", "strip_detect"):
        monkeypatch.setattr(rob, name, boom)
    monkeypatch.setattr(core, "train_many", boom)  # no model is retrained either
    for m in DEFENSE_METHODS:
        pd.testing.assert_frame_equal(fine_tuning_table(P, m, settings=FT, cache=cache, progress=False),
                                      tables["ft"][m])
        pd.testing.assert_frame_equal(pruning_table(P, m, RATES, cache=cache, progress=False), tables["pr"][m])
        pd.testing.assert_frame_equal(pruning_table(P, m, RATES, cache=cache, progress=False, benign=True),
                                      tables["pr_benign"][m])
    pd.testing.assert_frame_equal(strip_table(P, STRIP_METHODS, n=N_STRIP, cache=cache, progress=False),
                                  tables["strip"])
    pd.testing.assert_frame_equal(benign_reference_table(P, DEFENSE_METHODS, cache=cache, progress=False),
                                  tables["reference"])
    assert _table_entries(cache) == before
    # a subset of the methods reuses the rows cached one by one
    sub = strip_table(P, ("ubw-c",), n=N_STRIP, cache=cache, progress=False, reference=False)
    pd.testing.assert_frame_equal(sub, tables["strip"].loc[["UBW-C"]])


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("training", [False, True])
def test_the_callers_model_is_never_modified(runs, data, training):
    run = runs["ubw-p"]
    model = run.trained.model
    model.train(training)
    try:
        before = _snapshot(model)
        defense_metrics(model, data.test, run.released, "ubw-p")
        fine_tuning_curve(model, data.train, data.test, run.released, "ubw-p", FT.replace(epochs=1))
        pruning_sweep(model, data.train.images[:200], data.test, run.released, "ubw-p", rates=(0.5,))
        strip_row(model, data.train, data.test, run.released.key, "ubw-p", StripSettings(n_overlays=4), n=30)
        assert model.training is training
        assert not isinstance(get_layer(model, "layer4"), ChannelMask)
        after = model.state_dict()
        assert before.keys() == after.keys()
        for k, v in before.items():
            assert torch.equal(v, after[k]), k
    finally:
        model.eval()


def test_defense_settings_table():
    df = defense_settings_table()
    assert df.index.names == ["defense", "setting"]
    assert set(df.index.get_level_values("defense")) == {"fine-tuning", "pruning", "STRIP"}
    ft = df.loc["fine-tuning", "value"]
    assert ft["epochs"] == "10" and ft["learning rate"] == "0.001" and ft["momentum"] == "0.9"
    assert ft["batch size"] == "128" and ft["benign training data used"].startswith("10%")
    assert df.loc[("pruning", "rates"), "value"].count(",") == len(PRUNING_RATES) - 1
    assert df.loc[("STRIP", "overlays per input (N)"), "value"] == "20"
    assert defense_settings_table(FineTuningSettings(epochs=3)).loc[("fine-tuning", "epochs"), "value"] == "3"
