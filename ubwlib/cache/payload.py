"""What an entry or a checkpoint holds: named CPU tensors (read back with ``weights_only=True`` only) and
JSON data, encoded for the disk and checked when read; a model's weights as such tensors."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .keys import type_name

__all__ = [
    "CacheCorruptionWarning",
    "Corrupt",
    "encode_data",
    "json_default",
    "load_state_dict_tensors",
    "load_tensors",
    "prepare_tensors",
    "save_tensors",
    "sha256_hex",
    "state_dict_tensors",
]


class CacheCorruptionWarning(UserWarning):
    """A cache entry or checkpoint was damaged (missing file, checksum mismatch, unreadable
    JSON, a ``tensors.pt`` that ``torch.load(weights_only=True)`` refuses...). It was removed
    and will be recomputed."""


class Corrupt(Exception):
    """Raised while verifying an entry or checkpoint; the cache turns it into a :class:`CacheCorruptionWarning`."""


def sha256_hex(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def prepare_tensors(tensors: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """``tensors`` (or None: none) checked and copied as detached, contiguous CPU clones."""
    if tensors is None:
        return {}
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a dict[str, Tensor] or None, got {type_name(tensors)}")
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {type_name(name)} ({name!r})")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{name!r}] must be a torch.Tensor, got {type_name(t)}")
        # clone: a view would otherwise drag its whole storage into the file
        out[name] = t.detach().to("cpu").contiguous().clone()
    return out


def save_tensors(tensors: dict[str, Any]) -> bytes:
    """The bytes ``torch.save`` writes for ``tensors``."""
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


def load_tensors(raw: bytes) -> dict[str, torch.Tensor]:
    """The ``dict[str, Tensor]`` in ``raw`` (``weights_only=True``, on the CPU); another object -> :class:`Corrupt`."""
    obj = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise Corrupt("tensors file does not hold a dict[str, Tensor]")
    return obj


def json_default(obj: Any) -> Any:
    """``json.dumps``'s ``default``: numpy scalars as Python numbers; anything else -> TypeError with a hint."""
    if isinstance(obj, np.generic) and not isinstance(obj, (np.datetime64, np.timedelta64, np.void)):
        return obj.item()
    hint = ""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        hint = " (store arrays in `tensors`, or convert with .tolist())"
    elif type(obj).__name__ in {"DataFrame", "Series"}:
        hint = " (convert tables with ubwlib.cache.table_to_data)"
    raise TypeError(f"cache data must be JSON-able; got {type_name(obj)}{hint}")


def encode_data(data: Any) -> tuple[bytes, Any]:
    """JSON bytes of ``data`` plus the value read back from them (what a later get returns)."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=True, default=json_default)
    raw = text.encode("utf-8")
    return raw, json.loads(text)


def state_dict_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as detached, contiguous CPU clones (parameters and buffers)."""
    out: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict entry {name!r} is a {type_name(value)}, not a tensor")
        out[name] = value.detach().to("cpu").contiguous().clone()
    return out


def load_state_dict_tensors(
    model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], *, strict: bool = True
) -> Any:
    """Load ``tensors`` (from :func:`state_dict_tensors` / a cache entry) into ``model``,
    copying onto the model's own devices and dtypes. Returns ``load_state_dict``'s result."""
    return model.load_state_dict(dict(tensors), strict=strict)
