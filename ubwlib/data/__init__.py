"""Image datasets in memory, and loaders for the datasets the UBW paper (and this project) uses.

Everything ends up as one type, :class:`ImageDataset`: ``uint8`` images ``N x C x H x W`` plus
``int64`` labels, class names and a name. :func:`load_dataset` returns the train and test splits
(:class:`DatasetSplits`) of

* ``"fashion-mnist"`` — the project's offline default (Debian's ``dataset-fashion-mnist`` package
  installs the four IDX ``.gz`` files under ``/usr/share/datasets/fashion-mnist/``), read with numpy
  (:mod:`ubwlib.data.fashion`);
* ``"cifar10"`` — torchvision's CIFAR-10 (python-pickle batches; :mod:`ubwlib.data.cifar`);
* ``"imagefolder:<path>"`` — a ``train/`` + ``val/`` (or ``test/``) ImageFolder tree, including the
  Tiny-ImageNet ``val/images`` + ``val_annotations.txt`` layout (:mod:`ubwlib.data.imagefolder`);
* ``"imagenet50:<path>"`` — the public UBW code's ImageNet subset: the first 50 classes (sorted folder
  names) of such a tree, at 64 x 64 (see :data:`IMAGEFOLDER_PRESETS`).

Nothing is ever written into (or deleted from) a user's dataset folder: the decoded splits (memos, so that a
second load reads one file) and downloads live under :func:`ubwlib._paths.data_cache_dir` (``<cache
root>/data``; the root is created and marked with :func:`ubwlib.cache.ensure_cache_root`), written atomically
and read back with ``torch.load(..., weights_only=True)`` (:mod:`ubwlib.data.memo`). ``ubw cache info`` lists
the memos and ``ubw cache clear`` removes them (:meth:`ubwlib.cache.Cache.clear`); downloads are kept.

Errors: :class:`DataNotFoundError` (a ``FileNotFoundError``) when the data is not there;
:class:`DataIntegrityError` (a ``RuntimeError``) when files are there but unreadable (a truncated or
corrupted ``.gz``/IDX file, an image that cannot be decoded, ...; the message names the file and the fix).
Its subclasses :class:`DatasetSpecError` (an invalid spec) and :class:`DataLayoutError` (an image folder
whose layout or annotations are wrong) are also ``ValueError`` s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .cifar import describe_cifar10, load_cifar10
from .dataset import (
    DataIntegrityError,
    DataLayoutError,
    DataNotFoundError,
    DatasetSpecError,
    DatasetSplits,
    ImageDataset,
)
from .fashion import FASHION_MNIST_CLASSES, FASHION_MNIST_SYSTEM_DIR, SYSTEM_LABEL, describe_fashion, load_fashion
from .imagefolder import describe_imagefolder, load_imagefolder
from .memo import DOWNLOAD_LABEL, download_dir

# private helpers other modules use: ubwlib.cache lists and clears the memos, ubwlib.publish lists image folders
from .imagefolder import _imagefolder_samples, _list_classes  # noqa: E402,F401
from .memo import _derived_data_folders, _derived_data_items, _remove_stale_temps  # noqa: E402,F401

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
    "FASHION_MNIST_CLASSES",
    "IMAGEFOLDER_PRESETS",
    "DATASET_SPECS",
]

#: Named ImageFolder presets: ``"<preset>:<path>"`` loads ``<path>`` with these settings.
IMAGEFOLDER_PRESETS: dict[str, dict[str, Any]] = {
    # The public UBW code's ImageNet subset: first 50 classes (sorted folder names), 64 x 64.
    "imagenet50": {"max_classes": 50, "image_size": 64},
}

#: Human-readable list of valid specs (used in error messages).
DATASET_SPECS = ("fashion-mnist", "cifar10", "imagefolder:<path>")

_FASHION_ALIASES = {"fashion-mnist", "fashionmnist", "fashion_mnist"}
_CIFAR_ALIASES = {"cifar10", "cifar-10", "cifar_10"}


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


def _check_image_size(image_size: Any) -> int | None:
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive int or None; got {image_size!r}")
    return int(image_size)


def _candidates(kind: str, root: str | Path | None) -> list[tuple[str, Path]]:
    """Where to look for ``kind`` (``fashion-mnist`` or ``cifar10``), in order, as ``(label, folder)``:
    ``root`` alone when given; else ``$UBW_DATA``, the system package (Fashion-MNIST) and the download cache."""
    if root is not None:
        return [("root", Path(root).expanduser())]
    out: list[tuple[str, Path]] = []
    env = os.environ.get("UBW_DATA")
    if env:
        out.append(("$UBW_DATA", Path(env).expanduser()))
    if kind == "fashion-mnist":
        out.append((SYSTEM_LABEL, Path(FASHION_MNIST_SYSTEM_DIR)))
    out.append((DOWNLOAD_LABEL, download_dir()))
    return out


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
            return load_fashion(_candidates(kind, root), root, bool(download), size)
        return load_cifar10(_candidates(kind, root), root, bool(download), size, bool(check_integrity))
    if path is None:
        if root is None:
            raise DatasetSpecError(
                f"dataset spec {spec!r} names no folder: use '{kind}:<path>' or pass root=<path> "
                f"(--root in the CLI); valid specs: {_valid_specs()}"
            )
        path = str(root)
    return load_imagefolder(kind, Path(path), size, max_classes, IMAGEFOLDER_PRESETS.get(kind))


def describe_sources(spec: str = "fashion-mnist", root: str | Path | None = None) -> list[tuple[str, Path, bool]]:
    """Candidate locations for ``spec``, in lookup order, and whether each holds the data.

    Returns ``(label, path, found)`` triples (used by the CLI ``ubw data``). ``found`` means the data
    files are there (not merely that the folder exists).
    """
    kind, path = _parse_spec(spec)
    if kind == "fashion-mnist":
        return describe_fashion(_candidates(kind, root))
    if kind == "cifar10":
        return describe_cifar10(_candidates(kind, root))
    return describe_imagefolder(Path(path if path is not None else (root if root is not None else ".")).expanduser())
