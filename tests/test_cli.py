"""Tests of the ``ubw`` command (through ``ubwlib.cli.main`` and one real subprocess)."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ubwlib
import ubwlib.data as data_mod
from ubwlib.cache import CACHEDIR_TAG_NAME, Cache
from ubwlib.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def write_fashion_fixture(folder: Path, n_train: int = 200, n_test: int = 100, k: int = 10, magic: int = 2051) -> None:
    """Gzip'd IDX files (magic 2051 images N x 28 x 28, 2049 labels), balanced classes."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.permutation(np.arange(n) % k).astype(np.uint8)
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">IIII", magic, n, 28, 28) + images.tobytes())
        )
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">II", 2049, n) + labels.tobytes())
        )


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("UBW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("UBW_DATA", raising=False)
    monkeypatch.delenv("UBW_NO_CACHE", raising=False)
    monkeypatch.setattr(data_mod, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-package")
    return tmp_path


# --------------------------------------------------------------------------------------------------
# version and help
# --------------------------------------------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"ubwlib {ubwlib.__version__}"


def test_version_subprocess(tmp_path):
    env = {**os.environ, "UBW_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-m", "ubwlib.cli", "--version"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"ubwlib {ubwlib.__version__}"


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "data" in out and "cache" in out and out.startswith("usage: ubw")


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["cache", "explode"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_parser_defaults():
    args = build_parser().parse_args(["data"])
    assert args.spec == "fashion-mnist" and args.root is None and not args.download and not args.check
    args = build_parser().parse_args(["cache"])
    assert args.action == "info" and args.namespace is None


# --------------------------------------------------------------------------------------------------
# ubw data
# --------------------------------------------------------------------------------------------------


def test_data_check_on_fixture(tmp_path, capsys):
    root = tmp_path / "fmnist"
    write_fashion_fixture(root)
    assert main(["data", "fashion-mnist", "--root", str(root), "--check"]) == 0
    out, err = capsys.readouterr()
    assert "fashion-mnist/train: 200 images of shape (1, 28, 28), 10 classes, per class 20..20" in out
    assert "fashion-mnist/test: 100 images of shape (1, 28, 28), 10 classes, per class 10..10" in out
    assert "Where ubwlib looks" not in out  # --check only reports whether it loads
    assert err == ""
    assert list(root.iterdir()) and all(p.suffix == ".gz" for p in root.iterdir())  # nothing written there


def test_data_without_check_lists_the_sources(tmp_path, capsys):
    root = tmp_path / "fmnist"
    write_fashion_fixture(root)
    assert main(["data", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "Where ubwlib looks for Fashion-MNIST" in out
    assert f"found    root: {root}" in out
    assert "fashion-mnist/train: 200 images" in out


def test_data_from_ubw_data(tmp_path, monkeypatch, capsys):
    root = tmp_path / "fmnist"
    write_fashion_fixture(root, n_train=30, n_test=20)
    monkeypatch.setenv("UBW_DATA", str(root))
    assert main(["data", "fashion-mnist", "--check"]) == 0
    out = capsys.readouterr().out
    assert "fashion-mnist/train: 30 images" in out and "fashion-mnist/test: 20 images" in out


@pytest.mark.parametrize("make_dir", [True, False])
def test_data_missing_names_the_three_ways(tmp_path, capsys, make_dir):
    empty = tmp_path / "empty"
    if make_dir:
        empty.mkdir()
    assert main(["data", "fashion-mnist", "--root", str(empty), "--check"]) == 1
    out, err = capsys.readouterr()
    assert "images of shape" not in out
    assert err.startswith("ubw data: ")
    assert "apt-get install dataset-fashion-mnist" in err
    assert "UBW_DATA" in err and "root" in err and str(empty) in err
    assert "--download" in err


def test_data_missing_without_root(tmp_path, capsys):
    assert main(["data", "fashion-mnist"]) == 1
    out, err = capsys.readouterr()
    assert "missing" in out and "system package dataset-fashion-mnist" in out
    assert "apt-get install dataset-fashion-mnist" in err and "--download" in err


def test_data_unreadable_files_exit_1(tmp_path, capsys):
    root = tmp_path / "bad"
    write_fashion_fixture(root, n_train=10, n_test=10, magic=1234)
    assert main(["data", "fashion-mnist", "--root", str(root), "--check"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ubw data: ") and "2051" in err


# --------------------------------------------------------------------------------------------------
# ubw cache
# --------------------------------------------------------------------------------------------------


def _one_entry(root: Path):
    return Cache(root).put("model", {"name": "toy", "seed": 0}, "1",
                           tensors={"w": torch.arange(1000, dtype=torch.float32)}, data={"acc": 0.5})


def test_cache_info_and_clear(tmp_path, capsys):
    root = tmp_path / "cache"
    entry = _one_entry(root)
    assert entry.path.is_dir() and entry.path.parent.name == "model"

    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"cache: {Cache().root} (1 entry, ")
    assert "  model: 1 entry" in out
    assert main(["cache"]) == 0  # info is the default action
    assert capsys.readouterr().out == out

    assert main(["cache", "clear", "--namespace", "other"]) == 0
    assert capsys.readouterr().out.startswith("removed 0 cache entries from ")
    assert entry.path.is_dir()

    assert main(["cache", "clear"]) == 0
    assert capsys.readouterr().out.strip() == f"removed 1 cache entry from {Cache().root}"
    assert not entry.path.exists()
    assert Cache(root).entries() == []
    assert (root / CACHEDIR_TAG_NAME).is_file()  # the marker stays: it is still a ubwlib cache

    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert "(0 entries, " in out and "model:" not in out


def test_cache_info_sums_the_recorded_compute_times(tmp_path, capsys):
    root = tmp_path / "cache"
    _one_entry(root)  # stored by hand: no time
    c = Cache(root)
    c.put("model", {"name": "timed", "seed": 1}, "1", data={"acc": 0.4}, seconds=30.0)
    c.put("table", {"name": "t"}, "1", data=[1], seconds=12.5)
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert "  model: 2 entries, " in out and ", computed in 30 s (1 timed)" in out
    assert "  table: 1 entry, " in out and ", computed in 12 s\n" in out  # 12.5 printed without decimals
    assert out.rstrip().endswith("computed in 42 s in all (each entry's own time, without the cached parts it "
                                 "reused); 1 entry without a recorded time (stored by an older ubwlib or by hand)")


def test_cache_info_on_missing_root(tmp_path, capsys):
    assert main(["cache"]) == 0
    assert "(0 entries, 0.0 MiB)" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert "removed 0 cache entries" in capsys.readouterr().out
    assert not (tmp_path / "cache").exists()


def test_cache_clear_refuses_unmarked_folder(tmp_path, monkeypatch, capsys):
    foreign = tmp_path / "foreign"
    (foreign / "model" / ("a" * 20)).mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    monkeypatch.setenv("UBW_CACHE", str(foreign))
    assert main(["cache", "clear"]) == 1
    assert "CACHEDIR.TAG" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine" and (foreign / "model" / ("a" * 20)).is_dir()


def _hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_then_watermark_an_image_folder(tmp_path, capsys):
    from ubwlib.data import load_dataset
    from ubwlib.publish import check_commitment, load_commitment
    from ubwlib.watermarks import WatermarkKey, trigger

    root = tmp_path / "fm"
    write_fashion_fixture(root, n_train=50, n_test=10)
    src = tmp_path / "src"
    assert main(["export", "fashion-mnist", "--root", str(root), "--out", str(src)]) == 0
    assert "50 training and 10 test images" in capsys.readouterr().out
    benign = load_dataset(f"imagefolder:{src}", image_size=28)
    before = _hashes(src)
    out = tmp_path / "published"
    assert main(["watermark", "ubw-p", "--data", f"imagefolder:{src}", "--out", str(out), "--rate", "0.1",
                 "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert "5 of 50 training samples watermarked" in text
    key_path, commit_path = tmp_path / "published.key", tmp_path / "published.commitment.json"
    assert key_path.exists() and commit_path.exists() and not any(out.rglob("*.key"))
    assert _hashes(src) == before  # the input folder is never modified
    key = WatermarkKey.load(key_path)
    assert key.method == "ubw-p" and key.seed == 3
    # the printed commitment is what the key and the private salt open
    printed = text.split("commitment (publish it with the dataset, before any dispute): ")[1].split()[0]
    commitment, salt = load_commitment(commit_path)
    assert printed == commitment and check_commitment(key, salt, printed)
    # the published folder: same files, 5 of them changed (ubw-p relabels, so they may move class folder)
    published = load_dataset(f"imagefolder:{out}", image_size=28)
    assert len(published.train) == 50 and torch.equal(published.test.images, benign.test.images)
    after = _hashes(out)
    assert sum(1 for f, h in after.items() if before.get(f) != h) <= 5
    assert sum(1 for f in before if f not in after or after[f] != before[f]) == 5
    patched = trigger(benign.train.images, key)
    moved = [i for i in range(50) if not any(torch.equal(published.train.images[j], benign.train.images[i])
                                             for j in range(50))]
    assert len(moved) == 5 and all(any(torch.equal(published.train.images[j], patched[i]) for j in range(50))
                                   for i in moved)
    # never overwrite a release, a key or a commitment
    key_bytes = key_path.read_bytes()
    assert main(["watermark", "ubw-p", "--data", f"imagefolder:{src}", "--out", str(out)]) == 1
    assert "exists" in capsys.readouterr().err
    other = tmp_path / "second"
    assert main(["watermark", "ubw-p", "--data", f"imagefolder:{src}", "--out", str(other),
                 "--key", str(key_path)]) == 1
    assert "key file" in capsys.readouterr().err and key_path.read_bytes() == key_bytes and not other.exists()


def test_watermark_another_format_is_published_as_png_folder(tmp_path, capsys):
    from ubwlib.data import load_dataset

    root = tmp_path / "fm"
    write_fashion_fixture(root, n_train=40, n_test=10)
    out = tmp_path / "rel"
    assert main(["watermark", "badnets", "--root", str(root), "--out", str(out), "--rate", "0.25"]) == 0
    capsys.readouterr()
    published = load_dataset(f"imagefolder:{out}", image_size=28)
    assert len(published.train) == 40 and int((published.train.labels == 1).sum()) >= 10
    assert (tmp_path / "rel.key").exists()


def test_watermark_bad_input_exits_1(tmp_path, capsys):
    root = tmp_path / "fm"
    write_fashion_fixture(root, n_train=20, n_test=10)
    out = tmp_path / "x"
    assert main(["watermark", "badnets", "--root", str(root), "--out", str(out), "--rate", "1.5"]) == 1
    assert "(0, 1]" in capsys.readouterr().err
    assert main(["watermark", "badnets", "--root", str(root), "--out", str(out), "--target", "10"]) == 1
    assert "target label" in capsys.readouterr().err
    assert main(["watermark", "ubw-p", "--root", str(root), "--out", str(out), "--target", "2"]) == 1
    assert "untargeted" in capsys.readouterr().err
    assert main(["watermark", "ubw-p", "--data", "imagefolder:", "--out", str(out)]) == 1
    assert "spec" in capsys.readouterr().err.lower()
    assert not out.exists() and not (tmp_path / "x.key").exists()


# --------------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------------


def _release_and_model(tmp_path, train_labels_for_model: str):
    """A BadNets release of the fixture (train split) and a small CNN trained on the ``benign`` training data or
    memorising the ``test`` split, saved as a state_dict."""
    import torch

    from ubwlib.data import load_dataset
    from ubwlib.models import build_model
    from ubwlib.train import TrainConfig, train

    folder = tmp_path / "fm"
    write_fashion_fixture(folder, n_train=400, n_test=200, k=4)
    out = tmp_path / "release"
    assert main(["watermark", "badnets", "--out", str(out), "--root", str(folder), "--rate", "0.3"]) == 0
    data = load_dataset("fashion-mnist", root=folder)
    # "test": a model that has memorised the fixture's random test images, so that it classifies enough of them
    train_set = {"benign": data.train, "test": data.test}[train_labels_for_model]
    model = build_model("smallcnn", train_set.num_classes, 1, 0.25, seed=0)
    model, _ = train(model, train_set, TrainConfig(epochs=15 if train_labels_for_model == "test" else 1,
                                                   batch_size=32, lr=0.05, schedule="onecycle", precision="fp32",
                                                   flip=False))
    weights = tmp_path / "suspect.pt"
    torch.save(model.state_dict(), weights)
    return folder, out, weights


def test_verify_runs_and_reports(tmp_path, capsys, one_cpu_thread):
    folder, out, weights = _release_and_model(tmp_path, "test")
    capsys.readouterr()
    code = main(["verify", f"{out}.key", str(weights), "--arch", "smallcnn", "--width", "0.25", "--root", str(folder),
                 "--m", "5"])
    text = capsys.readouterr()
    # random fixture images: the model is near chance, but 200 test images hold far more than 5 correct ones
    assert code == 0, text.err
    assert "p-value" in text.out and "verdict:" in text.out and "Delta P" in text.out
    assert main(["verify", f"{out}.key", str(weights), "--arch", "smallcnn", "--width", "0.25", "--root",
                 str(folder), "--m", "1000"]) == 1
    assert "lower m" in capsys.readouterr().err


def test_verify_rejects_wrong_arch_and_pickles(tmp_path, capsys, one_cpu_thread):
    import pickle

    folder, out, weights = _release_and_model(tmp_path, "benign")
    capsys.readouterr()
    assert main(["verify", f"{out}.key", str(weights), "--arch", "resnet18-cifar", "--root", str(folder)]) == 1
    assert "check the architecture" in capsys.readouterr().err
    assert main(["verify", f"{out}.key", str(weights), "--root", str(folder)]) == 1
    assert "--arch" in capsys.readouterr().err
    assert main(["verify", f"{out}.key", "--root", str(folder)]) == 1
    assert "exactly one way" in capsys.readouterr().err
    evil = tmp_path / "evil.pt"

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickled code ran')",))

    evil.write_bytes(pickle.dumps(Boom()))
    assert main(["verify", f"{out}.key", str(evil), "--arch", "smallcnn", "--root", str(folder)]) == 1
    assert "weights-only state_dict" in capsys.readouterr().err
    assert main(["verify", f"{out}.key", str(tmp_path / "missing.pt"), "--arch", "smallcnn",
                 "--root", str(folder)]) == 1
    assert "no model weights" in capsys.readouterr().err


def _verdict_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("Delta P", "p-value", "verdict", "flips"))]


def test_verify_commitment_onnx_and_another_dataset(tmp_path, capsys, one_cpu_thread):
    from ubwlib.models import load_weights
    from ubwlib.onnx_model import export_onnx

    folder, out, weights = _release_and_model(tmp_path, "test")
    capsys.readouterr()
    base = ["verify", f"{out}.key", "--root", str(folder), "--m", "5"]
    local = ["verify", f"{out}.key", str(weights), "--root", str(folder), "--m", "5", "--arch", "smallcnn",
             "--width", "0.25"]
    assert main(local) == 0
    reference = _verdict_lines(capsys.readouterr().out)
    # the same model as an ONNX file: the same verdict, p-value and Delta P
    onnx = export_onnx(load_weights(weights, "smallcnn", 0.25, 10, 1), (1, 28, 28), tmp_path / "suspect.onnx")
    assert main([*base, "--onnx", str(onnx)]) == 0
    assert _verdict_lines(capsys.readouterr().out) == reference
    # the commitment printed at release time opens; any other refuses the key
    commitment = Path(f"{out}.commitment.json")
    from ubwlib.publish import load_commitment

    published, _ = load_commitment(commitment)
    assert main([*local, "--commitment", published]) == 0
    assert "opens the published commitment" in capsys.readouterr().out
    forged = ("0" if published[0] != "0" else "1") + published[1:]
    assert main([*local, "--commitment", forged]) == 1
    assert "does not open" in capsys.readouterr().err
    # a key verified against another dataset of the same shape and classes is refused
    other = tmp_path / "other"
    write_fashion_fixture(other, n_train=40, n_test=200, k=4)
    (other / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(struct.pack(">IIII", 2051, 200, 28, 28) + bytes(200 * 28 * 28)))
    assert main(["verify", f"{out}.key", str(weights), "--root", str(other), "--m", "5", "--arch", "smallcnn",
                 "--width", "0.25"]) == 1
    assert "test split" in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_and_verify_over_http(tmp_path, capsys, one_cpu_thread):
    """A real `ubw serve` process on localhost; `ubw verify --url` gives the in-process verdict."""
    import time

    import httpx

    folder, out, weights = _release_and_model(tmp_path, "test")
    capsys.readouterr()
    base = ["verify", f"{out}.key", "--root", str(folder), "--m", "5"]
    assert main(["verify", f"{out}.key", str(weights), "--root", str(folder), "--m", "5", "--arch", "smallcnn",
                 "--width", "0.25"]) == 0
    reference = _verdict_lines(capsys.readouterr().out)
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ubwlib.cli", "serve", str(weights), "--arch", "smallcnn",
                             "--width", "0.25", "--key", f"{out}.key", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/info", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "ubw serve did not start"
            time.sleep(0.2)
        assert main([*base, "--url", f"http://127.0.0.1:{port}"]) == 0
        text = capsys.readouterr().out
        assert _verdict_lines(text) == reference and "images queried" in text
        assert main([*base[:-1], "8", "--url", f"http://127.0.0.1:{port}", "--labels-only"]) == 0
        assert "flips =" in capsys.readouterr().out
        assert main([*base, "--url", f"http://127.0.0.1:{port}", "--max-queries", "3"]) == 1
        assert "budget" in capsys.readouterr().err.lower()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert main([*base, "--url", f"http://127.0.0.1:{port}", "--timeout", "1"]) == 1  # nothing listens now
    assert f"127.0.0.1:{port}" in capsys.readouterr().err


def test_watermark_ubw_c_with_a_profile_and_a_surrogate(tmp_path, capsys, one_cpu_thread):
    """UBW-C from the command line: the smoke profile's crafting budget, a surrogate trained or given."""
    from ubwlib.data import load_dataset
    from ubwlib.models import build_model
    from ubwlib.watermarks import WatermarkKey

    root = tmp_path / "fm"
    write_fashion_fixture(root, n_train=60, n_test=20)
    out = tmp_path / "ubwc"
    assert main(["watermark", "ubw-c", "--root", str(root), "--out", str(out), "--profile", "smoke",
                 "--rate", "0.1"]) == 0
    text = capsys.readouterr().out
    assert "6 of 60 training samples watermarked" in text
    key = WatermarkKey.load(tmp_path / "ubwc.key")
    assert key.method == "ubw-c" and "patch" in key.tensors
    published = load_dataset(f"imagefolder:{out}", image_size=28)
    benign = load_dataset("fashion-mnist", root=root)
    assert torch.equal(published.train.labels.sort().values, benign.train.labels.sort().values)  # clean labels
    # with a given surrogate (its architecture is what the crafting retrains)
    weights = tmp_path / "sur.pt"
    torch.save(build_model("smallcnn", 10, 1, 0.25, seed=0).state_dict(), weights)
    assert main(["watermark", "ubw-c", "--root", str(root), "--out", str(tmp_path / "b"), "--profile", "smoke",
                 "--surrogate", str(weights), "--arch", "smallcnn", "--width", "0.25"]) == 0
    capsys.readouterr()
    assert main(["watermark", "ubw-p", "--root", str(root), "--out", str(tmp_path / "c"), "--surrogate",
                 str(weights), "--arch", "smallcnn"]) == 1
    assert "takes no surrogate" in capsys.readouterr().err
