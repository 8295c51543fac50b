"""The cache's folder on disk: the names of its files and folders, the root's markers, and the checks that
prove a folder was made by the cache (what :meth:`ubwlib.cache.Cache.clear` may delete). The layout itself is
described in :mod:`ubwlib.cache`."""

from __future__ import annotations

import json
import os
import re
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .files import write_text_atomic
from .keys import SHORT

__all__ = [
    "CACHEDIR_TAG_NAME",
    "CACHEDIR_TAG_SIGNATURE",
    "CACHE_MARKER_NAME",
    "ensure_cache_root",
]

CACHEDIR_TAG_NAME = "CACHEDIR.TAG"
CACHEDIR_TAG_SIGNATURE = "Signature: 8a477f597d28d172789f06886806bc55"
_CACHEDIR_TAG_TEXT = (
    CACHEDIR_TAG_SIGNATURE + "\n"
    "# This file is a cache directory tag created by ubwlib.\n"
    "# For information about cache directory tags, see:\n"
    "#\thttps://bford.info/cachedir/\n"
)

#: The root marker: written (JSON, with ``marker_format``) only when ubwlib creates the root or
#: finds it empty, or by :meth:`Cache.adopt`; :meth:`Cache.clear` refuses a root without it.
CACHE_MARKER_NAME = ".ubwlib-cache"
_MARKER_WHAT = "ubwlib cache root"
_MARKER_FORMAT = 1
_MAX_MARKER_BYTES = 1 << 16

#: The folder of ubwlib.data's derived dataset copies inside the root (a reserved namespace).
DATA_DIR = "data"
#: ``format`` of meta.json and of checkpoint files.
FORMAT = 1
TENSORS_FILE = "tensors.pt"
DATA_FILE = "data.json"
META_FILE = "meta.json"
CKPT_FILE = "checkpoint.pt"

NAMESPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
# ``data`` is where ubwlib._paths.data_cache_dir() keeps dataset copies inside the same root.
RESERVED_NAMESPACES = frozenset({DATA_DIR})
ENTRY_RE = re.compile(r"[0-9a-f]{%d}" % SHORT)
CKPT_RE = re.compile(r"[0-9a-f]{%d}\.ckpt" % SHORT)
STALE_RE = re.compile(r"\.(?:tmp|corrupt|old)-[0-9a-f]{%d}-.+" % SHORT)
_FULL_HASH_RE = re.compile(r"[0-9a-f]{64}")
# files the cache itself puts into entry and checkpoint folders (what a leftover may hold)
_OWN_FILES = frozenset({TENSORS_FILE, DATA_FILE, META_FILE, CKPT_FILE})
# a checkpoint being saved: atomic_path's ".checkpoint.pt.<random>.tmp" (".checkpoint.pt.tmp-<random>" before)
_OWN_TMP_RE = re.compile(r"\.checkpoint\.pt\.(?:tmp-.+|[a-z0-9_]+\.tmp)")


def ubwlib_version() -> str:
    """``ubwlib.__version__`` (recorded in markers and entries)."""
    try:
        import ubwlib

        return str(getattr(ubwlib, "__version__", "unknown"))
    except Exception:  # pragma: no cover - only during a broken install
        return "unknown"


def read_json_file(path: Path, limit: int = _MAX_MARKER_BYTES) -> dict[str, Any] | None:
    """The JSON object in a regular (non-link) file of at most ``limit`` bytes, else None."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        obj = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


# --------------------------------------------------------------------------------------
# The root
# --------------------------------------------------------------------------------------


def has_cachedir_tag(root: Path) -> bool:
    tag = root / CACHEDIR_TAG_NAME
    try:
        if tag.is_symlink() or not tag.is_file():
            return False
        with open(tag, "rb") as fh:
            first = fh.readline(len(CACHEDIR_TAG_SIGNATURE) + 2)
    except OSError:
        return False
    return first.rstrip(b"\r\n") == CACHEDIR_TAG_SIGNATURE.encode("ascii")


def has_root_marker(root: Path) -> bool:
    m = read_json_file(root / CACHE_MARKER_NAME)
    fmt = None if m is None else m.get("marker_format")
    return (
        m is not None and m.get("what") == _MARKER_WHAT
        and isinstance(fmt, int) and not isinstance(fmt, bool) and fmt >= 1
    )


def mark_root(root: Path) -> None:
    """Write the root marker (and CACHEDIR.TAG for backup tools) into ``root``."""
    if not has_cachedir_tag(root):
        write_text_atomic(root / CACHEDIR_TAG_NAME, _CACHEDIR_TAG_TEXT)
    marker = {
        "what": _MARKER_WHAT,
        "marker_format": _MARKER_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(),
        "ubwlib_version": ubwlib_version(),
        "note": "ubwlib clear() deletes only cache entries, checkpoints and derived dataset copies here",
    }
    write_text_atomic(root / CACHE_MARKER_NAME, json.dumps(marker, indent=1) + "\n")


def ensure_cache_root(root: Path | str) -> Path:
    """Create the cache root ``root`` if needed; mark it only if ubwlib created it or it was empty.

    A pre-existing folder holding anything (files or folders) is used but never claimed: it gets
    no marker, so :meth:`Cache.clear` refuses to work there. Also used by :mod:`ubwlib.data` before
    it writes derived dataset copies under ``<root>/data``. Returns ``root`` as a Path.
    """
    root = Path(root)
    try:
        root.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False
    if has_root_marker(root):
        return root
    if not created:
        with os.scandir(root) as it:
            if next(it, None) is not None:
                return root  # someone else's folder (or an older ubwlib's cache): not claimed
    mark_root(root)
    return root


# --------------------------------------------------------------------------------------
# Entries, checkpoints and leftovers: what proves that a folder was made by the cache
# --------------------------------------------------------------------------------------


def _hash_matches(meta: dict[str, Any] | None, namespace: str, short: str) -> bool:
    h = None if meta is None else meta.get("hash")
    return (
        isinstance(h, str) and _FULL_HASH_RE.fullmatch(h) is not None and h[:SHORT] == short
        and meta.get("namespace") == namespace
    )


def is_own_entry(path: Path, namespace: str, short: str | None = None) -> bool:
    """An entry folder the cache wrote: its meta.json names this namespace and a hash starting
    with the folder's name."""
    if path.is_symlink() or not path.is_dir():
        return False
    meta = read_json_file(path / META_FILE, limit=1 << 26)
    return meta is not None and meta.get("format") == FORMAT and _hash_matches(
        meta, namespace, path.name[:SHORT] if short is None else short
    )


def _checkpoint_records(file: Path, namespace: str, short: str) -> bool:
    """Whether ``file`` is a torch.save archive whose pickle records ``namespace`` and a full hash
    starting with ``short`` (what :meth:`Checkpoint.save` writes). Reads only the pickle, never
    unpickles it."""
    import zipfile

    try:
        st = os.lstat(file)
        if not stat.S_ISREG(st.st_mode):
            return False
        with zipfile.ZipFile(file) as zf:
            names = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(names) != 1 or zf.getinfo(names[0]).file_size > 1 << 26:
                return False
            raw = zf.read(names[0])
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError, EOFError):
        return False
    pattern = rb"(?<![0-9a-f])" + re.escape(short.encode("ascii")) + rb"[0-9a-f]{%d}(?![0-9a-f])" % (64 - SHORT)
    return re.search(pattern, raw) is not None and namespace.encode("utf-8") in raw


def is_own_checkpoint(path: Path, namespace: str, short: str | None = None) -> bool:
    """A checkpoint folder the cache wrote: its checkpoint.pt records this namespace and a hash
    starting with the folder's name; or it holds nothing but the cache's temporary checkpoint
    files (an interrupted first save, or a checkpoint discarded as damaged)."""
    if path.is_symlink() or not path.is_dir():
        return False
    short = path.name[:SHORT] if short is None else short
    try:
        with os.scandir(path) as it:
            names = [(e.name, e.is_file(follow_symlinks=False)) for e in it]
    except OSError:
        return False
    if any(name == CKPT_FILE for name, _ in names):
        return _checkpoint_records(path / CKPT_FILE, namespace, short)
    return all(is_file and _OWN_TMP_RE.fullmatch(name) for name, is_file in names)


def _holds_only_cache_files(path: Path) -> bool:
    """A real folder whose content is only regular files the cache writes (a crashed write or
    an interrupted delete)."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        with os.scandir(path) as it:
            for e in it:
                if not e.is_file(follow_symlinks=False):
                    return False
                if e.name not in _OWN_FILES and not _OWN_TMP_RE.fullmatch(e.name):
                    return False
    except OSError:
        return False
    return True


def is_own_leftover(path: Path, namespace: str) -> bool:
    """A ``.tmp-``/``.old-``/``.corrupt-`` folder the cache left behind."""
    short = path.name.split("-", 1)[1][:SHORT]
    return (
        _holds_only_cache_files(path)
        or is_own_entry(path, namespace, short)
        or is_own_checkpoint(path, namespace, short)
    )
