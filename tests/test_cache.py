"""Tests for ubwlib.cache: hashing, atomic entries, corruption handling, safe clearing, atomic file writes."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import pickle
import stat
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from ubwlib.cache import (
    CACHE_MARKER_NAME,
    CACHEDIR_TAG_NAME,
    CACHEDIR_TAG_SIGNATURE,
    Cache,
    CacheCorruptionWarning,
    Entry,
    atomic_path,
    canonical_settings,
    load_state_dict_tensors,
    settings_hash,
    state_dict_tensors,
    table_from_data,
    table_to_data,
    write_bytes_atomic,
    write_text_atomic,
)
from ubwlib.cache.payload import sha256_hex
from ubwlib.cache.store import LOCK_FILE

NS = "train"
V = "v1"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UBW_NO_CACHE", raising=False)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


class Counter:
    """A compute function that counts its calls and returns fixed tensors and data."""

    def __init__(self, value: float = 1.0) -> None:
        self.calls = 0
        self.value = value

    def __call__(self) -> tuple[dict[str, torch.Tensor], dict]:
        self.calls += 1
        return {"w": torch.full((3,), self.value)}, {"acc": self.value, "hist": [1, 2]}


@dataclasses.dataclass
class Opt:
    lr: float
    steps: int


@dataclasses.dataclass
class OtherOpt:
    lr: float
    steps: int


class Color(enum.Enum):
    RED = 1
    BLUE = 2


# ---------------------------------------------------------------------------------------
# hashing
# ---------------------------------------------------------------------------------------


def test_hash_is_sha256_hex_and_stable_under_key_order() -> None:
    a = {"model": {"depth": 3, "width": 8}, "lr": 0.1, "tags": ["x", "y"]}
    b = {"tags": ["x", "y"], "lr": 0.1, "model": {"width": 8, "depth": 3}}
    h = settings_hash(NS, a, V)
    assert len(h) == 64 and all(c in "0123456789abcdef" for c in h)
    assert h == settings_hash(NS, b, V)
    assert h == settings_hash(NS, json.loads(json.dumps(a)), V)


def test_hash_changes_with_nested_value_version_and_namespace() -> None:
    base = {"model": {"depth": 3, "width": 8}, "lr": 0.1}
    h = settings_hash(NS, base, V)
    assert settings_hash(NS, {"model": {"depth": 4, "width": 8}, "lr": 0.1}, V) != h
    assert settings_hash(NS, base, "v2") != h
    assert settings_hash("eval", base, V) != h
    assert settings_hash(NS, {**base, "extra": None}, V) != h


def test_hash_number_rules() -> None:
    # documented: ints and floats of the same value differ; bool differs from int
    assert settings_hash(NS, {"x": 1}, V) != settings_hash(NS, {"x": 1.0}, V)
    assert settings_hash(NS, {"x": True}, V) != settings_hash(NS, {"x": 1}, V)
    assert settings_hash(NS, {"x": 0.1}, V) == settings_hash(NS, {"x": np.float64(0.1)}, V)
    assert settings_hash(NS, {"x": 3}, V) == settings_hash(NS, {"x": np.int64(3)}, V)
    assert settings_hash(NS, {"x": float("nan")}, V) == settings_hash(NS, {"x": float("nan")}, V)
    assert settings_hash(NS, {"x": float("inf")}, V) != settings_hash(NS, {"x": float("-inf")}, V)
    # list and tuple are the same; Path and str are the same (documented)
    assert settings_hash(NS, [1, 2], V) == settings_hash(NS, (1, 2), V)
    assert settings_hash(NS, Path("a/b"), V) == settings_hash(NS, "a/b", V)
    assert settings_hash(NS, {1, 2, 3}, V) == settings_hash(NS, {3, 2, 1}, V)


def test_hash_dataclass_enum_rules() -> None:
    opt = Opt(lr=0.1, steps=10)
    assert settings_hash(NS, opt, V) == settings_hash(NS, Opt(lr=0.1, steps=10), V)
    assert settings_hash(NS, opt, V) != settings_hash(NS, Opt(lr=0.1, steps=11), V)
    # documented: a dataclass differs from the dict of its fields, and from another class
    assert settings_hash(NS, opt, V) != settings_hash(NS, dataclasses.asdict(opt), V)
    assert settings_hash(NS, opt, V) != settings_hash(NS, OtherOpt(lr=0.1, steps=10), V)
    assert canonical_settings(opt)["class"] == "Opt"
    assert settings_hash(NS, {"c": Color.RED}, V) != settings_hash(NS, {"c": Color.BLUE}, V)
    assert settings_hash(NS, {"c": Color.RED}, V) != settings_hash(NS, {"c": 1}, V)


def test_hash_tensors_and_arrays_by_content() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    h = settings_hash(NS, {"t": t}, V)
    assert h == settings_hash(NS, {"t": t.clone()}, V)
    assert h == settings_hash(NS, {"t": t.t().contiguous().t()}, V)  # layout does not matter
    assert h == settings_hash(NS, {"t": t.clone().requires_grad_()}, V)
    t2 = t.clone()
    t2[1, 2] = 100.0
    assert h != settings_hash(NS, {"t": t2}, V)
    assert h != settings_hash(NS, {"t": t.double()}, V)  # dtype matters
    assert h != settings_hash(NS, {"t": t.reshape(3, 2)}, V)  # shape matters
    a = np.arange(6.0).reshape(2, 3)
    assert settings_hash(NS, a, V) == settings_hash(NS, a.copy(order="F"), V)
    assert settings_hash(NS, a, V) != settings_hash(NS, a + 1, V)


def test_hash_rejects_unknown_types() -> None:
    class Foo:
        pass

    with pytest.raises(TypeError, match="Foo"):
        settings_hash(NS, {"a": [1, Foo()]}, V)
    with pytest.raises(TypeError, match="object"):
        settings_hash(NS, {"a": object()}, V)
    with pytest.raises(TypeError, match="complex"):
        settings_hash(NS, 1j, V)
    with pytest.raises(TypeError, match="int"):
        settings_hash(NS, {1: "non-str key"}, V)
    with pytest.raises(TypeError):
        settings_hash(NS, {}, 2)  # version must be str


# ---------------------------------------------------------------------------------------
# put / get / get_or_compute
# ---------------------------------------------------------------------------------------


def test_put_get_roundtrip_bit_exact(root: Path) -> None:
    c = Cache(root)
    tensors = {
        "w": torch.randn(4, 5),
        "b": torch.randn(7, dtype=torch.float64)[::2],  # a view
        "h": torch.randn(3).to(torch.bfloat16),
        "m": torch.tensor([True, False]),
        "i": torch.arange(5, dtype=torch.int64),
    }
    data = {"acc": 0.123456789012345678, "hist": [1.5, float("nan"), 3], "name": "ünï", "none": None}
    settings = {"lr": 0.1, "model": "resnet"}
    assert c.get(NS, settings, V) is None
    assert not root.exists()  # nothing created by a read
    put = c.put(NS, settings, V, tensors=tensors, data=data)
    assert not put.hit
    got = c.get(NS, settings, V)
    assert isinstance(got, Entry) and got.hit
    assert got.path == put.path == root / NS / settings_hash(NS, settings, V)[:20]
    assert set(got.tensors) == set(tensors)
    for k, t in tensors.items():
        assert got.tensors[k].dtype == t.dtype and got.tensors[k].device.type == "cpu"
        assert torch.equal(got.tensors[k].view(torch.uint8), t.contiguous().view(torch.uint8))
    assert got.data["acc"] == data["acc"] and got.data["name"] == "ünï" and got.data["none"] is None
    assert got.data["hist"][0] == 1.5 and np.isnan(got.data["hist"][1])
    meta = got.meta
    assert meta["hash"] == settings_hash(NS, settings, V)
    assert meta["namespace"] == NS and meta["version"] == V
    assert meta["settings"] == canonical_settings(settings)
    assert set(meta["sha256"]) == {"tensors.pt", "data.json"}
    assert "created" in meta and "ubwlib_version" in meta
    assert (root / CACHEDIR_TAG_NAME).read_text().splitlines()[0] == CACHEDIR_TAG_SIGNATURE


def test_put_returns_json_normalised_data(root: Path) -> None:
    e = Cache(root).put(NS, {}, V, data={"t": (1, 2), "x": np.float32(0.5)})
    assert e.data == {"t": [1, 2], "x": 0.5}
    assert Cache(root).get(NS, {}, V).data == e.data
    with pytest.raises(TypeError, match="table_to_data"):
        Cache(root).put(NS, {"k": 1}, V, data=pd.DataFrame({"a": [1]}))


def test_get_or_compute_calls_compute_once(root: Path) -> None:
    compute = Counter()
    c1 = Cache(root)
    e1 = c1.get_or_compute(NS, {"a": 1}, V, compute)
    e2 = c1.get_or_compute(NS, {"a": 1}, V, compute)
    e3 = Cache(root).get_or_compute(NS, {"a": 1}, V, compute)  # second object, same root
    assert compute.calls == 1
    assert (e1.hit, e2.hit, e3.hit) == (False, True, True)
    assert torch.equal(e1.tensors["w"], e3.tensors["w"]) and e1.data == e3.data
    Cache(root).get_or_compute(NS, {"a": 2}, V, compute)
    Cache(root).get_or_compute(NS, {"a": 1}, "v2", compute)
    assert compute.calls == 3


def test_entries_record_their_compute_time_without_the_cached_parts_they_reused(root: Path, monkeypatch) -> None:
    import ubwlib.cache.store as store

    clock = iter([0.0, 10.0, 13.0, 20.0, 100.0, 101.5])  # outer starts, inner starts, inner ends, outer ends; then one more
    monkeypatch.setattr(store.time, "perf_counter", lambda: next(clock))
    c = Cache(root)

    def outer():
        inner = c.get_or_compute(NS, {"part": 1}, V, lambda: (None, 1))
        return None, inner.data + 1

    e = c.get_or_compute(NS, {"whole": 1}, V, outer)
    assert (e.meta["seconds"], e.meta["seconds_own"]) == (20.0, 17.0)
    assert c.get_or_compute(NS, {"whole": 1}, V, outer).hit  # no clock read for a hit
    last = c.get_or_compute(NS, {"alone": 1}, V, lambda: (None, 0))
    assert (last.meta["seconds"], last.meta["seconds_own"]) == (1.5, 1.5)  # the stack is empty again
    by_key = {info.hash: info for info in c.entries()}
    part = by_key[settings_hash(NS, {"part": 1}, V)]
    assert (part.seconds, part.seconds_own) == (3.0, 3.0)
    assert sum(i.seconds_own for i in by_key.values()) == 20.0 + 1.5  # a cold run's time, each second once
    plain = c.put(NS, {"stored": 1}, V, data=0)  # stored by hand: nothing was timed
    assert "seconds" not in plain.meta
    # a part timed by its caller and stored with put (a trained model) inside a computation counts as cached
    clock = iter([200.0, 210.0])
    monkeypatch.setattr(store.time, "perf_counter", lambda: next(clock))
    e = c.get_or_compute(NS, {"with a model": 1}, V,
                         lambda: (None, c.put(NS, {"model": 1}, V, data=4, seconds=6.0).data))
    assert (e.meta["seconds"], e.meta["seconds_own"]) == (10.0, 4.0)
    assert c.get(NS, {"model": 1}, V).meta["seconds_own"] == 6.0


# A process that holds the compute lock of the cache at argv[1] until the file argv[2]/go exists, then stores
# {"by": "the other process"} under the test's key and lets go.
_HOLDER = """
import sys, time
from pathlib import Path
from ubwlib.cache import Cache
cache, flags = Cache(sys.argv[1]), Path(sys.argv[2])
with cache.computing():
    (flags / "holding").touch()
    while not (flags / "go").exists():
        time.sleep(0.02)
    cache.put("train", {"a": 1}, "v1", data={"by": "the other process"})
"""


def _wait_for(path: Path, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_a_computation_waits_for_another_process_and_takes_its_result(root: Path, tmp_path: Path) -> None:
    """Two processes sharing a cache compute one at a time; the one that waited finds the result the other stored
    and does not compute it again."""
    flags = tmp_path / "flags"
    flags.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(root), str(flags)])
    try:
        _wait_for(flags / "holding")
        compute = Counter()
        got: list = []
        waiter = threading.Thread(target=lambda: got.append(Cache(root).get_or_compute(NS, {"a": 1}, V, compute)))
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive() and not got  # blocked while the other process holds the lock
        (flags / "go").touch()
        waiter.join(timeout=60)
        assert holder.wait(timeout=60) == 0
    finally:
        holder.kill()
    assert not waiter.is_alive() and compute.calls == 0
    assert got[0].hit and got[0].data == {"by": "the other process"}
    assert (root / LOCK_FILE).is_file() and not any(i.namespace == LOCK_FILE for i in Cache(root).entries())


def test_nested_computations_take_the_lock_once(root: Path) -> None:
    """A computation's cached parts run under the lock their caller holds (a second flock would wait forever)."""
    c = Cache(root)
    done: list = []

    def outer():
        inner = c.get_or_compute(NS, {"part": 1}, V, lambda: (None, 1))
        with c.computing():
            return None, inner.data + Cache(root).get_or_compute(NS, {"part": 2}, V, lambda: (None, 2)).data

    worker = threading.Thread(target=lambda: done.append(c.get_or_compute(NS, {"whole": 1}, V, outer).data))
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive() and done == [3]
    with pytest.raises(RuntimeError, match="inside"):  # released on an error too: the next computation runs
        c.get_or_compute(NS, {"fails": 1}, V, lambda: (_ for _ in ()).throw(RuntimeError("inside")))
    assert c.get_or_compute(NS, {"after": 1}, V, lambda: (None, 4)).data == 4


def test_a_disabled_cache_takes_no_lock(root: Path) -> None:
    with Cache(root, enabled=False).computing():
        pass
    assert Cache(root, enabled=False).get_or_compute(NS, {"a": 1}, V, lambda: (None, 1)).data == 1
    assert not root.exists()


def test_compute_may_return_no_tensors(root: Path) -> None:
    e = Cache(root).get_or_compute(NS, {}, V, lambda: (None, [1, 2]))
    assert e.tensors == {} and e.data == [1, 2]
    assert Cache(root).get(NS, {}, V).data == [1, 2]


def test_invalid_namespace(root: Path) -> None:
    for bad in ["", "../x", "a/b", ".hidden", "data"]:
        with pytest.raises(ValueError):
            Cache(root).get(bad, {}, V)


# ---------------------------------------------------------------------------------------
# corruption
# ---------------------------------------------------------------------------------------


def _corrupt_truncate(path: Path) -> None:
    f = path / "tensors.pt"
    f.write_bytes(f.read_bytes()[:40])


def _corrupt_edit_data(path: Path) -> None:
    f = path / "data.json"
    f.write_text(f.read_text().replace("1.0", "2.0"))


def _corrupt_delete_meta(path: Path) -> None:
    (path / "meta.json").unlink()


def _corrupt_bad_meta_json(path: Path) -> None:
    (path / "meta.json").write_text("{not json")


def _corrupt_bad_data_json_with_matching_sum(path: Path) -> None:
    raw = b"{broken"
    (path / "data.json").write_bytes(raw)
    meta = json.loads((path / "meta.json").read_text())
    meta["sha256"]["data.json"] = sha256_hex(raw)
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage",
    [_corrupt_truncate, _corrupt_edit_data, _corrupt_delete_meta, _corrupt_bad_meta_json,
     _corrupt_bad_data_json_with_matching_sum],
)
def test_corruption_is_detected_and_recomputed(root: Path, damage) -> None:
    compute = Counter()
    c = Cache(root)
    e = c.get_or_compute(NS, {"a": 1}, V, compute)
    damage(e.path)
    with pytest.warns(CacheCorruptionWarning):
        assert c.get(NS, {"a": 1}, V) is None
    assert not e.path.exists()
    assert not [p for p in (root / NS).iterdir() if p.name.startswith(".")]  # nothing left aside
    e2 = c.get_or_compute(NS, {"a": 1}, V, compute)
    assert compute.calls == 2 and not e2.hit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e3 = Cache(root).get(NS, {"a": 1}, V)
    assert e3 is not None and e3.hit and torch.equal(e3.tensors["w"], torch.ones(3))


def test_corruption_during_get_or_compute_warns_and_recomputes(root: Path) -> None:
    compute = Counter()
    c = Cache(root)
    e = c.get_or_compute(NS, {"a": 1}, V, compute)
    _corrupt_truncate(e.path)
    with pytest.warns(CacheCorruptionWarning, match="tensors.pt"):
        e2 = c.get_or_compute(NS, {"a": 1}, V, compute)
    assert compute.calls == 2 and c.get(NS, {"a": 1}, V).hit and e2.data == e.data


def test_malicious_pickle_is_not_executed(root: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    c = Cache(root)
    e = c.put(NS, {"a": 1}, V, tensors={"w": torch.ones(2)})
    raw = pickle.dumps({"w": Evil()}, protocol=2)  # torch.load's own protocol
    pickle.loads(raw)  # sanity: a plain unpickle *does* run the payload
    assert marker.exists()
    marker.unlink()
    (e.path / "tensors.pt").write_bytes(raw)
    meta = json.loads((e.path / "meta.json").read_text())
    meta["sha256"]["tensors.pt"] = sha256_hex(raw)  # checksum matches: only weights_only saves us
    (e.path / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(CacheCorruptionWarning, match="weights_only"):
        assert c.get(NS, {"a": 1}, V) is None
    assert not marker.exists()
    assert not e.path.exists()


def test_interrupted_write_leftover_is_ignored(root: Path) -> None:
    c = Cache(root)
    c.put(NS, {"other": 0}, V)  # creates root and namespace dir
    key_short = settings_hash(NS, {"a": 1}, V)[:20]
    leftover = root / NS / f".tmp-{key_short}-crashed"
    leftover.mkdir()
    (leftover / "tensors.pt").write_bytes(b"partial")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert c.get(NS, {"a": 1}, V) is None
        compute = Counter()
        e = c.get_or_compute(NS, {"a": 1}, V, compute)
    assert compute.calls == 1 and e.path.name == key_short
    assert c.get(NS, {"a": 1}, V).hit
    assert [i.path for i in c.entries()].count(e.path) == 1 and len(c.entries()) == 2
    assert c.clear() == 2 and not leftover.exists()  # leftovers cleaned, not counted


def test_crash_before_rename_leaves_no_entry(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = Cache(root)

    def crash(src, dst):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        c.put(NS, {"a": 1}, V, tensors={"w": torch.ones(2)})
    monkeypatch.undo()
    assert c.get(NS, {"a": 1}, V) is None
    assert not c.path_for(NS, {"a": 1}, V).exists()


def test_race_other_writer_wins(root: Path) -> None:
    a, b = Cache(root), Cache(root)
    winner = Counter(value=7.0)

    def slow_compute():
        # while "we" compute, another process finishes the same entry first
        b.get_or_compute(NS, {"a": 1}, V, winner)
        return {"w": torch.full((3,), 3.0)}, {"acc": 3.0}

    e = a.get_or_compute(NS, {"a": 1}, V, slow_compute)
    assert winner.calls == 1
    assert torch.equal(e.tensors["w"], torch.full((3,), 7.0)) and e.data["acc"] == 7.0
    stored = Cache(root).get(NS, {"a": 1}, V)
    assert torch.equal(stored.tensors["w"], torch.full((3,), 7.0))
    assert sorted(p.name for p in (root / NS).iterdir()) == [e.path.name]  # our temp dir is gone


def test_race_with_corrupt_existing_entry_is_replaced(root: Path) -> None:
    c = Cache(root)
    path = c.path_for(NS, {"a": 1}, V)

    def compute():
        path.mkdir(parents=True)
        (path / "junk").write_text("half-written by a broken writer")
        return {"w": torch.ones(1)}, 1

    with pytest.warns(CacheCorruptionWarning):
        e = c.get_or_compute(NS, {"a": 1}, V, compute)
    assert e.data == 1 and c.get(NS, {"a": 1}, V).data == 1


# ---------------------------------------------------------------------------------------
# enabled / UBW_NO_CACHE
# ---------------------------------------------------------------------------------------


def test_disabled_cache_never_touches_disk(root: Path) -> None:
    compute = Counter()
    c = Cache(root, enabled=False)
    e1 = c.get_or_compute(NS, {"a": 1}, V, compute)
    e2 = c.get_or_compute(NS, {"a": 1}, V, compute)
    assert compute.calls == 2 and not e1.hit and not e2.hit
    assert e1.data == {"acc": 1.0, "hist": [1, 2]}
    c.put(NS, {"b": 1}, V, data=1)
    assert c.get(NS, {"b": 1}, V) is None
    assert not root.exists()
    # an enabled cache on the same root has nothing either
    assert Cache(root).get(NS, {"a": 1}, V) is None


def test_ubw_no_cache_forces_recompute_but_writes(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Cache(root).get_or_compute(NS, {"a": 1}, V, Counter(value=1.0))
    monkeypatch.setenv("UBW_NO_CACHE", "1")
    fresh = Counter(value=2.0)
    c = Cache(root)
    assert c.get(NS, {"a": 1}, V) is None
    e = c.get_or_compute(NS, {"a": 1}, V, fresh)
    e = c.get_or_compute(NS, {"a": 1}, V, fresh)
    assert fresh.calls == 2 and not e.hit
    monkeypatch.delenv("UBW_NO_CACHE")
    stored = c.get(NS, {"a": 1}, V)
    assert stored.hit and stored.data["acc"] == 2.0  # the fresh result replaced the old one
    assert len(c.entries()) == 1


# ---------------------------------------------------------------------------------------
# entries / size / clear
# ---------------------------------------------------------------------------------------


def test_entries_size_and_clear(root: Path) -> None:
    c = Cache(root)
    assert c.entries() == [] and c.size_bytes() == 0 and c.clear() == 0
    c.put(NS, {"a": 1}, V, tensors={"w": torch.zeros(100)})
    c.put(NS, {"a": 2}, "v2", data=[1])
    c.put("eval", {"a": 1}, V, data=[2])
    infos = c.entries()
    assert len(infos) == 3
    assert {(i.namespace, i.version) for i in infos} == {(NS, V), (NS, "v2"), ("eval", V)}
    assert all(len(i.hash) == 64 and i.size_bytes > 0 and i.created is not None for i in infos)
    assert c.size_bytes() >= sum(i.size_bytes for i in infos) > 400
    assert c.clear("eval") == 1
    assert {i.namespace for i in c.entries()} == {NS}
    assert c.clear() == 2
    assert c.entries() == [] and (root / CACHEDIR_TAG_NAME).exists()
    assert c.get(NS, {"a": 1}, V) is None


def test_clear_refuses_unmarked_folder(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    (folder / NS / ("a" * 20)).mkdir(parents=True)
    (folder / "notes.txt").write_text("precious")
    c = Cache(folder)
    with pytest.raises(ValueError, match=str(folder)):
        c.clear()
    # writing into a foreign, non-empty folder does not claim it
    c.put(NS, {"a": 1}, V, data=1)
    assert not (folder / CACHEDIR_TAG_NAME).exists()
    with pytest.raises(ValueError, match="marker"):
        c.clear()
    assert (folder / NS / ("a" * 20)).is_dir() and (folder / "notes.txt").exists()
    # a fake marker with the wrong signature is not enough
    (folder / CACHEDIR_TAG_NAME).write_text("Signature: nope\n")
    with pytest.raises(ValueError):
        c.clear()


def test_clear_refuses_home_and_filesystem_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    entry = home / NS / ("b" * 20)
    entry.mkdir(parents=True)
    (home / CACHEDIR_TAG_NAME).write_text(CACHEDIR_TAG_SIGNATURE + "\n")
    assert Path.home() == home
    with pytest.raises(ValueError, match="home"):
        Cache(home).clear()
    with pytest.raises(ValueError, match="home"):
        Cache(tmp_path).clear()  # an ancestor of home
    assert entry.is_dir()
    with pytest.raises(ValueError, match="filesystem root"):
        Cache(Path(Path.cwd().anchor)).clear()


def test_clear_never_follows_symlinks(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / ("c" * 20)).mkdir(parents=True)
    precious = outside / "precious.txt"
    precious.write_text("keep me")
    (outside / ("c" * 20) / "keep.txt").write_text("keep me too")

    c = Cache(root)
    e = c.put(NS, {"a": 1}, V, data=1)
    (e.path / "link_to_file").symlink_to(precious)  # a link inside an entry
    (e.path / "link_to_dir").symlink_to(outside, target_is_directory=True)
    (root / "evilns").symlink_to(outside, target_is_directory=True)  # a namespace that is a link
    (root / NS / ("d" * 20)).symlink_to(outside / ("c" * 20), target_is_directory=True)  # entry link
    assert c.clear() == 1
    assert precious.read_text() == "keep me"
    assert (outside / ("c" * 20) / "keep.txt").read_text() == "keep me too"
    assert not e.path.exists()



def _tree(folder: Path) -> dict:
    """Every path under ``folder`` with its content (to prove nothing was touched)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else "dir") for p in sorted(folder.rglob("*"))}


def test_users_folder_of_subfolders_is_never_claimed_nor_cleared(tmp_path: Path, monkeypatch) -> None:
    """UBW_CACHE pointed at an existing folder that holds only sub-folders, some named like entries."""
    mine = tmp_path / "mine"
    for rel in (f"photos/{'a' * 20}", f"{NS}/{'b' * 20}", f"{NS}/{'c' * 20}.ckpt", f"{NS}/.tmp-{'d' * 20}-x",
                f"eval/{'e' * 20}"):
        (mine / rel).mkdir(parents=True)
        (mine / rel / "precious.jpg").write_bytes(b"holiday " + rel.encode())
    (mine / "eval" / ("e" * 20) / "meta.json").write_text(json.dumps({"format": 1, "hash": "0" * 64}))
    before = _tree(mine)
    monkeypatch.setenv("UBW_CACHE", str(mine))
    c = Cache()
    assert c.root == mine
    e = c.put(NS, {"a": 1}, V, data=1)  # the cache may write there...
    assert not (mine / CACHE_MARKER_NAME).exists() and not (mine / CACHEDIR_TAG_NAME).exists()  # ...not claim it
    with pytest.raises(ValueError, match="no ubwlib marker") as info:
        c.clear()
    assert "adopt()" in str(info.value) and str(mine) in str(info.value)
    assert e.path.is_dir()
    # even once the user declares it a cache, only what the cache made is deleted
    c.adopt()
    assert (mine / CACHE_MARKER_NAME).is_file() and (mine / CACHEDIR_TAG_NAME).is_file()
    assert c.clear() == 1 and not e.path.exists()
    after = _tree(mine)
    for name in (CACHE_MARKER_NAME, CACHEDIR_TAG_NAME):
        after.pop(name)
    assert after == before


def test_new_or_empty_root_is_marked_with_a_format_version(tmp_path: Path) -> None:
    new = tmp_path / "new"
    Cache(new).put(NS, {"a": 1}, V, data=1)
    marker = json.loads((new / CACHE_MARKER_NAME).read_text())
    assert marker["marker_format"] == 1 and marker["what"] == "ubwlib cache root"
    assert (new / CACHEDIR_TAG_NAME).read_text().startswith(CACHEDIR_TAG_SIGNATURE)
    empty = tmp_path / "empty"
    empty.mkdir()
    Cache(empty).put(NS, {"a": 1}, V, data=1)
    assert (empty / CACHE_MARKER_NAME).is_file()
    assert Cache(empty).clear() == 1
    for bad in ("not json", json.dumps({"what": "something else", "marker_format": 1}), json.dumps([1])):
        (empty / CACHE_MARKER_NAME).write_text(bad)
        with pytest.raises(ValueError, match="refusing to clear"):
            Cache(empty).clear()


def test_root_of_an_older_version_must_be_adopted_before_clear(tmp_path: Path) -> None:
    old = tmp_path / "old"
    e = Cache(old).put(NS, {"a": 1}, V, data=1)
    (old / CACHE_MARKER_NAME).unlink()  # what an older ubwlib left: only CACHEDIR.TAG
    with pytest.raises(ValueError, match="older ubwlib") as info:
        Cache(old).clear()
    assert "adopt()" in str(info.value) and e.path.is_dir()
    Cache(old).adopt()
    assert Cache(old).clear() == 1 and not e.path.exists()
    with pytest.raises(ValueError, match="home"):
        Cache(Path.home()).adopt()


def test_clear_deletes_only_entries_and_checkpoints_it_can_prove_it_made(root: Path) -> None:
    c = Cache(root)
    e = c.put(NS, {"a": 1}, V, data=1)
    ck = c.checkpoint(NS, {"long": 1}, V)
    ck.save(3, {"x": torch.ones(2)}, {"loss": [1.0]})
    empty_ck = c.checkpoint(NS, {"long": 2}, V).path
    empty_ck.mkdir()  # a checkpoint discarded as damaged leaves its empty folder
    crashed = root / NS / f".tmp-{'1' * 20}-crashed"
    crashed.mkdir()
    (crashed / "tensors.pt").write_bytes(b"partial")
    kept = {
        "no meta": root / NS / ("2" * 20),
        "other hash": root / NS / ("3" * 20),
        "other namespace": root / NS / ("4" * 20),
        "user ckpt": root / NS / f"{'5' * 20}.ckpt",
        "foreign ckpt file": root / NS / f"{'6' * 20}.ckpt",
        "user tmp": root / NS / f".tmp-{'7' * 20}-x",
    }
    for path in kept.values():
        path.mkdir()
        (path / "mine.txt").write_text("keep")
    (kept["other hash"] / "meta.json").write_text(json.dumps({"format": 1, "namespace": NS, "hash": "8" * 64}))
    (kept["other namespace"] / "meta.json").write_text(
        json.dumps({"format": 1, "namespace": "eval", "hash": "4" * 64}))
    torch.save({"hash": "9" * 64, "namespace": NS}, kept["foreign ckpt file"] / "checkpoint.pt")
    assert c.clear() == 3  # the entry and both checkpoints
    assert not e.path.exists() and not ck.path.exists() and not empty_ck.exists() and not crashed.exists()
    for why, path in kept.items():
        assert (path / "mine.txt").read_text() == "keep", why


# ---------------------------------------------------------------------------------------
# payload helpers
# ---------------------------------------------------------------------------------------


def test_table_roundtrip_preserves_order_index_dtypes(root: Path) -> None:
    df = pd.DataFrame(
        {
            "zeta": [3, 1, 2],
            "alpha": [0.1, float("nan"), 1 / 3],
            "name": ["a", "b", None],
            "flag": [True, False, True],
            "n": pd.array([1, None, 3], dtype="Int64"),
            "f32": np.array([0.1, 0.2, 0.3], dtype=np.float32),
            "cat": pd.Categorical(["x", "y", "x"]),
        },
        index=pd.Index(["r1", "r2", "r3"], name="run"),
    )
    e = Cache(root).put(NS, {"t": 1}, V, data={"table": table_to_data(df)})
    back = table_from_data(Cache(root).get(NS, {"t": 1}, V).data["table"])
    assert list(back.columns) == ["zeta", "alpha", "name", "flag", "n", "f32", "cat"]
    assert back["zeta"].dtype == np.int64 and back["flag"].dtype == bool
    assert back["alpha"].dtype == np.float64 and back["f32"].dtype == np.float32
    pd.testing.assert_frame_equal(back, df, check_exact=True)
    assert table_from_data(e.data["table"]).equals(df)
    multi = df.set_index(["zeta", "flag"])
    pd.testing.assert_frame_equal(table_from_data(json.loads(json.dumps(table_to_data(multi)))), multi, check_exact=True)


def test_state_dict_roundtrip_gives_identical_outputs(root: Path) -> None:
    torch.manual_seed(0)

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

    model = make()
    model.train()
    model(torch.randn(16, 4))  # update BatchNorm running stats (buffers)
    model.eval()
    Cache(root).put(NS, {"m": 1}, V, tensors=state_dict_tensors(model))
    fresh = make().eval()
    load_state_dict_tensors(fresh, Cache(root).get(NS, {"m": 1}, V).tensors)
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    sd = state_dict_tensors(model)
    assert all(t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad for t in sd.values())
    assert sd["0.weight"].data_ptr() != model[0].weight.data_ptr()  # a clone


# ---------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------


def test_checkpoint_save_load_clear(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = Cache(root)
    ck = c.checkpoint("craft", {"eps": 0.1}, V)
    assert ck.load() is None
    ck.save(1, {"delta": torch.zeros(3)}, {"loss": [1.0]})
    ck.save(2, {"delta": torch.ones(3)}, {"loss": [1.0, 0.5]})
    assert [p.name for p in ck.path.iterdir()] == ["checkpoint.pt"]  # single file, no temp left
    assert ck.path == root / "craft" / (settings_hash("craft", {"eps": 0.1}, V)[:20] + ".ckpt")
    step, tensors, data = Cache(root).checkpoint("craft", {"eps": 0.1}, V).load()
    assert step == 2 and torch.equal(tensors["delta"], torch.ones(3)) and data == {"loss": [1.0, 0.5]}
    assert c.checkpoint("craft", {"eps": 0.2}, V).load() is None  # other settings, other checkpoint
    assert c.entries() == []  # checkpoints are not entries
    monkeypatch.setenv("UBW_NO_CACHE", "1")
    assert ck.load() is None
    monkeypatch.delenv("UBW_NO_CACHE")
    assert ck.clear() and not ck.path.exists() and ck.load() is None and not ck.clear()
    ck.save(5, None, None)
    assert c.clear("craft") == 1 and ck.load() is None


def test_checkpoint_corruption_and_disabled(root: Path) -> None:
    ck = Cache(root).checkpoint("craft", {}, V)
    ck.save(3, {"x": torch.ones(2)}, 1)
    ck.file.write_bytes(ck.file.read_bytes()[:50])
    with pytest.warns(CacheCorruptionWarning):
        assert ck.load() is None
    assert not ck.file.exists()
    off = Cache(tmp := root.parent / "off", enabled=False).checkpoint("craft", {}, V)
    off.save(1, None, None)
    assert off.load() is None and not tmp.exists()


def test_checkpoint_save_is_atomic_and_flushed(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ck = Cache(root).checkpoint("craft", {"eps": 0.3}, V)
    ck.save(1, {"delta": torch.zeros(3)}, {"loss": [1.0]})
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    ck.save(2, {"delta": torch.ones(3)}, {"loss": [0.5]})
    assert synced  # flushed to disk before the move
    assert stat.S_IMODE(ck.file.stat().st_mode) == 0o644

    def power_cut(src, dst):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(os, "replace", power_cut)
    with pytest.raises(KeyboardInterrupt):
        ck.save(3, {"delta": torch.full((3,), 3.0)}, {"loss": []})
    monkeypatch.undo()
    assert [p.name for p in ck.path.iterdir()] == ["checkpoint.pt"]  # the old one, no temporary file
    assert ck.load().step == 2


def test_clear_recognises_checkpoint_temp_files_old_and_new(root: Path) -> None:
    c = Cache(root)
    c.put(NS, {"a": 1}, V, data=1)
    interrupted = {
        "atomic_path": c.checkpoint(NS, {"long": 1}, V).path / ".checkpoint.pt.k3_x9q0a.tmp",
        "before atomic_path": c.checkpoint(NS, {"long": 2}, V).path / ".checkpoint.pt.tmp-abc123",
    }
    for f in interrupted.values():
        f.parent.mkdir()
        f.write_bytes(b"partial")
    foreign = c.checkpoint(NS, {"long": 3}, V).path
    foreign.mkdir()
    (foreign / ".checkpoint.pt.notes.txt").write_text("keep")
    assert c.clear() == 3  # the entry and both interrupted checkpoints
    assert not any(f.parent.exists() for f in interrupted.values())
    assert (foreign / ".checkpoint.pt.notes.txt").read_text() == "keep"


# ---------------------------------------------------------------------------------------
# atomic file writes
# ---------------------------------------------------------------------------------------


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_path_file_appears_only_on_success(tmp_path: Path) -> None:
    path = tmp_path / "new" / "sub" / "out.bin"
    with atomic_path(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".out.bin.") and tmp.name.endswith(".tmp")
        assert tmp.is_file() and tmp.stat().st_size == 0  # created empty; the folder too
        tmp.write_bytes(b"half")
        assert not path.exists()  # nothing at the destination while the block runs
        tmp.write_bytes(b"whole")
    assert path.read_bytes() == b"whole" and _temps(path.parent) == []
    write_text_atomic(path, "é\n")  # replaces an existing file by default
    assert path.read_bytes() == "é\n".encode("utf-8") and _temps(path.parent) == []
    write_bytes_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01" and os.listdir(path.parent) == ["out.bin"]


def test_atomic_path_error_keeps_old_content_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(path) as tmp:
            tmp.write_text("new, half written")
            raise RuntimeError("boom")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]
    with pytest.raises(KeyboardInterrupt):  # also on an interrupt
        with atomic_path(tmp_path / "other.txt") as tmp:
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["out.txt"]


def test_atomic_path_block_may_replace_the_temporary_file(tmp_path: Path) -> None:
    """Writers that open the name themselves (torch.save, an ONNX exporter) or rename onto it."""
    path = tmp_path / "t.pt"
    with atomic_path(path) as tmp:
        torch.save({"x": torch.ones(2)}, tmp)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))
    with atomic_path(path, mode=None) as tmp:
        other = tmp_path / "elsewhere"
        other.write_text("renamed in")
        os.chmod(other, 0o640)
        os.replace(other, tmp)
    assert path.read_text() == "renamed in" and stat.S_IMODE(path.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["t.pt"]


def test_atomic_path_overwrite_false_never_replaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "key.json"
    write_text_atomic(path, "first", overwrite=False)
    assert path.read_text() == "first"
    with pytest.raises(FileExistsError, match="not overwritten"):
        write_text_atomic(path, "second", overwrite=False)
    assert path.read_text() == "first" and os.listdir(tmp_path) == ["key.json"]
    late = tmp_path / "late.json"
    with pytest.raises(FileExistsError, match="created meanwhile"):
        with atomic_path(late, overwrite=False) as tmp:
            tmp.write_text("mine")
            late.write_text("theirs")  # another writer wins the race
    assert late.read_text() == "theirs" and sorted(os.listdir(tmp_path)) == ["key.json", "late.json"]

    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")  # a file system without hard links

    monkeypatch.setattr(os, "link", no_links)
    with pytest.raises(FileExistsError, match="not overwritten"):
        write_text_atomic(path, "third", overwrite=False)
    write_text_atomic(tmp_path / "fresh.json", "checked rename", overwrite=False)
    assert path.read_text() == "first" and (tmp_path / "fresh.json").read_text() == "checked rename"
    assert sorted(os.listdir(tmp_path)) == ["fresh.json", "key.json", "late.json"]


@pytest.mark.parametrize(("mode", "expected"), [(0o644, 0o644), (0o600, 0o600), (0o755, 0o755), (None, 0o600)])
def test_atomic_path_mode(tmp_path: Path, mode, expected: int) -> None:
    path = tmp_path / "f"
    write_bytes_atomic(path, b"x", mode=mode)
    assert stat.S_IMODE(path.stat().st_mode) == expected
    path.chmod(0o444)  # replacing a file gives the new one the requested mode, not the old one's
    write_bytes_atomic(path, b"y", mode=mode)
    assert path.read_bytes() == b"y" and stat.S_IMODE(path.stat().st_mode) == expected


def test_atomic_path_default_mode_and_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    write_bytes_atomic(tmp_path / "a", b"a")
    assert synced == [] and stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o644
    write_bytes_atomic(tmp_path / "b", b"b", fsync=True)
    assert len(synced) == 1 and (tmp_path / "b").read_bytes() == b"b"


def test_a_context_is_part_of_every_key(root: Path) -> None:
    """Results computed in one context (device, precision) are never served in another; no context keeps the keys of
    the settings alone."""
    plain = Cache(root)
    fp32 = Cache(root, context={"device": "cpu", "precision": "fp32"})
    bf16 = Cache(root, context={"device": "cpu", "precision": "bf16"})
    paths = {c.path_for(NS, {"a": 1}, V) for c in (plain, fp32, bf16)}
    assert len(paths) == 3
    assert plain.path_for(NS, {"a": 1}, V).name == settings_hash(NS, {"a": 1}, V)[:20]
    assert fp32.path_for(NS, {"a": 1}, V).name == settings_hash(NS, {"settings": {"a": 1}, "context": {
        "precision": "fp32", "device": "cpu"}}, V)[:20]
    assert Cache(root, context={"precision": "fp32", "device": "cpu"}).path_for(NS, {"a": 1}, V) == \
        fp32.path_for(NS, {"a": 1}, V)  # the context's order does not matter
    first, second = Counter(1.0), Counter(2.0)
    assert fp32.get_or_compute(NS, {"a": 1}, V, first).data["acc"] == 1.0
    assert bf16.get_or_compute(NS, {"a": 1}, V, second).data["acc"] == 2.0  # not fp32's entry
    assert fp32.get_or_compute(NS, {"a": 1}, V, second).data["acc"] == 1.0 and first.calls == second.calls == 1
    assert plain.get(NS, {"a": 1}, V) is None
    assert len(Cache(root).entries(include_data=False)) == 2
    assert repr(fp32).endswith("context={'device': 'cpu', 'precision': 'fp32'})") and repr(plain).endswith("enabled=True)")
