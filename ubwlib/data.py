"""Image datasets in memory, and loaders for the datasets the UBW paper (and this project) uses.

Everything ends up as one type, :class:`ImageDataset`: ``uint8`` images ``N x C x H x W`` plus
``int64`` labels, class names and a name. :func:`load_dataset` returns the train and test splits
(:class:`DatasetSplits`) of

* ``"fashion-mnist"`` — the project's offline default (Debian's ``dataset-fashion-mnist`` package
  installs the four IDX ``.gz`` files under ``/usr/share/datasets/fashion-mnist/``);
* ``"cifar10"`` — torchvision's CIFAR-10 (python-pickle batches);
* ``"imagefolder:<path>"`` — a ``train/`` + ``val/`` (or ``test/``) ImageFolder tree, including the
  Tiny-ImageNet ``val/images`` + ``val_annotations.txt`` layout;
* ``"imagenet50:<path>"`` — the public UBW code's ImageNet subset: the first 50 classes (sorted folder
  names) of such a tree, at 64 x 64 (see :data:`IMAGEFOLDER_PRESETS`).

Nothing is ever written into (or deleted from) a user's dataset folder: decompressed IDX files, decoded
image folders and downloads live under :func:`ubwlib._paths.data_cache_dir` (``<cache root>/data``; the
root is created and marked with :func:`ubwlib.cache.ensure_cache_root`). Cached tensors are read back with
``torch.load(..., weights_only=True)``. Files are written to a unique temporary name (naming host and
process) and renamed into place; temporaries left by a killed process are removed by the next write into
the same folder. ``ubw cache info`` lists the derived copies and ``ubw cache clear`` removes them
(:meth:`ubwlib.cache.Cache.clear`); downloads are kept.

Errors: :class:`DataNotFoundError` (a ``FileNotFoundError``) when the data is not there;
:class:`DataIntegrityError` (a ``RuntimeError``) when files are there but unreadable (a truncated or
corrupted ``.gz``/IDX file, an image that cannot be decoded, ...; the message names the file and the fix).
Its subclasses :class:`DatasetSpecError` (an invalid spec) and :class:`DataLayoutError` (an image folder
whose layout or annotations are wrong) are also ``ValueError`` s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import os
import pickle
import re
import shutil
import socket
import stat
import struct
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ._paths import cache_root, data_cache_dir
from .cache import ensure_cache_root

__all__ = [
    "ImageDataset",
    "DatasetSplits",
    "DataNotFoundError",
    "DataIntegrityError",
    "DatasetSpecError",
    "DataLayoutError",
    "load_dataset",
    "describe_sources",
    "FASHION_MNIST_SYSTEM_DIR",
    "IMAGEFOLDER_PRESETS",
    "DATASET_SPECS",
]

#: Where Debian/Ubuntu's ``dataset-fashion-mnist`` package puts the four IDX ``.gz`` files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Named ImageFolder presets: ``"<preset>:<path>"`` loads ``<path>`` with these settings.
IMAGEFOLDER_PRESETS: dict[str, dict[str, Any]] = {
    # The public UBW code's ImageNet subset: first 50 classes (sorted folder names), 64 x 64.
    "imagenet50": {"max_classes": 50, "image_size": 64},
}

#: Human-readable list of valid specs (used in error messages).
DATASET_SPECS = ("fashion-mnist", "cifar10", "imagefolder:<path>")

_FASHION_ALIASES = {"fashion-mnist", "fashionmnist", "fashion_mnist"}
_CIFAR_ALIASES = {"cifar10", "cifar-10", "cifar_10"}
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
_DEFAULT_IMAGEFOLDER_SIZE = 64
_IMAGEFOLDER_CACHE_VERSION = 1
_SAVE_FORMAT = "ubwlib.ImageDataset"


class DataNotFoundError(FileNotFoundError):
    """The requested dataset is not on this machine (the message says how to provide it)."""


class DataIntegrityError(RuntimeError):
    """Dataset files were found but failed a check or could not be read (e.g. torchvision's md5 sums for
    CIFAR-10, a truncated ``.gz`` file, an image that cannot be decoded); the message names the file and
    the fix. ubwlib never modifies or deletes the files it names."""


class DatasetSpecError(DataIntegrityError, ValueError):
    """The dataset spec is invalid (unknown name, or a folder spec without a path); the message lists the
    valid specs. A ``ValueError``; also a :class:`DataIntegrityError` so that handlers of data problems
    (the CLI ``ubw data``) report it, but never a :class:`DataNotFoundError`, so that code falling back
    on missing data does not hide a typo."""


class DataLayoutError(DataIntegrityError, ValueError):
    """An image folder's layout or annotation file is inconsistent (e.g. a ``val/`` class that ``train/``
    lacks, a malformed ``val_annotations.txt``). A ``ValueError`` and a :class:`DataIntegrityError`."""


# --------------------------------------------------------------------------------------------------
# ImageDataset
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """An image classification dataset held in memory.

    ``images``: ``uint8`` tensor ``N x C x H x W`` (contiguous; a non-contiguous tensor is stored as a
    contiguous copy). ``labels``: ``int64`` tensor ``N`` with values in ``[0, len(classes))``.
    ``classes``: the class names (a list is stored as a tuple). ``name``: e.g. ``"cifar10/train"``.

    The tensors given are never modified in place; every method returns new tensors.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        images, labels, classes, name = self.images, self.labels, self.classes, self.name
        if not isinstance(images, torch.Tensor):
            raise TypeError(
                f"images must be a torch.Tensor (uint8, N x C x H x W); got {type(images).__name__} — "
                "convert with torch.as_tensor(x) (and .permute(0, 3, 1, 2) if it is N x H x W x C)"
            )
        if images.dtype != torch.uint8 or images.ndim != 4:
            hint = (
                "convert with (x*255).round().to(torch.uint8)"
                if images.dtype.is_floating_point
                else "convert with x.to(torch.uint8) after checking the values are in [0, 255]"
                if images.dtype != torch.uint8
                else "add a channel axis with x.unsqueeze(1)" if images.ndim == 3
                else "reshape to N x C x H x W"
            )
            raise TypeError(
                f"images must be uint8 N x C x H x W; got {str(images.dtype).replace('torch.', '')} "
                f"of shape {tuple(images.shape)} — {hint}"
            )
        if min(images.shape[1:]) < 1:
            raise ValueError(f"images must have C, H, W >= 1; got shape {tuple(images.shape)}")
        if not isinstance(labels, torch.Tensor):
            raise TypeError(
                f"labels must be a torch.Tensor (int64, N); got {type(labels).__name__} — "
                "convert with torch.as_tensor(labels, dtype=torch.int64)"
            )
        if labels.dtype != torch.int64 or labels.ndim != 1:
            raise TypeError(
                f"labels must be int64 of shape (N,); got {str(labels.dtype).replace('torch.', '')} "
                f"of shape {tuple(labels.shape)} — convert with labels.reshape(-1).to(torch.int64)"
            )
        if labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"images and labels must have the same length; got {images.shape[0]} images and "
                f"{labels.shape[0]} labels"
            )
        if labels.device != images.device:
            raise ValueError(
                f"images and labels must be on the same device; got {images.device} and {labels.device}"
            )
        if isinstance(classes, str) or not isinstance(classes, Iterable):
            raise TypeError(f"classes must be a tuple of class names; got {type(classes).__name__}")
        classes = tuple(classes)
        if len(classes) < 1:
            raise ValueError("classes must name at least one class")
        if not all(isinstance(c, str) for c in classes):
            raise TypeError(f"classes must be strings; got {[type(c).__name__ for c in classes][:5]}...")
        if len(set(classes)) != len(classes):
            dup = sorted({c for c in classes if classes.count(c) > 1})
            raise ValueError(f"class names must be unique; duplicated: {dup}")
        if not isinstance(name, str):
            raise TypeError(f"name must be a str; got {type(name).__name__}")
        if labels.numel():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= len(classes):
                raise ValueError(
                    f"labels must be in [0, {len(classes)}) (one per class name); got values in "
                    f"[{lo}, {hi}] — pass the full class list or remap the labels"
                )
        object.__setattr__(self, "classes", classes)
        if not images.is_contiguous():
            object.__setattr__(self, "images", images.contiguous())
        if not labels.is_contiguous():
            object.__setattr__(self, "labels", labels.contiguous())

    # ---- basic properties ------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (
            f"ImageDataset({self.name!r}, n={len(self)}, shape={self.image_shape}, "
            f"classes={self.num_classes})"
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def class_counts(self) -> torch.Tensor:
        """Number of samples per class, ``int64`` tensor of length ``num_classes`` (on CPU)."""
        return torch.bincount(self.labels.cpu(), minlength=self.num_classes)

    def float_images(self) -> torch.Tensor:
        """The images as ``float32`` in ``[0, 1]`` (a new tensor)."""
        return self.images.to(torch.float32).div_(255.0)

    def replace(self, **changes: Any) -> "ImageDataset":
        """A copy with some fields changed (``dataclasses.replace``; validated again)."""
        return dataclasses.replace(self, **changes)

    # ---- subsets ---------------------------------------------------------------------------------
    def _as_index(self, indices: Any) -> torch.Tensor:
        n = len(self)
        if isinstance(indices, slice):
            return torch.arange(n)[indices]
        if isinstance(indices, range):
            indices = list(indices)
        if isinstance(indices, torch.Tensor):
            idx = indices.detach().to("cpu")
        elif isinstance(indices, np.ndarray):
            idx = torch.from_numpy(np.ascontiguousarray(indices))
        else:
            seq = list(indices)
            if len(seq) == 0:
                idx = torch.zeros(0, dtype=torch.int64)
            elif all(isinstance(v, (bool, np.bool_)) for v in seq):
                idx = torch.tensor([bool(v) for v in seq], dtype=torch.bool)
            else:
                try:
                    idx = torch.tensor([int(v) for v in seq], dtype=torch.int64)
                except (TypeError, ValueError) as exc:
                    raise TypeError(f"indices must be integers or a bool mask; got {seq[:5]}...") from exc
        if idx.dtype == torch.bool:
            if idx.shape != (n,):
                raise ValueError(f"a bool mask must have shape ({n},); got {tuple(idx.shape)}")
            return idx.nonzero().reshape(-1)
        if idx.dtype.is_floating_point or idx.dtype.is_complex:
            raise TypeError(f"indices must be integers or a bool mask; got dtype {idx.dtype}")
        idx = idx.reshape(-1).to(torch.int64)
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= n:
                raise IndexError(f"indices must be in [0, {n}); got values in [{lo}, {hi}]")
        return idx

    def subset(self, indices: Any, name: str | None = None) -> "ImageDataset":
        """The samples at ``indices`` (tensor / list / ndarray of ints, or a bool mask of length N).

        Returns new tensors (never views of this dataset's). ``name`` defaults to this dataset's name.
        """
        idx = self._as_index(indices).to(self.images.device)
        return ImageDataset(
            images=self.images.index_select(0, idx),
            labels=self.labels.index_select(0, idx),
            classes=self.classes,
            name=self.name if name is None else name,
        )

    def _check_n(self, n: int) -> int:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"n must be an int; got {type(n).__name__}")
        n = int(n)
        if n < 1 or n > len(self):
            raise ValueError(f"n must be in [1, {len(self)}] (the dataset's size); got {n}")
        return n

    def random_subset(self, n: int, seed: int, name: str | None = None) -> "ImageDataset":
        """``n`` samples drawn uniformly without replacement (``torch.Generator(seed)``), kept in order."""
        n = self._check_n(n)
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(len(self), generator=g)[:n].sort().values
        return self.subset(idx, name=name)

    def stratified_quotas(self, n: int) -> torch.Tensor:
        """Per-class sample counts for a stratified subset of size ``n`` (largest-remainder rounding).

        Class k gets ``floor(n * c_k / N)`` plus one for the classes with the largest remainders
        (ties: lower class index first), so the quotas sum to exactly ``n`` and never exceed ``c_k``.
        """
        n = self._check_n(n)
        counts = [int(c) for c in self.class_counts()]
        total = len(self)
        quotas = [n * c // total for c in counts]
        remainders = [n * c % total for c in counts]
        short = n - sum(quotas)
        order = sorted(range(len(counts)), key=lambda k: (-remainders[k], k))
        for k in order[:short]:
            quotas[k] += 1
        return torch.tensor(quotas, dtype=torch.int64)

    def stratified_subset(self, n: int, seed: int, name: str | None = None) -> "ImageDataset":
        """Exactly ``n`` samples with per-class counts proportional to the class frequencies.

        Counts use largest-remainder rounding (:meth:`stratified_quotas`); within each class the
        samples are chosen by ``torch.randperm`` with one ``torch.Generator(seed)`` (classes in index
        order), so the result is deterministic. Samples keep their original order.
        """
        quotas = self.stratified_quotas(n)
        g = torch.Generator().manual_seed(int(seed))
        labels = self.labels.cpu()
        chosen = []
        for k, q in enumerate(quotas.tolist()):
            members = (labels == k).nonzero().reshape(-1)
            perm = torch.randperm(members.numel(), generator=g)
            chosen.append(members[perm[:q]])
        idx = torch.cat(chosen).sort().values
        return self.subset(idx, name=name)

    # ---- persistence -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write to ``path`` with ``torch.save`` (a plain dict of tensors and strings; atomic)."""
        path = Path(path)
        payload = {
            "format": _SAVE_FORMAT,
            "version": 1,
            "images": self.images.cpu(),
            "labels": self.labels.cpu(),
            "classes": tuple(self.classes),
            "name": self.name,
        }
        _atomic_torch_save(payload, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ImageDataset":
        """Read a file written by :meth:`save` (``torch.load(weights_only=True)``; no code is unpickled)."""
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != _SAVE_FORMAT:
            raise ValueError(f"{path} is not an ImageDataset file written by ImageDataset.save")
        return cls(
            images=payload["images"],
            labels=payload["labels"],
            classes=tuple(payload["classes"]),
            name=str(payload["name"]),
        )


@dataclass(frozen=True)
class DatasetSplits:
    """The train and test splits of one dataset (same class list)."""

    train: ImageDataset
    test: ImageDataset

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            if not isinstance(getattr(self, split), ImageDataset):
                raise TypeError(f"{split} must be an ImageDataset; got {type(getattr(self, split)).__name__}")
        if self.train.classes != self.test.classes:
            raise ValueError(
                f"train and test must share the class list; got {len(self.train.classes)} vs "
                f"{len(self.test.classes)} classes"
            )

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.classes

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


#: Temporaries older than this are stale whoever wrote them (a live writer keeps its file's mtime fresh).
_STALE_TMP_AGE_S = 3600.0
_HOST_TAG = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
_TMP_RE = re.compile(r"\..+\.ubwtmp-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[0-9a-f]{8}\.tmp")
_ANY_TMP_RE = re.compile(r"\..+\.tmp")  # also the mkstemp names of older versions
_FASHION_COPY_RE = re.compile(r"[0-9a-f]{16}")
_FASHION_MEMO_RE = re.compile(r"decoded-[0-9a-f]{24}\.pt")
_IMAGEFOLDER_MEMO_RE = re.compile(r".+-[0-9]+px-[0-9a-f]{24}\.pt")
_SOURCE_NOTE = "SOURCE.txt"
_SOURCE_PREFIX = "derived copy of "
_DERIVED_FOLDERS = ("fashion-mnist", "imagefolder")  # under data_cache_dir(); "torchvision" holds downloads


def _temp_name(dest: Path, pid: int | None = None) -> Path:
    """A unique temporary name next to ``dest`` that names this host and process (see :func:`_is_stale_temp`)."""
    pid = os.getpid() if pid is None else pid
    return dest.parent / f".{dest.name}.ubwtmp-{_HOST_TAG}-{pid}-{uuid.uuid4().hex[:8]}.tmp"


def _make_temp(dest: Path) -> tuple[int, Path]:
    """Create (``O_EXCL``) and open a temporary file for ``dest``; returns the fd and its path."""
    for _ in range(100):
        tmp = _temp_name(dest)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {dest}")


def _pid_is_dead(pid: int) -> bool:
    if os.name != "posix" or pid <= 0:
        return False  # cannot tell (and os.kill(pid, 0) is not a probe on Windows)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists
        return False
    return False


def _is_stale_temp(path: Path) -> bool:
    """A temporary file (``.NAME....tmp``) whose writer is gone: its process (on this host) no longer
    exists, or it was not modified for :data:`_STALE_TMP_AGE_S` seconds."""
    if not _ANY_TMP_RE.fullmatch(path.name):
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        return False
    m = _TMP_RE.fullmatch(path.name)
    if m and m["host"] == _HOST_TAG and int(m["pid"]) != os.getpid() and _pid_is_dead(int(m["pid"])):
        return True
    return time.time() - st.st_mtime > _STALE_TMP_AGE_S


def _remove_stale_temps(folder: Path) -> int:
    """Delete the stale temporaries directly in ``folder`` (one of ubwlib's own data folders); returns how many."""
    removed = 0
    try:
        if folder.is_symlink() or not folder.is_dir():
            return 0
        with os.scandir(folder) as it:
            names = [e.name for e in it if _ANY_TMP_RE.fullmatch(e.name)]
    except OSError:
        return 0
    for name in names:
        p = folder / name
        if _is_stale_temp(p):
            with contextlib.suppress(OSError):
                p.unlink()
                removed += 1
    return removed


def _derived_dir(*parts: str) -> Path:
    """``data_cache_dir()/parts``, created; the cache root is created (and marked) first when missing."""
    with contextlib.suppress(OSError):  # a read-only location fails below, with the real error
        ensure_cache_root(cache_root())
    folder = data_cache_dir().joinpath(*parts)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _derived_data_folders(data_dir: Path) -> list[Path]:
    """The folders of ``data_dir`` (a ``data_cache_dir()``) that hold derived copies (not downloads)."""
    out = []
    for name in _DERIVED_FOLDERS:
        p = data_dir / name
        if p.is_dir() and not p.is_symlink():
            out.append(p)
    return out


def _is_fashion_copy(path: Path) -> bool:
    note = path / _SOURCE_NOTE
    try:
        if path.is_symlink() or not path.is_dir() or note.is_symlink() or not note.is_file():
            return False
        with open(note, "rb") as f:
            return f.read(len(_SOURCE_PREFIX)) == _SOURCE_PREFIX.encode()
    except OSError:
        return False


def _derived_data_items(data_dir: Path) -> list[Path]:
    """The derived dataset copies ubwlib made under ``data_dir`` (used by ``Cache.entries``/``clear``).

    Folders ``fashion-mnist/<16 hex>/`` marked by their ``SOURCE.txt`` (decompressed IDX copies, links to
    raw originals), files ``fashion-mnist/decoded-<24 hex>.pt`` and ``imagefolder/<name>-<N>px-<24 hex>.pt``.
    Never the downloads (``torchvision/``), never anything else.
    """
    items: list[Path] = []
    for folder in _derived_data_folders(data_dir):
        try:
            with os.scandir(folder) as it:
                found = sorted(it, key=lambda e: e.name)
                for e in found:
                    p = Path(e.path)
                    if folder.name == "fashion-mnist":
                        if _FASHION_COPY_RE.fullmatch(e.name) and _is_fashion_copy(p):
                            items.append(p)
                        elif _FASHION_MEMO_RE.fullmatch(e.name) and e.is_file(follow_symlinks=False):
                            items.append(p)
                    elif _IMAGEFOLDER_MEMO_RE.fullmatch(e.name) and e.is_file(follow_symlinks=False):
                        items.append(p)
        except OSError:
            continue
    return items


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _make_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.chmod(tmp, 0o644)  # as readable as the source (also under a restrictive umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _resize_uint8(x: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """Resize ``uint8`` ``N x C x H x W`` images to ``size x size`` (bilinear, antialias, rounded)."""
    if x.shape[-2:] == (size, size):
        return x
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, x.shape[0], chunk):
        y = F.interpolate(
            x[i : i + chunk].to(torch.float32), size=(size, size), mode="bilinear",
            align_corners=False, antialias=True,
        )
        out[i : i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _check_image_size(image_size: Any) -> int | None:
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive int or None; got {image_size!r}")
    return int(image_size)


def _env_data_root() -> Path | None:
    env = os.environ.get("UBW_DATA")
    return Path(env).expanduser() if env else None


def _sized_name(base: str, size: int | None, native: int) -> str:
    return base if size is None or size == native else f"{base}@{size}"


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST
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


def _fashion_candidates(root: str | Path | None) -> list[tuple[str, Path]]:
    if root is not None:
        return [("root", Path(root).expanduser())]
    out: list[tuple[str, Path]] = []
    env = _env_data_root()
    if env is not None:
        out.append(("$UBW_DATA", env))
    out.append((_SYSTEM_LABEL, Path(FASHION_MNIST_SYSTEM_DIR)))
    out.append((_DOWNLOAD_LABEL, data_cache_dir() / "torchvision"))
    return out


_IDX_SPEC = {  # magic number and number of dimensions of each file
    "train-images-idx3-ubyte": (2051, 3),
    "train-labels-idx1-ubyte": (2049, 1),
    "t10k-images-idx3-ubyte": (2051, 3),
    "t10k-labels-idx1-ubyte": (2049, 1),
}
_SYSTEM_LABEL = "system package dataset-fashion-mnist"
_DOWNLOAD_LABEL = "download cache"


class _BadSource(Exception):
    """Internal: a source file could not be read or decompressed (becomes a DataIntegrityError)."""

    def __init__(self, src: Path, exc: BaseException) -> None:
        super().__init__(f"{src}: {type(exc).__name__}: {exc}")
        self.src = src
        self.problem = f"it cannot be read or decompressed, it is truncated or corrupted ({type(exc).__name__}: {exc})"


def _gzip_size(path: Path) -> int | None:
    """Uncompressed size recorded in a gzip trailer (mod 2**32); None for a file too short to have one."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 4:
            return None
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


def _gunzip_into(src: Path, out: Any) -> None:
    """Decompress ``src`` into the open file ``out``; errors reading ``src`` raise :class:`_BadSource`."""
    try:
        inp = gzip.open(src, "rb")
    except OSError as exc:
        raise _BadSource(src, exc) from exc
    with inp:
        while True:
            try:
                chunk = inp.read(1 << 22)
            except (EOFError, zlib.error, OSError) as exc:  # gzip.BadGzipFile is an OSError
                raise _BadSource(src, exc) from exc
            if not chunk:
                return
            out.write(chunk)


def _materialize_raw(src: Path, dest: Path, force: bool = False) -> bool:
    """Make ``dest`` an uncompressed copy of ``src`` (``.gz``) or a link to it (raw); atomic, idempotent.

    Returns True when ``dest`` was (re)written. Stale temporaries of killed runs in ``dest``'s folder are
    removed first. A ``src`` that cannot be read or decompressed raises :class:`_BadSource` (``src`` is only
    ever read).
    """
    try:
        st = src.stat()
    except OSError as exc:
        raise _BadSource(src, exc) from exc
    _remove_stale_temps(dest.parent)
    if src.suffix == ".gz":
        if not force and dest.is_file() and not dest.is_symlink():
            dst = dest.stat()
            try:
                trailer = _gzip_size(src)
            except OSError as exc:
                raise _BadSource(src, exc) from exc
            if dst.st_size % (1 << 32) == trailer and dst.st_mtime_ns == st.st_mtime_ns:
                return False
        fd, tmp = _make_temp(dest)
        try:
            with os.fdopen(fd, "wb") as out:
                _gunzip_into(src, out)
            os.chmod(tmp, 0o644)  # derived copies are as readable as the source
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return True
    target = str(src.resolve())
    if not force and dest.is_symlink() and os.readlink(dest) == target:
        return False
    tmp = _temp_name(dest)
    try:
        os.symlink(target, tmp)
    except OSError:  # no symlinks here (e.g. some Windows setups): copy instead
        try:
            shutil.copyfile(src, tmp)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise _BadSource(src, exc) from exc
    os.replace(tmp, dest)
    return True


def _fashion_torchvision_root(folder: Path, files: dict[str, Path]) -> tuple[Path, set[str]]:
    """A root that torchvision's FashionMNIST can read: the source itself, or a derived copy in the cache.

    Returns the root and the files (re)written into the copy. Raises :class:`_BadSource`.
    """
    if (
        folder.name == "raw"
        and folder.parent.name == "FashionMNIST"
        and all(p.suffix != ".gz" for p in files.values())
    ):
        return folder.parent.parent, set()
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    tv_root = _derived_dir("fashion-mnist", key)
    note = tv_root / _SOURCE_NOTE  # written first: it marks the folder as ubwlib's derived copy
    text = f"{_SOURCE_PREFIX}{folder.resolve()}\n"
    if note.is_symlink() or not note.is_file() or note.read_text(errors="replace") != text:
        fd, tmp = _make_temp(note)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, note)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    raw = tv_root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    written = set()
    for base, src in files.items():
        if _materialize_raw(src, raw / base):
            written.add(base)
    return tv_root, written


def _fashion_fix(label: str, folder: Path) -> str:
    """How to repair damaged Fashion-MNIST files found at the candidate location ``label``."""
    if label == _SYSTEM_LABEL:
        return "reinstall the package: `sudo apt-get install --reinstall dataset-fashion-mnist`"
    if label == _DOWNLOAD_LABEL:
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


def _idx_check(path: Path, magic: int, ndim: int) -> tuple[str | None, tuple[int, ...]]:
    """``(problem or None, dims)`` of the IDX file ``path``: magic number, header and exact length."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4 + 4 * ndim)
    except OSError as exc:
        return f"it cannot be read ({type(exc).__name__}: {exc})", ()
    if len(head) < 4:
        return f"it holds {size} bytes, too few for an IDX header (truncated; the standard IDX files " \
               "have magic numbers 2051/2049)", ()
    got = struct.unpack(">I", head[:4])[0]
    if got != magic:
        return (
            f"its IDX magic number is {got}, expected {magic} (the standard IDX files have magic numbers "
            "2051/2049 for images/labels)"
        ), ()
    if len(head) < 4 + 4 * ndim:
        return f"it holds {size} bytes, too few for its IDX header (truncated)", ()
    dims = struct.unpack(f">{ndim}I", head[4:])
    need = 4 + 4 * ndim + int(np.prod(dims, dtype=np.int64))
    if size != need:
        shape = " x ".join(str(d) for d in dims)
        kind = "truncated" if size < need else "with trailing bytes"
        return f"its header announces {shape} values ({need} bytes in all) but it holds {size} bytes ({kind})", ()
    return None, tuple(int(d) for d in dims)


def _prepare_fashion(label: str, folder: Path, files: dict[str, Path]) -> Path:
    """The torchvision root of checked, decompressed IDX files; :class:`DataIntegrityError` naming the file."""
    try:
        tv_root, written = _fashion_torchvision_root(folder, files)
    except _BadSource as exc:
        raise _damaged(label, folder, exc.src, exc.problem) from exc.__cause__
    raw = tv_root / "FashionMNIST" / "raw"
    dims: dict[str, tuple[int, ...]] = {}
    for base in _IDX_FILES:
        src = files[base]
        magic, ndim = _IDX_SPEC[base]
        problem, d = _idx_check(raw / base, magic, ndim)
        if problem is not None and src.suffix == ".gz" and base not in written:
            # the derived copy itself may be damaged: decompress the source again and look once more
            try:
                _materialize_raw(src, raw / base, force=True)
            except _BadSource as exc:
                raise _damaged(label, folder, exc.src, exc.problem) from exc.__cause__
            problem, d = _idx_check(raw / base, magic, ndim)
        if problem is not None:
            after = " (after decompression)" if src.suffix == ".gz" else ""
            raise _damaged(label, folder, src, problem + after)
        dims[base] = d
    for images, labels in ((_IDX_FILES[0], _IDX_FILES[1]), (_IDX_FILES[2], _IDX_FILES[3])):
        if dims[images][0] != dims[labels][0]:
            raise DataIntegrityError(
                f"Fashion-MNIST files {files[images]} ({dims[images][0]} images) and {files[labels]} "
                f"({dims[labels][0]} labels) do not match: one of them is damaged or from another release. "
                f"ubwlib has not changed them. To fix it, {_fashion_fix(label, folder)}."
            )
    return tv_root


def _torchvision_fashion(root: Path, train: bool, download: bool = False) -> Any:
    import torchvision

    return torchvision.datasets.FashionMNIST(root=str(root), train=train, download=download)


def _fashion_decoded(train: Any, test: Any) -> dict:
    """torchvision's FashionMNIST splits as plain tensors (uint8 N x 28 x 28 images, int64 labels) and class names."""
    out: dict = {"classes": list(train.classes)}
    for split, ds in (("train", train), ("test", test)):
        out[f"{split}_images"] = torch.as_tensor(ds.data).to(torch.uint8).contiguous()
        out[f"{split}_labels"] = torch.as_tensor(ds.targets).to(torch.int64).clone()
    return out


def _bad_label_split(decoded: dict) -> str | None:
    """``"train"``/``"test"`` when that split has a label outside ``[0, len(classes))``, else None."""
    n = len(decoded["classes"])
    for split in ("train", "test"):
        labels = decoded[f"{split}_labels"]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
            return split
    return None


def _decode_fashion(label: str, folder: Path, files: dict[str, Path]) -> dict:
    tv_root = _prepare_fashion(label, folder, files)
    try:
        decoded = _fashion_decoded(_torchvision_fashion(tv_root, True), _torchvision_fashion(tv_root, False))
    except Exception as exc:  # torchvision's readers raise AssertionError on a bad magic number
        raise DataIntegrityError(
            f"Fashion-MNIST IDX files in {folder} could not be read ({type(exc).__name__}: {exc}); check that "
            "they are the standard IDX files (magic numbers 2051/2049). ubwlib has not changed them. To fix "
            f"it, {_fashion_fix(label, folder)}."
        ) from exc
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


_DECODED_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


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
    """The memoised splits (tensors only, read with ``weights_only=True``), or None when missing or unusable."""
    if not path.is_file():
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        ok = (isinstance(d, dict) and all(isinstance(d.get(k), torch.Tensor) for k in _DECODED_KEYS)
              and d["train_images"].dtype == torch.uint8 and d["test_images"].dtype == torch.uint8
              and d["train_images"].dim() == 3 and d["test_images"].dim() == 3
              and d["train_labels"].dtype == torch.int64 and d["test_labels"].dtype == torch.int64
              and d["train_labels"].dim() == 1 and d["test_labels"].dim() == 1
              and len(d["train_images"]) == len(d["train_labels"]) and len(d["test_images"]) == len(d["test_labels"])
              and isinstance(d.get("classes"), (list, tuple)) and len(d["classes"]) > 0
              and all(isinstance(c, str) for c in d["classes"]) and _bad_label_split(d) is None)
    except Exception:  # truncated, corrupt or foreign file: decode again
        return None
    return d if ok else None


def _write_decoded(path: Path, decoded: dict) -> None:
    """Atomic; a read-only or full cache is not an error (the next load decodes again)."""
    try:
        _derived_dir()  # the cache root (marked when ubwlib creates it) and its data folder
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path.parent)
        _atomic_torch_save(decoded, path)
    except OSError:
        pass


def _fashion_splits(decoded: dict, size: int | None) -> DatasetSplits:
    classes = tuple(decoded["classes"])
    splits = {}
    for split in ("train", "test"):
        images = decoded[f"{split}_images"].unsqueeze(1).contiguous()
        if size is not None:
            images = _resize_uint8(images, size)
        splits[split] = ImageDataset(images=images, labels=decoded[f"{split}_labels"], classes=classes,
                                     name=f"{_sized_name('fashion-mnist', size, 28)}/{split}")
    return DatasetSplits(**splits)


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


def _load_fashion(root: str | Path | None, download: bool, size: int | None) -> DatasetSplits:
    candidates = _fashion_candidates(root)
    for label, cand in candidates:
        hit = _find_fashion(cand)
        if hit is None:
            continue
        folder, files = hit
        # torchvision decodes the IDX files once; later loads read the memoised tensors (about 0.1 s, and no
        # torchvision import, which costs 1.7 s per process: every chapter of the book is a process)
        memo = _decoded_path(files)
        decoded = _read_decoded(memo)
        if decoded is None:
            decoded = _decode_fashion(label, folder, files)
            _write_decoded(memo, decoded)
        return _fashion_splits(decoded, size)
    if download and root is None:
        tv_root = data_cache_dir() / "torchvision"
        try:
            tv_root = _derived_dir("torchvision")
            train = _torchvision_fashion(tv_root, True, download=True)
            test = _torchvision_fashion(tv_root, False, download=True)
        except Exception as exc:  # offline, proxy, disk full, ...
            raise DataNotFoundError(
                f"downloading Fashion-MNIST into {tv_root} failed ({type(exc).__name__}: {exc}).\n"
                + _fashion_help(candidates)
            ) from exc
        return _fashion_splits(_fashion_decoded(train, test), size)
    msg = _fashion_help(candidates)
    if root is not None:
        msg = (
            f"root={root} was given explicitly but holds no Fashion-MNIST (an explicit root is not "
            "silently replaced by other locations; drop root= to search $UBW_DATA, the system package "
            "and the download cache).\n" + msg
        )
    raise DataNotFoundError(msg)


# --------------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------------


def _cifar_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in _CIFAR_FILES)


def _cifar_root_of(root: Path) -> Path | None:
    """The torchvision root for a folder holding ``cifar-10-batches-py/`` (or being it), else None."""
    if _cifar_complete(root / _CIFAR_FOLDER):
        return root
    if root.name == _CIFAR_FOLDER and _cifar_complete(root):
        return root.parent
    return None


def _cifar_candidates(root: str | Path | None) -> list[tuple[str, Path]]:
    if root is not None:
        return [("root", Path(root).expanduser())]
    out: list[tuple[str, Path]] = []
    env = _env_data_root()
    if env is not None:
        out.append(("$UBW_DATA", env))
    out.append(("download cache", data_cache_dir() / "torchvision"))
    return out


def _cifar_class(check_integrity: bool) -> type:
    import torchvision

    if check_integrity:
        return torchvision.datasets.CIFAR10

    class _CIFAR10NoMD5(torchvision.datasets.CIFAR10):
        """CIFAR10 that only requires the batch files to exist (for re-packed or test copies)."""

        def _check_integrity(self) -> bool:
            folder = os.path.join(self.root, self.base_folder)
            return all(
                os.path.isfile(os.path.join(folder, name))
                for name, _md5 in self.train_list + self.test_list
            )

        def _load_meta(self) -> None:
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            if not os.path.isfile(path):
                raise RuntimeError(f"CIFAR-10 metadata file {path} not found")
            with open(path, "rb") as f:
                data = pickle.load(f, encoding="latin1")
            self.classes = data[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    return _CIFAR10NoMD5


def _cifar_to_dataset(ds: Any, split: str, size: int | None) -> ImageDataset:
    data = np.asarray(ds.data, dtype=np.uint8)  # N x H x W x C
    images = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    if size is not None:
        images = _resize_uint8(images, size)
    return ImageDataset(
        images=images,
        labels=torch.as_tensor(list(ds.targets), dtype=torch.int64),
        classes=tuple(str(c) for c in ds.classes),
        name=f"{_sized_name('cifar10', size, 32)}/{split}",
    )


def _load_cifar10(
    root: str | Path | None, download: bool, size: int | None, check_integrity: bool
) -> DatasetSplits:
    cls = _cifar_class(check_integrity)
    candidates = _cifar_candidates(root)
    for _label, cand in candidates:
        tv_root = _cifar_root_of(cand)
        if tv_root is None:
            continue
        try:
            train = cls(root=str(tv_root), train=True, download=False)
            test = cls(root=str(tv_root), train=False, download=False)
        except RuntimeError as exc:
            raise DataIntegrityError(
                f"CIFAR-10 files in {tv_root / _CIFAR_FOLDER} failed torchvision's check ({exc}). If this "
                "is a re-packed or test copy whose md5 sums differ from the official release, pass "
                "check_integrity=False (only the files' presence is then checked)."
            ) from exc
        except Exception as exc:  # a truncated or corrupted batch file (UnpicklingError, EOFError, ...)
            raise DataIntegrityError(
                f"CIFAR-10 files in {tv_root / _CIFAR_FOLDER} could not be read ({type(exc).__name__}: {exc}): "
                "a batch file is truncated or corrupted. ubwlib has not changed them. To fix it, replace the "
                f"folder with a fresh extract of cifar-10-python.tar.gz (or delete it if it is ubwlib's download "
                f"under {data_cache_dir() / 'torchvision'} and load with download=True)."
            ) from exc
        return DatasetSplits(
            train=_cifar_to_dataset(train, "train", size), test=_cifar_to_dataset(test, "test", size)
        )
    lines = "\n".join(f"  - {label}: {path}/{_CIFAR_FOLDER}" for label, path in candidates)
    help_text = (
        f"CIFAR-10 not found. Searched:\n{lines}\n"
        f"Provide it by passing root=<folder> or setting UBW_DATA=<folder>, where the folder contains "
        f"{_CIFAR_FOLDER}/ (data_batch_1..5, test_batch, batches.meta), or allow downloads: "
        f"load_dataset('cifar10', download=True) (saved under {data_cache_dir() / 'torchvision'}), "
        "or the CLI `ubw data cifar10 --download`."
    )
    if download and root is None:
        tv_root = data_cache_dir() / "torchvision"
        try:
            tv_root = _derived_dir("torchvision")
            train = cls(root=str(tv_root), train=True, download=True)
            test = cls(root=str(tv_root), train=False, download=True)
        except Exception as exc:
            raise DataNotFoundError(
                f"downloading CIFAR-10 into {tv_root} failed ({type(exc).__name__}: {exc}).\n" + help_text
            ) from exc
        return DatasetSplits(
            train=_cifar_to_dataset(train, "train", size), test=_cifar_to_dataset(test, "test", size)
        )
    if root is not None:
        help_text = f"root={root} was given explicitly but holds no CIFAR-10.\n" + help_text
    raise DataNotFoundError(help_text)


# --------------------------------------------------------------------------------------------------
# ImageFolder (and presets)
# --------------------------------------------------------------------------------------------------


class _BadImage(Exception):
    """Internal: an image file that PIL cannot decode (collected by :func:`_decode_all`)."""

    def __init__(self, path: Path, exc: BaseException) -> None:
        super().__init__(f"{path}: {type(exc).__name__}: {exc}")
        self.path = path
        self.exc = exc


def _image_errors() -> tuple[type[BaseException], ...]:
    """What decoding a bad image file raises (PIL: UnidentifiedImageError and "image file is truncated" are
    OSErrors; broken chunks raise SyntaxError, ValueError, struct.error, zlib.error, ...)."""
    from PIL import Image

    return (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, LookupError, TypeError,
            Image.DecompressionBombError)


def _decode_image(path: str, size: int) -> torch.Tensor:
    """Decode one image file to ``uint8`` ``3 x size x size`` (RGB; bilinear + antialias resize)."""
    from torchvision.datasets.folder import pil_loader

    try:
        img = pil_loader(path)  # opens, converts to RGB
        arr = np.array(img, dtype=np.uint8)
        if arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
            raise ValueError(f"decoded to an array of shape {arr.shape}, not H x W x 3")
    except _image_errors() as exc:
        raise _BadImage(Path(path), exc) from exc
    x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)
    return _resize_uint8(x, size)[0].contiguous()


def _list_class_files(class_dir: Path) -> list[Path]:
    """Image files under ``class_dir``, in torchvision ImageFolder order (sorted walk, followlinks)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    out = []
    for dirpath, _dirs, fnames in sorted(os.walk(class_dir, followlinks=True)):
        for fname in sorted(fnames):
            if has_file_allowed_extension(fname, IMG_EXTENSIONS):
                out.append(Path(dirpath) / fname)
    return out


def _list_classes(split_dir: Path) -> list[str]:
    from torchvision.datasets.folder import find_classes

    try:
        classes, _ = find_classes(str(split_dir))
    except FileNotFoundError as exc:
        raise DataNotFoundError(f"{split_dir} has no class sub-folders (ImageFolder layout expected)") from exc
    return classes


def _imagefolder_samples(
    path: Path, max_classes: int | None
) -> tuple[tuple[str, ...], list[tuple[Path, int]], list[tuple[Path, int]], str, list[Path]]:
    """Class list, train samples, test samples, test split name, extra files that key the cache."""
    train_dir = path / "train"
    if not train_dir.is_dir():
        raise DataNotFoundError(
            f"{train_dir} not found: an image folder dataset needs <path>/train/<class>/... and "
            "<path>/val/<class>/... (or <path>/test/, or Tiny-ImageNet's val/images + val_annotations.txt)"
        )
    all_classes = _list_classes(train_dir)
    classes = all_classes if max_classes is None else all_classes[:max_classes]
    class_to_idx = {c: i for i, c in enumerate(classes)}
    train: list[tuple[Path, int]] = []
    for c in classes:
        files = _list_class_files(train_dir / c)
        if not files:
            raise DataNotFoundError(f"class folder {train_dir / c} contains no images")
        train.extend((f, class_to_idx[c]) for f in files)

    test_name = "val" if (path / "val").is_dir() else "test" if (path / "test").is_dir() else None
    if test_name is None:
        raise DataNotFoundError(f"neither {path / 'val'} nor {path / 'test'} exists (needed for the test split)")
    test_dir = path / test_name
    all_set = set(all_classes)
    test: list[tuple[Path, int]] = []
    extra: list[Path] = []
    annotations = test_dir / f"{test_name}_annotations.txt"
    if not annotations.is_file():
        annotations = test_dir / "val_annotations.txt"
    if annotations.is_file():  # Tiny-ImageNet: <split>/images/*.JPEG + <split>/val_annotations.txt
        extra.append(annotations)
        try:
            text = annotations.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataLayoutError(
                f"{annotations} cannot be read as a text file ({type(exc).__name__}: {exc}); it should hold lines "
                "'<file>\\t<class>...' (replace it with the dataset's original)"
            ) from exc
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2:
                raise DataLayoutError(f"{annotations}:{lineno}: expected '<file>\\t<class>...'; got {line!r}")
            fname, cls = parts[0].strip(), parts[1].strip()
            if cls not in all_set:
                raise DataLayoutError(
                    f"{annotations}:{lineno}: class {cls!r} is not a class folder of {train_dir}"
                )
            if cls in class_to_idx:
                f = test_dir / "images" / fname
                if not f.is_file():
                    raise DataNotFoundError(f"{annotations}:{lineno}: image {f} not found")
                test.append((f, class_to_idx[cls]))
    else:
        test_classes = _list_classes(test_dir)
        unknown = [c for c in test_classes if c not in all_set]
        if unknown:
            hint = (
                " (for Tiny-ImageNet's val/images layout, val_annotations.txt must be present)"
                if "images" in unknown else ""
            )
            raise DataLayoutError(
                f"{test_dir} has classes that {train_dir} lacks: {unknown[:10]}{hint}; the test split must "
                "use the train split's class list"
            )
        for c in test_classes:
            if c in class_to_idx:
                test.extend((f, class_to_idx[c]) for f in _list_class_files(test_dir / c))
    if not test:
        raise DataNotFoundError(f"{test_dir} contains no images of the {len(classes)} selected classes")
    return tuple(classes), train, test, test_name, extra


def _decode_all(files: Sequence[Path], size: int, where: Path | None = None) -> torch.Tensor:
    """Decode ``files``; unreadable ones raise one :class:`DataIntegrityError` naming every bad file."""
    out = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    workers = max(1, min(8, os.cpu_count() or 1))
    failures: list[tuple[Path, BaseException]] = []

    def work(i: int) -> None:
        try:
            out[i] = _decode_image(str(files[i]), size)
        except _BadImage as bad:
            failures.append((bad.path, bad.exc))  # list.append is atomic

    if workers == 1 or len(files) < 64:
        for i in range(len(files)):
            work(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(work, range(len(files))))
    if failures:
        failures.sort(key=lambda f: str(f[0]))
        shown = "\n".join(f"  {p}: {type(e).__name__}: {e}" for p, e in failures[:10])
        more = f"\n  ... and {len(failures) - 10} more" if len(failures) > 10 else ""
        n = len(failures)
        raise DataIntegrityError(
            f"{n} image file{'s' if n > 1 else ''}{f' in {where}' if where is not None else ''} could not be "
            f"decoded (truncated, corrupted or not an image):\n{shown}{more}\n"
            f"ubwlib has not changed {'them' if n > 1 else 'it'}. Replace each bad file with an intact copy "
            "(re-download or re-extract the dataset), or remove it from the image folder, then load again."
        )
    return out


def _load_imagefolder(
    path: Path, size: int, max_classes: int | None, base_name: str
) -> DatasetSplits:
    path = path.expanduser()
    if not path.is_dir():
        raise DataNotFoundError(f"image folder dataset {path} not found (expected <path>/train and <path>/val)")
    classes, train, test, _test_name, extra = _imagefolder_samples(path, max_classes)
    resolved = path.resolve()
    listing = []
    for f in sorted({p for p, _ in train} | {p for p, _ in test} | set(extra)):
        try:
            st = f.stat()
        except OSError as exc:  # e.g. a dangling symbolic link
            raise DataNotFoundError(
                f"image file {f} cannot be opened ({type(exc).__name__}: {exc}); a broken link? Restore it or "
                "remove it from the image folder"
            ) from exc
        listing.append((str(f.relative_to(path)), st.st_size, st.st_mtime_ns))
    key_src = json.dumps(
        {
            "v": _IMAGEFOLDER_CACHE_VERSION,
            "path": str(resolved),
            "size": size,
            "max_classes": max_classes,
            "classes": list(classes),
            "files": listing,
        }
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in resolved.name) or "root"
    cache_file = data_cache_dir() / "imagefolder" / f"{safe}-{size}px-{key}.pt"  # see _IMAGEFOLDER_MEMO_RE
    payload = None
    if cache_file.is_file():
        try:
            payload = torch.load(cache_file, map_location="cpu", weights_only=True)
            if not isinstance(payload, dict) or payload.get("key") != key:
                payload = None
        except Exception:  # truncated or foreign file: decode again
            payload = None
    if payload is None:
        payload = {
            "key": key,
            "classes": tuple(classes),
            "train_images": _decode_all([p for p, _ in train], size, path / "train"),
            "train_labels": torch.tensor([y for _, y in train], dtype=torch.int64),
            "test_images": _decode_all([p for p, _ in test], size, path / _test_name),
            "test_labels": torch.tensor([y for _, y in test], dtype=torch.int64),
        }
        try:
            _remove_stale_temps(_derived_dir("imagefolder"))
            _atomic_torch_save(payload, cache_file)
        except OSError:  # a read-only or full cache is not an error (the next load decodes again)
            pass
    cls_tuple = tuple(payload["classes"])
    return DatasetSplits(
        train=ImageDataset(payload["train_images"], payload["train_labels"], cls_tuple, f"{base_name}/train"),
        test=ImageDataset(payload["test_images"], payload["test_labels"], cls_tuple, f"{base_name}/test"),
    )


# --------------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------------


def _parse_spec(spec: str) -> tuple[str, str | None]:
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetSpecError(f"dataset spec must be a non-empty string; got {spec!r}; valid specs: {_valid_specs()}")
    spec = spec.strip()
    head, sep, rest = spec.partition(":")
    kind = head.strip().lower()
    if kind in _FASHION_ALIASES and not sep:
        return "fashion-mnist", None
    if kind in _CIFAR_ALIASES and not sep:
        return "cifar10", None
    if kind == "imagefolder" or kind in IMAGEFOLDER_PRESETS:
        return kind, (rest if sep and rest else None)
    raise DatasetSpecError(f"unknown dataset spec {spec!r}; valid specs: {_valid_specs()}")


def _valid_specs() -> str:
    presets = [f"{p}:<path>" for p in IMAGEFOLDER_PRESETS]
    return ", ".join([*DATASET_SPECS, *presets]) + " (fashion-mnist alias: fashionmnist)"


def load_dataset(
    spec: str,
    *,
    root: str | Path | None = None,
    download: bool = False,
    image_size: int | None = None,
    check_integrity: bool = True,
    max_classes: int | None = None,
) -> DatasetSplits:
    """Load the train and test splits of a dataset as :class:`ImageDataset` s.

    ``spec``: ``"fashion-mnist"`` (alias ``"fashionmnist"``), ``"cifar10"``, ``"imagefolder:<path>"``
    or ``"<preset>:<path>"`` for a preset of :data:`IMAGEFOLDER_PRESETS` (``"imagenet50:<path>"``).

    ``root``: where to look (Fashion-MNIST / CIFAR-10). When given it is the only place searched;
    otherwise ``$UBW_DATA``, then (Fashion-MNIST) :data:`FASHION_MNIST_SYSTEM_DIR`, then the download
    cache ``data_cache_dir()/torchvision``. For image folders, ``root`` may stand in for ``<path>``.

    ``download``: allow torchvision to download into ``data_cache_dir()/torchvision`` when nothing is
    found. ``image_size``: resize to ``image_size x image_size`` (bilinear + antialias); image folders
    default to 64 (or the preset's size), the others keep their native size when None.
    ``check_integrity``: CIFAR-10 only; False skips torchvision's md5 check (re-packed copies).
    ``max_classes``: image folders only; keep the first classes in sorted folder-name order.

    Raises :class:`DataNotFoundError` (with the ways to provide the data) when it is not found;
    :class:`DataIntegrityError` naming the file and the fix when files are there but unreadable (a truncated
    or corrupted ``.gz``/IDX file, an image that cannot be decoded, CIFAR-10's failed md5 check);
    :class:`DatasetSpecError` (a ``ValueError`` and a ``DataIntegrityError``) for an invalid ``spec``, and
    :class:`DataLayoutError` (likewise) for an inconsistent image folder. Other bad arguments
    (``image_size``, ``max_classes``) raise a plain ``ValueError``.
    """
    kind, path = _parse_spec(spec)
    size = _check_image_size(image_size)
    if max_classes is not None and (
        isinstance(max_classes, bool) or not isinstance(max_classes, (int, np.integer)) or max_classes < 1
    ):
        raise ValueError(f"max_classes must be a positive int or None; got {max_classes!r}")
    if kind == "fashion-mnist" or kind == "cifar10":
        if max_classes is not None:
            raise ValueError(f"max_classes applies to image folders only, not {kind!r}")
        if kind == "fashion-mnist":
            return _load_fashion(root, bool(download), size)
        return _load_cifar10(root, bool(download), size, bool(check_integrity))
    if path is None:
        if root is None:
            raise DatasetSpecError(
                f"dataset spec {spec!r} names no folder: use '{kind}:<path>' or pass root=<path> "
                f"(--root in the CLI); valid specs: {_valid_specs()}"
            )
        path = str(root)
    preset = IMAGEFOLDER_PRESETS.get(kind, {})
    eff_size = size if size is not None else int(preset.get("image_size", _DEFAULT_IMAGEFOLDER_SIZE))
    eff_classes = max_classes if max_classes is not None else preset.get("max_classes")
    folder = Path(path).expanduser()
    if kind == "imagefolder":
        base = f"imagefolder:{folder.resolve().name}"
        if eff_classes is not None:
            base += f"-c{eff_classes}"
        base = _sized_name(base, eff_size, _DEFAULT_IMAGEFOLDER_SIZE)
    else:
        base = kind
        if eff_classes != preset.get("max_classes"):
            base += f"-c{eff_classes if eff_classes is not None else 'all'}"
        base = _sized_name(base, eff_size, int(preset.get("image_size", _DEFAULT_IMAGEFOLDER_SIZE)))
    return _load_imagefolder(folder, eff_size, None if eff_classes is None else int(eff_classes), base)


def describe_sources(spec: str = "fashion-mnist", root: str | Path | None = None) -> list[tuple[str, Path, bool]]:
    """Candidate locations for ``spec``, in lookup order, and whether each holds the data.

    Returns ``(label, path, found)`` triples (used by the CLI ``ubw data``). ``found`` means the data
    files are there (not merely that the folder exists).
    """
    kind, path = _parse_spec(spec)
    if kind == "fashion-mnist":
        out = []
        for label, cand in _fashion_candidates(root):
            hit = _find_fashion(cand)
            out.append((label, hit[0] if hit else cand, hit is not None))
        return out
    if kind == "cifar10":
        out = []
        for label, cand in _cifar_candidates(root):
            tv_root = _cifar_root_of(cand)
            out.append((label, tv_root / _CIFAR_FOLDER if tv_root else cand, tv_root is not None))
        return out
    folder = Path(path if path is not None else (root if root is not None else ".")).expanduser()
    val = folder / "val" if (folder / "val").is_dir() or not (folder / "test").is_dir() else folder / "test"
    return [
        ("train", folder / "train", (folder / "train").is_dir()),
        (val.name, val, val.is_dir()),
    ]
