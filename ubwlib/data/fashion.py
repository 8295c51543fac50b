"""Fashion-MNIST: find its four IDX files (raw or ``.gz``), read them with numpy, memoise the decoded splits.

The files are only ever read: a ``.gz`` file is decompressed in memory, nothing is written next to it. Each
file's header is checked (magic number, data type code, number of dimensions) and its length must be exactly
what the header announces; a damaged file raises :class:`DataIntegrityError` naming the file and the fix
(which depends on where it was found). The decoded splits are memoised under
``data_cache_dir()/fashion-mnist/decoded-<key>.pt`` (see :mod:`ubwlib.data.memo`), keyed by each source file's
resolved path, size, mtime, ctime and inode, so a second load reads one file and any change to a source file
(even one that keeps its size and mtime) decodes again.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .._paths import data_cache_dir
from .dataset import DataIntegrityError, DataNotFoundError, DatasetSplits, ImageDataset, _resize_uint8, _sized_name
from .memo import DOWNLOAD_LABEL, _derived_dir, download_dir, read_memo, write_memo

#: Where Debian/Ubuntu's ``dataset-fashion-mnist`` package puts the four IDX ``.gz`` files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
SYSTEM_LABEL = "system package dataset-fashion-mnist"
#: The class names, in label order (as torchvision's ``FashionMNIST.classes``).
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_SPLIT_KEYS = ("train_images", "train_labels", "test_images", "test_labels")  # one per file of _IDX_FILES
_NATIVE_SIZE = 28


# --------------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------------

#: IDX data type codes (third byte of the magic number); Fashion-MNIST uses 0x08 only.
_IDX_TYPES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "short", 0x0C: "int", 0x0D: "float", 0x0E: "double"}
_UBYTE = 0x08
_MAGIC_HINT = "the standard IDX files have magic numbers 2051/2049 for images/labels"


class _BadIdx(Exception):
    """Internal: what is wrong with an IDX file, as the end of a sentence (becomes a DataIntegrityError)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def _read_bytes(path: Path) -> bytes:
    """All bytes of ``path``, decompressed when it ends in ``.gz``; :class:`_BadIdx` when that fails."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        how = "read or decompressed, it is truncated or corrupted" if path.suffix == ".gz" else "read"
        raise _BadIdx(f"it cannot be {how} ({type(exc).__name__}: {exc})") from exc


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """The ``uint8`` array (``ndim`` dimensions, writable, C order) stored in the IDX file ``path``.

    ``.gz`` files are decompressed in memory. The header must be ``0x00 0x00 0x08 <ndim>`` (unsigned bytes)
    followed by ``ndim`` big-endian ``uint32`` sizes, and the file must hold exactly that many values after it;
    otherwise :class:`_BadIdx` says what is wrong.
    """
    blob = _read_bytes(path)
    after = " (after decompression)" if path.suffix == ".gz" else ""
    head = 4 + 4 * ndim
    if len(blob) < 4:
        raise _BadIdx(f"it holds {len(blob)} bytes{after}, too few for an IDX header (truncated; {_MAGIC_HINT})")
    magic, code, got_ndim = struct.unpack(">I", blob[:4])[0], blob[2], blob[3]
    if blob[:2] != b"\0\0" or code not in _IDX_TYPES:
        raise _BadIdx(f"its IDX magic number is {magic}, expected {(_UBYTE << 8) + ndim}{after} ({_MAGIC_HINT})")
    if code != _UBYTE:
        raise _BadIdx(
            f"its IDX data type code is 0x{code:02X} ({_IDX_TYPES[code]}), expected 0x08 (unsigned byte){after}"
        )
    if got_ndim != ndim:
        raise _BadIdx(f"its IDX header announces {got_ndim} dimensions, expected {ndim}{after} ({_MAGIC_HINT})")
    if len(blob) < head:
        raise _BadIdx(f"it holds {len(blob)} bytes{after}, too few for its IDX header (truncated)")
    dims = struct.unpack(f">{ndim}I", blob[4:head])
    count = int(np.prod(dims, dtype=np.int64))
    if len(blob) != head + count:
        shape = " x ".join(str(d) for d in dims)
        kind = "truncated" if len(blob) < head + count else "with trailing bytes"
        raise _BadIdx(
            f"its header announces {shape} values ({head + count} bytes in all) but it holds {len(blob)} "
            f"bytes{after} ({kind})"
        )
    return np.frombuffer(blob, dtype=np.uint8, count=count, offset=head).reshape(dims).copy()


# --------------------------------------------------------------------------------------------------
# finding the files
# --------------------------------------------------------------------------------------------------


def _idx_files_in(folder: Path) -> dict[str, Path] | None:
    """The four IDX files (raw preferred over .gz) directly in ``folder``, or None if any is missing."""
    found: dict[str, Path] = {}
    for base in _IDX_FILES:
        raw, gz = folder / base, folder / f"{base}.gz"
        if raw.is_file():
            found[base] = raw
        elif gz.is_file():
            found[base] = gz
        else:
            return None
    return found


def _fashion_layouts(root: Path) -> list[Path]:
    """Folders inside a candidate root that may hold the IDX files, in the order they are tried."""
    return [root, root / "FashionMNIST" / "raw", root / "fashion-mnist"]


def _find_fashion(root: Path) -> tuple[Path, dict[str, Path]] | None:
    for folder in _fashion_layouts(root):
        files = _idx_files_in(folder)
        if files is not None:
            return folder, files
    return None


def _fashion_fix(label: str, folder: Path) -> str:
    """How to repair damaged Fashion-MNIST files found at the candidate location ``label``."""
    if label == SYSTEM_LABEL:
        return "reinstall the package: `sudo apt-get install --reinstall dataset-fashion-mnist`"
    if label == DOWNLOAD_LABEL:
        return (
            f"delete ubwlib's downloaded copy {folder} and download it again: "
            "load_dataset('fashion-mnist', download=True) or `ubw data fashion-mnist --download`"
        )
    return (
        "replace it with an intact copy: re-download the four IDX files (e.g. from "
        "https://github.com/zalandoresearch/fashion-mnist), or drop root=/UBW_DATA and use Debian's "
        "dataset-fashion-mnist package or load_dataset('fashion-mnist', download=True)"
    )


def _damaged(label: str, folder: Path, src: Path, problem: str) -> DataIntegrityError:
    return DataIntegrityError(
        f"Fashion-MNIST file {src} is damaged: {problem}. ubwlib has not changed it. To fix it, "
        f"{_fashion_fix(label, folder)}."
    )


# --------------------------------------------------------------------------------------------------
# decoding and the memo
# --------------------------------------------------------------------------------------------------


def _bad_label_split(decoded: dict) -> str | None:
    """``"train"``/``"test"`` when that split has a label outside ``[0, len(classes))``, else None."""
    n = len(decoded["classes"])
    for split in ("train", "test"):
        labels = decoded[f"{split}_labels"]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
            return split
    return None


def _decode_fashion(label: str, folder: Path, files: dict[str, Path]) -> dict:
    """The splits as plain tensors (``uint8`` N x H x W images, ``int64`` labels) and the class names; a
    damaged file raises :class:`DataIntegrityError` naming it and the fix for ``label``'s location."""
    arrays: dict[str, np.ndarray] = {}
    for base, key in zip(_IDX_FILES, _SPLIT_KEYS):
        try:
            arrays[key] = read_idx(files[base], ndim=3 if key.endswith("_images") else 1)
        except _BadIdx as bad:
            raise _damaged(label, folder, files[base], bad.problem) from bad.__cause__
    for img, lab in ((0, 1), (2, 3)):  # images and labels of one split must agree in number
        n_img, n_lab = len(arrays[_SPLIT_KEYS[img]]), len(arrays[_SPLIT_KEYS[lab]])
        if n_img != n_lab:
            raise DataIntegrityError(
                f"Fashion-MNIST files {files[_IDX_FILES[img]]} ({n_img} images) and {files[_IDX_FILES[lab]]} "
                f"({n_lab} labels) do not match: one of them is damaged or from another release. "
                f"ubwlib has not changed them. To fix it, {_fashion_fix(label, folder)}."
            )
    decoded: dict = {"classes": list(FASHION_MNIST_CLASSES)}
    for key in _SPLIT_KEYS:
        a = arrays[key]
        decoded[key] = torch.from_numpy(a) if key.endswith("_images") else torch.from_numpy(a.astype(np.int64))
    bad = _bad_label_split(decoded)
    if bad is not None:
        f = files[_IDX_FILES[1] if bad == "train" else _IDX_FILES[3]]
        labels = decoded[f"{bad}_labels"]
        raise _damaged(
            label, folder, f,
            f"it holds label values up to {int(labels.max())}, but Fashion-MNIST has "
            f"{len(decoded['classes'])} classes (labels 0..{len(decoded['classes']) - 1})",
        )
    return decoded


def _decoded_path(files: dict[str, Path]) -> Path:
    """Where the decoded splits of these IDX files are memoised: keyed by each file's resolved path, size,
    mtime, ctime and inode, so any change to a source file (even one that keeps its size and mtime) misses."""
    stamp = []
    for base in sorted(files):
        p = files[base].resolve()
        st = p.stat()
        stamp.append([str(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:24]
    return data_cache_dir() / "fashion-mnist" / f"decoded-{key}.pt"


def _read_decoded(path: Path) -> dict | None:
    """The memoised splits (tensors only), or None when missing, unreadable or not shaped like
    :func:`_decode_fashion`'s result."""
    d = read_memo(path)
    try:
        ok = (isinstance(d, dict) and all(isinstance(d.get(k), torch.Tensor) for k in _SPLIT_KEYS)
              and d["train_images"].dtype == torch.uint8 and d["test_images"].dtype == torch.uint8
              and d["train_images"].dim() == 3 and d["test_images"].dim() == 3
              and d["train_labels"].dtype == torch.int64 and d["test_labels"].dtype == torch.int64
              and d["train_labels"].dim() == 1 and d["test_labels"].dim() == 1
              and len(d["train_images"]) == len(d["train_labels"]) and len(d["test_images"]) == len(d["test_labels"])
              and isinstance(d.get("classes"), (list, tuple)) and len(d["classes"]) > 0
              and all(isinstance(c, str) for c in d["classes"]) and _bad_label_split(d) is None)
    except Exception:
        return None
    return d if ok else None


def _decoded(label: str, folder: Path, files: dict[str, Path]) -> dict:
    """The decoded splits of ``files``: from the memo, or decoded (and memoised)."""
    memo = _decoded_path(files)
    decoded = _read_decoded(memo)
    if decoded is None:
        decoded = _decode_fashion(label, folder, files)
        write_memo(memo, decoded)
    return decoded


def _fashion_splits(decoded: dict, size: int | None) -> DatasetSplits:
    classes = tuple(decoded["classes"])
    splits = {}
    for split in ("train", "test"):
        images = decoded[f"{split}_images"].unsqueeze(1).contiguous()
        if size is not None:
            images = _resize_uint8(images, size)
        splits[split] = ImageDataset(images=images, labels=decoded[f"{split}_labels"], classes=classes,
                                     name=f"{_sized_name('fashion-mnist', size, _NATIVE_SIZE)}/{split}")
    return DatasetSplits(**splits)


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


def _download_fashion(folder: Path) -> None:
    """Let torchvision download (and md5-check) the IDX files into ``folder/FashionMNIST/raw``."""
    import torchvision

    # the constructor downloads all four files; train=False makes it parse only the small test split
    torchvision.datasets.FashionMNIST(root=str(folder), train=False, download=True)


def _fashion_help(searched: Sequence[tuple[str, Path]]) -> str:
    lines = "\n".join(
        f"  - {label}: {path}  (also {path}/FashionMNIST/raw, {path}/fashion-mnist)"
        for label, path in searched
    )
    names = ", ".join(f"{b}[.gz]" for b in _IDX_FILES)
    return (
        "Fashion-MNIST not found. Searched:\n"
        f"{lines}\n"
        "Provide it in one of three ways:\n"
        "  (a) Debian/Ubuntu: `sudo apt-get install dataset-fashion-mnist` "
        f"(installs {FASHION_MNIST_SYSTEM_DIR})\n"
        "  (b) pass root=<folder> to load_dataset, or set UBW_DATA=<folder>, where the folder holds the "
        f"four IDX files ({names})\n"
        "  (c) allow downloads: load_dataset('fashion-mnist', download=True), or the CLI "
        "`ubw data fashion-mnist --download`"
    )


def describe_fashion(candidates: Sequence[tuple[str, Path]]) -> list[tuple[str, Path, bool]]:
    """``(label, folder, found)`` for each candidate location (the folder holding the files when found)."""
    out = []
    for label, cand in candidates:
        hit = _find_fashion(cand)
        out.append((label, hit[0] if hit else cand, hit is not None))
    return out


def load_fashion(
    candidates: Sequence[tuple[str, Path]], root: str | Path | None, download: bool, size: int | None
) -> DatasetSplits:
    """Fashion-MNIST from the first candidate location that holds it, else (``download`` without ``root``)
    torchvision's download into :func:`ubwlib.data.memo.download_dir`; :class:`DataNotFoundError` otherwise."""
    for label, cand in candidates:
        hit = _find_fashion(cand)
        if hit is not None:
            return _fashion_splits(_decoded(label, *hit), size)
    if download and root is None:
        folder = download_dir()
        try:
            folder = _derived_dir(folder.name)
            _download_fashion(folder)
        except Exception as exc:  # offline, proxy, disk full, ...
            raise DataNotFoundError(
                f"downloading Fashion-MNIST into {folder} failed ({type(exc).__name__}: {exc}).\n"
                + _fashion_help(candidates)
            ) from exc
        hit = _find_fashion(folder)
        if hit is None:
            raise DataNotFoundError(
                f"downloading Fashion-MNIST into {folder} left no IDX files there.\n" + _fashion_help(candidates)
            )
        return _fashion_splits(_decoded(DOWNLOAD_LABEL, *hit), size)
    msg = _fashion_help(candidates)
    if root is not None:
        msg = (
            f"root={root} was given explicitly but holds no Fashion-MNIST (an explicit root is not "
            "silently replaced by other locations; drop root= to search $UBW_DATA, the system package "
            "and the download cache).\n" + msg
        )
    raise DataNotFoundError(msg)
