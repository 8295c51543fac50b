"""Cache keys: the canonical form of settings and its hash.

A key identifies *what* was computed: a namespace, the full settings that determine the result and a version
string. :func:`canonical_settings` turns the settings into plain JSON data (see there for the rules),
:func:`canonical_json` writes it in one fixed way, and :func:`settings_hash` is the sha256 of that text for
``{"namespace", "settings", "version"}``. The cache's folders on disk are named by these hashes, so nothing
here may change what a given value hashes to.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import numpy as np
import torch

__all__ = ["SHORT", "CacheKey", "cache_key", "canonical_json", "canonical_settings", "settings_hash", "type_name"]

#: Hex characters of a key that name its folder on disk (80 bits).
SHORT = 20
_TYPE_KEY = "__ubw_type__"  # reserved key marking non-JSON values in canonical settings


def type_name(obj: Any) -> str:
    """``module.QualName`` of ``obj``'s type, for error messages."""
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
            f"settings_hash: cannot canonicalise a value of type {type_name(obj)} at {where}; "
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
                        f"settings_hash: dict keys must be str, got {type_name(key)} ({key!r}) at {where}"
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


def _key_hash(namespace: str, settings_canon: Any, version: str) -> str:
    doc = canonical_json({"namespace": namespace, "settings": settings_canon, "version": version})
    return hashlib.sha256(doc.encode("utf-8")).hexdigest()


def settings_hash(namespace: str, settings: Any, version: str) -> str:
    """Full sha256 hex digest (64 chars) identifying ``(namespace, settings, version)``.

    It is the hash of the canonical JSON of ``{"namespace", "version", "settings"}``, with
    ``settings`` canonicalised by :func:`canonical_settings` (see there for the rules).
    Cache directories use the first 20 hex characters; ``meta.json`` keeps all 64.
    """
    if not isinstance(namespace, str):
        raise TypeError(f"settings_hash: namespace must be str, got {type_name(namespace)}")
    if not isinstance(version, str):
        raise TypeError(f"settings_hash: version must be str, got {type_name(version)}")
    return _key_hash(namespace, canonical_settings(settings), version)


@dataclasses.dataclass(frozen=True)
class CacheKey:
    """A key with what it was made of: ``settings`` in canonical form, ``full`` the :func:`settings_hash`."""

    namespace: str
    version: str
    settings: Any
    full: str

    @property
    def short(self) -> str:
        """The first :data:`SHORT` hex characters of the hash: the folder name of the key's entry."""
        return self.full[:SHORT]


def cache_key(namespace: str, settings: Any, version: str) -> CacheKey:
    """The :class:`CacheKey` of ``(namespace, settings, version)`` (both str, not checked here)."""
    canon = canonical_settings(settings)
    return CacheKey(namespace, version, canon, _key_hash(namespace, canon, version))
