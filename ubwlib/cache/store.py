"""The store: :class:`Cache` keeps each result as an entry folder under its key (written aside and renamed
into place, verified on every read), lists the entries and clears what it provably made."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

try:  # POSIX; elsewhere computations are not serialised across processes
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from .checkpoints import Checkpoint
from .keys import SHORT, CacheKey, cache_key, type_name
from .layout import (
    CACHE_MARKER_NAME,
    CACHEDIR_TAG_NAME,
    CKPT_RE,
    DATA_DIR,
    DATA_FILE,
    ENTRY_RE,
    FORMAT,
    META_FILE,
    NAMESPACE_RE,
    RESERVED_NAMESPACES,
    STALE_RE,
    TENSORS_FILE,
    ensure_cache_root,
    has_cachedir_tag,
    has_root_marker,
    is_own_checkpoint,
    is_own_entry,
    is_own_leftover,
    mark_root,
    ubwlib_version,
)
from .payload import (
    CacheCorruptionWarning,
    Corrupt,
    encode_data,
    load_tensors,
    prepare_tensors,
    save_tensors,
    sha256_hex,
)

__all__ = ["Cache", "Entry", "EntryInfo"]

_NO_CACHE_ENV = "UBW_NO_CACHE"
#: The root's lock file: :meth:`Cache.computing` holds an exclusive ``flock`` on it.
LOCK_FILE = ".compute.lock"
_LOG = logging.getLogger("ubwlib.cache")
#: How many :meth:`Cache.computing` blocks this thread is inside (the outermost one holds the lock).
_HELD = threading.local()
#: The computations of :meth:`Cache.get_or_compute` under way in this thread, innermost last: each holds the
#: seconds its nested computations took, so that an entry records its own time beside the whole.
_RUNNING = threading.local()


def _timing(seconds: float, nested: float = 0.0) -> dict[str, float]:
    """An entry's recorded times, and ``seconds`` counted as a cached part of the computation under way, if any."""
    stack = getattr(_RUNNING, "stack", None)
    if stack:
        stack[-1] += seconds
    return {"seconds": round(seconds, 3), "seconds_own": round(max(seconds - nested, 0.0), 3)}
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})


def _no_cache_env() -> bool:
    return os.environ.get(_NO_CACHE_ENV, "").strip().lower() in _TRUE_WORDS


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _fsync_write(path: Path, raw: bytes) -> None:
    """Write a file of an entry folder being built (the folder, not the file, is renamed into place)."""
    with open(path, "wb") as fh:
        fh.write(raw)
        fh.flush()
        os.fsync(fh.fileno())


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
# Records
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
    seconds: float | None = None
    """How long the computation took, including the cached computations it called (``get_or_compute``, or the
    caller's ``put(seconds=...)``; None for entries stored otherwise or before it was recorded)."""
    seconds_own: float | None = None
    """``seconds`` less the time of the cached computations it called: summed over entries, a cold run's time."""



# --------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------


class Cache:
    """Content-addressed store of results under ``root`` (its layout and contract: :mod:`ubwlib.cache`).

    ``root=None`` uses :func:`ubwlib._paths.cache_root` (``$UBW_CACHE`` or
    ``~/.cache/ubwlib``). Nothing is created until the first write, which creates the root
    and its ``CACHEDIR.TAG`` marker. ``enabled=False`` makes the cache a pass-through that
    never reads or writes entries; ``UBW_NO_CACHE=1`` in the environment (checked at each
    call) disables reads only. Listing and :meth:`clear` work in either case.

    ``context``: what every result stored through this cache also depends on besides its settings (e.g. the device
    and the precision the computations ran in, which the settings name only as ``"auto"``); it is part of every key,
    so results computed in one context are never served in another. ``None`` or empty: keys of the settings alone.
    """

    def __init__(self, root: Path | str | None = None, *, enabled: bool = True,
                 context: Mapping[str, Any] | None = None) -> None:
        if root is None:
            from ubwlib._paths import cache_root

            root = cache_root()
        self.root: Path = Path(root).expanduser().absolute()
        self.enabled: bool = bool(enabled)
        self.context: dict[str, Any] = dict(context or {})

    def __repr__(self) -> str:
        ctx = f", context={self.context!r}" if self.context else ""
        return f"Cache(root={str(self.root)!r}, enabled={self.enabled}{ctx})"

    # ---- keys and paths --------------------------------------------------------------

    @property
    def reads_enabled(self) -> bool:
        """False when the cache is disabled or ``UBW_NO_CACHE`` is set: every get misses."""
        return self.enabled and not _no_cache_env()

    @staticmethod
    def _check_namespace(namespace: str) -> None:
        if not isinstance(namespace, str):
            raise TypeError(f"namespace must be str, got {type_name(namespace)}")
        if not NAMESPACE_RE.fullmatch(namespace) or namespace in RESERVED_NAMESPACES:
            raise ValueError(
                f"invalid cache namespace {namespace!r}: use 1-128 characters from "
                "[A-Za-z0-9_.-], starting with a letter or digit (and not 'data')"
            )

    def _key(self, namespace: str, settings: Any, version: str) -> CacheKey:
        self._check_namespace(namespace)
        if not isinstance(version, str):
            raise TypeError(f"version must be str, got {type_name(version)}")
        if self.context:
            settings = {"settings": settings, "context": self.context}
        return cache_key(namespace, settings, version)

    def _entry_dir(self, key: CacheKey) -> Path:
        return self.root / key.namespace / key.short

    def path_for(self, namespace: str, settings: Any, version: str) -> Path:
        """The directory an entry for these settings has (or would have)."""
        return self._entry_dir(self._key(namespace, settings, version))

    # ---- root and marker -------------------------------------------------------------

    def _has_marker(self) -> bool:
        """Whether the root carries the ``.ubwlib-cache`` marker (see :func:`ensure_cache_root`)."""
        return has_root_marker(self.root)

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
        if not has_root_marker(self.root):
            mark_root(self.root)

    # ---- discarding damaged entries --------------------------------------------------

    def _discard(self, path: Path, prefix: str, short: str) -> None:
        """Move ``path`` aside (atomically, so readers never see it half-deleted), then delete it."""
        aside = path.parent / f".{prefix}-{short}-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return  # someone else removed it
        _remove_tree(aside)

    def _corrupt(self, path: Path, key: CacheKey, reason: str) -> None:
        self._discard(path, "corrupt", key.short)
        warnings.warn(
            f"ubwlib cache: discarded damaged entry {path} ({reason}); it will be recomputed",
            CacheCorruptionWarning,
            stacklevel=4,
        )

    # ---- reading ---------------------------------------------------------------------

    def _load(self, key: CacheKey) -> Entry | None:
        path = self._entry_dir(key)
        if not os.path.lexists(path):
            return None
        try:
            if path.is_symlink() or not path.is_dir():
                raise Corrupt("not a directory")
            try:
                meta = json.loads((path / META_FILE).read_bytes())
            except FileNotFoundError:
                raise Corrupt(f"{META_FILE} is missing") from None
            except ValueError as exc:
                raise Corrupt(f"{META_FILE} is not valid JSON: {exc}") from None
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise Corrupt(f"{META_FILE} has an unknown format")
            if meta.get("hash") != key.full:
                raise Corrupt(f"{META_FILE} belongs to another key")
            if meta.get("namespace") != key.namespace or meta.get("version") != key.version:
                raise Corrupt(f"{META_FILE} names another namespace/version")
            sums = meta.get("sha256")
            if not isinstance(sums, dict):
                raise Corrupt(f"{META_FILE} lacks checksums")
            raw: dict[str, bytes] = {}
            for name in (TENSORS_FILE, DATA_FILE):
                try:
                    raw[name] = (path / name).read_bytes()
                except FileNotFoundError:
                    raise Corrupt(f"{name} is missing") from None
                if sha256_hex(raw[name]) != sums.get(name):
                    raise Corrupt(f"checksum mismatch in {name}")
            try:
                data = json.loads(raw[DATA_FILE].decode("utf-8"))
            except ValueError as exc:
                raise Corrupt(f"{DATA_FILE} is not valid JSON: {exc}") from None
            try:
                tensors = load_tensors(raw[TENSORS_FILE])
            except Corrupt:
                raise
            except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ...
                raise Corrupt(f"torch.load(weights_only=True) failed on {TENSORS_FILE}: {exc}") from None
        except Corrupt as exc:
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

    def _make_meta(self, key: CacheKey, tensor_raw: bytes, data_raw: bytes,
                   timing: Mapping[str, float] | None = None) -> dict[str, Any]:
        return {**(timing or {}),
            "format": FORMAT,
            "namespace": key.namespace,
            "version": key.version,
            "hash": key.full,
            "settings": key.settings,
            "created": datetime.now(timezone.utc).isoformat(),
            "ubwlib_version": ubwlib_version(),
            "torch_version": str(torch.__version__),
            "sha256": {TENSORS_FILE: sha256_hex(tensor_raw), DATA_FILE: sha256_hex(data_raw)},
        }

    def _put(
        self,
        key: CacheKey,
        tensors: Mapping[str, torch.Tensor] | None,
        data: Any,
        overwrite: bool,
        timing: Mapping[str, float] | None = None,
    ) -> Entry:
        tensors_c = prepare_tensors(tensors)
        data_raw, data_rt = encode_data(data)
        tensor_raw = save_tensors(tensors_c)
        meta = self._make_meta(key, tensor_raw, data_raw, timing)
        path = self._entry_dir(key)
        if not self.enabled:
            return Entry(tensors=tensors_c, data=data_rt, meta=meta, path=path, hit=False)

        self._ensure_root()
        path.parent.mkdir(exist_ok=True)
        tmp: Path | None = Path(tempfile.mkdtemp(prefix=f".tmp-{key.short}-", dir=path.parent))
        try:
            _fsync_write(tmp / TENSORS_FILE, tensor_raw)
            _fsync_write(tmp / DATA_FILE, data_raw)
            meta_raw = json.dumps(meta, indent=1, ensure_ascii=False, allow_nan=False).encode("utf-8")
            _fsync_write(tmp / META_FILE, meta_raw)
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
        seconds: float | None = None,
    ) -> Entry:
        """Store ``tensors`` (dict[str, Tensor], saved as CPU clones) and JSON-able ``data``.

        ``seconds``: how long computing them took, when the caller timed it (recorded as the entry's own time,
        and counted as a cached part of the :meth:`get_or_compute` under way, if any).

        The entry is built in a temporary directory and renamed into place. If a sound entry
        already exists (e.g. a concurrent process won the race) it is kept and returned
        (``hit=True``) unless ``overwrite=True``, which replaces it. Numpy scalars in
        ``data`` are converted to Python numbers; other non-JSON values raise TypeError.
        With ``enabled=False`` nothing is written and the would-be entry is returned.
        """
        key = self._key(namespace, settings, version)
        timing = None if seconds is None else _timing(float(seconds))
        return self._put(key, tensors, data, overwrite, timing=timing)

    @contextlib.contextmanager
    def computing(self):
        """Hold this cache's compute lock: one computation at a time among the processes sharing the root.

        :meth:`get_or_compute` computes inside it, and so does every caller that computes and then :meth:`put` s
        (the trainings of :func:`ubwlib.experiments.core.trained_models`). Two processes building into one cache
        (the chapters of ``make book`` executed side by side) therefore never train side by side, where each
        would take its share of the cores and run several times slower, and a result both need is computed
        once: the one that waited finds it in the cache (callers look again once they hold the lock). Only the
        outermost block of a thread takes the lock (an exclusive ``flock`` on the root's :data:`LOCK_FILE`,
        released when the block ends or the process dies); the computations nested in it run under it. No lock
        where the cache is disabled or the platform or file system has no ``flock``."""
        depth = getattr(_HELD, "depth", 0)
        fd = None
        if depth == 0 and self.enabled and fcntl is not None:
            self._ensure_root()
            try:
                fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    _LOG.info("waiting for another process's computation in %s", self.root)
                    fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as err:  # no flock on this file system: compute unserialised
                _LOG.info("no compute lock in %s (%s)", self.root, err)
                if fd is not None:
                    os.close(fd)
                fd = None
        _HELD.depth = depth + 1
        try:
            yield
        finally:
            _HELD.depth = depth
            if fd is not None:
                os.close(fd)  # releases the lock

    def get_or_compute(
        self,
        namespace: str,
        settings: Any,
        version: str,
        compute: Callable[[], tuple[Mapping[str, torch.Tensor] | None, Any]],
    ) -> Entry:
        """The cached entry, or ``compute()`` -> ``(tensors | None, data)`` stored and returned.

        ``compute`` runs at most once per call, under the compute lock (:meth:`computing`; a result another
        process stored while this one waited for the lock is returned instead). Under ``UBW_NO_CACHE`` it always
        runs and its result replaces any stored entry; with ``enabled=False`` it always runs and nothing is
        stored.
        """
        key = self._key(namespace, settings, version)
        if self.reads_enabled:
            entry = self._load(key)
            if entry is not None:
                return entry
        with self.computing():
            if self.reads_enabled:
                entry = self._load(key)  # computed by another process while this one waited
                if entry is not None:
                    return entry
            stack = _RUNNING.__dict__.setdefault("stack", [])
            stack.append(0.0)
            start = time.perf_counter()
            try:
                result = compute()
            finally:
                nested = stack.pop()
                # where a cold build spends its time (``ubw cache`` sums it): the whole computation, and what
                # remains of it once the cached computations it called are taken out
                timing = _timing(time.perf_counter() - start, nested)
            if not isinstance(result, tuple) or len(result) != 2:
                raise TypeError(
                    f"compute() must return a (tensors, data) tuple, got {type_name(result)}"
                )
            tensors, data = result
            return self._put(key, tensors, data, overwrite=self.enabled and _no_cache_env(), timing=timing)

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
                and NAMESPACE_RE.fullmatch(e.name)
                and e.name not in RESERVED_NAMESPACES
            ]

    def entries(self, *, include_data: bool = True) -> list[EntryInfo]:
        """All entries on disk (checkpoints and temporary directories excluded), sorted by
        namespace then hash.

        With ``include_data`` (the default) the derived dataset copies that :mod:`ubwlib.data`
        keeps under ``<root>/data`` (decoded tensors; not downloads) are
        listed too, under the namespace ``"data"``: their ``hash`` is their path relative to
        ``<root>/data``, ``created`` their modification time and ``version`` None.
        """
        out: list[EntryInfo] = []
        for ns_path in self._namespace_dirs(None):
            with os.scandir(ns_path) as it:
                dirs = [e for e in it if e.is_dir(follow_symlinks=False) and ENTRY_RE.fullmatch(e.name)]
            for e in dirs:
                p = Path(e.path)
                size = 0
                with os.scandir(p) as files:
                    for f in files:
                        if f.is_file(follow_symlinks=False):
                            size += f.stat(follow_symlinks=False).st_size
                full, created, version, seconds, own = e.name, None, None, None, None
                try:
                    meta = json.loads((p / META_FILE).read_bytes())
                    if isinstance(meta, dict):
                        full = meta.get("hash", full) if isinstance(meta.get("hash"), str) else full
                        created = _parse_time(meta.get("created"))
                        version = meta.get("version") if isinstance(meta.get("version"), str) else None
                        seconds, own = (meta.get(k) if isinstance(meta.get(k), (int, float)) else None
                                        for k in ("seconds", "seconds_own"))
                except (OSError, ValueError):
                    pass
                out.append(EntryInfo(ns_path.name, full, size, created, version, p, seconds, own))
        if include_data:
            out.extend(self.data_entries())
        out.sort(key=lambda i: (i.namespace, i.hash))
        return out

    def _data_dir(self) -> Path | None:
        d = self.root / DATA_DIR
        return d if d.is_dir() and not d.is_symlink() else None

    def data_entries(self) -> list[EntryInfo]:
        """The derived dataset copies under ``<root>/data`` (namespace ``"data"``), sorted.

        Each is a file of decoded tensors, or a folder of decompressed IDX files that an older
        version made (links in it are counted as links, never followed). Downloads are not listed.
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
            out.append(EntryInfo(DATA_DIR, rel, _tree_size(item), created, None, item))
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
            if has_cachedir_tag(self.root):
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
        data_only = namespace == DATA_DIR
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
                if ENTRY_RE.fullmatch(name):
                    counted = is_own_entry(path, ns)
                elif CKPT_RE.fullmatch(name):
                    counted = is_own_checkpoint(path, ns)
                elif STALE_RE.fullmatch(name) and is_own_leftover(path, ns):
                    shutil.rmtree(path, ignore_errors=True)
                    continue
                else:
                    continue
                if not counted:
                    continue  # named like ours but not provably ours: left alone
                aside = ns_path / f".old-{name[:SHORT]}-{uuid.uuid4().hex[:12]}"
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

