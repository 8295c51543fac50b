"""The in-memory dataset type (:class:`ImageDataset`, :class:`DatasetSplits`), the data errors, and the
image helpers every loader shares (resizing, dataset names)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ..cache import atomic_path

_SAVE_FORMAT = "ubwlib.ImageDataset"


class DataNotFoundError(FileNotFoundError):
    """The requested dataset is not on this machine (the message says how to provide it)."""


class DataIntegrityError(RuntimeError):
    """Dataset files were found but failed a check or could not be read (e.g. torchvision's md5 sums for
    CIFAR-10, a truncated ``.gz`` or IDX file, an image that cannot be decoded); the message names the file
    and the fix. ubwlib never modifies or deletes the files it names."""


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
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
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
# helpers shared by the loaders
# --------------------------------------------------------------------------------------------------


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


def _sized_name(base: str, size: int | None, native: int) -> str:
    """A dataset's name: ``base``, or ``base@<size>`` when it was resized away from its native size."""
    return base if size is None or size == native else f"{base}@{size}"
