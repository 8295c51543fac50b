"""CIFAR-10 from its python-pickle batches (``cifar-10-batches-py/``), read by torchvision (with its md5
check unless ``check_integrity=False``); torchvision also downloads it on request."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .dataset import DataIntegrityError, DataNotFoundError, DatasetSplits, ImageDataset, _resize_uint8, _sized_name
from .memo import _derived_dir, download_dir

_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")


def _cifar_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in _CIFAR_FILES)


def _cifar_root_of(root: Path) -> Path | None:
    """The torchvision root for a folder holding ``cifar-10-batches-py/`` (or being it), else None."""
    if _cifar_complete(root / _CIFAR_FOLDER):
        return root
    if root.name == _CIFAR_FOLDER and _cifar_complete(root):
        return root.parent
    return None


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


def describe_cifar10(candidates: Sequence[tuple[str, Path]]) -> list[tuple[str, Path, bool]]:
    """``(label, folder, found)`` for each candidate location (``.../cifar-10-batches-py`` when found)."""
    out = []
    for label, cand in candidates:
        tv_root = _cifar_root_of(cand)
        out.append((label, tv_root / _CIFAR_FOLDER if tv_root else cand, tv_root is not None))
    return out


def load_cifar10(
    candidates: Sequence[tuple[str, Path]], root: str | Path | None, download: bool, size: int | None,
    check_integrity: bool,
) -> DatasetSplits:
    """CIFAR-10 (torchvision's reader) from the first candidate location that holds it, else (``download``
    without ``root``) torchvision's download into :func:`ubwlib.data.memo.download_dir`."""
    cls = _cifar_class(check_integrity)
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
                f"under {download_dir()} and load with download=True)."
            ) from exc
        return DatasetSplits(
            train=_cifar_to_dataset(train, "train", size), test=_cifar_to_dataset(test, "test", size)
        )
    lines = "\n".join(f"  - {label}: {path}/{_CIFAR_FOLDER}" for label, path in candidates)
    help_text = (
        f"CIFAR-10 not found. Searched:\n{lines}\n"
        f"Provide it by passing root=<folder> or setting UBW_DATA=<folder>, where the folder contains "
        f"{_CIFAR_FOLDER}/ (data_batch_1..5, test_batch, batches.meta), or allow downloads: "
        f"load_dataset('cifar10', download=True) (saved under {download_dir()}), "
        "or the CLI `ubw data cifar10 --download`."
    )
    if download and root is None:
        tv_root = download_dir()
        try:
            tv_root = _derived_dir(tv_root.name)
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
