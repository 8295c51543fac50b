"""The prepared GPU run (python -m ubwlib.devicecheck) end to end on the CPU: every part writes its file, a stored
chapter comes back packed, the budget stops chapters, and a failing check is written down without stopping the
run. torch.compile is the identity here (no C++ compilation in a test); on a GPU it captures CUDA graphs."""

from __future__ import annotations

import json
import tarfile

import pytest
import torch

from ubwlib import devicecheck

BENCH = "--profile smoke --steps 1 --plain-steps 1 --cifar-steps 0 --craft-steps 0 --norm-images 0 --rounds 1"
SIZES = dict(model="smallcnn", width=0.125)


@pytest.fixture(autouse=True)
def _no_compilation(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)


def test_the_checks_compare_each_cuda_path_with_its_eager_counterpart():
    dev = torch.device("cpu")
    t = devicecheck.check_compiled_training(dev, n=256, epochs=2, **SIZES)
    assert len(t["off"]["loss"]) == len(t["on"]["loss"]) == 2
    assert t["largest loss gap"] == 0.0  # the identity "compiler": the same computation, the same numbers
    assert t["off"]["accuracy"] == t["on"]["accuracy"] > 0.1  # learnable images: off chance after 2 epochs
    c = devicecheck.check_compiled_crafting(dev, batch=16, **SIZES)
    assert c["cosine"] == pytest.approx(1.0) and c["relative loss gap"] == 0.0 and c["compiled path taken"]
    p = devicecheck.check_predict_proba(dev, n=50, **SIZES)
    assert p == {"largest probability gap": 0.0, "shape": [50, 10]}


def test_a_failing_check_is_written_down_and_the_others_still_run(monkeypatch):
    def broken(device, **sizes):
        raise RuntimeError("no graph for you")

    monkeypatch.setattr(devicecheck, "check_compiled_crafting", broken)
    lines = []
    monkeypatch.setattr(devicecheck, "check_compiled_training", lambda device, **s: {"ok": 1})
    monkeypatch.setattr(devicecheck, "check_predict_proba", lambda device, **s: {"ok": 2})
    out = devicecheck.run_checks(torch.device("cpu"), lines.append)
    assert out["compiled training"] == {"ok": 1} and out["predict_proba"] == {"ok": 2}
    assert out["compiled crafting"].startswith("FAILED") and "no graph for you" in out["compiled crafting"]
    assert [line.split(" (")[0] for line in lines] == ["compiled training", "compiled crafting", "predict_proba"]


def test_main_writes_every_part_and_packs_the_stored_chapter(tmp_path, monkeypatch):
    """As on a lent machine: no .git (git answers "unknown"), the commit given by UBW_COMMIT."""
    monkeypatch.setattr("ubwlib.experiments.provenance.git", lambda *args: "unknown")
    monkeypatch.setenv("UBW_COMMIT", "0123abcd")
    monkeypatch.setattr(devicecheck, "run_checks", lambda dev, write: write("checks ran\n") or {})
    out = tmp_path / "out"
    assert devicecheck.main(["--out", str(out), "--profile", "smoke", "--chapters", "ubw_p", "--bench-args", BENCH,
                             "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["bench.txt", "checks.txt", "env.txt", "log.txt",
                                                      "results.tar.gz"]
    env = (out / "env.txt").read_text()
    assert "torch:" in env and "device: cpu" in env and "commit: 0123abcd" in env
    assert (out / "checks.txt").read_text() == "checks ran\n"
    assert "smoke: smallcnn x0.5" in (out / "bench.txt").read_text()
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
        assert "smoke/ubw_p/table1.json" in names and "smoke/manifest.json" in names
        table = json.load(tar.extractfile("smoke/ubw_p/table1.json"))
    assert table["provenance"]["commit"] == "0123abcd" and table["provenance"]["dirty"] is None
    log = (out / "log.txt").read_text()
    assert "ubw_p: stored in" in log and log.rstrip().endswith("done")


def test_the_budget_stops_chapters_and_a_wrong_chapter_fails_before_anything_runs(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr("ubwlib.book.store_results", lambda *a, **k: ran.append(a))
    out = tmp_path / "out"
    assert devicecheck.main(["--out", str(out), "--profile", "smoke", "--chapters", "ubw_p,ubw_c", "--no-checks",
                             "--bench-args", "skip", "--budget", "10", "--chapter-reserve", "60"]) == 0
    assert ran == [] and "ubw_p and after: skipped" in (out / "log.txt").read_text()
    assert not (out / "results.tar.gz").exists() and not (out / "bench.txt").exists()
    with pytest.raises(ValueError, match="no stored tables for chapter 'no_such_chapter'"):
        devicecheck.main(["--out", str(tmp_path / "o2"), "--chapters", "no_such_chapter", "--no-checks"])
