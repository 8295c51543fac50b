"""Tests of ubwlib.data against fixtures written in the datasets' real on-disk formats."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ubwlib.data as data
from ubwlib.cache import CACHE_MARKER_NAME, Cache
from ubwlib.cli import main as cli_main
from ubwlib.data import (
    DataIntegrityError,
    DataLayoutError,
    DataNotFoundError,
    DatasetSpecError,
    DatasetSplits,
    ImageDataset,
    describe_sources,
    load_dataset,
)

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test: its own cache, no $UBW_DATA, and a system dir that does not exist."""
    monkeypatch.setenv("UBW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("UBW_DATA", raising=False)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-package")
    return tmp_path


def snapshot(folder: Path) -> dict:
    """Listing of a folder with hashes, sizes and mtimes (to prove nothing was written there)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(folder))] = (digest, st.st_size, st.st_mtime_ns, st.st_mode)
    return out


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST: real IDX files
# --------------------------------------------------------------------------------------------------


def idx_images(arr: np.ndarray) -> bytes:
    n, h, w = arr.shape
    return struct.pack(">IIII", 2051, n, h, w) + arr.astype(np.uint8).tobytes()


def idx_labels(arr: np.ndarray) -> bytes:
    return struct.pack(">II", 2049, len(arr)) + arr.astype(np.uint8).tobytes()


def write_fashion(folder: Path, seed: int, gz: bool = True, n_train: int = 20, n_test: int = 10) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    blobs = {
        IDX_NAMES[0]: idx_images(arrays["train_x"]),
        IDX_NAMES[1]: idx_labels(arrays["train_y"]),
        IDX_NAMES[2]: idx_images(arrays["test_x"]),
        IDX_NAMES[3]: idx_labels(arrays["test_y"]),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in blobs.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (folder / name).write_bytes(blob)
    return arrays


def assert_fashion_equal(splits: DatasetSplits, arrays: dict) -> None:
    assert isinstance(splits, DatasetSplits)
    tr, te = splits.train, splits.test
    assert tr.images.dtype == torch.uint8 and tr.labels.dtype == torch.int64
    assert tr.images.shape == (len(arrays["train_x"]), 1, 28, 28)
    assert te.images.shape == (len(arrays["test_x"]), 1, 28, 28)
    assert tr.images.is_contiguous()
    assert torch.equal(tr.images[:, 0], torch.from_numpy(arrays["train_x"]))
    assert torch.equal(tr.labels, torch.from_numpy(arrays["train_y"]).long())
    assert torch.equal(te.images[:, 0], torch.from_numpy(arrays["test_x"]))
    assert torch.equal(te.labels, torch.from_numpy(arrays["test_y"]).long())
    assert tr.name == "fashion-mnist/train" and te.name == "fashion-mnist/test"
    assert tr.classes == te.classes and len(tr.classes) == 10
    assert tr.classes[0] == "T-shirt/top" and tr.classes[9] == "Ankle boot"


def fashion_cache(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "data" / "fashion-mnist"


def cache_files(tmp_path: Path) -> list[str]:
    """Every file and link under the test's cache root, relative to it."""
    root = tmp_path / "cache"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir() or p.is_symlink())


def test_fashion_gz_round_trip_leaves_source_untouched(tmp_path):
    src = tmp_path / "fmnist"
    arrays = write_fashion(src, seed=1, gz=True)
    before = snapshot(src)
    splits = load_dataset("fashion-mnist", root=src)
    assert_fashion_equal(splits, arrays)
    assert snapshot(src) == before  # nothing written into the user's folder
    # the cache holds the decoded memo only: no decompressed copies, no links
    (memo,) = fashion_cache(tmp_path).glob("decoded-*.pt")
    assert [f for f in cache_files(tmp_path) if f.startswith("data/")] == [str(memo.relative_to(tmp_path / "cache"))]
    # warm: same result, from the memo, which is not rewritten
    mtime = memo.stat().st_mtime_ns
    assert_fashion_equal(load_dataset("fashionmnist", root=src), arrays)
    assert memo.stat().st_mtime_ns == mtime
    assert snapshot(src) == before


def test_fashion_raw_flat_and_torchvision_layouts(tmp_path):
    flat = tmp_path / "flat"
    a = write_fashion(flat, seed=2, gz=False)
    before = snapshot(flat)
    assert_fashion_equal(load_dataset("fashion-mnist", root=flat), a)
    assert snapshot(flat) == before

    tv = tmp_path / "tv"
    b = write_fashion(tv / "FashionMNIST" / "raw", seed=3, gz=False)
    before = snapshot(tv)
    assert_fashion_equal(load_dataset("fashion-mnist", root=tv), b)
    assert snapshot(tv) == before

    tvgz = tmp_path / "tvgz"
    c = write_fashion(tvgz / "FashionMNIST" / "raw", seed=4, gz=True)
    before = snapshot(tvgz)
    assert_fashion_equal(load_dataset("fashion-mnist", root=tvgz), c)
    assert snapshot(tvgz) == before
    assert len(list(fashion_cache(tmp_path).iterdir())) == 3  # one memo per source, nothing else


def test_fashion_read_only_source_folder(tmp_path):
    """The source folder and files may be read-only: they are only ever read (and never changed)."""
    src = tmp_path / "ro"
    arrays = write_fashion(src, seed=8, gz=True)
    (src / IDX_NAMES[1]).write_bytes(gzip.decompress((src / f"{IDX_NAMES[1]}.gz").read_bytes()))  # raw + .gz mix
    (src / f"{IDX_NAMES[1]}.gz").unlink()
    before = snapshot(src)
    for p in src.iterdir():
        p.chmod(0o444)
    src.chmod(0o555)
    try:
        assert_fashion_equal(load_dataset("fashion-mnist", root=src), arrays)
        assert_fashion_equal(load_dataset("fashion-mnist", root=src), arrays)  # from the memo
    finally:
        src.chmod(0o755)
    after = snapshot(src)
    assert {k: v[:3] for k, v in after.items()} == {k: v[:3] for k, v in before.items()}  # content, size, mtime
    expected = sorted(n if n == IDX_NAMES[1] else f"{n}.gz" for n in IDX_NAMES)
    assert sorted(after) == sorted(before) == expected  # nothing added


def test_fashion_lookup_order(tmp_path, monkeypatch):
    explicit, env, system = tmp_path / "explicit", tmp_path / "env", tmp_path / "system"
    a = write_fashion(explicit, seed=10)
    b = write_fashion(env, seed=11)
    c = write_fashion(system, seed=12, gz=True)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", system)
    monkeypatch.setenv("UBW_DATA", str(env))
    assert_fashion_equal(load_dataset("fashion-mnist", root=explicit), a)  # root beats UBW_DATA
    assert_fashion_equal(load_dataset("fashion-mnist"), b)  # UBW_DATA beats the system dir
    labels = [label for label, _p, _f in describe_sources("fashion-mnist")]
    assert labels[:2] == ["$UBW_DATA", "system package dataset-fashion-mnist"]
    monkeypatch.setenv("UBW_DATA", str(tmp_path / "empty"))  # UBW_DATA without the data falls through
    assert_fashion_equal(load_dataset("fashion-mnist"), c)
    monkeypatch.delenv("UBW_DATA")
    assert_fashion_equal(load_dataset("fashion-mnist"), c)
    found = [(label, found) for label, _p, found in describe_sources("fashion-mnist")]
    assert found == [("system package dataset-fashion-mnist", True), ("download cache", False)]


def test_fashion_memo_misses_when_a_gz_source_changes(tmp_path):
    src = tmp_path / "fmnist"
    write_fashion(src, seed=20)
    load_dataset("fashion-mnist", root=src)
    b = write_fashion(src, seed=21)  # same sizes, new content
    for name in IDX_NAMES:
        os.utime(src / f"{name}.gz", ns=(1_000_000_000, 1_000_000_000))
    assert_fashion_equal(load_dataset("fashion-mnist", root=src), b)


def _no_decoding(*args, **kwargs):
    raise AssertionError("an IDX file was decoded again")


def test_fashion_decoded_once_then_memoised(tmp_path, monkeypatch):
    src = tmp_path / "fmnist"
    arrays = write_fashion(src, seed=22)
    before = snapshot(src)
    assert_fashion_equal(load_dataset("fashion-mnist", root=src), arrays)
    memos = list(fashion_cache(tmp_path).glob("decoded-*.pt"))
    assert len(memos) == 1
    monkeypatch.setattr(data.fashion, "read_idx", _no_decoding)
    assert_fashion_equal(load_dataset("fashion-mnist", root=src), arrays)  # from the memo
    sized = load_dataset("fashion-mnist", root=src, image_size=32)  # resizing applies after the memo
    assert sized.train.images.shape == (20, 1, 32, 32)
    assert snapshot(src) == before


def test_fashion_memo_misses_when_a_source_changes_with_same_size_and_mtime(tmp_path):
    src = tmp_path / "fmnist"
    write_fashion(src, seed=23, gz=False)
    load_dataset("fashion-mnist", root=src)
    stamps = {n: (src / n).stat() for n in IDX_NAMES}
    b = write_fashion(src, seed=24, gz=False)  # same sizes, new content...
    for n, st in stamps.items():  # ...and the old mtimes put back
        os.utime(src / n, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert_fashion_equal(load_dataset("fashion-mnist", root=src), b)


@pytest.mark.parametrize("damage", ["truncate", "foreign"])
def test_fashion_unusable_memo_is_decoded_again(tmp_path, damage):
    src = tmp_path / "fmnist"
    arrays = write_fashion(src, seed=25)
    load_dataset("fashion-mnist", root=src)
    (memo,) = fashion_cache(tmp_path).glob("decoded-*.pt")
    if damage == "truncate":
        memo.write_bytes(memo.read_bytes()[:100])
    else:
        torch.save({"train_images": torch.zeros(3)}, memo)
    assert_fashion_equal(load_dataset("fashion-mnist", root=src), arrays)
    assert data.fashion._read_decoded(memo) is not None  # rewritten whole


def test_fashion_missing_names_three_ways_and_searched_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("UBW_DATA", str(tmp_path / "my-data"))
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("fashion-mnist")
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "sudo apt-get install dataset-fashion-mnist" in msg  # (a)
    assert "root=" in msg and "UBW_DATA" in msg  # (b)
    assert "download=True" in msg and "ubw data fashion-mnist --download" in msg  # (c)
    assert str(tmp_path / "my-data") in msg and str(tmp_path / "no-system-package") in msg
    assert "train-images-idx3-ubyte" in msg


def test_fashion_explicit_root_is_not_silently_replaced(tmp_path, monkeypatch):
    system = tmp_path / "system"
    write_fashion(system, seed=5)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", system)
    with pytest.raises(DataNotFoundError, match="root=.*given explicitly"):
        load_dataset("fashion-mnist", root=tmp_path / "typo")


def test_fashion_failed_download_is_data_not_found(tmp_path, monkeypatch):
    def offline(folder):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(data.fashion, "_download_fashion", offline)
    with pytest.raises(DataNotFoundError, match="downloading Fashion-MNIST .* failed"):
        load_dataset("fashion-mnist", download=True)


def test_fashion_download_is_read_like_any_other_copy(tmp_path, monkeypatch):
    """What torchvision downloads (``.gz`` and extracted raw files in FashionMNIST/raw) is read by the IDX reader."""
    arrays = {}

    def fake_download(folder):
        raw = folder / "FashionMNIST" / "raw"
        arrays.update(write_fashion(raw, seed=9, gz=True))
        write_fashion(raw, seed=9, gz=False)

    monkeypatch.setattr(data.fashion, "_download_fashion", fake_download)
    assert_fashion_equal(load_dataset("fashion-mnist", download=True), arrays)
    assert describe_sources("fashion-mnist")[-1] == (
        "download cache", tmp_path / "cache" / "data" / "torchvision" / "FashionMNIST" / "raw", True
    )
    monkeypatch.setattr(data.fashion, "_download_fashion", _no_decoding)
    assert_fashion_equal(load_dataset("fashion-mnist", download=True), arrays)  # found: no second download


def test_fashion_image_size(tmp_path):
    src = tmp_path / "fm"
    write_fashion(src, seed=7)
    splits = load_dataset("fashion-mnist", root=src, image_size=32)
    assert splits.train.images.shape == (20, 1, 32, 32)
    assert splits.train.name == "fashion-mnist@32/train"


# ---- the IDX reader -------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("shape", [(0,), (7,), (3, 5), (4, 28, 28), (2, 3, 4, 5)])
def test_idx_reader_round_trips_exact_arrays(tmp_path, gz, shape):
    arr = np.random.default_rng(len(shape)).integers(0, 256, shape, dtype=np.uint8)
    blob = struct.pack(f">BBBB{len(shape)}I", 0, 0, 0x08, len(shape), *shape) + arr.tobytes()
    path = tmp_path / ("x.idx.gz" if gz else "x.idx")
    path.write_bytes(gzip.compress(blob) if gz else blob)
    got = data.fashion.read_idx(path, ndim=len(shape))
    assert got.dtype == np.uint8 and got.shape == shape and np.array_equal(got, arr)
    assert got.flags.writeable and got.flags.c_contiguous  # torch.from_numpy takes it without a warning


IDX_DAMAGE = {
    # name: (how to change the train images' IDX bytes, words the message must contain)
    "bad-magic": (lambda b: b"\x01\x02" + b[2:], "magic number is 16910339, expected 2051"),
    "html": (lambda b: b"<html>404</html>", "magic number is"),
    "dtype-code": (lambda b: b[:2] + b"\x0d" + b[3:], "data type code is 0x0D (float), expected 0x08"),
    "unknown-dtype-code": (lambda b: b[:2] + b"\x07" + b[3:], "magic number is 1795, expected 2051"),
    "ndim": (lambda b: b[:3] + b"\x02" + b[4:], "announces 2 dimensions, expected 3"),
    "short-header": (lambda b: b[:10], "too few for its IDX header (truncated)"),
    "tiny": (lambda b: b[:3], "too few for an IDX header"),
    "empty": (lambda b: b"", "holds 0 bytes"),
    "truncated": (lambda b: b[:-300], "20 x 28 x 28 values (15696 bytes in all) but it holds 15396 bytes"),
    "trailing": (lambda b: b + b"\x00", "with trailing bytes"),
}


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("how", sorted(IDX_DAMAGE))
def test_idx_damage_is_a_data_integrity_error_naming_the_file(tmp_path, how, gz):
    src = tmp_path / "bad"
    write_fashion(src, seed=6, gz=gz)
    bad = src / (f"{IDX_NAMES[0]}.gz" if gz else IDX_NAMES[0])
    change, words = IDX_DAMAGE[how]
    blob = change(gzip.decompress(bad.read_bytes()) if gz else bad.read_bytes())
    bad.write_bytes(gzip.compress(blob) if gz else blob)
    before = snapshot(src)
    with pytest.raises(DataIntegrityError) as info:
        load_dataset("fashion-mnist", root=src)
    msg = str(info.value)
    assert not isinstance(info.value, DataNotFoundError)
    assert f"Fashion-MNIST file {bad} is damaged: " in msg and words in msg
    assert ("(after decompression)" in msg) == gz
    assert "ubwlib has not changed it" in msg and "re-download" in msg
    assert snapshot(src) == before
    assert not list(fashion_cache(tmp_path).glob("decoded-*.pt"))


def test_fashion_bad_idx_magic_is_a_clear_error(tmp_path):
    src = tmp_path / "bad"
    write_fashion(src, seed=6, gz=False)
    (src / IDX_NAMES[0]).write_bytes(struct.pack(">IIII", 1234, 20, 28, 28) + bytes(20 * 784))
    with pytest.raises(DataIntegrityError, match="2051/2049"):
        load_dataset("fashion-mnist", root=src)


# ---- damaged files: errors that name the file and the fix, and never touch it ----------------------


def _damage_gz(path: Path, how: str) -> None:
    blob = path.read_bytes()
    if how == "truncated":  # EOFError inside gzip
        path.write_bytes(blob[: len(blob) // 2])
    elif how == "bad-deflate":  # zlib.error: the deflate stream is garbage (header and trailer kept)
        path.write_bytes(blob[:10] + b"\xff" * (len(blob) - 18) + blob[-8:])
    elif how == "bad-crc":  # gzip.BadGzipFile: CRC check failed
        path.write_bytes(blob[:-8] + bytes(b ^ 0xFF for b in blob[-8:-4]) + blob[-4:])
    elif how == "not-gzip":  # gzip.BadGzipFile: not a gzipped file
        path.write_bytes(b"<html>404 Not Found</html>")
    elif how == "empty":  # decompresses to nothing: no IDX header
        path.write_bytes(b"")
    elif how == "tiny":  # shorter than a gzip trailer
        path.write_bytes(b"\x1f\x8b")
    elif how == "short-payload":  # a valid gzip whose IDX payload is cut
        path.write_bytes(gzip.compress(gzip.decompress(blob)[:-100]))
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "bad-deflate", "bad-crc", "not-gzip", "empty", "tiny", "short-payload"])
def test_fashion_damaged_gz_names_the_file_and_the_fix(tmp_path, how):
    src = tmp_path / "fmnist"
    write_fashion(src, seed=30)
    bad = src / f"{IDX_NAMES[2]}.gz"
    _damage_gz(bad, how)
    before = snapshot(src)
    with pytest.raises(DataIntegrityError) as info:
        load_dataset("fashion-mnist", root=src)
    msg = str(info.value)
    assert not isinstance(info.value, DataNotFoundError)
    assert str(bad) in msg and "damaged" in msg
    assert "ubwlib has not changed it" in msg and "re-download" in msg
    assert snapshot(src) == before  # the user's (damaged) file is neither modified nor deleted
    assert not list(fashion_cache(tmp_path).glob("decoded-*.pt"))  # nothing memoised
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # no temporary left behind
    # the CLI reports it on one line (DataIntegrityError is what `ubw data` catches)
    assert cli_main(["data", "fashion-mnist", "--root", str(src), "--check"]) == 1
    # repaired: loads
    arrays = write_fashion(src, seed=31)
    assert_fashion_equal(load_dataset("fashion-mnist", root=src), arrays)


def test_fashion_damage_fix_depends_on_where_the_files_are(tmp_path, monkeypatch, capsys):
    system = tmp_path / "system"
    write_fashion(system, seed=32)
    _damage_gz(system / f"{IDX_NAMES[0]}.gz", "truncated")
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", system)
    with pytest.raises(DataIntegrityError, match=r"apt-get install --reinstall dataset-fashion-mnist") as info:
        load_dataset("fashion-mnist")
    assert str(system / f"{IDX_NAMES[0]}.gz") in str(info.value)
    assert cli_main(["data", "fashion-mnist", "--check"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ubw data: ") and "--reinstall" in err and "Traceback" not in err

    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "none")
    downloaded = tmp_path / "cache" / "data" / "torchvision" / "FashionMNIST" / "raw"
    write_fashion(downloaded, seed=33)
    _damage_gz(downloaded / f"{IDX_NAMES[1]}.gz", "not-gzip")
    with pytest.raises(DataIntegrityError) as info:
        load_dataset("fashion-mnist")
    msg = str(info.value)
    assert str(downloaded / f"{IDX_NAMES[1]}.gz") in msg
    assert f"delete ubwlib's downloaded copy {downloaded}" in msg and "download=True" in msg


def test_fashion_damaged_raw_idx_files_name_the_file(tmp_path):
    src = tmp_path / "raw"
    write_fashion(src, seed=34, gz=False)
    before = snapshot(src)
    img = src / IDX_NAMES[0]
    blob = img.read_bytes()
    img.write_bytes(blob[:-300])  # truncated payload
    with pytest.raises(DataIntegrityError, match="truncated") as info:
        load_dataset("fashion-mnist", root=src)
    assert str(img) in str(info.value)
    img.write_bytes(blob[:10])  # truncated header
    with pytest.raises(DataIntegrityError, match="too few") as info:
        load_dataset("fashion-mnist", root=src)
    assert str(img) in str(info.value)
    img.write_bytes(blob)
    # labels that do not match the images in number, or in range
    lab = src / IDX_NAMES[1]
    lab.write_bytes(idx_labels(np.zeros(19, dtype=np.uint8)))
    with pytest.raises(DataIntegrityError, match="20 images.*19 labels") as info:
        load_dataset("fashion-mnist", root=src)
    assert str(img) in str(info.value) and str(lab) in str(info.value)
    lab.write_bytes(idx_labels(np.full(20, 200, dtype=np.uint8)))
    with pytest.raises(DataIntegrityError, match="label values up to 200") as info:
        load_dataset("fashion-mnist", root=src)
    assert str(lab) in str(info.value)
    assert not list(fashion_cache(tmp_path).glob("decoded-*.pt"))
    assert snapshot(src) != before  # (the test itself changed the files)


# ---- the memo's temporary files -------------------------------------------------------------------


def test_fashion_stale_memo_temps_are_removed_fresh_ones_kept(tmp_path):
    src = tmp_path / "fmnist"
    arrays = write_fashion(src, seed=36)
    load_dataset("fashion-mnist", root=src)
    fm = fashion_cache(tmp_path)
    (memo,) = fm.glob("decoded-*.pt")
    memo.unlink()  # as if the process was killed (SIGKILL: no cleanup) while writing the memo
    hours_ago = time.time() - 2 * 3600
    stale = fm / f".{memo.name}.k2j4h5x8.tmp"  # atomic_path's name: .<name>.<random>.tmp
    stale.write_bytes(b"PK partial")
    legacy = fm / f".{memo.name}.ubwtmp-0123abcd-4242-deadbeef.tmp"  # an older version's name
    legacy.write_bytes(b"PK partial")
    for p in (stale, legacy):
        os.utime(p, (hours_ago, hours_ago))
    live = fm / f".{memo.name}.q9w8e7r6.tmp"  # a writer that may still be running
    live.write_bytes(b"in progress")
    not_a_temp = fm / "notes.tmp"  # not a hidden temporary: never touched
    not_a_temp.write_bytes(b"mine")
    os.utime(not_a_temp, (hours_ago, hours_ago))

    assert_fashion_equal(load_dataset("fashion-mnist", root=src), arrays)
    assert not stale.exists() and not legacy.exists()
    assert live.exists() and not_a_temp.exists()
    assert memo.is_file()


def test_fashion_interrupted_memo_write_leaves_no_temp(tmp_path, monkeypatch):
    src = tmp_path / "fmnist"
    arrays = write_fashion(src, seed=37)

    def killed(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK partial")
        raise KeyboardInterrupt("killed mid-write")

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):  # (undo() would also undo `isolated`)
        m.setattr(torch, "save", killed)
        load_dataset("fashion-mnist", root=src)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]
    assert not list(fashion_cache(tmp_path).glob("decoded-*.pt"))
    assert_fashion_equal(load_dataset("fashion-mnist", root=src), arrays)
    assert len(list(fashion_cache(tmp_path).glob("decoded-*.pt"))) == 1


def test_fashion_read_only_cache_still_loads(tmp_path, monkeypatch):
    src = tmp_path / "fmnist"
    arrays = write_fashion(src, seed=38)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data.memo, "atomic_path", full)
    assert_fashion_equal(load_dataset("fashion-mnist", root=src), arrays)  # decoded, not memoised
    assert not list(fashion_cache(tmp_path).glob("decoded-*.pt"))


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_debian_fashion_mnist(monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", REAL_FASHION)
    splits = load_dataset("fashion-mnist")
    assert len(splits.train) == 60000 and len(splits.test) == 10000
    assert splits.train.image_shape == (1, 28, 28)
    assert splits.train.class_counts().tolist() == [6000] * 10
    assert splits.test.class_counts().tolist() == [1000] * 10
    # the content fingerprints the experiment cache is keyed on (as decoded by torchvision before)
    from ubwlib.watermarks.base import dataset_fingerprint

    assert dataset_fingerprint(splits.train) == "ec4409109aa256aac73662970822581d4098eac95abfe958644770ad14eb0f90"
    assert dataset_fingerprint(splits.test) == "38adbc957d98f7cb6a130a0612c4315c087e7306eb3e26336428da3217e331c3"


# --------------------------------------------------------------------------------------------------
# CIFAR-10: real python-pickle batches (written as Python 2 pickles, like the official release)
# --------------------------------------------------------------------------------------------------


class Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` (BINSTRING opcodes), like the official CIFAR-10 files:
    read back with ``encoding='bytes'`` they are bytes, with ``encoding='latin1'`` they are str."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2str(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2str


def py2_dump(obj, path: Path) -> None:
    with open(path, "wb") as f:
        Py2Pickler(f, protocol=2).dump(obj)


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar(root: Path, seed: int = 0, per_batch: int = 4, n_test: int = 5) -> dict:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, train_y = [], []
    for b in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)  # CHW-planar rows
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        py2_dump(
            {
                b"batch_label": f"training batch {b} of 5".encode(),
                b"labels": y,
                b"data": x,
                b"filenames": [f"img_{b}_{i}.png".encode() for i in range(per_batch)],
            },
            folder / f"data_batch_{b}",
        )
        train_x.append(x)
        train_y += y
    tx = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    ty = [int(v) for v in rng.integers(0, 10, n_test)]
    py2_dump({b"batch_label": b"testing batch 1 of 1", b"labels": ty, b"data": tx,
              b"filenames": [f"t{i}.png".encode() for i in range(n_test)]}, folder / "test_batch")
    py2_dump({b"num_cases_per_batch": per_batch, b"label_names": [c.encode() for c in CIFAR_CLASSES],
              b"num_vis": 3072}, folder / "batches.meta")
    return {"train_x": np.concatenate(train_x), "train_y": train_y, "test_x": tx, "test_y": ty}


def test_cifar_fixture_is_in_the_official_format(tmp_path):
    write_cifar(tmp_path / "c")
    with open(tmp_path / "c" / "cifar-10-batches-py" / "batches.meta", "rb") as f:
        meta = pickle.load(f, encoding="bytes")  # how the CIFAR-10 web page reads it
    assert b"label_names" in meta and meta[b"label_names"][0] == b"airplane"
    with open(tmp_path / "c" / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (4, 3072)


def test_cifar_pixel_exact_without_integrity_check(tmp_path):
    root = tmp_path / "c"
    arrays = write_cifar(root, seed=3)
    before = snapshot(root)
    splits = load_dataset("cifar10", root=root, check_integrity=False)
    tr, te = splits.train, splits.test
    assert tr.images.shape == (20, 3, 32, 32) and te.images.shape == (5, 3, 32, 32)
    assert tr.images.dtype == torch.uint8 and tr.images.is_contiguous()
    assert torch.equal(tr.images, torch.from_numpy(arrays["train_x"].reshape(-1, 3, 32, 32)))
    assert torch.equal(te.images, torch.from_numpy(arrays["test_x"].reshape(-1, 3, 32, 32)))
    assert tr.labels.tolist() == arrays["train_y"] and te.labels.tolist() == arrays["test_y"]
    assert tr.classes == tuple(CIFAR_CLASSES)
    assert (tr.name, te.name) == ("cifar10/train", "cifar10/test")
    assert snapshot(root) == before
    # a root that *is* cifar-10-batches-py, and $UBW_DATA, work too
    again = load_dataset("cifar10", root=root / "cifar-10-batches-py", check_integrity=False)
    assert torch.equal(again.train.images, tr.images)


def test_cifar_via_ubw_data(tmp_path, monkeypatch):
    root = tmp_path / "shared"
    arrays = write_cifar(root, seed=4)
    monkeypatch.setenv("UBW_DATA", str(root))
    splits = load_dataset("cifar-10", check_integrity=False)
    assert splits.test.labels.tolist() == arrays["test_y"]
    assert describe_sources("cifar10")[0] == ("$UBW_DATA", root / "cifar-10-batches-py", True)


def test_cifar_integrity_check_fails_clearly(tmp_path):
    write_cifar(tmp_path / "c")
    with pytest.raises(DataIntegrityError, match="check_integrity=False"):
        load_dataset("cifar10", root=tmp_path / "c")


def test_cifar_missing(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("cifar10")
    msg = str(info.value)
    assert "root=" in msg and "UBW_DATA" in msg and "download=True" in msg
    assert str(tmp_path / "cache" / "data" / "torchvision") in msg


# --------------------------------------------------------------------------------------------------
# Image folders, Tiny-ImageNet layout, presets, caching
# --------------------------------------------------------------------------------------------------


def save_img(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0, color=None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    w, h = size
    if color is not None:
        arr = np.empty((h, w, channels), dtype=np.uint8)
        arr[...] = color
    else:
        arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    Image.fromarray(arr[..., 0] if mode == "L" else arr, mode=mode).save(path)
    return arr


@pytest.fixture
def folder_ds(tmp_path):
    root = tmp_path / "pets"
    arrs = {}
    # classes created out of order; sorted order is ant, cat, dog
    arrs["dog0"] = save_img(root / "train" / "dog" / "a.png", (64, 64), seed=1)
    save_img(root / "train" / "dog" / "b.png", (20, 10), mode="RGBA", seed=2)
    save_img(root / "train" / "cat" / "x.png", (10, 12), mode="L", seed=3)
    save_img(root / "train" / "cat" / "sub" / "y.png", (40, 30), color=(10, 200, 30))
    save_img(root / "train" / "ant" / "z.png", (33, 17), seed=4)
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    save_img(root / "val" / "ant" / "v.png", (64, 64), seed=5)
    save_img(root / "val" / "dog" / "w.png", (16, 16), color=(255, 0, 128))
    return root, arrs


def test_imagefolder_layout_resize_and_class_order(folder_ds, tmp_path):
    root, arrs = folder_ds
    before = snapshot(root)
    splits = load_dataset(f"imagefolder:{root}")
    tr, te = splits.train, splits.test
    assert tr.classes == ("ant", "cat", "dog") == te.classes
    assert tr.labels.tolist() == [0, 1, 1, 2, 2]  # class order, then sorted walk (cat/sub/y after cat/x)
    assert te.labels.tolist() == [0, 2]  # val classes mapped onto train's list
    assert tr.images.shape == (5, 3, 64, 64) and te.images.shape == (2, 3, 64, 64)
    assert tr.images.dtype == torch.uint8
    assert torch.equal(tr.images[3], torch.from_numpy(arrs["dog0"]).permute(2, 0, 1))  # 64x64: exact
    gray = tr.images[1]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # L -> RGB
    assert (tr.images[2] == torch.tensor([10, 200, 30]).view(3, 1, 1)).all()  # constant stays constant
    assert (te.images[1] == torch.tensor([255, 0, 128]).view(3, 1, 1)).all()
    assert tr.name == f"imagefolder:{root.name}/train"
    assert snapshot(root) == before
    small = load_dataset(f"imagefolder:{root}", image_size=16)
    assert small.train.images.shape == (5, 3, 16, 16)
    assert small.train.name == f"imagefolder:{root.name}@16/train"
    two = load_dataset(f"imagefolder:{root}", max_classes=2)
    assert two.train.classes == ("ant", "cat") and two.test.labels.tolist() == [0]
    assert list((tmp_path / "cache" / "data" / "imagefolder").glob("*.pt"))


def test_imagefolder_val_with_unknown_class(folder_ds):
    root, _ = folder_ds
    save_img(root / "val" / "zebra" / "q.png", (8, 8))
    with pytest.raises(ValueError, match="zebra"):
        load_dataset(f"imagefolder:{root}")


def test_imagefolder_test_split_when_no_val(folder_ds):
    root, _ = folder_ds
    (root / "val").rename(root / "test")
    splits = load_dataset("imagefolder", root=root)
    assert splits.test.labels.tolist() == [0, 2]


def test_tiny_imagenet_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    for k, wnid in enumerate(["n02", "n01", "n03"]):
        for i in range(2):
            save_img(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", (64, 64), seed=10 * k + i)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t10\t10\n")
    ann = []
    for i, wnid in enumerate(["n03", "n01", "n02", "n01"]):
        save_img(root / "val" / "images" / f"val_{i}.JPEG", (64, 64), seed=100 + i)
        ann.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    splits = load_dataset(f"imagefolder:{root}")
    assert splits.train.classes == ("n01", "n02", "n03")
    assert splits.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert splits.test.labels.tolist() == [2, 0, 1, 0]
    assert splits.test.images.shape == (4, 3, 64, 64)
    preset = load_dataset(f"imagenet50:{root}")  # fewer than 50 classes: all kept
    assert preset.train.classes == ("n01", "n02", "n03") and preset.train.name == "imagenet50/train"
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match="n99"):
        load_dataset(f"imagefolder:{root}")


def test_imagenet50_preset_keeps_first_50_sorted(tmp_path):
    root = tmp_path / "subset"
    names = [f"n{k:03d}" for k in range(52)]
    for k in np.random.default_rng(0).permutation(52):  # creation order shuffled
        save_img(root / "train" / names[k] / "a.png", (4, 4), color=(k, k, k))
        save_img(root / "val" / names[k] / "b.png", (4, 4), color=(k, k, k))
    assert data.IMAGEFOLDER_PRESETS["imagenet50"] == {"max_classes": 50, "image_size": 64}
    splits = load_dataset(f"imagenet50:{root}")
    assert splits.train.classes == tuple(names[:50]) and splits.num_classes == 50
    assert splits.train.images.shape == (50, 3, 64, 64) and len(splits.test) == 50
    assert splits.test.labels.tolist() == list(range(50))
    assert (splits.train.images[7] == 7).all()
    assert splits.train.name == "imagenet50/train"


def test_imagefolder_cache_skips_decoding_and_invalidates(folder_ds, monkeypatch):
    root, _ = folder_ds
    first = load_dataset(f"imagefolder:{root}")

    def no_decode(path, size):
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(data.imagefolder, "_decode_image", no_decode)
    second = load_dataset(f"imagefolder:{root}")
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels)
    assert first.train.classes == second.train.classes
    # a changed file invalidates the cache (the decoder is called again)
    save_img(root / "train" / "ant" / "z.png", (33, 18), seed=9)
    with pytest.raises(AssertionError, match="decoded"):
        load_dataset(f"imagefolder:{root}")


def _truncated_png(path: Path) -> None:
    save_img(path, (64, 64), seed=99)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])


@pytest.mark.parametrize("how", ["truncated", "fake", "empty", "header-only"])
def test_imagefolder_unreadable_image_names_the_file(folder_ds, tmp_path, how):
    root, _ = folder_ds
    bad = root / "train" / "cat" / "broken.png"
    if how == "truncated":
        _truncated_png(bad)
    elif how == "fake":
        bad.write_text("this is not a PNG")
    elif how == "empty":
        bad.write_bytes(b"")
    else:
        save_img(bad, (8, 8))
        bad.write_bytes(bad.read_bytes()[:30])
    before = snapshot(root)
    with pytest.raises(DataIntegrityError) as info:
        load_dataset(f"imagefolder:{root}")
    msg = str(info.value)
    assert str(bad) in msg and "could not be decoded" in msg and "ubwlib has not changed" in msg
    assert snapshot(root) == before
    assert not list((tmp_path / "cache" / "data" / "imagefolder").glob("*.pt"))
    assert cli_main(["data", f"imagefolder:{root}", "--check"]) == 1
    bad.unlink()  # the user fixes it
    assert len(load_dataset(f"imagefolder:{root}").train) == 5


def test_imagefolder_lists_every_unreadable_image(folder_ds):
    root, _ = folder_ds
    bads = [root / "train" / "dog" / "c.png", root / "val" / "ant" / "w.jpg"]
    bads[0].write_bytes(b"\x89PNG\r\n\x1a\n nope")
    _truncated_png(bads[1])
    with pytest.raises(DataIntegrityError) as info:
        load_dataset(f"imagefolder:{root}")
    assert str(bads[0]) in str(info.value)
    bads[0].unlink()
    with pytest.raises(DataIntegrityError) as info:
        load_dataset(f"imagefolder:{root}")
    assert str(bads[1]) in str(info.value) and "1 image file in" in str(info.value)


def test_imagefolder_dangling_link_names_the_file(folder_ds):
    root, _ = folder_ds
    link = root / "train" / "ant" / "gone.png"
    link.symlink_to(root / "nowhere.png")
    with pytest.raises(DataNotFoundError, match="gone.png"):
        load_dataset(f"imagefolder:{root}")


def test_imagefolder_layout_errors_reach_the_cli(folder_ds, capsys):
    root, _ = folder_ds
    save_img(root / "val" / "zebra" / "q.png", (8, 8))
    with pytest.raises(DataLayoutError) as info:
        load_dataset(f"imagefolder:{root}")
    assert isinstance(info.value, ValueError) and isinstance(info.value, DataIntegrityError)
    assert cli_main(["data", f"imagefolder:{root}", "--check"]) == 1
    assert "zebra" in capsys.readouterr().err


def test_unknown_spec_lists_valid_specs():
    with pytest.raises(ValueError) as info:
        load_dataset("mnist")
    for valid in ("fashion-mnist", "cifar10", "imagefolder:<path>", "imagenet50:<path>"):
        assert valid in str(info.value)
    with pytest.raises(ValueError, match="max_classes"):
        load_dataset("cifar10", max_classes=3)


@pytest.mark.parametrize("spec", ["mnist", "imagefolder:", "imagenet50:", "imagefolder", "", "  ", "cifar10:x"])
def test_bad_spec_is_a_value_error_listing_valid_specs_and_the_cli_reports_it(spec, capsys):
    with pytest.raises(DatasetSpecError) as info:
        load_dataset(spec)
    exc = info.value
    assert isinstance(exc, ValueError) and isinstance(exc, DataIntegrityError)
    assert not isinstance(exc, DataNotFoundError)  # code that falls back on missing data does not hide it
    for valid in ("fashion-mnist", "cifar10", "imagefolder:<path>", "imagenet50:<path>"):
        assert valid in str(exc)
    assert cli_main(["data", spec, "--check"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ubw data: ") and "valid specs" in err


# --------------------------------------------------------------------------------------------------
# ImageDataset
# --------------------------------------------------------------------------------------------------


def make_ds(counts=(50, 30, 20), seed=0, shape=(3, 4, 4)) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((c,), k, dtype=torch.int64) for k, c in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    images = torch.randint(0, 256, (len(labels), *shape), generator=g, dtype=torch.uint8)
    return ImageDataset(images, labels, tuple(f"c{k}" for k in range(len(counts))), "toy")


def test_validation_errors_name_the_fix():
    x = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    y = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"uint8 N x C x H x W; got float32 of shape \(4, 3, 8, 8\).*round\(\)"):
        ImageDataset(x.float(), y, ("a",), "t")
    with pytest.raises(TypeError, match="unsqueeze"):
        ImageDataset(x[:, 0], y, ("a",), "t")
    with pytest.raises(TypeError, match="int64"):
        ImageDataset(x, y.int(), ("a",), "t")
    with pytest.raises(ValueError, match="same length"):
        ImageDataset(x, y[:3], ("a",), "t")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        ImageDataset(x, torch.tensor([0, 1, 2, 0]), ("a", "b"), "t")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        ImageDataset(x, torch.tensor([0, -1, 1, 0]), ("a", "b"), "t")
    with pytest.raises(ValueError, match="at least one class"):
        ImageDataset(x, y, (), "t")
    with pytest.raises(TypeError):
        ImageDataset(x.numpy(), y, ("a",), "t")
    ds = ImageDataset(x, y, ["a"], "t")
    assert ds.classes == ("a",)
    with pytest.raises(TypeError, match="uint8"):
        ds.replace(images=x.float())
    with pytest.raises(dataclasses_frozen_error()):
        ds.name = "other"


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_non_contiguous_input_is_copied_not_modified():
    base = torch.randint(0, 256, (5, 8, 8, 3), dtype=torch.uint8)
    nhwc_view = base.permute(0, 3, 1, 2)
    snapshot_base = base.clone()
    ds = ImageDataset(nhwc_view, torch.zeros(5, dtype=torch.int64), ("a",), "t")
    assert ds.images.is_contiguous() and torch.equal(ds.images, nhwc_view)
    ds.float_images().mul_(0)
    assert torch.equal(base, snapshot_base)


def test_basic_properties_and_repr():
    ds = make_ds()
    assert len(ds) == 100 and ds.num_classes == 3 and ds.image_shape == (3, 4, 4)
    assert ds.class_counts().tolist() == [50, 30, 20] and ds.class_counts().dtype == torch.int64
    f = ds.float_images()
    assert f.dtype == torch.float32 and float(f.min()) >= 0 and float(f.max()) <= 1
    assert torch.equal((f * 255).round().to(torch.uint8), ds.images)
    assert repr(ds) == "ImageDataset('toy', n=100, shape=(3, 4, 4), classes=3)"


def test_subset_forms_and_no_aliasing():
    ds = make_ds()
    orig = ds.images.clone()
    idx = [3, 1, 4, 1, 5]
    for form in (idx, torch.tensor(idx), np.array(idx)):
        sub = ds.subset(form)
        assert torch.equal(sub.images, ds.images[idx]) and torch.equal(sub.labels, ds.labels[idx])
    mask = torch.zeros(100, dtype=torch.bool)
    mask[[2, 7]] = True
    assert torch.equal(ds.subset(mask).labels, ds.labels[[2, 7]])
    assert torch.equal(ds.subset(mask.numpy()).labels, ds.labels[[2, 7]])
    assert len(ds.subset([])) == 0
    sub = ds.subset(range(10), name="first10")
    assert sub.name == "first10" and ds.subset([0]).name == "toy"
    sub.images.fill_(0)
    sub.labels.fill_(0)
    assert torch.equal(ds.images, orig)
    assert sub.images.untyped_storage().data_ptr() != ds.images.untyped_storage().data_ptr()
    with pytest.raises(IndexError):
        ds.subset([100])
    with pytest.raises(IndexError):
        ds.subset([-1])
    with pytest.raises(ValueError, match="mask"):
        ds.subset(torch.ones(99, dtype=torch.bool))
    with pytest.raises(TypeError):
        ds.subset(torch.tensor([0.5]))


def test_stratified_subset_counts_and_determinism():
    ds = make_ds((50, 30, 20))
    sub = ds.stratified_subset(7, seed=0)
    # 7 * (0.5, 0.3, 0.2) = (3.5, 2.1, 1.4) -> floors (3, 2, 1), the largest remainder goes to class 0
    assert sub.class_counts().tolist() == [4, 2, 1] and len(sub) == 7
    again = ds.stratified_subset(7, seed=0)
    assert torch.equal(sub.images, again.images) and torch.equal(sub.labels, again.labels)
    other = ds.stratified_subset(7, seed=1)
    assert not torch.equal(sub.images, other.images)
    uneven = make_ds((37, 1, 13, 9))
    for n in range(1, len(uneven) + 1):
        counts = uneven.stratified_subset(n, seed=n).class_counts()
        exact = n * uneven.class_counts().double() / len(uneven)
        assert int(counts.sum()) == n
        assert ((counts.double() - exact).abs() < 1).all()
        assert (counts <= uneven.class_counts()).all()
    assert torch.equal(ds.stratified_subset(100, seed=3).images, ds.images)  # n = N: everything, in order
    for bad in (0, 101):
        with pytest.raises(ValueError):
            ds.stratified_subset(bad, seed=0)


def test_random_subset():
    ds = make_ds()
    a, b = ds.random_subset(10, seed=5), ds.random_subset(10, seed=5)
    assert len(a) == 10 and torch.equal(a.images, b.images)
    assert not torch.equal(a.images, ds.random_subset(10, seed=6).images)
    with pytest.raises(ValueError):
        ds.random_subset(101, seed=0)


def test_save_load_round_trip(tmp_path):
    ds = make_ds()
    path = ds.save(tmp_path / "d.pt")
    payload = torch.load(path, weights_only=True)  # a plain dict, loadable without unpickling code
    assert isinstance(payload, dict) and set(payload) >= {"images", "labels", "classes", "name"}
    back = ImageDataset.load(path)
    assert torch.equal(back.images, ds.images) and torch.equal(back.labels, ds.labels)
    assert back.classes == ds.classes and back.name == ds.name
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an ImageDataset"):
        ImageDataset.load(tmp_path / "other.pt")


def test_dataset_splits_require_same_classes():
    a = make_ds()
    b = ImageDataset(a.images, a.labels, ("x", "y", "z"), "other")
    with pytest.raises(ValueError, match="class list"):
        DatasetSplits(a, b)
    assert DatasetSplits(a, a).num_classes == 3



# --------------------------------------------------------------------------------------------------
# Derived copies in the cache: listed by `ubw cache info`, removed by `ubw cache clear`
# --------------------------------------------------------------------------------------------------


def test_cache_info_and_clear_cover_memos_but_not_originals(tmp_path, monkeypatch, folder_ds, capsys):
    system = tmp_path / "system"  # stands for /usr/share/datasets/fashion-mnist
    a = write_fashion(system, seed=40, gz=False)
    gz_src = tmp_path / "fmnist-gz"
    b = write_fashion(gz_src, seed=41)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", system)
    root, _ = folder_ds
    originals = {p: snapshot(p) for p in (system, gz_src, root)}
    assert_fashion_equal(load_dataset("fashion-mnist"), a)
    assert_fashion_equal(load_dataset("fashion-mnist", root=gz_src), b)
    load_dataset(f"imagefolder:{root}")
    cache_root = tmp_path / "cache"
    assert (cache_root / CACHE_MARKER_NAME).is_file()  # the data loader created the root, so it is marked
    assert not [p for p in (cache_root / "data").rglob("*") if p.is_symlink()]  # no links to the originals
    downloads = cache_root / "data" / "torchvision" / "FashionMNIST" / "raw"
    downloads.mkdir(parents=True)
    (downloads / "kept.gz").write_bytes(b"a download")
    # a decompressed copy an older version made (with a link to a raw original): listed and cleared
    legacy = cache_root / "data" / "fashion-mnist" / ("0123456789abcdef")
    (legacy / "FashionMNIST" / "raw").mkdir(parents=True)
    (legacy / "SOURCE.txt").write_text(f"derived copy of {gz_src}\n")
    (legacy / "FashionMNIST" / "raw" / IDX_NAMES[0]).write_bytes(b"\x00\x00\x08\x03 decompressed")
    (legacy / "FashionMNIST" / "raw" / IDX_NAMES[1]).symlink_to(system / IDX_NAMES[1])
    foreign = cache_root / "data" / "fashion-mnist" / ("f" * 16)  # named like a copy, but not marked as one
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")

    cache = Cache()
    derived = cache.data_entries()
    names = sorted(e.hash.split("/")[0] for e in derived)
    assert names == ["fashion-mnist"] * 3 + ["imagefolder"]  # 2 memos + the legacy copy, 1 decoded image folder
    assert all(e.namespace == "data" and e.size_bytes > 0 for e in derived)
    assert sorted(e.path.name for e in derived if e.path.is_dir()) == [legacy.name]
    assert [e.hash for e in cache.entries()] == sorted(e.hash for e in derived)
    assert cli_main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert "(4 entries, " in out and "  data: 4 entries" in out

    assert cache.clear("train") == 0 and len(cache.data_entries()) == 4  # a namespace leaves the data alone
    assert cli_main(["cache", "clear"]) == 0
    assert capsys.readouterr().out.strip() == f"removed 4 cache entries from {cache.root}"
    assert cache.data_entries() == []
    assert not list((cache_root / "data").rglob("decoded-*.pt")) and not legacy.exists()
    assert (downloads / "kept.gz").read_bytes() == b"a download"  # downloads are kept
    assert (foreign / "mine.txt").read_text() == "keep"
    for folder, before in originals.items():
        assert snapshot(folder) == before  # the originals (one was linked from the legacy copy) are untouched
    # and everything loads again
    assert_fashion_equal(load_dataset("fashion-mnist"), a)
    assert len(cache.data_entries()) == 1
    assert cache.clear("data") == 1 and cache.data_entries() == []
