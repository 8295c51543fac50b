"""Tests of ubwlib.experiments: profiles, the cached recipes of ``core`` and the dispersibility chapter.

Everything runs on a tiny Fashion-MNIST fixture written in the real IDX format (gzip'd) with the smoke
profile's small CNN, and on a private cache folder per test.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import ubwlib.data as data_mod
import ubwlib.experiments.core as core
from ubwlib.cache import Cache, CacheCorruptionWarning
from ubwlib.data import ImageDataset
from ubwlib.experiments import (
    PROFILES,
    VERSIONS,
    Profile,
    benign_model,
    fingerprint,
    get_profile,
    load_data,
    profile_names,
    run,
    run_many,
    trained_model,
    trained_models,
)
from ubwlib.experiments.dispersibility import (
    lemma1_table,
    model_dispersibility,
    random_probability_sets,
    worked_examples,
)
from ubwlib.train import TrainConfig, predict_proba

N_TRAIN, N_TEST, K = 200, 100, 10


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------


def _idx_images(arr: np.ndarray) -> bytes:
    n, h, w = arr.shape
    return struct.pack(">IIII", 2051, n, h, w) + arr.astype(np.uint8).tobytes()


def _idx_labels(arr: np.ndarray) -> bytes:
    return struct.pack(">II", 2049, len(arr)) + arr.astype(np.uint8).tobytes()


def _pattern_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise plus a bright horizontal band whose row depends on the class (invariant under h-flips)."""
    x = rng.integers(0, 60, (len(labels), 28, 28), dtype=np.uint8)
    for i, y in enumerate(labels):
        x[i, 4 + 2 * y : 6 + 2 * y, 3:25] = 230
    return x


def write_fashion_fixture(folder: Path, n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 0) -> dict:
    """The four gzip'd IDX files of a balanced, learnable 10-class Fashion-MNIST look-alike."""
    rng = np.random.default_rng(seed)
    ytr = rng.permutation(np.arange(n_train) % K).astype(np.uint8)
    yte = rng.permutation(np.arange(n_test) % K).astype(np.uint8)
    arrays = {"train_x": _pattern_images(ytr, rng), "train_y": ytr, "test_x": _pattern_images(yte, rng), "test_y": yte}
    blobs = {
        "train-images-idx3-ubyte": _idx_images(arrays["train_x"]),
        "train-labels-idx1-ubyte": _idx_labels(arrays["train_y"]),
        "t10k-images-idx3-ubyte": _idx_images(arrays["test_x"]),
        "t10k-labels-idx1-ubyte": _idx_labels(arrays["test_y"]),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in blobs.items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
    return arrays


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private cache, no $UBW_DATA / $UBW_PROFILE / $UBW_NO_CACHE, no system dataset, fresh split cache."""
    monkeypatch.setenv("UBW_CACHE", str(tmp_path / "cache"))
    for var in ("UBW_DATA", "UBW_PROFILE", "UBW_NO_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(data_mod, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-package")
    core._load_splits.cache_clear()
    core._subsets.cache_clear()
    yield tmp_path
    core._load_splits.cache_clear()
    core._subsets.cache_clear()


@pytest.fixture
def fixture_root(tmp_path) -> Path:
    root = tmp_path / "fmnist"
    write_fashion_fixture(root)
    return root


@pytest.fixture
def tiny(fixture_root) -> Profile:
    """The smoke profile on the fixture: all 200/100 images, 1 epoch."""
    return get_profile("smoke", train={"epochs": 1}).replace(
        data_root=str(fixture_root), train_size=None, test_size=None
    )


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and torch.equal(wa[k], wb[k]), k


# --------------------------------------------------------------------------------------------------
# profiles
# --------------------------------------------------------------------------------------------------


def test_profiles_with_documented_datasets_and_models():
    assert profile_names() == ("smoke", "default", "lite", "study", "full", "paper")
    assert set(PROFILES) == {"smoke", "default", "lite", "study", "full", "paper"}
    for name, prof in PROFILES.items():
        assert prof.name == name and isinstance(prof.train, TrainConfig) and prof.description
    smoke, default, paper = PROFILES["smoke"], PROFILES["default"], PROFILES["paper"]
    assert (smoke.dataset, smoke.model) == ("fashion-mnist", "smallcnn")
    assert (default.dataset, default.model) == ("fashion-mnist", "resnet18-cifar")
    assert smoke.train.epochs <= default.train.epochs and smoke.train_size < default.train_size
    assert (paper.dataset, paper.model, paper.width) == ("cifar10", "resnet18-cifar", 1.0)
    assert paper.train_size is None and paper.test_size is None  # the full CIFAR-10 splits
    assert paper.seed == 666 and paper.seeds[0] == 666
    full = PROFILES["full"]  # issue 12: all of Fashion-MNIST, the paper's ResNet-18, its schedule shape
    assert (full.dataset, full.model, full.width, full.train_size, full.test_size) == (
        "fashion-mnist", "resnet18-cifar", 1.0, None, None)
    assert full.train.schedule == "multistep" and [m / full.train.epochs for m in full.train.milestones] == [
        m / 200 for m in TrainConfig().milestones]
    # every profile owns its sizes; each is hashable (profiles key in-process memos)
    for prof in PROFILES.values():
        hash(prof)
        assert prof.crafting.steps >= 1 and prof.verification.m >= 1 and prof.grid.lambdas


def test_paper_schedule_is_the_trainconfig_default():
    t = PROFILES["paper"].train
    assert t == dataclasses.replace(TrainConfig(), seed=666)
    d = TrainConfig()
    assert (d.lr, d.momentum, d.weight_decay, d.batch_size, d.epochs) == (0.1, 0.9, 5e-4, 128, 200)
    assert d.schedule == "multistep" and tuple(d.milestones) == (150, 180) and d.lr_decay == 0.1
    assert d.seed == 666 and t.seed == 666


def test_get_profile_reads_env_and_falls_back_to_default(monkeypatch):
    assert get_profile(None) is PROFILES["default"]
    assert get_profile() is PROFILES["default"]
    monkeypatch.setenv("UBW_PROFILE", "")
    assert get_profile(None).name == "default"
    monkeypatch.setenv("UBW_PROFILE", "smoke")
    assert get_profile(None) is PROFILES["smoke"]
    assert get_profile("paper").name == "paper"  # an explicit name wins over the environment
    monkeypatch.setenv("UBW_PROFILE", "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        get_profile(None)


def test_unknown_profile_lists_the_choices():
    with pytest.raises(ValueError) as exc:
        get_profile("huge")
    msg = str(exc.value)
    assert "huge" in msg
    for name in ("smoke", "default", "paper"):
        assert name in msg


def test_overrides_including_train_dict():
    p = get_profile("smoke", train={"epochs": 1}, train_size=100, seeds=(5, 6))
    assert p.train.epochs == 1 and p.train_size == 100 and p.seed == 5
    # the other train settings are kept
    assert p.train == PROFILES["smoke"].train.replace(epochs=1)
    # the registered profile is untouched
    assert PROFILES["smoke"].train.epochs == 4 and PROFILES["smoke"].train_size == 2000
    # a TrainConfig works too, and a Profile can be passed in place of a name
    q = get_profile(p, train=TrainConfig(epochs=3))
    assert q.train == TrainConfig(epochs=3) and q.train_size == 100
    assert get_profile(p) is p
    with pytest.raises(ValueError, match="bogus"):
        get_profile("smoke", bogus=1)
    with pytest.raises(ValueError, match="unknown train setting.*bogus"):
        get_profile("smoke", train={"bogus": 1})
    for group in ("crafting", "grid", "verification"):
        with pytest.raises(ValueError, match=f"unknown {group} setting.*bogus"):
            get_profile("smoke", **{group: {"bogus": 1}})
    v = get_profile("smoke", verification={"m": 9})
    assert v.verification.m == 9 and v.verification.power_repeats == PROFILES["smoke"].verification.power_repeats


def test_profiles_are_frozen():
    p = PROFILES["smoke"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.epochs = 3  # type: ignore[attr-defined]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.train_size = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.train.epochs = 3  # type: ignore[misc]
    r = p.replace(train_size=10)
    assert r.train_size == 10 and p.train_size == 2000


def test_data_root_is_not_part_of_equality():
    p = PROFILES["smoke"]
    assert p.replace(data_root="/somewhere") == p


def test_summary_is_flat_with_train_keys():
    s = PROFILES["paper"].summary()
    assert s["name"] == "paper" and s["dataset"] == "cifar10" and s["model"] == "resnet18-cifar"
    assert "train" not in s and "description" not in s and "data_root" not in s
    for f in dataclasses.fields(TrainConfig):
        assert f"train.{f.name}" in s
    assert s["train.epochs"] == 200 and s["train.lr"] == 0.1 and s["train.seed"] == 666
    assert all(not isinstance(v, (dict, TrainConfig)) for v in s.values())


# --------------------------------------------------------------------------------------------------
# core: data
# --------------------------------------------------------------------------------------------------


def test_load_data_full_fixture(tiny):
    splits = load_data(tiny)
    assert len(splits.train) == N_TRAIN and len(splits.test) == N_TEST
    assert splits.train.image_shape == (1, 28, 28) and splits.num_classes == K
    assert splits.train.class_counts().tolist() == [N_TRAIN // K] * K


@pytest.mark.parametrize("train_size,test_size", [(50, 30), (55, 23)])
def test_load_data_stratified_subsets(tiny, train_size, test_size):
    p = tiny.replace(train_size=train_size, test_size=test_size)
    splits = load_data(p)
    assert len(splits.train) == train_size and len(splits.test) == test_size
    for part in (splits.train, splits.test):
        counts = part.class_counts().tolist()
        assert len(counts) == K and max(counts) - min(counts) <= 1 and min(counts) >= 1
    if train_size % K == 0:
        assert splits.train.class_counts().tolist() == [train_size // K] * K
    # deterministic, and the subset seed matters
    again = load_data(p)
    assert torch.equal(again.train.images, splits.train.images) and torch.equal(again.test.labels, splits.test.labels)
    other = load_data(p.replace(subset_seed=7))
    assert not torch.equal(other.train.images, splits.train.images)


def test_load_data_is_made_once_per_process_and_shared(tiny):
    """Equal data settings give the very same split objects (no copy, no second hash); other sizes or seeds give
    others. The profile's other settings (here the epochs) do not matter."""
    p = tiny.replace(train_size=50, test_size=30)
    splits = load_data(p)
    assert load_data(p.replace(train=p.train.replace(epochs=p.train.epochs + 1))) is splits
    assert load_data(p.replace(subset_seed=7)) is not splits and load_data(p.replace(train_size=40)) is not splits


def test_load_data_sizes_at_least_the_split_keep_everything(tiny):
    splits = load_data(tiny.replace(train_size=N_TRAIN, test_size=10 * N_TEST))
    assert len(splits.train) == N_TRAIN and len(splits.test) == N_TEST


# --------------------------------------------------------------------------------------------------
# core: fingerprint
# --------------------------------------------------------------------------------------------------


def _toy(seed: int = 0, name: str = "toy/train") -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (12, 1, 6, 6), dtype=torch.uint8, generator=g)
    labels = torch.arange(12) % 3
    return ImageDataset(images, labels, ("a", "b", "c"), name)


def test_fingerprint_is_content():
    a, b = _toy(), _toy(name="another name")
    assert fingerprint(a) == fingerprint(b) == fingerprint(a.replace(images=a.images.clone()))
    assert len(fingerprint(a)) == 64
    px = a.images.clone()
    px[3, 0, 2, 4] ^= 1
    assert fingerprint(a.replace(images=px)) != fingerprint(a)
    lab = a.labels.clone()
    lab[5] = (lab[5] + 1) % 3
    assert fingerprint(a.replace(labels=lab)) != fingerprint(a)
    assert fingerprint(a.replace(classes=("a", "b", "z"))) != fingerprint(a)
    # same bytes, different shape
    assert fingerprint(a.replace(images=a.images.reshape(12, 1, 3, 12))) != fingerprint(a)


# --------------------------------------------------------------------------------------------------
# core: trained_model and its cache
# --------------------------------------------------------------------------------------------------


def _counting_train(monkeypatch, groups: list | None = None):
    """Record the config of every model the recipes train (and, in ``groups``, how many trained side by side)."""
    calls = []
    real = core.train_many

    def counting(models, datasets, configs, **kwargs):
        calls.extend(configs)
        if groups is not None:
            groups.append(len(models))
        return real(models, datasets, configs, **kwargs)

    monkeypatch.setattr(core, "train_many", counting)
    return calls


def _forbid_train(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("trained although the model is in the cache")

    monkeypatch.setattr(core, "train_many", boom)


def test_trained_model_cold_then_warm(tiny, tmp_path, monkeypatch):
    calls = _counting_train(monkeypatch)
    train_set = load_data(tiny).train
    root = tmp_path / "models"
    first = trained_model(tiny, train_set, cache=Cache(root), progress=False)
    assert first.cached is False and len(calls) == 1
    assert calls[0] == tiny.train.replace(seed=tiny.seed)
    assert list(first.history["epoch"]) == [1] and first.train_seconds > 0
    assert (root / "model" / first.key / "tensors.pt").is_file()
    assert not first.model.training

    _forbid_train(monkeypatch)
    second = trained_model(tiny, train_set, cache=Cache(root), progress=False)  # a new Cache object
    assert second.cached is True and second.key == first.key
    _assert_same_weights(first.model, second.model)
    pd.testing.assert_frame_equal(first.history, second.history)
    test = load_data(tiny).test
    assert torch.equal(predict_proba(first.model, test.images), predict_proba(second.model, test.images))


def test_default_cache_follows_ubw_cache(tiny, tmp_path, monkeypatch):
    calls = _counting_train(monkeypatch)
    a = benign_model(tiny, progress=False)
    assert a.cached is False and len(calls) == 1
    assert (tmp_path / "cache" / "model" / a.key).is_dir()
    b = benign_model(tiny, progress=False)
    assert b.cached is True and len(calls) == 1 and b.key == a.key


def test_the_default_cache_keys_the_device_and_the_precision_auto_resolves_to(tmp_path, monkeypatch):
    """A model trained in bfloat16 is not served to a float32 run of the same settings (UBW_PRECISION, or another
    CPU sharing the folder), nor a GPU's result to a CPU run."""
    monkeypatch.setenv("UBW_CACHE", str(tmp_path))
    monkeypatch.setenv("UBW_DEVICE", "cpu")
    monkeypatch.setenv("UBW_PRECISION", "fp32")
    fp32 = core.default_cache()
    monkeypatch.setenv("UBW_PRECISION", "bf16")
    bf16 = core.default_cache()
    numerics = {"numerics": core.NUMERICS}
    assert fp32.context == {"device": "cpu", "precision": "fp32", **numerics}
    assert fp32.context == core.computed_with() | {"precision": "fp32"}
    assert bf16.context == {"device": "cpu", "precision": "bf16", **numerics}
    assert fp32.root == bf16.root == tmp_path
    assert fp32.path_for("model", {"a": 1}, "1") != bf16.path_for("model", {"a": 1}, "1")


def test_the_default_cache_keys_the_numerics(tmp_path, monkeypatch):
    """A result of older numerics (another NUMERICS) is not served to this code: same settings, another key."""
    monkeypatch.setenv("UBW_CACHE", str(tmp_path))
    now = core.default_cache()
    monkeypatch.setattr(core, "NUMERICS", core.NUMERICS + "-older")
    older = core.default_cache()
    assert now.path_for("model", {"a": 1}, "1") != older.path_for("model", {"a": 1}, "1")


def test_trained_models_stack_the_uncached_and_cache_each_under_trained_models_key(tiny, tmp_path, monkeypatch):
    groups: list[int] = []
    calls = _counting_train(monkeypatch, groups)
    P = tiny.replace(stack=2)
    train_set = load_data(P).train
    flipped = train_set.replace(images=train_set.images.flip(3))
    half = train_set.stratified_subset(100, seed=0)
    cache = Cache(tmp_path / "models")
    trained_model(P, train_set, seed=5, cache=cache, progress=False)  # already cached: not trained again
    calls.clear(), groups.clear()
    jobs = [(train_set, 5), (train_set, 6), (flipped, 5), (half, 5), (train_set, 6)]  # the last repeats the 2nd
    out = trained_models(P, jobs, cache=cache, progress=False)
    # 2 new models of the full size side by side, 1 of the half size alone; the cached one and the repeat not at all
    assert sorted(groups) == [1, 2] and len(calls) == 3
    assert [t.cached for t in out] == [True, False, False, False, False]
    assert out[1].key == out[4].key
    _assert_same_weights(out[1].model, out[4].model)
    _forbid_train(monkeypatch)
    for (data, seed), t in zip(jobs, out):  # each stored under the key trained_model looks up
        again = trained_model(P, data, seed=seed, cache=Cache(tmp_path / "models"), progress=False)
        assert again.cached and again.key == t.key
        _assert_same_weights(again.model, t.model)
    assert len({t.key for t in out}) == 4


def test_trained_models_look_again_once_they_hold_the_lock(tiny, tmp_path, monkeypatch):
    """A model another process trained while this one waited for the cache's compute lock is loaded, not trained
    again: here the "other process" stores it on the way into the lock."""
    train_set = load_data(tiny).train
    theirs = trained_model(tiny, train_set, seed=3, cache=Cache(tmp_path / "theirs"), progress=False)
    cache = Cache(tmp_path / "ours")
    real = Cache.computing
    entered = []

    def computing(self):
        entered.append(True)
        shutil.copytree(tmp_path / "theirs" / "model", cache.root / "model", dirs_exist_ok=True)
        return real(self)

    monkeypatch.setattr(Cache, "computing", computing)
    _forbid_train(monkeypatch)
    out = trained_models(tiny, [(train_set, 3)], cache=cache, progress=False)
    assert entered == [True] and out[0].cached and out[0].key == theirs.key
    _assert_same_weights(out[0].model, theirs.model)
    trained_models(tiny, [(train_set, 3)], cache=cache, progress=False)  # cached: no lock taken
    assert entered == [True]


def test_run_many_equals_run_and_trains_the_victims_side_by_side(tiny, tmp_path, monkeypatch):
    groups: list[int] = []
    _counting_train(monkeypatch, groups)
    P = tiny.replace(stack=4)
    cache = Cache(tmp_path / "c")
    trained_model(P, load_data(P).train, cache=cache, progress=False)  # the benign model
    groups.clear()
    many = run_many(P, ["badnets", ("ubw-p", None), ("ubw-p", None, {"poisoning_rate": 0.05})], cache, progress=False)
    assert groups == [3]
    _forbid_train(monkeypatch)
    for r, (m, o) in zip(many, [("badnets", {}), ("ubw-p", {}), ("ubw-p", {"poisoning_rate": 0.05})]):
        one = run(P, m, cache=cache, progress=False, **o)
        assert one.trained.key == r.trained.key and one.method == m
        pd.testing.assert_series_equal(pd.Series(one.row), pd.Series(r.row))  # NaN where a rate does not apply
        assert not r.trained.cached and one.trained.cached
    assert len(many[2].released.indices) == round(0.05 * len(load_data(P).train))
    with pytest.raises(TypeError, match="each spec"):
        run_many(P, [("ubw-p", None, "gamma")], cache, progress=False)


def test_key_changes_with_seed_config_and_labels(tiny, tmp_path, monkeypatch):
    calls = _counting_train(monkeypatch)
    cache = Cache(tmp_path / "models")
    train_set = load_data(tiny).train
    base = trained_model(tiny, train_set, cache=cache, progress=False)
    assert not base.cached and len(calls) == 1

    variants = {
        "seed": lambda: trained_model(tiny, train_set, seed=tiny.seed + 1, cache=cache, progress=False),
        "lr": lambda: trained_model(get_profile(tiny, train={"lr": 0.04}), train_set, cache=cache, progress=False),
        "batch": lambda: trained_model(tiny.replace(train=tiny.train.replace(batch_size=64)), train_set,
                                       cache=cache, progress=False),
    }
    flipped = train_set.labels.clone()
    flipped[0] = (flipped[0] + 1) % K
    variants["one label"] = lambda: trained_model(tiny, train_set.replace(labels=flipped), cache=cache,
                                                  progress=False)
    keys = {base.key}
    for name, run in variants.items():
        n = len(calls)
        res = run()
        assert res.cached is False, name
        assert len(calls) == n + 1, name
        assert res.key not in keys, name
        keys.add(res.key)
    assert calls[1].seed == tiny.seed + 1

    # the unchanged settings still hit; data_root is not part of the key
    n = len(calls)
    again = trained_model(tiny.replace(data_root="/elsewhere"), train_set, cache=cache, progress=False)
    assert again.cached is True and again.key == base.key and len(calls) == n
    # the recipe version is part of the key
    monkeypatch.setitem(VERSIONS, "model", VERSIONS["model"] + "-test")
    bumped = trained_model(tiny, train_set, cache=cache, progress=False)
    assert bumped.cached is False and bumped.key != base.key and len(calls) == n + 1


def test_corrupted_entry_is_detected_and_retrained(tiny, tmp_path, monkeypatch):
    calls = _counting_train(monkeypatch)
    root = tmp_path / "models"
    train_set = load_data(tiny).train
    first = trained_model(tiny, train_set, cache=Cache(root), progress=False)
    tensors = root / "model" / first.key / "tensors.pt"
    size = tensors.stat().st_size
    with open(tensors, "r+b") as fh:
        fh.truncate(size // 2)

    with pytest.warns(CacheCorruptionWarning, match="tensors.pt"):
        second = trained_model(tiny, train_set, cache=Cache(root), progress=False)
    assert second.cached is False and len(calls) == 2 and second.key == first.key
    _assert_same_weights(first.model, second.model)  # same seed, same CPU: same weights
    assert tensors.stat().st_size == size  # the entry was rewritten whole

    _forbid_train(monkeypatch)
    third = trained_model(tiny, train_set, cache=Cache(root), progress=False)
    assert third.cached is True
    _assert_same_weights(second.model, third.model)


# --------------------------------------------------------------------------------------------------
# dispersibility recipes
# --------------------------------------------------------------------------------------------------


def test_worked_examples_values():
    ex = worked_examples(num_classes=10, per_class=100)
    assert len(ex) == 4
    expected = [0.0, 0.0, 0.9 * math.log(2), math.log(10)]
    assert np.allclose(ex["D_p"], expected, atol=1e-12, rtol=0)
    assert np.allclose(ex["D_p / ln K"], np.array(expected) / math.log(10), atol=1e-12, rtol=0)
    # ASR-A: every triggered image misclassified except those already of class 1 / kept correct
    assert np.allclose(ex["ASR-A"], [0.9, 1.0, 0.45, 0.9], atol=1e-12)
    with pytest.raises(ValueError, match="per_class"):
        worked_examples(num_classes=10, per_class=15)


def test_worked_examples_other_k():
    ex = worked_examples(num_classes=4, per_class=8)
    assert np.allclose(ex["D_p"], [0.0, 0.0, 0.75 * math.log(2), math.log(4)], atol=1e-12)


def test_lemma1_table_holds_and_is_deterministic():
    t = lemma1_table(n_sets=200, seed=3)
    assert len(t) == 200
    assert set(t["kind"]) == {"dirichlet", "one-hot", "sparse", "equal within class"}
    assert (t["gap"] >= -1e-12).all()
    assert (t["D_s"] <= t["D_c"] + 1e-12).all()
    assert np.allclose(t["gap"], t["D_c"] - t["D_s"], atol=1e-9)
    equal = t["kind"] == "equal within class"
    assert equal.sum() == 50
    assert (t.loc[equal, "gap"].abs() < 1e-12).all()
    assert (t["D_c"] <= np.log(t["K"]) + 1e-12).all() and (t["D_s"] >= -1e-12).all()
    pd.testing.assert_frame_equal(t, lemma1_table(n_sets=200, seed=3))
    assert not t[["D_s", "D_c"]].equals(lemma1_table(n_sets=200, seed=4)[["D_s", "D_c"]])


def test_random_probability_sets_are_valid():
    for kind, probs, labels in random_probability_sets(n_sets=40, seed=1):
        assert probs.ndim == 2 and probs.shape[0] == len(labels) >= 1 and probs.shape[1] >= 2
        assert (probs >= 0).all() and np.allclose(probs.sum(1), 1.0)
        assert labels.min() >= 0 and labels.max() < probs.shape[1]
        if kind == "one-hot":
            assert set(np.unique(probs)) <= {0.0, 1.0}


def test_model_dispersibility_on_fixture(tiny, tmp_path, monkeypatch):
    p = tiny.replace(train=tiny.train.replace(epochs=2), train_size=150, test_size=60)
    cache = Cache(tmp_path / "models")
    report = model_dispersibility(p, cache=cache, progress=False)
    assert set(report) == {"trained", "summary", "per_class", "entropies"}
    assert report["trained"].cached is False
    s = report["summary"]
    assert len(s) == 1
    row = s.iloc[0]
    assert 0.0 <= row["BA"] <= 1.0
    assert row["D_s"] <= row["D_c"] + 1e-12 and row["D_c - D_s"] >= -1e-12
    assert math.isclose(row["D_c - D_s"], row["D_c"] - row["D_s"], abs_tol=1e-9)
    assert 0.0 <= row["D_p (clean predictions)"] <= math.log(K) + 1e-12
    assert row["ln K"] == pytest.approx(math.log(K))
    per_class = report["per_class"]
    assert len(per_class) == K
    assert list(per_class["class"]) == list(load_data(p).test.classes)
    assert (per_class["mean H(f(x)) (sample-wise)"] <= per_class["H(mean f(x)) (class-wise)"] + 1e-12).all()
    assert per_class["accuracy"].between(0, 1).all()
    assert report["entropies"].shape == (60,)
    # the class-size-weighted mean of the per-class entropies is the summary's D_s (balanced: plain mean)
    assert per_class["mean H(f(x)) (sample-wise)"].mean() == pytest.approx(row["D_s"], abs=1e-9)

    # a second report loads the model and reproduces the numbers exactly
    _forbid_train(monkeypatch)
    again = model_dispersibility(p, cache=Cache(tmp_path / "models"), progress=False)
    assert again["trained"].cached is True
    pd.testing.assert_frame_equal(again["summary"], s)
    pd.testing.assert_frame_equal(again["per_class"], per_class)


# --------------------------------------------------------------------------------------------------
# watermark recipes (Table 1)
# --------------------------------------------------------------------------------------------------


def test_table1_rows_and_paper_comparison(tiny, tmp_path):
    from ubwlib.experiments.paper import TABLE1_CIFAR10
    from ubwlib.experiments.stored import load_stored, three_columns
    from ubwlib.experiments.runs import run
    from ubwlib.experiments.watermarking import table1

    t1 = table1(tiny, ("badnets", "ubw-p"), progress=False)
    assert list(t1.index) == ["No Attack", "BadNets", "UBW-P"]
    for col in ("BA", "ASR-A", "ASR-C"):
        vals = t1[col].dropna()
        assert ((vals >= 0) & (vals <= 1)).all()
    assert t1.loc["BadNets", "eval set"].startswith("test, non-target classes")
    assert t1.loc["BadNets", "n eval"] == int((load_data(tiny).test.labels != 1).sum())
    assert t1.loc["UBW-P", "eval set"] == "test, all classes" and math.isnan(t1.loc["UBW-P", "ASR (targeted)"])
    # the watermarked models are cached like any other: a second table loads them
    run_ = run(tiny, "badnets", progress=False)
    assert run_.source_row is None
    assert run_.trained.cached
    nothing = load_stored("ubw_p", "table1", "full", root=tmp_path)  # an empty results folder
    both = three_columns(t1, nothing, TABLE1_CIFAR10, ["BA", "D_p"], live_profile=tiny).table
    assert both.loc["UBW-P", ("D_p", "paper (CIFAR-10)")] == TABLE1_CIFAR10.loc["UBW-P", "D_p"] == 2.2548
    assert both.loc["BadNets", ("BA", f"{tiny.name} (live)")] == pytest.approx(100 * t1.loc["BadNets", "BA"])
    assert both[("BA", "full (stored)")].isna().all()  # missing is shown as missing, never filled in


def test_triggered_confusion_rows_are_distributions(tiny):
    from ubwlib.experiments.runs import run
    from ubwlib.experiments.watermarking import triggered_confusion

    cm = triggered_confusion(run(tiny, "ubw-p", progress=False), load_data(tiny).test)
    test = load_data(tiny).test
    assert cm.shape == (10, 10)
    np.testing.assert_allclose(cm.sum(axis=1).to_numpy(), 1.0)
    assert list(cm.index) == list(test.classes)


def test_calibration_table_by_hand_and_cached(tiny, monkeypatch):
    from ubwlib import metrics
    from ubwlib.experiments.runs import run
    from ubwlib.experiments.watermarking import calibration_table
    from ubwlib.train import predict_proba
    from ubwlib.watermarks import trigger

    r, test = run(tiny, "ubw-p", progress=False), load_data(tiny).test
    got = calibration_table(r, test)
    assert list(got.columns) == ["clean test images", "triggered test images"]
    for col, images in (("clean test images", test.images), ("triggered test images", trigger(test.images, r.released.key))):
        probs = predict_proba(r.trained.model, images).double().numpy()
        true = test.labels.numpy()
        want = [probs[np.arange(len(true)), true].mean(), probs.max(1).mean(), metrics.sample_dispersibility(probs)]
        np.testing.assert_allclose(got[col].to_numpy(), want, rtol=1e-6)
    assert got.loc["D_s (mean entropy, nats)"].between(0, np.log(K)).all()
    from ubwlib.experiments import watermarking

    monkeypatch.setattr(watermarking, "predict_proba", lambda *a, **k: pytest.fail("recomputed"))
    pd.testing.assert_frame_equal(calibration_table(r, test), got)  # read from the cache


def test_release_is_deterministic_and_exact(tiny):
    from ubwlib.experiments.runs import release
    from ubwlib.experiments.watermarking import settings_table

    a = release(tiny, "blended", seed=3)
    b = release(tiny, "blended", seed=3)
    assert torch.equal(a.dataset.images, b.dataset.images) and len(a.indices) == 20  # round(0.1 * 200)
    c = release(tiny, "blended", seed=3, poisoning_rate=0.05)
    assert len(c.indices) == 10
    st = settings_table(("badnets", "blended"))
    assert st.loc[("Blended", "alpha"), "value"] == 0.2 and st.loc[("BadNets", "target"), "value"] == 1


# --------------------------------------------------------------------------------------------------
# clean-label recipes
# --------------------------------------------------------------------------------------------------


def test_crafting_budget_follows_the_profile():
    from ubwlib.experiments.runs import crafting_budget

    paper = crafting_budget(get_profile("paper"))
    assert (paper.steps, paper.retrain_every, paper.lr, paper.eps) == (250, 50, 0.025, 16 / 255)
    assert paper.retrain.epochs == 40 and paper.pretrain.epochs == 100
    assert paper.precision == "fp32" and paper.held_out == 0
    smoke = crafting_budget(get_profile("smoke"))
    assert smoke.model == "smallcnn" and smoke.retrain == get_profile("smoke").train and smoke.steps < paper.steps
    assert (smoke.steps, smoke.retrain_every, smoke.held_out, smoke.precision) == (4, 2, 1, "auto")
    # the budget belongs to the profile, not to its name: a renamed profile keeps its own budget (it used to
    # get the paper's 250 steps silently), and a new budget is one override
    renamed = crafting_budget(get_profile("smoke").replace(name="my-profile"))
    assert renamed == smoke
    custom = crafting_budget(get_profile(get_profile("smoke").replace(name="my-profile"), crafting={"steps": 7, "schedule": "public"}))
    assert custom.steps == 7 and custom.retrain_every == 2 and custom.retrain.epochs == 40
    full = crafting_budget(get_profile("full"))
    assert (full.steps, full.retrain_every) == (250, 50) and full.retrain == get_profile("full").train
    with pytest.raises(ValueError, match="unknown crafting setting"):
        get_profile("smoke", crafting={"stepz": 1})
    with pytest.raises(ValueError, match="schedule must be"):
        get_profile("smoke", crafting={"schedule": "fast"})


def test_verification_counts_follow_the_profile():
    from ubwlib.experiments.verification import verification_settings

    assert verification_settings(get_profile("paper")).m == 100
    assert verification_settings(get_profile("smoke")).m == 20
    assert verification_settings(get_profile("smoke").replace(name="other")).m == 20
    assert verification_settings(get_profile("default", verification={"m": 30})).m == 30
    assert verification_settings(get_profile("smoke"), m=7).m == 7


@pytest.mark.parametrize("method", ["ubw-c", "label-consistent"])
def test_clean_label_run_is_cached_and_keeps_labels(tiny, method):
    from ubwlib.experiments.runs import run, source_class

    first = run(tiny, method, progress=False)
    train = load_data(tiny).train
    assert torch.equal(first.released.dataset.labels, train.labels)
    changed = (first.released.dataset.images != train.images).flatten(1).any(1).nonzero().flatten()
    assert set(changed.tolist()) <= set(first.released.indices.tolist())
    assert first.released.report["cached"] is False and not first.trained.cached
    again = run(tiny, method, progress=False)
    assert again.released.report["cached"] is True and again.trained.cached
    assert torch.equal(again.released.dataset.images, first.released.dataset.images)
    assert pd.Series(again.row).equals(pd.Series(first.row))  # NaN (targeted ASR of untargeted methods) included
    if method == "ubw-c":
        assert source_class(first.released.key) == 0  # UBWCSettings' source, read from the key
        assert first.source_row["eval set"].startswith("test, source class 0")
        assert list(again.released.report["history"].columns) == ["restart", "step", "lr", "passenger loss",
                                                                  "held-out passenger loss", "seconds"]
    else:
        assert source_class(first.released.key) is None and first.source_row is None
    # the victim's seed is one no crafting model used
    from ubwlib.experiments.runs import victim_seed

    assert victim_seed(tiny.seed) != tiny.seed
    assert first.trained.key == trained_model(tiny, first.released.dataset, seed=victim_seed(tiny.seed)).key


def test_noise_control_is_ubwc_poisons_with_the_random_start_and_no_crafting(tiny):
    """Same poisons as UBW-C, labels kept, a perturbation within eps that no crafting step moved."""
    from ubwlib.experiments.clean_label import noise_control_run
    from ubwlib.experiments.runs import crafting_budget, run

    eps_u8 = crafting_budget(tiny).eps * 255
    control = noise_control_run(tiny, progress=False)
    crafted = run(tiny, "ubw-c", progress=False)
    train = load_data(tiny).train
    rel = control.released
    assert torch.equal(rel.indices, crafted.released.indices)
    assert torch.equal(rel.dataset.labels, train.labels)
    diff = rel.dataset.images.to(torch.int16) - train.images.to(torch.int16)
    assert diff.abs().max() <= round(eps_u8) and diff[rel.indices].abs().sum() > 0
    outside = torch.ones(len(train), dtype=torch.bool)
    outside[rel.indices] = False
    assert not diff[outside].any()  # only the poisons change
    hist = rel.report["history"]
    assert (hist["step"] == 0).all() and hist["passenger loss"].isna().all()  # no crafting step was taken
    assert len(hist) == crafting_budget(tiny).held_out  # only the diagnostic of the random start
    assert not torch.equal(rel.dataset.images, crafted.released.dataset.images)
    assert control.source_row["eval set"].startswith("test, source class 0")
    assert noise_control_run(tiny, progress=False).released.report["cached"] is True
    from ubwlib.experiments.watermarking import noise_control_table, source_table

    table = noise_control_table(tiny)
    src = source_table(tiny, ("ubw-c",))
    assert len(table) == 3 and table["ASR-A"].dtype == float
    assert table.iloc[0]["ASR-A"] == src.loc["benign model, UBW-C trigger", "ASR-A"]
    assert table.iloc[1]["ASR-A"] == control.source_row["ASR-A"]
    assert table.iloc[2]["ASR-A"] == crafted.source_row["ASR-A"]


# --------------------------------------------------------------------------------------------------
# the UBW-C recipe study (issue 9)
# --------------------------------------------------------------------------------------------------


def test_study_rows_victims_and_summary(tiny):
    from ubwlib.experiments.runs import release, victim_seed
    from ubwlib.experiments.core import cached_evaluation
    from ubwlib.experiments.study import _overrides, study_rows, study_table

    rows = [r for r in study_rows() if r[0] in ("benign model", "noise control (same poisons, 0 steps)",
                                               "ensemble of 2")]
    assert [r[0] for r in rows] == ["benign model", "noise control (same poisons, 0 steps)", "ensemble of 2"]
    table = study_table(tiny, rows=rows, victims=2, progress=False)
    assert list(table.index) == [r[0] for r in rows]
    assert (table["victims"] == 2).all()
    # the ensemble row by hand: its release, two victims with seeds victim_seed(seed) and +1, source class 0
    rel = release(tiny, "ubw-c", progress=False, **_overrides(tiny, rows[2][1]))
    assert rel.report["cached"] is True  # computed once, by the study
    test = load_data(tiny).test
    asr = []
    for s in (victim_seed(tiny.seed), victim_seed(tiny.seed) + 1):
        m = trained_model(tiny, rel.dataset, seed=s)
        assert m.cached
        asr.append(cached_evaluation(m, test, rel.key, source_class=0, seed=tiny.seed)["ASR-A"])
    assert table.loc["ensemble of 2", "ASR-A"] == pytest.approx(np.mean(asr))
    assert table.loc["ensemble of 2", "ASR-A std"] == pytest.approx(np.std(asr, ddof=1))
    assert table.loc["ensemble of 2", "ASR-A per victim"] == " / ".join(f"{v:.3f}" for v in asr)
    # the benign row: the benign models of the same two seeds under the same trigger
    benign = [cached_evaluation(benign_model(tiny, seed=s), test, rel.key, source_class=0, seed=tiny.seed)["ASR-A"]
              for s in (victim_seed(tiny.seed), victim_seed(tiny.seed) + 1)]
    assert table.loc["benign model", "ASR-A"] == pytest.approx(np.mean(benign))
    assert math.isnan(table.loc["benign model", "release seconds"])


def test_study_victim_lever_changes_the_victims_only(tiny):
    """A lever's ``victim`` entry retrains the victims (and their benign baselines) with another schedule on the
    same release: the release's cache entry is the one without it."""
    from ubwlib.experiments.runs import release, victim_seed
    from ubwlib.experiments.core import cached_evaluation
    from ubwlib.experiments.study import _overrides, _resolve, study_row

    longer = tiny.train.epochs + 1
    lever = {"crafting": {"fresh_seeds": False}, "victim": {"train": {"epochs": longer}}}
    prof, overrides, victims = _resolve(tiny, lever)
    assert prof == tiny and victims.train.epochs == longer and victims.train.lr == tiny.train.lr
    assert overrides == _overrides(tiny, {"crafting": {"fresh_seeds": False}})  # the release ignores it
    row = study_row(tiny, "short victims", lever, victims=1, progress=False)
    rel = release(tiny, "ubw-c", progress=False, **overrides)
    assert rel.report["cached"] is True
    m = trained_model(victims, rel.dataset, seed=victim_seed(tiny.seed))
    assert m.cached and m.key != trained_model(tiny, rel.dataset, seed=victim_seed(tiny.seed), progress=False).key
    test = load_data(tiny).test
    assert row["ASR-A"] == cached_evaluation(m, test, rel.key, source_class=0, seed=tiny.seed)["ASR-A"]
    short_benign = benign_model(victims, seed=victim_seed(tiny.seed))
    assert short_benign.cached  # the baseline is the benign model of the victims' schedule
    assert row["benign ASR-A"] == cached_evaluation(short_benign, test, rel.key, source_class=0,
                                                    seed=tiny.seed)["ASR-A"]


def test_store_and_load_study_with_provenance(tiny, tmp_path):
    from ubwlib.experiments.study import load_stored_study, store_study

    assert load_stored_study(tmp_path / "none", tiny) == (None, {})
    df = pd.DataFrame({"row": ["a", "b"], "ASR-A": [0.5, 0.25]}).set_index("row")
    path = store_study(df, tiny, seconds=12.34, command="make study", directory=tmp_path / "st")
    table, meta = load_stored_study(tmp_path / "st", tiny)
    pd.testing.assert_frame_equal(table, df)
    assert meta["current"] is True and meta["command"] == "make study" and meta["wall seconds"] == 12.3
    assert meta["profile"] == tiny.name and meta["torch"] == torch.__version__ and meta["machine"]
    assert (len(meta["commit"]) == 40 or meta["commit"] == "unknown") and meta["date"].startswith("20")
    # settings that changed since: flagged, never silently shown as current
    _, stale = load_stored_study(tmp_path / "st", tiny.replace(train=tiny.train.replace(epochs=2)))
    assert stale["current"] is False
    assert path.read_text().startswith("row,")
    assert meta["learnability"] is None and meta["poisons alone"] is None  # not stored: shown as missing
    learn = pd.DataFrame({"kind": ["poisoned label"], "amplitude": [16], "ASR-A": [0.125]})
    store_study(df, tiny, seconds=1.0, command="make study", directory=tmp_path / "st", learnability=learn)
    pd.testing.assert_frame_equal(load_stored_study(tmp_path / "st", tiny)[1]["learnability"], learn)
    assert load_stored_study(tmp_path / "st", tiny)[1]["amplitudes"] is None
    amps = pd.DataFrame({"row": ["benign model"], "test amplitude": [16], "ASR-A": [0.25]})
    store_study(df, tiny, seconds=1.0, command="make study", directory=tmp_path / "st", amplitudes=amps)
    pd.testing.assert_frame_equal(load_stored_study(tmp_path / "st", tiny)[1]["amplitudes"], amps)


def test_victim_trajectory_is_measured_each_epoch_and_cached(tiny):
    from ubwlib.experiments.runs import run
    from ubwlib.experiments.study import victim_trajectory

    two = tiny.replace(train=tiny.train.replace(epochs=2))
    traj = victim_trajectory(two, progress=False)
    assert traj["epoch"].tolist() == [0, 1, 2]
    assert traj[["poisons", "same images, unperturbed"]].stack().between(0, 2).all()
    assert math.isnan(traj["lr (epoch)"].iloc[0]) and (traj["lr (epoch)"].iloc[1:] >= 0).all()
    assert traj["ASR-A"].between(0, 1).all() and traj["BA"].between(0, 1).all()
    # the last row is the victim of run: the same seed, recipe and release give the same model
    run_ = run(two, "ubw-c", progress=False)
    assert traj["ASR-A"].iloc[-1] == pytest.approx(run_.source_row["ASR-A"])
    assert traj["BA"].iloc[-1] == pytest.approx(run_.row["BA"])
    again = victim_trajectory(two, progress=False)
    pd.testing.assert_frame_equal(traj, again)


def test_release_cache_key_ignores_settings_added_at_their_default():
    """Fields added to the settings later (stages, poison_classes) leave the key of a release crafted without them
    unchanged at their default, and change it otherwise."""
    from ubwlib.experiments.runs import _key_settings
    from ubwlib.watermarks import GradientMatchingSettings
    from ubwlib.watermarks.ubw_c import UBWCSettings

    plain = _key_settings(UBWCSettings())
    assert "poison_classes" not in plain and "stages" not in plain["crafting"]
    assert plain["crafting"]["eps"] == pytest.approx(16 / 255)
    staged = _key_settings(UBWCSettings(crafting=GradientMatchingSettings(stages=(0.5, 1.0))))
    assert staged["crafting"]["stages"] == (0.5, 1.0)
    assert _key_settings(UBWCSettings(poison_classes="source"))["poison_classes"] == "source"


def test_release_cache_key_ignores_contrast_and_matching_at_their_default():
    from ubwlib.experiments.runs import _key_settings
    from ubwlib.watermarks import GradientMatchingSettings
    from ubwlib.watermarks.ubw_c import UBWCSettings

    plain = _key_settings(UBWCSettings())
    assert "contrast" not in plain["crafting"] and "matching" not in plain["crafting"]
    changed = _key_settings(UBWCSettings(crafting=GradientMatchingSettings(contrast=1.0, matching="l2")))
    assert changed["crafting"]["contrast"] == 1.0 and changed["crafting"]["matching"] == "l2"


def test_trigger_shares_by_hand_and_cached(tiny, monkeypatch):
    from ubwlib.experiments.runs import method_settings
    from ubwlib.experiments.study import TRIGGER_SHARE_METHODS, trigger_shares
    from ubwlib.watermarks import get_watermark
    from ubwlib.watermarks.gradient_matching import GradientMatchingWatermark

    got = trigger_shares(tiny, progress=False)
    assert list(got.index) == list(TRIGGER_SHARE_METHODS)
    model, train_set = benign_model(tiny).model, load_data(tiny).train
    for m in TRIGGER_SHARE_METHODS:
        want = get_watermark(m, **method_settings(tiny, m)).trigger_share(model, train_set, seed=tiny.seed)
        assert got.loc[m].to_dict() == pytest.approx(want)
    monkeypatch.setattr(GradientMatchingWatermark, "trigger_share", lambda *a, **k: pytest.fail("recomputed"))
    pd.testing.assert_frame_equal(trigger_shares(tiny, progress=False), got)  # read from the cache


def test_surrogate_fine_tune_by_hand(tiny):
    import copy

    from ubwlib.experiments.runs import release, victim_seed
    from ubwlib.experiments.study import REFERENCE, LEVERS, _overrides, surrogate_fine_tune
    from ubwlib.train import predict, train
    from ubwlib.watermarks import trigger

    got = surrogate_fine_tune(tiny, LEVERS[REFERENCE], lr=0.01, epochs=1, progress=False)
    rel = release(tiny, "ubw-c", progress=False, **_overrides(tiny, LEVERS[REFERENCE]))
    cfg = tiny.train.replace(epochs=1, lr=0.01, schedule="constant", seed=victim_seed(tiny.seed))
    model, _ = train(copy.deepcopy(benign_model(tiny).model), rel.dataset, cfg, progress=False)
    test = load_data(tiny).test
    src = test.images[test.labels == 0]
    asr = float((predict(model, trigger(src, rel.key, seed=tiny.seed)) != 0).float().mean())
    err = float((predict(model, src) != 0).float().mean())
    assert got["ASR-A"] == pytest.approx(asr) and got["clean error"] == pytest.approx(err)
    assert got["trigger-caused"] == pytest.approx(asr - err)
    benign = surrogate_fine_tune(tiny, None, lr=0.01, epochs=1, progress=False)  # on the benign data
    model_b, _ = train(copy.deepcopy(benign_model(tiny).model), load_data(tiny).train, cfg, progress=False)
    assert benign["clean error"] == pytest.approx(float((predict(model_b, src) != 0).float().mean()))
    assert benign["ASR-A"] == pytest.approx(
        float((predict(model_b, trigger(src, rel.key, seed=tiny.seed)) != 0).float().mean()))
    assert surrogate_fine_tune(tiny, LEVERS[REFERENCE], lr=0.01, epochs=1, progress=False) == got  # cached
    # the poisons alone, and the same images unperturbed: trained on exactly those samples
    alone = surrogate_fine_tune(tiny, LEVERS[REFERENCE], lr=0.01, epochs=1, on="poisons", progress=False)
    control = surrogate_fine_tune(tiny, LEVERS[REFERENCE], lr=0.01, epochs=1, on="unperturbed", progress=False)
    for result, data in ((alone, rel.dataset), (control, load_data(tiny).train)):
        m, _ = train(copy.deepcopy(benign_model(tiny).model), data.subset(rel.indices), cfg, progress=False)
        assert result["clean error"] == pytest.approx(float((predict(m, src) != 0).float().mean()))
        assert result["ASR-A"] == pytest.approx(
            float((predict(m, trigger(src, rel.key, seed=tiny.seed)) != 0).float().mean()))
    with pytest.raises(ValueError, match="on must be one of"):
        surrogate_fine_tune(tiny, LEVERS[REFERENCE], lr=0.01, on="clean")
    with pytest.raises(ValueError, match="need a lever"):
        surrogate_fine_tune(tiny, None, lr=0.01, on="poisons")


def test_faint_trigger_clips_every_change():
    from ubwlib.watermarks.patch import faint_trigger
    from ubwlib.watermarks.patch import paste_random, resized_square

    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (6, 1, 12, 12), generator=g, dtype=torch.uint8)
    patch = resized_square(1, 5)
    full = paste_random(images, patch, torch.Generator().manual_seed(9))
    assert torch.equal(faint_trigger(images, patch, 255, torch.Generator().manual_seed(9)), full)
    faint = faint_trigger(images, patch, 16, torch.Generator().manual_seed(9))
    change, wanted = faint.short() - images.short(), full.short() - images.short()
    assert change.abs().max() <= 16 and images.dtype == faint.dtype
    assert torch.equal(change, wanted.clamp(-16, 16))  # the same positions, each change clipped
    assert torch.equal(change.sign(), wanted.sign())
    with pytest.raises(ValueError, match="amplitude must be in"):
        faint_trigger(images, patch, 0, g)


def test_trigger_learnability_by_hand(tiny, monkeypatch):
    import ubwlib.experiments.study as study

    monkeypatch.setattr(study, "LEARNABILITY_PAPER_EPOCHS", 3)  # the paper's 200 epochs: a test needs no such wait
    from ubwlib.experiments.runs import victim_seed
    from ubwlib.experiments.study import LEARNABILITY_TARGET, learnability_table, trigger_learnability
    from ubwlib.watermarks.patch import faint_trigger
    from ubwlib.train import predict
    from ubwlib.watermarks.base import choose_indices
    from ubwlib.watermarks.gradient_matching import derived_seed, select_source_like
    from ubwlib.watermarks.patch import paste_random, resized_square

    data = load_data(tiny)
    tr, te = data.train, data.test
    patch = resized_square(1, 8)
    count = round(0.1 * len(tr))
    for kind in ("poisoned label", "clean label, source-like"):
        got = trigger_learnability(tiny, 32, kind, victims=1, progress=False)
        labels = tr.labels.clone()
        if kind == "poisoned label":
            idx = choose_indices(len(tr), count, torch.Generator().manual_seed(derived_seed(tiny.seed, "learnability")),
                                 pool=torch.nonzero(tr.labels != LEARNABILITY_TARGET).flatten())
            labels[idx] = LEARNABILITY_TARGET
        else:
            idx = select_source_like(benign_model(tiny).model, tr, count, 0)
            assert (tr.labels[idx] != 0).all()
        images = tr.images.clone()
        images[idx] = faint_trigger(images[idx], patch, 32,
                                    torch.Generator().manual_seed(derived_seed(tiny.seed, "learnability", "positions")))
        model = trained_model(tiny, tr.replace(images=images, labels=labels), seed=victim_seed(tiny.seed),
                              progress=False).model
        src, others = te.images[te.labels == 0], te.images[te.labels != LEARNABILITY_TARGET]
        g = torch.Generator().manual_seed(tiny.seed)
        assert got["ASR (targeted)"] == pytest.approx(
            float((predict(model, paste_random(others, patch, g)) == LEARNABILITY_TARGET).float().mean()))
        assert got["ASR-A"] == pytest.approx(float((predict(model, paste_random(src, patch, g)) != 0).float().mean()))
        assert got["source clean accuracy"] == pytest.approx(float((predict(model, src) == 0).float().mean()))
        assert got["BA"] == pytest.approx(float((predict(model, te.images) == te.labels).float().mean()))
        assert got["poisons fitted"] == pytest.approx(float((predict(model, images[idx]) == labels[idx]).float().mean()))
        measured = others if kind == "poisoned label" else src
        g = torch.Generator().manual_seed(tiny.seed)
        under = [paste_random(torch.zeros_like(x), torch.full_like(patch, 255), g) > 0 for x in (others, src)]
        under = under[0 if kind == "poisoned label" else 1]  # the pixels under the trigger, by hand
        black = ((measured == 0) & under).flatten(1).sum(1) / under.flatten(1).sum(1)
        assert got["test images, trigger on the background"] == int((black >= 0.9).sum())
        assert got["test images, trigger on the object"] == int((black <= 0.1).sum())
        for a in (16, 32, 64, 128, 255):  # the kind's measure, the trigger at a / 255, the same positions
            g = torch.Generator().manual_seed(tiny.seed)
            o, sr = faint_trigger(others, patch, a, g), faint_trigger(src, patch, a, g)
            hit = (predict(model, o) == LEARNABILITY_TARGET) if kind == "poisoned label" else (predict(model, sr) != 0)
            assert got[f"test trigger {a}/255"] == pytest.approx(float(hit.float().mean()))
            for w, mask in (("on the background", black >= 0.9), ("on the object", black <= 0.1)):
                want = float(hit[mask].float().mean()) if mask.any() else math.nan
                assert got[f"test trigger {a}/255 {w}"] == pytest.approx(want, nan_ok=True)
        assert got["test trigger 255/255"] == got["ASR (targeted)" if kind == "poisoned label" else "ASR-A"]
        assert got["kind"] == kind and got["amplitude"] == 32 and got["epochs"] == tiny.train.epochs
        again = trigger_learnability(tiny, 32, kind, victims=1, progress=False)  # cached (NaN where no image lands)
        pd.testing.assert_series_equal(pd.Series(again, dtype=object), pd.Series(got, dtype=object))
    table = learnability_table(tiny, progress=False)
    assert list(zip(table["kind"], table["amplitude"], table["epochs"])) == [
        (k, a, 1) for k in ("poisoned label", "clean label, source-like") for a in (16, 32, 64, 255)] + [
        ("poisoned label", 16, 4), ("poisoned label", 32, 4), ("clean label, source-like", 16, 4),
        ("poisoned label", 16, 3)]
    # two victims per row, one for the row of the paper's epochs
    assert table["ASR-A per victim"].str.count("/").tolist() == [1] * 11 + [0]
    with pytest.raises(ValueError, match="kind must be one of"):
        trigger_learnability(tiny, 32, "targeted")


def test_background_share_counts_black_pixels_under_the_trigger():
    from ubwlib.experiments.study import background_share
    from ubwlib.watermarks.patch import faint_trigger

    patch = torch.full((1, 4, 4), 255, dtype=torch.uint8)
    g = lambda: torch.Generator().manual_seed(3)
    assert torch.equal(background_share(torch.zeros(5, 1, 12, 12, dtype=torch.uint8), patch, g()), torch.ones(5))
    assert torch.equal(background_share(torch.full((5, 1, 12, 12), 7, dtype=torch.uint8), patch, g()), torch.zeros(5))
    half = torch.zeros(64, 1, 12, 12, dtype=torch.uint8)
    half[..., 6:] = 100  # black left half, grey right half
    share = background_share(half, patch, g())
    pasted = faint_trigger(torch.zeros_like(half), patch, 255, g()) > 0  # the same positions
    cols = pasted[:, 0].any(1)  # the columns under the trigger
    assert torch.equal(share, cols[:, :6].sum(1) / 4)
    assert set(share.tolist()) > {0.0, 1.0}  # all three cases drawn: on black, on grey, across the edge


def test_amplitude_response_by_hand(tiny):
    """The victims of a study row under UBW-C's trigger at every test amplitude, recomputed by hand."""
    from ubwlib.experiments.runs import release, victim_seed
    from ubwlib.experiments.study import REFERENCE, LEVERS, TEST_AMPLITUDES, _overrides, amplitude_response
    from ubwlib.train import predict
    from ubwlib.watermarks.patch import faint_trigger, resized_square

    got = amplitude_response(tiny, REFERENCE, victims=2, progress=False)
    assert got["test amplitude"].tolist() == list(TEST_AMPLITUDES) and (got["row"] == REFERENCE).all()
    rel = release(tiny, "ubw-c", progress=False, **_overrides(tiny, LEVERS[REFERENCE]))
    te = load_data(tiny).test
    src = te.images[te.labels == 0]  # the tiny profile's source class
    models = [trained_model(tiny, rel.dataset, seed=victim_seed(tiny.seed) + i, progress=False).model
              for i in range(2)]
    for a, (_, r) in zip(TEST_AMPLITUDES, got.iterrows()):
        per = [float((predict(m, faint_trigger(src, resized_square(1, 8), a, torch.Generator().manual_seed(tiny.seed)))
                      != 0).float().mean()) for m in models]
        assert r["ASR-A"] == pytest.approx(np.mean(per))
        assert r["ASR-A per victim"] == " / ".join(f"{v:.3f}" for v in per)
    assert got["clean source ASR-A"].iloc[0] == pytest.approx(
        np.mean([float((predict(m, src) != 0).float().mean()) for m in models]))
    benign = amplitude_response(tiny, "benign model", victims=2, progress=False)  # the benign models of those seeds
    full = float((predict(benign_model(tiny, seed=victim_seed(tiny.seed)).model,
                          faint_trigger(src, resized_square(1, 8), 255, torch.Generator().manual_seed(tiny.seed)))
                  != 0).float().mean())
    assert benign["ASR-A per victim"].iloc[-1].split(" / ")[0] == f"{full:.3f}"
    pd.testing.assert_frame_equal(amplitude_response(tiny, REFERENCE, victims=2, progress=False), got)  # cached


def test_select_source_like_ranks_by_source_probability(tiny):
    from ubwlib.train import predict_proba
    from ubwlib.watermarks.gradient_matching import select_source_like

    tr = load_data(tiny).train
    model = benign_model(tiny).model
    idx = select_source_like(model, tr, 7, source=2)
    assert len(idx) == 7 and torch.equal(idx, idx.sort().values) and (tr.labels[idx] != 2).all()
    p = predict_proba(model, tr.images)[:, 2]
    outside = torch.nonzero(tr.labels != 2).flatten()
    rest = outside[~torch.isin(outside, idx)]
    assert p[idx].min() >= p[rest].max()  # none left out is more source-like than one chosen
    pool = torch.arange(0, len(tr), 2)
    sub = select_source_like(model, tr, 5, source=2, pool=pool)
    assert torch.isin(sub, pool).all() and (tr.labels[sub] != 2).all()
    with pytest.raises(ValueError, match="cannot select"):
        select_source_like(model, tr, len(tr), source=2)


# --------------------------------------------------------------------------------------------------
# plots: image grids
# --------------------------------------------------------------------------------------------------


def test_grid_row_lays_images_side_by_side_with_white_gaps():
    from ubwlib.experiments.plots import GRID_GAP, grid_row

    imgs = torch.arange(2 * 1 * 2 * 3, dtype=torch.uint8).reshape(2, 1, 2, 3)
    row = grid_row(imgs, ncol=3)
    assert row.shape == (2, 3 * 3 + 2 * GRID_GAP) and row.dtype == np.uint8
    assert (row[:, :3] == imgs[0, 0].numpy()).all() and (row[:, 3 + GRID_GAP:6 + GRID_GAP] == imgs[1, 0].numpy()).all()
    assert (row[:, 3:3 + GRID_GAP] == 255).all() and (row[:, 6 + GRID_GAP:] == 255).all()  # gaps, missing column
    rgb = torch.full((1, 3, 2, 2), 7, dtype=torch.uint8)
    rgb[0, 1] = 9
    out = grid_row(rgb, ncol=1)
    assert out.shape == (2, 2, 3) and out[0, 0].tolist() == [7, 9, 7]
    diff = torch.tensor([[[[0, 1], [2, 200]]]], dtype=torch.uint8)
    assert grid_row(diff, ncol=1, magnify=4.0).tolist() == [[0, 4], [8, 255]]  # |x| * 4, clipped
    with pytest.raises(ValueError, match="at most ncol=1"):
        grid_row(imgs, ncol=1)


def test_image_grid_draws_one_axes_per_row():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ubwlib.experiments.plots import image_grid

    rows = {"a": torch.zeros(4, 1, 5, 5, dtype=torch.uint8), "b": torch.full((3, 1, 5, 5), 9, dtype=torch.uint8)}
    fig = image_grid(rows, titles=["w", "x", "y", "z"], magnify={"b": 2.0})
    axes = fig.get_axes()
    assert len(axes) == 2 and [ax.get_ylabel() for ax in axes] == ["a", "b"]
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["w", "x", "y", "z"] and not axes[1].get_xticks().size
    shown = axes[1].get_images()[0].get_array()
    assert shown.shape == (5, 4 * 5 + 3 * 2) and shown[0, 0] == 18 and shown[0, -1] == 255
    plt.close(fig)
