"""ubwlib's own data folder (``data_cache_dir()``, i.e. ``<cache root>/data``): the decode memos, their
temporaries, and what ``ubw cache info`` / ``ubw cache clear`` list and remove there.

Layout::

    fashion-mnist/decoded-<24 hex>.pt          Fashion-MNIST's decoded splits (see ubwlib.data.fashion)
    imagefolder/<name>-<N>px-<24 hex>.pt       an image folder's decoded splits (see ubwlib.data.imagefolder)
    torchvision/                               downloads (kept by ``ubw cache clear``)

A memo is written with :func:`ubwlib.cache.atomic_path` (a temporary ``.<name>.<random>.tmp`` renamed into
place) and read back with ``torch.load(..., weights_only=True)``; an unreadable memo is simply decoded again.
Temporaries left by a killed process are removed by the next write into the same folder, and by
``ubw cache clear``, once they are :data:`_STALE_TMP_AGE_S` old. Nothing here ever touches a user's dataset
folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
from pathlib import Path
from typing import Any

import torch

from .._paths import cache_root, data_cache_dir
from ..cache import atomic_path, ensure_cache_root

#: Temporaries older than this are stale whoever wrote them (a live writer keeps its file's mtime fresh).
_STALE_TMP_AGE_S = 3600.0
#: Temporary names: :func:`ubwlib.cache.atomic_path`'s ``.<name>.<random>.tmp``, and those older versions wrote.
_TMP_RE = re.compile(r"\..+\.tmp")
_FASHION_MEMO_RE = re.compile(r"decoded-[0-9a-f]{24}\.pt")
_IMAGEFOLDER_MEMO_RE = re.compile(r".+-[0-9]+px-[0-9a-f]{24}\.pt")
#: Decompressed IDX copies that older versions made for torchvision: ``fashion-mnist/<16 hex>/`` marked by
#: their ``SOURCE.txt``. No longer written; still listed so that ``ubw cache clear`` removes them.
_LEGACY_COPY_RE = re.compile(r"[0-9a-f]{16}")
_LEGACY_NOTE, _LEGACY_PREFIX = "SOURCE.txt", b"derived copy of "
_DERIVED_FOLDERS = ("fashion-mnist", "imagefolder")  # under data_cache_dir()
_DOWNLOAD_FOLDER = "torchvision"  # under data_cache_dir(): downloads, never listed or cleared
#: How error messages and ``describe_sources`` name :func:`download_dir`.
DOWNLOAD_LABEL = "download cache"


def download_dir() -> Path:
    """Where torchvision downloads datasets when asked to (``data_cache_dir()/torchvision``)."""
    return data_cache_dir() / _DOWNLOAD_FOLDER


def _derived_dir(*parts: str) -> Path:
    """``data_cache_dir()/parts``, created; the cache root is created (and marked) first when missing."""
    with contextlib.suppress(OSError):  # a read-only location fails below, with the real error
        ensure_cache_root(cache_root())
    folder = data_cache_dir().joinpath(*parts)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _is_stale_temp(path: Path) -> bool:
    """A temporary file (``.NAME....tmp``) not modified for :data:`_STALE_TMP_AGE_S` seconds."""
    if not _TMP_RE.fullmatch(path.name):
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        return False
    return time.time() - st.st_mtime > _STALE_TMP_AGE_S


def _remove_stale_temps(folder: Path) -> int:
    """Delete the stale temporaries directly in ``folder`` (one of ubwlib's own data folders); returns how many."""
    removed = 0
    try:
        if folder.is_symlink() or not folder.is_dir():
            return 0
        with os.scandir(folder) as it:
            names = [e.name for e in it if _TMP_RE.fullmatch(e.name)]
    except OSError:
        return 0
    for name in names:
        p = folder / name
        if _is_stale_temp(p):
            with contextlib.suppress(OSError):
                p.unlink()
                removed += 1
    return removed


def _derived_data_folders(data_dir: Path) -> list[Path]:
    """The folders of ``data_dir`` (a ``data_cache_dir()``) that hold derived files (not downloads)."""
    out = []
    for name in _DERIVED_FOLDERS:
        p = data_dir / name
        if p.is_dir() and not p.is_symlink():
            out.append(p)
    return out


def _is_legacy_copy(path: Path) -> bool:
    note = path / _LEGACY_NOTE
    try:
        if path.is_symlink() or not path.is_dir() or note.is_symlink() or not note.is_file():
            return False
        with open(note, "rb") as f:
            return f.read(len(_LEGACY_PREFIX)) == _LEGACY_PREFIX
    except OSError:
        return False


def _derived_data_items(data_dir: Path) -> list[Path]:
    """The derived files ubwlib made under ``data_dir`` (used by ``Cache.entries``/``clear``).

    Files ``fashion-mnist/decoded-<24 hex>.pt`` and ``imagefolder/<name>-<N>px-<24 hex>.pt``, and the
    decompressed copies ``fashion-mnist/<16 hex>/`` of older versions (marked by their ``SOURCE.txt``).
    Never the downloads (``torchvision/``), never anything else.
    """
    items: list[Path] = []
    for folder in _derived_data_folders(data_dir):
        try:
            with os.scandir(folder) as it:
                for e in sorted(it, key=lambda e: e.name):
                    p = Path(e.path)
                    if folder.name == "fashion-mnist":
                        if _LEGACY_COPY_RE.fullmatch(e.name) and _is_legacy_copy(p):
                            items.append(p)
                        elif _FASHION_MEMO_RE.fullmatch(e.name) and e.is_file(follow_symlinks=False):
                            items.append(p)
                    elif _IMAGEFOLDER_MEMO_RE.fullmatch(e.name) and e.is_file(follow_symlinks=False):
                        items.append(p)
        except OSError:
            continue
    return items


def read_memo(path: Path) -> Any | None:
    """The memo at ``path`` (``torch.load(weights_only=True)``), or None when missing or unreadable; the
    caller checks its content."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated, corrupt or foreign file: decode again
        return None


def write_memo(path: Path, payload: Any) -> None:
    """Write ``payload`` to ``path`` (under ``data_cache_dir()``) atomically, after removing the folder's
    stale temporaries. A read-only or full cache is not an error (the next load decodes again)."""
    try:
        _derived_dir()  # the cache root (marked when ubwlib creates it) and its data folder
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path.parent)
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except OSError:
        pass
