"""Checkpoints: the latest state of a long, resumable computation (a training or crafting loop), kept under
the computation's cache key until its result is stored."""

from __future__ import annotations

import io
import json
import shutil
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from .files import atomic_path
from .keys import CacheKey, type_name
from .layout import CKPT_FILE, FORMAT
from .payload import CacheCorruptionWarning, Corrupt, encode_data, prepare_tensors, save_tensors, sha256_hex

if TYPE_CHECKING:
    from .store import Cache

__all__ = ["Checkpoint", "CheckpointState"]


class CheckpointState(NamedTuple):
    """What :meth:`Checkpoint.load` returns: unpack as ``step, tensors, data``."""

    step: int
    tensors: dict[str, torch.Tensor]
    data: Any


class Checkpoint:
    """The latest state of a long, resumable computation (e.g. an iterative crafting loop).

    Stored as one file ``<root>/<namespace>/<hash20>.ckpt/checkpoint.pt``, replaced
    atomically by each :meth:`save`. Loaded with ``weights_only=True`` only. Obtain one from
    :meth:`Cache.checkpoint`. With a disabled cache, saves are no-ops and loads return None;
    under ``UBW_NO_CACHE`` loads return None (start over) but saves still write.
    """

    def __init__(self, cache: Cache, key: CacheKey) -> None:
        self._cache = cache
        self._key = key
        self.path: Path = cache.root / key.namespace / f"{key.short}.ckpt"

    @property
    def file(self) -> Path:
        """The checkpoint file."""
        return self.path / CKPT_FILE

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
            if not isinstance(obj, dict) or obj.get("format") != FORMAT:
                raise Corrupt("unknown checkpoint format")
            if obj.get("hash") != self._key.full:
                raise Corrupt("checkpoint belongs to another key")
            step = obj.get("step")
            tensors = obj.get("tensors")
            if not isinstance(step, int) or isinstance(step, bool):
                raise Corrupt("bad step")
            if not isinstance(tensors, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
            ):
                raise Corrupt("bad tensors")
            data_json = obj.get("data_json")
            if not isinstance(data_json, str) or sha256_hex(data_json.encode("utf-8")) != obj.get("data_sha256"):
                raise Corrupt("bad data")
            data = json.loads(data_json)
        except Exception as exc:  # Corrupt, UnpicklingError, RuntimeError, ValueError, ...
            f.unlink(missing_ok=True)
            warnings.warn(
                f"ubwlib cache: discarded damaged checkpoint {f} ({exc}); starting over",
                CacheCorruptionWarning,
                stacklevel=2,
            )
            return None
        return CheckpointState(step, tensors, data)

    def save(self, step: int, tensors: Mapping[str, torch.Tensor] | None = None, data: Any = None) -> None:
        """Atomically replace the checkpoint with ``(step, tensors, data)`` (flushed to disk first)."""
        if not isinstance(step, int) or isinstance(step, bool):
            raise TypeError(f"step must be int, got {type_name(step)}")
        tensors_c = prepare_tensors(tensors)
        data_raw, _ = encode_data(data)
        data_json = data_raw.decode("utf-8")
        if not self._cache.enabled:
            return
        payload = {
            "format": FORMAT,
            "hash": self._key.full,
            "namespace": self._key.namespace,
            "version": self._key.version,
            "step": int(step),
            "tensors": tensors_c,
            "data_json": data_json,
            "data_sha256": sha256_hex(data_raw),
            "saved": datetime.now(timezone.utc).isoformat(),
        }
        raw = save_tensors(payload)
        self._cache._ensure_root()
        with atomic_path(self.file, fsync=True) as tmp:
            tmp.write_bytes(raw)

    def clear(self) -> bool:
        """Delete the checkpoint (e.g. once the final result is in the cache). True if one existed."""
        if self.path.is_symlink():
            self.path.unlink()
            return True
        if not self.path.is_dir():
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        return True
