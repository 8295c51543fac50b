"""Content-addressed cache of trained models, tensors and result tables.

Every expensive result of the book (a trained network, a crafted poison set, a table of
metrics) is stored under a key derived from *what* was computed: a namespace (a single folder name such
as ``"train"`` or ``"ubw-craft"``), the full settings that determine the result,
and a version string that the caller bumps whenever the code producing the result changes
meaning. A rebuilt book with a warm cache therefore never retrains.

Layout on disk (``root`` is :func:`ubwlib._paths.cache_root` unless given)::

    <root>/.ubwlib-cache                marker (JSON, with a format version) written only when
                                        ubwlib creates the root (or finds it empty); clear() needs it
    <root>/CACHEDIR.TAG                 marker for backup tools (written together with the above)
    <root>/<namespace>/<hash20>/        one entry (hash20 = first 20 hex chars of the key)
        tensors.pt                      dict[str, Tensor] written by torch.save
        data.json                       any JSON payload (tables as records, histories, ...)
        meta.json                       namespace, version, canonical settings, full hash,
                                        created time, ubwlib/torch versions, sha256 of both files;
                                        also the entry's own marker (its hash starts with <hash20>)
    <root>/<namespace>/<hash20>.ckpt/   a resumable computation's checkpoint (checkpoint.pt, which
                                        records namespace and full hash: its marker)
    <root>/<namespace>/.tmp-<hash20>-*  an entry being written (renamed into place atomically)
    <root>/data/                        derived dataset copies made by ubwlib.data (decompressed IDX
                                        files, decoded tensors) and its downloads (torchvision/)

Key points of the contract:

* Hashing (:func:`settings_hash`) is canonical: dict key order never matters; unknown types
  raise :class:`TypeError` instead of being silently ``str()``-ed. See
  :func:`canonical_settings` for the exact rules (``1`` and ``1.0`` hash *differently*).
* Entries are written into a temporary directory next to their final place and then
  ``os.rename``-d onto it, so readers never see half an entry. If another process won the
  race, its entry is kept and ours discarded.
* Tensors are only ever loaded with ``torch.load(..., weights_only=True, map_location="cpu")``:
  a cache folder cannot execute code. Every read verifies the sha256 checksums recorded in
  ``meta.json``; a damaged entry is moved aside and deleted with a
  :class:`CacheCorruptionWarning`, and is then simply recomputed.
* :meth:`Cache.clear` only deletes what the cache provably made: it refuses a root without the
  ``.ubwlib-cache`` marker (a folder that existed with content before ubwlib used it never gets
  one; a root written by an older ubwlib has only ``CACHEDIR.TAG`` and must be marked with
  :meth:`Cache.adopt` first), and inside a marked root it deletes only entries whose
  ``meta.json`` matches their folder, checkpoints whose file records their hash, leftovers holding
  nothing but cache files, and the derived dataset copies under ``data/`` (never the downloads
  in ``data/torchvision``, never a user's dataset: links to originals are unlinked, not followed).
* ``Cache(enabled=False)`` never touches the disk (always computes). The environment variable
  ``UBW_NO_CACHE=1`` (also ``true``/``yes``/``on``) disables *reads* only: everything is
  recomputed, and the fresh results replace the stored ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import io
import json
import math
import os
import re
import shutil
import stat
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

if TYPE_CHECKING:  # pandas is imported lazily: importing it costs ~0.3 s
    import pandas as pd

__all__ = [
    "atomic_path",
    "write_bytes_atomic",
    "write_text_atomic",
    "CACHEDIR_TAG_NAME",
    "CACHEDIR_TAG_SIGNATURE",
    "CACHE_MARKER_NAME",
    "Cache",
    "CacheCorruptionWarning",
    "Checkpoint",
    "CheckpointState",
    "Entry",
    "EntryInfo",
    "canonical_json",
    "canonical_settings",
    "ensure_cache_root",
    "load_state_dict_tensors",
    "settings_hash",
    "state_dict_tensors",
    "table_from_data",
    "table_to_data",
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
_DATA_DIR = "data"

_FORMAT = 1
_SHORT = 20  # hex characters of the key used for directory names (80 bits)
_TYPE_KEY = "__ubw_type__"  # reserved key marking non-JSON values in canonical settings
_TENSORS_FILE = "tensors.pt"
_DATA_FILE = "data.json"
_META_FILE = "meta.json"
_CKPT_FILE = "checkpoint.pt"
_NO_CACHE_ENV = "UBW_NO_CACHE"
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})

_NAMESPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
# ``data`` is where ubwlib._paths.data_cache_dir() keeps dataset copies inside the same root.
_RESERVED_NAMESPACES = frozenset({"data"})
_ENTRY_RE = re.compile(r"[0-9a-f]{%d}" % _SHORT)
_CKPT_RE = re.compile(r"[0-9a-f]{%d}\.ckpt" % _SHORT)
_STALE_RE = re.compile(r"\.(?:tmp|corrupt|old)-[0-9a-f]{%d}-.+" % _SHORT)
_FULL_HASH_RE = re.compile(r"[0-9a-f]{64}")
# files the cache itself puts into entry and checkpoint folders (what a leftover may hold)
_OWN_FILES = frozenset({"tensors.pt", "data.json", "meta.json", "checkpoint.pt"})
_OWN_TMP_RE = re.compile(r"\.checkpoint\.pt\.tmp-.+")
_MAX_MARKER_BYTES = 1 << 16


class CacheCorruptionWarning(UserWarning):
    """A cache entry or checkpoint was damaged (missing file, checksum mismatch, unreadable
    JSON, a ``tensors.pt`` that ``torch.load(weights_only=True)`` refuses...). It was removed
    and will be recomputed."""


class _Corrupt(Exception):
    """Internal: raised while verifying an entry; turned into a CacheCorruptionWarning."""


# --------------------------------------------------------------------------------------
# Canonical settings and hashing
# --------------------------------------------------------------------------------------


def _type_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _tensor_digest(t: torch.Tensor, where: str) -> dict[str, Any]:
    try:
        x = t.detach()
        if x.is_quantized:
            raise TypeError(f"settings_hash: quantized tensors are not supported (at {where})")
        if x.layout != torch.strided:
            x = x.to_dense()
        x = x.resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
        raw = x.view(torch.uint8).numpy().tobytes()
    except (RuntimeError, NotImplementedError) as exc:  # meta tensors, exotic layouts
        raise TypeError(f"settings_hash: cannot read the content of this tensor at {where}: {exc}") from exc
    return {
        _TYPE_KEY: "tensor",
        "dtype": str(t.dtype),
        "shape": list(t.shape),
        "sha256": hashlib.sha256(raw).hexdigest(),
    }


def _ndarray_digest(a: np.ndarray, where: str) -> dict[str, Any]:
    if a.dtype.hasobject:
        raise TypeError(f"settings_hash: numpy arrays of dtype object are not supported (at {where})")
    raw = np.ascontiguousarray(a).tobytes()
    return {
        _TYPE_KEY: "ndarray",
        "dtype": a.dtype.str,
        "shape": list(a.shape),
        "sha256": hashlib.sha256(raw).hexdigest(),
    }


def _canon(obj: Any, where: str, active: set[int]) -> Any:
    # Order matters: bool before int, Enum before int/str (IntEnum, StrEnum).
    if obj is None or isinstance(obj, (bool, np.bool_)):
        return None if obj is None else bool(obj)
    if isinstance(obj, enum.Enum):
        return {_TYPE_KEY: "enum", "class": type(obj).__qualname__, "name": obj.name}
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        if math.isfinite(x):
            return x  # json writes finite floats with repr(): "1.0" != "1"
        return {_TYPE_KEY: "float", "repr": repr(x)}
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return _tensor_digest(obj, where)
    if isinstance(obj, np.ndarray):
        return _ndarray_digest(obj, where)
    if isinstance(obj, torch.dtype):
        return {_TYPE_KEY: "torch.dtype", "name": str(obj)}

    is_dc = dataclasses.is_dataclass(obj) and not isinstance(obj, type)
    if not (is_dc or isinstance(obj, (Mapping, list, tuple, set, frozenset))):
        raise TypeError(
            f"settings_hash: cannot canonicalise a value of type {_type_name(obj)} at {where}; "
            "convert it to plain data (dict/list/str/int/float/bool/None, a dataclass, "
            "an Enum, a Path, a tensor or a numpy array)"
        )
    if id(obj) in active:
        raise ValueError(f"settings_hash: settings contain a reference cycle at {where}")
    active.add(id(obj))
    try:
        if is_dc:
            # Fields are walked by hand (not dataclasses.asdict) so that nested dataclasses
            # keep their class names too; the field set is the same as asdict's.
            fields = {
                f.name: _canon(getattr(obj, f.name), f"{where}.{f.name}", active)
                for f in dataclasses.fields(obj)
            }
            return {_TYPE_KEY: "dataclass", "class": type(obj).__qualname__, "fields": fields}
        if isinstance(obj, Mapping):
            out: dict[str, Any] = {}
            for key, value in obj.items():
                if not isinstance(key, str):
                    raise TypeError(
                        f"settings_hash: dict keys must be str, got {_type_name(key)} ({key!r}) at {where}"
                    )
                if key == _TYPE_KEY:
                    raise ValueError(f"settings_hash: the key {_TYPE_KEY!r} is reserved (at {where})")
                out[str(key)] = _canon(value, f"{where}[{key!r}]", active)
            return out
        if isinstance(obj, (list, tuple)):
            return [_canon(v, f"{where}[{i}]", active) for i, v in enumerate(obj)]
        # set / frozenset: order-free, sorted by the canonical JSON of the members
        members = [_canon(v, f"{where}{{...}}", active) for v in obj]
        members.sort(key=canonical_json)
        return {_TYPE_KEY: "set", "items": members}
    finally:
        active.discard(id(obj))


def canonical_settings(settings: Any) -> Any:
    """Turn ``settings`` into plain JSON data whose :func:`canonical_json` text identifies it.

    Rules (they define what counts as "the same settings"):

    * ``dict`` (any Mapping): keys must be ``str``; key order never matters. The key
      ``"__ubw_type__"`` is reserved (ValueError).
    * ``list`` and ``tuple`` are the same (both become JSON arrays; order matters).
      ``set``/``frozenset`` are order-free (tagged, members sorted).
    * ``str``, ``int``, ``bool``, ``None`` as themselves (numpy scalars are converted with
      ``int()``/``float()``/``bool()``). ``True`` and ``1`` differ.
    * ``float``: written as ``repr(float(x))``, so **``1`` and ``1.0`` hash differently**
      (an int and a float setting are different settings) and ``0.0``/``-0.0`` differ.
      NaN and infinities are tagged (the JSON stays standard).
    * ``pathlib`` paths: ``str(path)``; a Path and the same string hash **the same**.
    * Enum members: tagged with the class name and the member *name* (``Color.RED`` and
      ``"RED"``, or an ``IntEnum`` member and its int, differ).
    * dataclass instances: tagged with the class ``__qualname__`` and all fields (nested
      dataclasses keep their class names), so **a dataclass and a dict with the same fields
      hash differently**, as do two dataclass classes with the same fields.
    * ``torch.Tensor``: dtype, shape and the sha256 of its bytes (device, ``requires_grad``
      and memory layout do not matter). ``numpy.ndarray`` likewise (dtype incl. byte order);
      a tensor and an array with equal content differ.
    * ``torch.dtype``: its name.
    * Anything else raises :class:`TypeError` naming the type and where it was found.
    """
    return _canon(settings, "settings", set())


def canonical_json(obj: Any) -> str:
    """Compact, key-sorted JSON of already-canonical data (``allow_nan=False``)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _key_document(namespace: str, settings_canon: Any, version: str) -> str:
    return canonical_json({"namespace": namespace, "settings": settings_canon, "version": version})


def settings_hash(namespace: str, settings: Any, version: str) -> str:
    """Full sha256 hex digest (64 chars) identifying ``(namespace, settings, version)``.

    It is the hash of the canonical JSON of ``{"namespace", "version", "settings"}``, with
    ``settings`` canonicalised by :func:`canonical_settings` (see there for the rules).
    Cache directories use the first 20 hex characters; ``meta.json`` keeps all 64.
    """
    if not isinstance(namespace, str):
        raise TypeError(f"settings_hash: namespace must be str, got {_type_name(namespace)}")
    if not isinstance(version, str):
        raise TypeError(f"settings_hash: version must be str, got {_type_name(version)}")
    doc = _key_document(namespace, canonical_settings(settings), version)
    return hashlib.sha256(doc.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------
# Payload helpers
# --------------------------------------------------------------------------------------


def _sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _prepare_tensors(tensors: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    if tensors is None:
        return {}
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a dict[str, Tensor] or None, got {_type_name(tensors)}")
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {_type_name(name)} ({name!r})")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{name!r}] must be a torch.Tensor, got {_type_name(t)}")
        # clone: a view would otherwise drag its whole storage into the file
        out[name] = t.detach().to("cpu").contiguous().clone()
    return out


def _save_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


def _load_tensors(raw: bytes) -> dict[str, torch.Tensor]:
    obj = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise _Corrupt("tensors file does not hold a dict[str, Tensor]")
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic) and not isinstance(obj, (np.datetime64, np.timedelta64, np.void)):
        return obj.item()
    hint = ""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        hint = " (store arrays in `tensors`, or convert with .tolist())"
    elif type(obj).__name__ in {"DataFrame", "Series"}:
        hint = " (convert tables with ubwlib.cache.table_to_data)"
    raise TypeError(f"cache data must be JSON-able; got {_type_name(obj)}{hint}")


def _encode_data(data: Any) -> tuple[bytes, Any]:
    """JSON bytes of ``data`` plus the value read back from them (what a later get returns)."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=True, default=_json_default)
    raw = text.encode("utf-8")
    return raw, json.loads(text)


def _fsync_write(path: Path, raw: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(raw)
        fh.flush()
        os.fsync(fh.fileno())


def _no_cache_env() -> bool:
    return os.environ.get(_NO_CACHE_ENV, "").strip().lower() in _TRUE_WORDS


def _ubwlib_version() -> str:
    try:
        import ubwlib

        return str(getattr(ubwlib, "__version__", "unknown"))
    except Exception:  # pragma: no cover - only during a broken install
        return "unknown"


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


# --------------------------------------------------------------------------------------
# Markers: what proves that a folder was made by the cache
# --------------------------------------------------------------------------------------


def _read_json_file(path: Path, limit: int = _MAX_MARKER_BYTES) -> dict[str, Any] | None:
    """The JSON object in a regular (non-link) file of at most ``limit`` bytes, else None."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        obj = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


@contextlib.contextmanager
def atomic_path(path: Path | str, *, overwrite: bool = True, mode: int | None = 0o644,
                fsync: bool = False) -> Iterator[Path]:
    """The one way ubwlib writes a file: yield a temporary path in ``path``'s folder (named
    ``.<name>.<random>.tmp``, created empty); when the block ends without an error, move it onto ``path`` in one
    step, so that a reader sees the old file or the new one, never a half-written one. On an error the temporary
    file is removed and ``path`` is untouched. Creates the folder.

    ``overwrite=False`` refuses to replace a file that exists (also one created meanwhile: the move is a hard
    link, with a checked rename where the file system has none) and raises :class:`FileExistsError`.
    ``mode``: the new file's permissions (``None`` keeps the temporary file's ``0o600``). ``fsync``: flush the
    file to disk before the move.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(f"{path} exists (created meanwhile); it was not overwritten") from None
        except OSError:  # no hard links here: check, then rename
            if os.path.lexists(path):
                raise FileExistsError(f"{path} exists (created meanwhile); it was not overwritten") from None
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_bytes_atomic(path: Path | str, data: bytes, **kwargs: Any) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_path` (same keyword arguments)."""
    with atomic_path(path, **kwargs) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path | str, text: str, **kwargs: Any) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path` (same keyword arguments)."""
    write_bytes_atomic(path, text.encode("utf-8"), **kwargs)


def _has_cachedir_tag(root: Path) -> bool:
    tag = root / CACHEDIR_TAG_NAME
    try:
        if tag.is_symlink() or not tag.is_file():
            return False
        with open(tag, "rb") as fh:
            first = fh.readline(len(CACHEDIR_TAG_SIGNATURE) + 2)
    except OSError:
        return False
    return first.rstrip(b"\r\n") == CACHEDIR_TAG_SIGNATURE.encode("ascii")


def _has_root_marker(root: Path) -> bool:
    m = _read_json_file(root / CACHE_MARKER_NAME)
    fmt = None if m is None else m.get("marker_format")
    return (
        m is not None and m.get("what") == _MARKER_WHAT
        and isinstance(fmt, int) and not isinstance(fmt, bool) and fmt >= 1
    )


def _mark_root(root: Path) -> None:
    """Write the root marker (and CACHEDIR.TAG for backup tools) into ``root``."""
    if not _has_cachedir_tag(root):
        write_text_atomic(root / CACHEDIR_TAG_NAME, _CACHEDIR_TAG_TEXT)
    marker = {
        "what": _MARKER_WHAT,
        "marker_format": _MARKER_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(),
        "ubwlib_version": _ubwlib_version(),
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
    if _has_root_marker(root):
        return root
    if not created:
        with os.scandir(root) as it:
            if next(it, None) is not None:
                return root  # someone else's folder (or an older ubwlib's cache): not claimed
    _mark_root(root)
    return root


def _hash_matches(meta: dict[str, Any] | None, namespace: str, short: str) -> bool:
    h = None if meta is None else meta.get("hash")
    return (
        isinstance(h, str) and _FULL_HASH_RE.fullmatch(h) is not None and h[:_SHORT] == short
        and meta.get("namespace") == namespace
    )


def _is_own_entry(path: Path, namespace: str, short: str | None = None) -> bool:
    """An entry folder the cache wrote: its meta.json names this namespace and a hash starting
    with the folder's name."""
    if path.is_symlink() or not path.is_dir():
        return False
    meta = _read_json_file(path / _META_FILE, limit=1 << 26)
    return meta is not None and meta.get("format") == _FORMAT and _hash_matches(
        meta, namespace, path.name[:_SHORT] if short is None else short
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
    pattern = rb"(?<![0-9a-f])" + re.escape(short.encode("ascii")) + rb"[0-9a-f]{%d}(?![0-9a-f])" % (64 - _SHORT)
    return re.search(pattern, raw) is not None and namespace.encode("utf-8") in raw


def _is_own_checkpoint(path: Path, namespace: str, short: str | None = None) -> bool:
    """A checkpoint folder the cache wrote: its checkpoint.pt records this namespace and a hash
    starting with the folder's name; or it holds nothing but the cache's temporary checkpoint
    files (an interrupted first save, or a checkpoint discarded as damaged)."""
    if path.is_symlink() or not path.is_dir():
        return False
    short = path.name[:_SHORT] if short is None else short
    try:
        with os.scandir(path) as it:
            names = [(e.name, e.is_file(follow_symlinks=False)) for e in it]
    except OSError:
        return False
    if any(name == _CKPT_FILE for name, _ in names):
        return _checkpoint_records(path / _CKPT_FILE, namespace, short)
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


def _is_own_leftover(path: Path, namespace: str) -> bool:
    """A ``.tmp-``/``.old-``/``.corrupt-`` folder the cache left behind."""
    short = path.name.split("-", 1)[1][:_SHORT]
    return (
        _holds_only_cache_files(path)
        or _is_own_entry(path, namespace, short)
        or _is_own_checkpoint(path, namespace, short)
    )


def _tree_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (a file or folder), never following links."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if not os.path.isdir(path) or os.path.islink(path):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    total = 0
    for dirpath, _dirnames, filenames in os.walk(path, followlinks=False):
        for name in filenames:
            try:
                fst = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(fst.st_mode):
                total += fst.st_size
    return total


def _remove_tree(path: Path) -> None:
    """Delete a file, a link (not its target) or a folder (rmtree never follows links)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Public records
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Entry:
    """One cached result.

    ``tensors`` are CPU tensors; ``data`` is the JSON payload *as read back from JSON*
    (tuples became lists, non-str dict keys became str; also on a fresh computation, so
    a warm and a cold build see identical values). ``meta`` is the content of ``meta.json``;
    ``path`` the entry directory (where it would be, for a disabled cache); ``hit`` is True
    when the entry was loaded from disk rather than computed/stored by this call.
    Entries compare by identity (tensors have no single truth value).
    """

    tensors: dict[str, torch.Tensor]
    data: Any
    meta: dict[str, Any]
    path: Path
    hit: bool


@dataclasses.dataclass(frozen=True)
class EntryInfo:
    """Summary of one entry on disk, as listed by :meth:`Cache.entries`.

    ``hash`` is the full key from ``meta.json`` (the 20-char directory name when the meta
    file is unreadable, as are ``created``/``version`` then None).
    """

    namespace: str
    hash: str
    size_bytes: int
    created: datetime | None
    version: str | None
    path: Path


class CheckpointState(NamedTuple):
    """What :meth:`Checkpoint.load` returns: unpack as ``step, tensors, data``."""

    step: int
    tensors: dict[str, torch.Tensor]
    data: Any


@dataclasses.dataclass(frozen=True)
class _Key:
    namespace: str
    version: str
    settings: Any  # canonical form
    full: str

    @property
    def short(self) -> str:
        return self.full[:_SHORT]


# --------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------


class Cache:
    """Content-addressed store of results under ``root`` (see the module docstring).

    ``root=None`` uses :func:`ubwlib._paths.cache_root` (``$UBW_CACHE`` or
    ``~/.cache/ubwlib``). Nothing is created until the first write, which creates the root
    and its ``CACHEDIR.TAG`` marker. ``enabled=False`` makes the cache a pass-through that
    never reads or writes entries; ``UBW_NO_CACHE=1`` in the environment (checked at each
    call) disables reads only. Listing and :meth:`clear` work in either case.
    """

    def __init__(self, root: Path | str | None = None, *, enabled: bool = True) -> None:
        if root is None:
            from ubwlib._paths import cache_root

            root = cache_root()
        self.root: Path = Path(root).expanduser().absolute()
        self.enabled: bool = bool(enabled)

    def __repr__(self) -> str:
        return f"Cache(root={str(self.root)!r}, enabled={self.enabled})"

    # ---- keys and paths --------------------------------------------------------------

    @property
    def reads_enabled(self) -> bool:
        """False when the cache is disabled or ``UBW_NO_CACHE`` is set: every get misses."""
        return self.enabled and not _no_cache_env()

    @staticmethod
    def _check_namespace(namespace: str) -> None:
        if not isinstance(namespace, str):
            raise TypeError(f"namespace must be str, got {_type_name(namespace)}")
        if not _NAMESPACE_RE.fullmatch(namespace) or namespace in _RESERVED_NAMESPACES:
            raise ValueError(
                f"invalid cache namespace {namespace!r}: use 1-128 characters from "
                "[A-Za-z0-9_.-], starting with a letter or digit (and not 'data')"
            )

    def _key(self, namespace: str, settings: Any, version: str) -> _Key:
        self._check_namespace(namespace)
        if not isinstance(version, str):
            raise TypeError(f"version must be str, got {_type_name(version)}")
        canon = canonical_settings(settings)
        full = hashlib.sha256(_key_document(namespace, canon, version).encode("utf-8")).hexdigest()
        return _Key(namespace, version, canon, full)

    def _entry_dir(self, key: _Key) -> Path:
        return self.root / key.namespace / key.short

    def path_for(self, namespace: str, settings: Any, version: str) -> Path:
        """The directory an entry for these settings has (or would have)."""
        return self._entry_dir(self._key(namespace, settings, version))

    # ---- root and marker -------------------------------------------------------------

    def _has_marker(self) -> bool:
        """Whether the root carries the ``.ubwlib-cache`` marker (see :func:`ensure_cache_root`)."""
        return _has_root_marker(self.root)

    def _ensure_root(self) -> None:
        """Create the root and, when the folder is new or empty, its markers.

        A pre-existing folder holding anything of its own (files or folders) is used but not
        claimed: it gets no marker, so :meth:`clear` will refuse to work there.
        """
        ensure_cache_root(self.root)

    def adopt(self) -> None:
        """Mark an existing folder as this cache, so that :meth:`clear` works there.

        For a cache written by an older ubwlib (it has a ``CACHEDIR.TAG`` but no
        ``.ubwlib-cache`` marker). Even in a marked root, :meth:`clear` only deletes folders
        that carry the cache's own markers (see there). Refuses a filesystem root and the home
        directory (or a folder containing it).
        """
        self._check_not_root_or_home("mark")
        self.root.mkdir(parents=True, exist_ok=True)
        if not _has_root_marker(self.root):
            _mark_root(self.root)

    # ---- discarding damaged entries --------------------------------------------------

    def _discard(self, path: Path, prefix: str, short: str) -> None:
        """Move ``path`` aside (atomically, so readers never see it half-deleted), then delete it."""
        aside = path.parent / f".{prefix}-{short}-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return  # someone else removed it
        if aside.is_symlink() or not aside.is_dir():
            aside.unlink(missing_ok=True)
        else:
            shutil.rmtree(aside, ignore_errors=True)

    def _corrupt(self, path: Path, key: _Key, reason: str) -> None:
        self._discard(path, "corrupt", key.short)
        warnings.warn(
            f"ubwlib cache: discarded damaged entry {path} ({reason}); it will be recomputed",
            CacheCorruptionWarning,
            stacklevel=4,
        )

    # ---- reading ---------------------------------------------------------------------

    def _load(self, key: _Key) -> Entry | None:
        path = self._entry_dir(key)
        if not os.path.lexists(path):
            return None
        try:
            if path.is_symlink() or not path.is_dir():
                raise _Corrupt("not a directory")
            try:
                meta = json.loads((path / _META_FILE).read_bytes())
            except FileNotFoundError:
                raise _Corrupt(f"{_META_FILE} is missing") from None
            except ValueError as exc:
                raise _Corrupt(f"{_META_FILE} is not valid JSON: {exc}") from None
            if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
                raise _Corrupt(f"{_META_FILE} has an unknown format")
            if meta.get("hash") != key.full:
                raise _Corrupt(f"{_META_FILE} belongs to another key")
            if meta.get("namespace") != key.namespace or meta.get("version") != key.version:
                raise _Corrupt(f"{_META_FILE} names another namespace/version")
            sums = meta.get("sha256")
            if not isinstance(sums, dict):
                raise _Corrupt(f"{_META_FILE} lacks checksums")
            raw: dict[str, bytes] = {}
            for name in (_TENSORS_FILE, _DATA_FILE):
                try:
                    raw[name] = (path / name).read_bytes()
                except FileNotFoundError:
                    raise _Corrupt(f"{name} is missing") from None
                if _sha256(raw[name]) != sums.get(name):
                    raise _Corrupt(f"checksum mismatch in {name}")
            try:
                data = json.loads(raw[_DATA_FILE].decode("utf-8"))
            except ValueError as exc:
                raise _Corrupt(f"{_DATA_FILE} is not valid JSON: {exc}") from None
            try:
                tensors = _load_tensors(raw[_TENSORS_FILE])
            except _Corrupt:
                raise
            except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ...
                raise _Corrupt(f"torch.load(weights_only=True) failed on {_TENSORS_FILE}: {exc}") from None
        except _Corrupt as exc:
            if not os.path.lexists(path):
                return None  # removed concurrently while we looked at it: a plain miss
            self._corrupt(path, key, str(exc))
            return None
        return Entry(tensors=tensors, data=data, meta=meta, path=path, hit=True)

    def get(self, namespace: str, settings: Any, version: str) -> Entry | None:
        """The stored entry, verified, or None (miss, disabled reads, or a damaged entry,
        which is then removed with a :class:`CacheCorruptionWarning`)."""
        key = self._key(namespace, settings, version)
        if not self.reads_enabled:
            return None
        return self._load(key)

    # ---- writing ---------------------------------------------------------------------

    def _make_meta(self, key: _Key, tensor_raw: bytes, data_raw: bytes) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "namespace": key.namespace,
            "version": key.version,
            "hash": key.full,
            "settings": key.settings,
            "created": datetime.now(timezone.utc).isoformat(),
            "ubwlib_version": _ubwlib_version(),
            "torch_version": str(torch.__version__),
            "sha256": {_TENSORS_FILE: _sha256(tensor_raw), _DATA_FILE: _sha256(data_raw)},
        }

    def _put(
        self,
        key: _Key,
        tensors: Mapping[str, torch.Tensor] | None,
        data: Any,
        overwrite: bool,
    ) -> Entry:
        tensors_c = _prepare_tensors(tensors)
        data_raw, data_rt = _encode_data(data)
        tensor_raw = _save_tensors(tensors_c)
        meta = self._make_meta(key, tensor_raw, data_raw)
        path = self._entry_dir(key)
        if not self.enabled:
            return Entry(tensors=tensors_c, data=data_rt, meta=meta, path=path, hit=False)

        self._ensure_root()
        path.parent.mkdir(exist_ok=True)
        tmp: Path | None = Path(tempfile.mkdtemp(prefix=f".tmp-{key.short}-", dir=path.parent))
        try:
            _fsync_write(tmp / _TENSORS_FILE, tensor_raw)
            _fsync_write(tmp / _DATA_FILE, data_raw)
            meta_raw = json.dumps(meta, indent=1, ensure_ascii=False, allow_nan=False).encode("utf-8")
            _fsync_write(tmp / _META_FILE, meta_raw)
            for _ in range(5):
                if overwrite and os.path.lexists(path):
                    self._discard(path, "old", key.short)
                try:
                    os.rename(tmp, path)
                except OSError:
                    if not os.path.lexists(path):
                        raise
                    if overwrite:
                        continue
                    # Another writer won the race: keep theirs (if it is sound).
                    theirs = self._load(key)
                    if theirs is not None:
                        return theirs
                    continue  # theirs was damaged and has been removed; try again
                tmp = None
                return Entry(tensors=tensors_c, data=data_rt, meta=meta, path=path, hit=False)
            raise RuntimeError(f"ubwlib cache: could not move a new entry into place at {path}")
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def put(
        self,
        namespace: str,
        settings: Any,
        version: str,
        tensors: Mapping[str, torch.Tensor] | None = None,
        data: Any = None,
        *,
        overwrite: bool = False,
    ) -> Entry:
        """Store ``tensors`` (dict[str, Tensor], saved as CPU clones) and JSON-able ``data``.

        The entry is built in a temporary directory and renamed into place. If a sound entry
        already exists (e.g. a concurrent process won the race) it is kept and returned
        (``hit=True``) unless ``overwrite=True``, which replaces it. Numpy scalars in
        ``data`` are converted to Python numbers; other non-JSON values raise TypeError.
        With ``enabled=False`` nothing is written and the would-be entry is returned.
        """
        key = self._key(namespace, settings, version)
        return self._put(key, tensors, data, overwrite)

    def get_or_compute(
        self,
        namespace: str,
        settings: Any,
        version: str,
        compute: Callable[[], tuple[Mapping[str, torch.Tensor] | None, Any]],
    ) -> Entry:
        """The cached entry, or ``compute()`` -> ``(tensors | None, data)`` stored and returned.

        ``compute`` runs at most once per call. Under ``UBW_NO_CACHE`` it always runs and its
        result replaces any stored entry; with ``enabled=False`` it always runs and nothing
        is stored.
        """
        key = self._key(namespace, settings, version)
        if self.reads_enabled:
            entry = self._load(key)
            if entry is not None:
                return entry
        result = compute()
        if not isinstance(result, tuple) or len(result) != 2:
            raise TypeError(
                f"compute() must return a (tensors, data) tuple, got {_type_name(result)}"
            )
        tensors, data = result
        return self._put(key, tensors, data, overwrite=self.enabled and _no_cache_env())

    def checkpoint(self, namespace: str, settings: Any, version: str) -> Checkpoint:
        """A :class:`Checkpoint` for a long, resumable computation with this key."""
        key = self._key(namespace, settings, version)
        return Checkpoint(self, key)

    # ---- inspection and cleanup ------------------------------------------------------

    def _namespace_dirs(self, namespace: str | None) -> list[Path]:
        if namespace is not None:
            self._check_namespace(namespace)
            p = self.root / namespace
            return [p] if p.is_dir() and not p.is_symlink() else []
        if not self.root.is_dir():
            return []
        with os.scandir(self.root) as it:
            return [
                Path(e.path)
                for e in it
                if e.is_dir(follow_symlinks=False)
                and _NAMESPACE_RE.fullmatch(e.name)
                and e.name not in _RESERVED_NAMESPACES
            ]

    def entries(self, *, include_data: bool = True) -> list[EntryInfo]:
        """All entries on disk (checkpoints and temporary directories excluded), sorted by
        namespace then hash.

        With ``include_data`` (the default) the derived dataset copies that :mod:`ubwlib.data`
        keeps under ``<root>/data`` (decompressed IDX files, decoded tensors; not downloads) are
        listed too, under the namespace ``"data"``: their ``hash`` is their path relative to
        ``<root>/data``, ``created`` their modification time and ``version`` None.
        """
        out: list[EntryInfo] = []
        for ns_path in self._namespace_dirs(None):
            with os.scandir(ns_path) as it:
                dirs = [e for e in it if e.is_dir(follow_symlinks=False) and _ENTRY_RE.fullmatch(e.name)]
            for e in dirs:
                p = Path(e.path)
                size = 0
                with os.scandir(p) as files:
                    for f in files:
                        if f.is_file(follow_symlinks=False):
                            size += f.stat(follow_symlinks=False).st_size
                full, created, version = e.name, None, None
                try:
                    meta = json.loads((p / _META_FILE).read_bytes())
                    if isinstance(meta, dict):
                        full = meta.get("hash", full) if isinstance(meta.get("hash"), str) else full
                        created = _parse_time(meta.get("created"))
                        version = meta.get("version") if isinstance(meta.get("version"), str) else None
                except (OSError, ValueError):
                    pass
                out.append(EntryInfo(ns_path.name, full, size, created, version, p))
        if include_data:
            out.extend(self.data_entries())
        out.sort(key=lambda i: (i.namespace, i.hash))
        return out

    def _data_dir(self) -> Path | None:
        d = self.root / _DATA_DIR
        return d if d.is_dir() and not d.is_symlink() else None

    def data_entries(self) -> list[EntryInfo]:
        """The derived dataset copies under ``<root>/data`` (namespace ``"data"``), sorted.

        Each is a folder of decompressed IDX files (with links to raw originals, counted as
        links, never followed) or a file of decoded tensors. Downloads are not listed.
        """
        data_dir = self._data_dir()
        if data_dir is None:
            return []
        from ubwlib.data import _derived_data_items

        out = []
        for item in _derived_data_items(data_dir):
            try:
                mtime = os.lstat(item).st_mtime
            except OSError:
                continue
            created = datetime.fromtimestamp(mtime, timezone.utc)
            rel = item.relative_to(data_dir).as_posix()
            out.append(EntryInfo(_DATA_DIR, rel, _tree_size(item), created, None, item))
        out.sort(key=lambda i: i.hash)
        return out

    def size_bytes(self) -> int:
        """Total size of all files under the root (entries, checkpoints, leftovers, derived
        dataset copies and downloads under ``data/``), without following symlinks."""
        total = 0
        if not self.root.is_dir():
            return 0
        for dirpath, _dirnames, filenames in os.walk(self.root, followlinks=False):
            for name in filenames:
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except OSError:
                    continue
                total += st.st_size
        return total

    def _check_not_root_or_home(self, action: str) -> None:
        resolved = self.root.resolve()
        if resolved.parent == resolved:
            raise ValueError(f"refusing to {action} {self.root}: it is a filesystem root")
        home = Path.home().resolve()
        if resolved == home or home.is_relative_to(resolved):
            raise ValueError(f"refusing to {action} {self.root}: it is (or contains) the home directory")

    def _check_clear_allowed(self) -> None:
        self._check_not_root_or_home("clear")
        if self.root.exists() and not self._has_marker():
            if _has_cachedir_tag(self.root):
                why = (
                    f"it has a {CACHEDIR_TAG_NAME} but no {CACHE_MARKER_NAME} marker (probably a cache "
                    "written by an older ubwlib, which could also claim a pre-existing folder of yours)"
                )
            else:
                why = (
                    f"it has no ubwlib marker ({CACHE_MARKER_NAME}, {CACHEDIR_TAG_NAME}): ubwlib did not "
                    "create it, so it is not provably a ubwlib cache"
                )
            raise ValueError(
                f"refusing to clear {self.root}: {why}. If it is a ubwlib cache and holds nothing else "
                f"of yours, mark it with `python -c \"from ubwlib.cache import Cache; Cache({str(self.root)!r})"
                f".adopt()\"` and clear again, or delete the folder yourself; otherwise point UBW_CACHE "
                "at a new folder"
            )

    def clear(self, namespace: str | None = None) -> int:
        """Delete entries and checkpoints (of one ``namespace``, or all) and, for ``namespace=None``
        or ``"data"``, the derived dataset copies under ``<root>/data``; returns how many entries,
        checkpoints and derived copies were removed.

        Safe by construction: refuses (ValueError naming the path) unless the root carries the
        ``.ubwlib-cache`` marker, which ubwlib writes only into a root it created (or found
        empty) or on :meth:`adopt`, and always for a filesystem root or the home directory.
        Inside the root it deletes only

        * entry folders whose ``meta.json`` names their namespace and a hash starting with the
          folder's name, and checkpoint folders whose ``checkpoint.pt`` records the same (or that
          hold only the cache's temporary checkpoint files);
        * leftover ``.tmp-``/``.old-``/``.corrupt-`` folders holding only the cache's own files
          (not counted);
        * derived dataset copies (``data/fashion-mnist`` folders marked by their ``SOURCE.txt``,
          ``decoded-*.pt`` memos, ``data/imagefolder/*px-*.pt``) and their stale temporary files.
          Downloads (``data/torchvision``) are kept.

        It never follows symlinks (a symlink is never descended into, and a link inside an
        entry or a derived copy, e.g. to a raw dataset file, is unlinked, not its target). Any
        other folder, even one named like an entry, is left untouched. A missing root clears 0.
        """
        data_only = namespace == _DATA_DIR
        if namespace is not None and not data_only:
            self._check_namespace(namespace)
        self._check_clear_allowed()
        if not self.root.exists():
            return 0
        removed = 0
        if not data_only:
            removed += self._clear_entries(namespace)
        if namespace is None or data_only:
            removed += self._clear_data()
        return removed

    def _clear_entries(self, namespace: str | None) -> int:
        removed = 0
        for ns_path in self._namespace_dirs(namespace):
            ns = ns_path.name
            with os.scandir(ns_path) as it:
                candidates = [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
            for path in candidates:
                name = path.name
                if _ENTRY_RE.fullmatch(name):
                    counted = _is_own_entry(path, ns)
                elif _CKPT_RE.fullmatch(name):
                    counted = _is_own_checkpoint(path, ns)
                elif _STALE_RE.fullmatch(name) and _is_own_leftover(path, ns):
                    shutil.rmtree(path, ignore_errors=True)
                    continue
                else:
                    continue
                if not counted:
                    continue  # named like ours but not provably ours: left alone
                aside = ns_path / f".old-{name[:_SHORT]}-{uuid.uuid4().hex[:12]}"
                try:
                    os.rename(path, aside)
                except FileNotFoundError:
                    continue
                # rmtree does not follow symlinks (shutil.rmtree.avoids_symlink_attacks on
                # Linux/macOS); a symlinked entry directory was excluded above.
                shutil.rmtree(aside, ignore_errors=True)
                removed += 1
            try:
                ns_path.rmdir()  # only if now empty
            except OSError:
                pass
        return removed

    def _clear_data(self) -> int:
        data_dir = self._data_dir()
        if data_dir is None:
            return 0
        from ubwlib.data import _derived_data_folders, _derived_data_items, _remove_stale_temps

        removed = 0
        for item in _derived_data_items(data_dir):
            _remove_tree(item)
            removed += 1
        for folder in _derived_data_folders(data_dir):
            _remove_stale_temps(folder)
            try:
                folder.rmdir()  # only if now empty
            except OSError:
                pass
        return removed


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


class Checkpoint:
    """The latest state of a long, resumable computation (e.g. an iterative crafting loop).

    Stored as one file ``<root>/<namespace>/<hash20>.ckpt/checkpoint.pt``, replaced
    atomically by each :meth:`save`. Loaded with ``weights_only=True`` only. Obtain one from
    :meth:`Cache.checkpoint`. With a disabled cache, saves are no-ops and loads return None;
    under ``UBW_NO_CACHE`` loads return None (start over) but saves still write.
    """

    def __init__(self, cache: Cache, key: _Key) -> None:
        self._cache = cache
        self._key = key
        self.path: Path = cache.root / key.namespace / f"{key.short}.ckpt"

    @property
    def file(self) -> Path:
        """The checkpoint file."""
        return self.path / _CKPT_FILE

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"

    def load(self) -> CheckpointState | None:
        """``(step, tensors, data)`` of the last save, or None (none saved, reads disabled,
        or damaged: then the file is deleted with a :class:`CacheCorruptionWarning`)."""
        if not self._cache.reads_enabled:
            return None
        f = self.file
        try:
            raw = f.read_bytes()
        except FileNotFoundError:
            return None
        try:
            obj = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
            if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
                raise _Corrupt("unknown checkpoint format")
            if obj.get("hash") != self._key.full:
                raise _Corrupt("checkpoint belongs to another key")
            step = obj.get("step")
            tensors = obj.get("tensors")
            if not isinstance(step, int) or isinstance(step, bool):
                raise _Corrupt("bad step")
            if not isinstance(tensors, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
            ):
                raise _Corrupt("bad tensors")
            data_json = obj.get("data_json")
            if not isinstance(data_json, str) or _sha256(data_json.encode("utf-8")) != obj.get("data_sha256"):
                raise _Corrupt("bad data")
            data = json.loads(data_json)
        except Exception as exc:  # _Corrupt, UnpicklingError, RuntimeError, ValueError, ...
            f.unlink(missing_ok=True)
            warnings.warn(
                f"ubwlib cache: discarded damaged checkpoint {f} ({exc}); starting over",
                CacheCorruptionWarning,
                stacklevel=2,
            )
            return None
        return CheckpointState(step, tensors, data)

    def save(self, step: int, tensors: Mapping[str, torch.Tensor] | None = None, data: Any = None) -> None:
        """Atomically replace the checkpoint with ``(step, tensors, data)``."""
        if not isinstance(step, int) or isinstance(step, bool):
            raise TypeError(f"step must be int, got {_type_name(step)}")
        tensors_c = _prepare_tensors(tensors)
        data_raw, _ = _encode_data(data)
        data_json = data_raw.decode("utf-8")
        if not self._cache.enabled:
            return
        payload = {
            "format": _FORMAT,
            "hash": self._key.full,
            "namespace": self._key.namespace,
            "version": self._key.version,
            "step": int(step),
            "tensors": tensors_c,
            "data_json": data_json,
            "data_sha256": _sha256(data_raw),
            "saved": datetime.now(timezone.utc).isoformat(),
        }
        raw = _save_tensors(payload)  # type: ignore[arg-type]
        self._cache._ensure_root()
        self.path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{_CKPT_FILE}.tmp-", dir=self.path)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(raw)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def clear(self) -> bool:
        """Delete the checkpoint (e.g. once the final result is in the cache). True if one existed."""
        if self.path.is_symlink():
            self.path.unlink()
            return True
        if not self.path.is_dir():
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        return True


# --------------------------------------------------------------------------------------
# Common payloads: tables and model weights
# --------------------------------------------------------------------------------------


def _scalar_to_json(x: Any) -> Any:
    import pandas as pd

    if x is None or (not isinstance(x, (list, tuple, dict)) and pd.isna(x) is True):
        return None
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (str, bool, int, float)):
        return x
    if isinstance(x, (list, tuple, dict)):
        return json.loads(json.dumps(x, allow_nan=True, default=_json_default))
    raise TypeError(f"table_to_data: cannot store a cell of type {_type_name(x)}")


def _encode_series(values: Any) -> dict[str, Any]:
    """Encode a Series or Index (one column / index level) as JSON data, dtype included."""
    import pandas as pd

    dtype = values.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        cat = pd.Categorical(values)
        return {
            "dtype": "category",
            "ordered": bool(cat.ordered),
            "categories": _encode_series(cat.categories),
            "codes": [int(c) for c in cat.codes],
        }
    if isinstance(dtype, pd.DatetimeTZDtype):
        utc = pd.DatetimeIndex(values).tz_convert("UTC")
        return {"dtype": str(dtype), "tz": str(dtype.tz),
                "values": [None if pd.isna(v) else v.isoformat() for v in utc]}
    kind = getattr(dtype, "kind", "O")
    if kind == "M":
        return {"dtype": str(dtype), "values": [None if pd.isna(v) else v.isoformat() for v in pd.DatetimeIndex(values)]}
    if kind == "m":
        return {"dtype": str(dtype), "values": [None if pd.isna(v) else int(v.value) for v in pd.TimedeltaIndex(values)]}
    if isinstance(dtype, np.dtype) and kind in "biuf":
        # Python scalars: floats are written with repr(), i.e. bit-exact; NaN -> JSON NaN.
        return {"dtype": str(dtype), "values": list(np.asarray(values).tolist())}
    if kind == "c" or isinstance(dtype, (pd.PeriodDtype, pd.IntervalDtype, pd.SparseDtype)):
        raise TypeError(f"table_to_data: unsupported dtype {dtype}")
    return {"dtype": str(dtype), "values": [_scalar_to_json(v) for v in values]}


def _decode_series(enc: Mapping[str, Any]) -> Any:
    import pandas as pd

    dtype = enc["dtype"]
    if dtype == "category":
        cats = pd.Index(_decode_series(enc["categories"]))
        return pd.Series(pd.Categorical.from_codes(enc["codes"], categories=cats, ordered=enc["ordered"]))
    target = pd.api.types.pandas_dtype(dtype)
    vals = enc["values"]
    if isinstance(target, pd.DatetimeTZDtype):
        s = pd.Series(pd.to_datetime(pd.Series(vals, dtype=object), utc=True, format="ISO8601"))
        return s.dt.tz_convert(enc["tz"]).astype(target)
    kind = getattr(target, "kind", "O")
    if kind == "M":
        return pd.Series(pd.to_datetime(pd.Series(vals, dtype=object), format="ISO8601")).astype(target)
    if kind == "m":
        ns = [pd.NaT if v is None else pd.Timedelta(int(v), unit="ns") for v in vals]
        return pd.Series(ns, dtype="timedelta64[ns]").astype(target)
    if kind in "biuf" and isinstance(target, np.dtype):
        return pd.Series(np.asarray(vals, dtype=target))
    return pd.Series(vals, dtype=target)


def _encode_index(index: pd.Index) -> dict[str, Any]:
    import pandas as pd

    if isinstance(index, pd.RangeIndex):
        return {"kind": "range", "start": int(index.start), "stop": int(index.stop),
                "step": int(index.step), "name": _scalar_to_json(index.name)}
    if isinstance(index, pd.MultiIndex):
        return {"kind": "multi", "names": [_scalar_to_json(n) for n in index.names],
                "levels": [_encode_series(index.get_level_values(i)) for i in range(index.nlevels)]}
    return {"kind": "index", "name": _scalar_to_json(index.name), "values": _encode_series(index)}


def _decode_index(enc: Mapping[str, Any]) -> pd.Index:
    import pandas as pd

    kind = enc["kind"]
    if kind == "range":
        return pd.RangeIndex(enc["start"], enc["stop"], enc["step"], name=enc["name"])
    if kind == "multi":
        arrays = [pd.Index(_decode_series(level)) for level in enc["levels"]]
        return pd.MultiIndex.from_arrays(arrays, names=enc["names"])
    return pd.Index(_decode_series(enc["values"]), name=enc["name"])


def table_to_data(df: pd.DataFrame) -> dict[str, Any]:
    """Encode a DataFrame as JSON data for an entry's ``data`` (column-wise records).

    Column order, column labels, the index (incl. RangeIndex/MultiIndex and names) and the
    dtypes are preserved: numpy numeric/bool (floats bit-exact), str/object/string,
    nullable (``Int64``, ``boolean``, ...), category, datetime (naive or tz-aware) and
    timedelta. Other dtypes or non-JSON cells raise TypeError. Inverse: :func:`table_from_data`.
    """
    return {
        "__ubw_table__": 1,
        "nrows": int(len(df)),
        "columns": _encode_index(df.columns),
        "index": _encode_index(df.index),
        "data": [_encode_series(df.iloc[:, i]) for i in range(df.shape[1])],
    }


def table_from_data(d: Mapping[str, Any]) -> pd.DataFrame:
    """Rebuild the DataFrame encoded by :func:`table_to_data`."""
    import pandas as pd

    if not isinstance(d, Mapping) or d.get("__ubw_table__") != 1:
        raise ValueError("table_from_data: not a table encoded by ubwlib.cache.table_to_data")
    cols = [_decode_series(c) for c in d["data"]]
    df = pd.DataFrame(dict(enumerate(cols)), index=pd.RangeIndex(d["nrows"]))
    df.columns = _decode_index(d["columns"])
    df.index = _decode_index(d["index"])
    return df


def state_dict_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as detached, contiguous CPU clones (parameters and buffers)."""
    out: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict entry {name!r} is a {_type_name(value)}, not a tensor")
        out[name] = value.detach().to("cpu").contiguous().clone()
    return out


def load_state_dict_tensors(
    model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], *, strict: bool = True
) -> Any:
    """Load ``tensors`` (from :func:`state_dict_tensors` / a cache entry) into ``model``,
    copying onto the model's own devices and dtypes. Returns ``load_state_dict``'s result."""
    return model.load_state_dict(dict(tensors), strict=strict)
