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

Nothing is ever written into a user's dataset folder: decompressed IDX files, decoded image folders
and downloads live under :func:`ubwlib._paths.data_cache_dir`. Cached tensors are read back with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import os
import pickle
import shutil
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ._paths import data_cache_dir

__all__ = [
    "ImageDataset",
    "DatasetSplits",
    "DataNotFoundError",
    "DataIntegrityError",
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
    """Dataset files were found but failed a check (e.g. torchvision's md5 sums for CIFAR-10)."""


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


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.chmod(tmp, 0o644)
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
    out.append(("system package dataset-fashion-mnist", Path(FASHION_MNIST_SYSTEM_DIR)))
    out.append(("download cache", data_cache_dir() / "torchvision"))
    return out


def _gzip_size(path: Path) -> int:
    """Uncompressed size recorded in a gzip trailer (mod 2**32)."""
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


def _materialize_raw(src: Path, dest: Path) -> None:
    """Make ``dest`` an uncompressed copy of ``src`` (``.gz``) or a link to it (raw); atomic, idempotent."""
    st = src.stat()
    if src.suffix == ".gz":
        if dest.is_file() and not dest.is_symlink():
            dst = dest.stat()
            if dst.st_size % (1 << 32) == _gzip_size(src) and dst.st_mtime_ns == st.st_mtime_ns:
                return
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, gzip.open(src, "rb") as inp:
                shutil.copyfileobj(inp, out, length=1 << 22)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; derived copies are as readable as the source
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    target = str(src.resolve())
    if dest.is_symlink() and os.readlink(dest) == target:
        return
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{id(dest)}.tmp"
    try:
        os.symlink(target, tmp)
    except OSError:  # no symlinks here (e.g. some Windows setups): copy instead
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def _fashion_torchvision_root(folder: Path, files: dict[str, Path]) -> Path:
    """A root that torchvision's FashionMNIST can read: the source itself, or a derived copy in the cache."""
    if (
        folder.name == "raw"
        and folder.parent.name == "FashionMNIST"
        and all(p.suffix != ".gz" for p in files.values())
    ):
        return folder.parent.parent
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    tv_root = data_cache_dir() / "fashion-mnist" / key
    raw = tv_root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    note = tv_root / "SOURCE.txt"
    text = f"derived copy of {folder.resolve()}\n"
    if not note.is_file() or note.read_text() != text:
        note.write_text(text)
    for base, src in files.items():
        _materialize_raw(src, raw / base)
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
              and len(d["train_images"]) == len(d["train_labels"]) and len(d["test_images"]) == len(d["test_labels"])
              and isinstance(d.get("classes"), (list, tuple)) and all(isinstance(c, str) for c in d["classes"]))
    except Exception:  # truncated, corrupt or foreign file: decode again
        return None
    return d if ok else None


def _write_decoded(path: Path, decoded: dict) -> None:
    """Atomic; a read-only or full cache is not an error (the next load decodes again)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            torch.save(decoded, tmp)
            os.chmod(tmp, 0o644)  # as readable as the derived IDX copies
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
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
    for _label, cand in candidates:
        hit = _find_fashion(cand)
        if hit is None:
            continue
        folder, files = hit
        # torchvision decodes the IDX files once; later loads read the memoised tensors (about 0.1 s, and no
        # torchvision import, which costs 1.7 s per process: every chapter of the book is a process)
        memo = _decoded_path(files)
        decoded = _read_decoded(memo)
        if decoded is None:
            tv_root = _fashion_torchvision_root(folder, files)
            try:
                decoded = _fashion_decoded(_torchvision_fashion(tv_root, True), _torchvision_fashion(tv_root, False))
            except Exception as exc:  # torchvision's readers raise AssertionError on a bad magic number
                raise DataIntegrityError(
                    f"Fashion-MNIST IDX files in {folder} could not be read ({exc}); check that they are the "
                    "standard IDX files (magic numbers 2051/2049)"
                ) from exc
            _write_decoded(memo, decoded)
        return _fashion_splits(decoded, size)
    if download and root is None:
        tv_root = data_cache_dir() / "torchvision"
        try:
            tv_root.mkdir(parents=True, exist_ok=True)
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
            tv_root.mkdir(parents=True, exist_ok=True)
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


def _decode_image(path: str, size: int) -> torch.Tensor:
    """Decode one image file to ``uint8`` ``3 x size x size`` (RGB; bilinear + antialias resize)."""
    from torchvision.datasets.folder import pil_loader

    img = pil_loader(path)  # opens, converts to RGB
    arr = np.array(img, dtype=np.uint8)
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
        for lineno, line in enumerate(annotations.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2:
                raise ValueError(f"{annotations}:{lineno}: expected '<file>\\t<class>...'; got {line!r}")
            fname, cls = parts[0].strip(), parts[1].strip()
            if cls not in all_set:
                raise ValueError(f"{annotations}:{lineno}: class {cls!r} is not a class folder of {train_dir}")
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
            raise ValueError(
                f"{test_dir} has classes that {train_dir} lacks: {unknown[:10]}{hint}; the test split must "
                "use the train split's class list"
            )
        for c in test_classes:
            if c in class_to_idx:
                test.extend((f, class_to_idx[c]) for f in _list_class_files(test_dir / c))
    if not test:
        raise DataNotFoundError(f"{test_dir} contains no images of the {len(classes)} selected classes")
    return tuple(classes), train, test, test_name, extra


def _decode_all(files: Sequence[Path], size: int) -> torch.Tensor:
    out = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    workers = max(1, min(8, os.cpu_count() or 1))

    def work(i: int) -> None:
        out[i] = _decode_image(str(files[i]), size)

    if workers == 1 or len(files) < 64:
        for i in range(len(files)):
            work(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(work, range(len(files))))
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
        st = f.stat()
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
    cache_file = data_cache_dir() / "imagefolder" / f"{safe}-{size}px-{key}.pt"
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
            "train_images": _decode_all([p for p, _ in train], size),
            "train_labels": torch.tensor([y for _, y in train], dtype=torch.int64),
            "test_images": _decode_all([p for p, _ in test], size),
            "test_labels": torch.tensor([y for _, y in test], dtype=torch.int64),
        }
        _atomic_torch_save(payload, cache_file)
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
        raise ValueError(f"dataset spec must be a non-empty string; valid specs: {_valid_specs()}")
    spec = spec.strip()
    head, sep, rest = spec.partition(":")
    kind = head.strip().lower()
    if kind in _FASHION_ALIASES and not sep:
        return "fashion-mnist", None
    if kind in _CIFAR_ALIASES and not sep:
        return "cifar10", None
    if kind == "imagefolder" or kind in IMAGEFOLDER_PRESETS:
        return kind, (rest if sep and rest else None)
    raise ValueError(f"unknown dataset spec {spec!r}; valid specs: {_valid_specs()}")


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

    Raises :class:`DataNotFoundError` (with the ways to provide the data) when it is not found.
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
            raise ValueError(f"{kind!r} needs a folder: use '{kind}:<path>' or pass root=<path>")
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
