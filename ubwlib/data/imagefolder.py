"""Image folders: a ``train/`` + ``val/`` (or ``test/``) tree of ``<class>/<image>`` files (torchvision's
ImageFolder layout and order), including Tiny-ImageNet's ``val/images`` + ``val_annotations.txt``.

Images are decoded with PIL to RGB and resized to ``size x size`` (bilinear + antialias). The decoded splits
are memoised under ``data_cache_dir()/imagefolder/<name>-<size>px-<key>.pt`` (see :mod:`ubwlib.data.memo`),
keyed by the folder, the size, the classes and every file's relative path, size and mtime.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .._paths import data_cache_dir
from .dataset import (
    DataIntegrityError, DataLayoutError, DataNotFoundError, DatasetSplits, ImageDataset, _resize_uint8, _sized_name,
)
from .memo import read_memo, write_memo

_DEFAULT_IMAGEFOLDER_SIZE = 64
_IMAGEFOLDER_CACHE_VERSION = 1


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
    cache_file = data_cache_dir() / "imagefolder" / f"{safe}-{size}px-{key}.pt"  # see memo._IMAGEFOLDER_MEMO_RE
    payload = read_memo(cache_file)
    if not isinstance(payload, dict) or payload.get("key") != key:
        payload = {
            "key": key,
            "classes": tuple(classes),
            "train_images": _decode_all([p for p, _ in train], size, path / "train"),
            "train_labels": torch.tensor([y for _, y in train], dtype=torch.int64),
            "test_images": _decode_all([p for p, _ in test], size, path / _test_name),
            "test_labels": torch.tensor([y for _, y in test], dtype=torch.int64),
        }
        write_memo(cache_file, payload)  # a read-only or full cache is not an error
    cls_tuple = tuple(payload["classes"])
    return DatasetSplits(
        train=ImageDataset(payload["train_images"], payload["train_labels"], cls_tuple, f"{base_name}/train"),
        test=ImageDataset(payload["test_images"], payload["test_labels"], cls_tuple, f"{base_name}/test"),
    )


def load_imagefolder(
    kind: str, folder: Path, size: int | None, max_classes: int | None, preset: dict | None = None
) -> DatasetSplits:
    """The image folder ``folder`` as ``kind`` (``"imagefolder"`` or a preset's name, whose settings
    ``preset`` gives): ``size`` and ``max_classes`` default to the preset's (64 and all classes without one).

    Names: ``imagefolder:<folder name>[-c<N>][@<size>]``, or ``<preset>[-c<N>|-call][@<size>]`` when a
    setting differs from the preset's.
    """
    preset = preset or {}
    native = int(preset.get("image_size", _DEFAULT_IMAGEFOLDER_SIZE))
    eff_size = size if size is not None else native
    eff_classes = max_classes if max_classes is not None else preset.get("max_classes")
    folder = folder.expanduser()
    if kind == "imagefolder":
        base = f"imagefolder:{folder.resolve().name}"
        if eff_classes is not None:
            base += f"-c{eff_classes}"
        base = _sized_name(base, eff_size, _DEFAULT_IMAGEFOLDER_SIZE)
    else:
        base = kind
        if eff_classes != preset.get("max_classes"):
            base += f"-c{eff_classes if eff_classes is not None else 'all'}"
        base = _sized_name(base, eff_size, native)
    return _load_imagefolder(folder, eff_size, None if eff_classes is None else int(eff_classes), base)


def describe_imagefolder(folder: Path) -> list[tuple[str, Path, bool]]:
    """``(split, folder, found)`` for the train and the test (``val/`` or ``test/``) split of ``folder``."""
    val = folder / "val" if (folder / "val").is_dir() or not (folder / "test").is_dir() else folder / "test"
    return [
        ("train", folder / "train", (folder / "train").is_dir()),
        (val.name, val, val.is_dir()),
    ]
