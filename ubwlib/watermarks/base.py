"""The one interface of every watermark, and the one poisoned-dataset type.

A watermark is a frozen settings dataclass plus two operations:

- ``watermark(train_set, seed) -> WatermarkedDataset``: the dataset the owner releases (images and labels),
  the indices of the samples that were modified, and a :class:`WatermarkKey`: everything needed to trigger
  and verify later (pattern, mask, warping field, target...), serialisable to disk and back;
- ``trigger(images, key) -> images``: apply the key's test-time trigger to uint8 images.

Every watermark registers itself in :data:`REGISTRY` under its ``name``, so that
:func:`ubwlib.watermarks.trigger` can dispatch on a key alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..data import ImageDataset

__all__ = [
    "WatermarkKey",
    "WatermarkedDataset",
    "Watermark",
    "REGISTRY",
    "register",
    "get_watermark",
    "trigger",
    "poison_count",
    "class_capped_count",
    "choose_indices",
    "check_rate",
    "check_target",
]

_FORMAT = "ubwlib.watermark/1"


def check_rate(rate: float) -> float:
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not (0 < float(rate) <= 1):
        raise ValueError(f"poisoning_rate (gamma) must be in (0, 1], got {rate!r}; e.g. 0.1 poisons 10% of the samples")
    return float(rate)


def check_target(target: int, num_classes: int) -> int:
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < num_classes:
        raise ValueError(f"target label must be an int in [0, {num_classes}), got {target!r} "
                         f"(the dataset has {num_classes} classes)")
    return target


def poison_count(rate: float, n: int) -> int:
    """``round(gamma * N)`` (half away from zero), at least 1."""
    return max(1, int(math.floor(check_rate(rate) * n + 0.5)))


def class_capped_count(train_set: ImageDataset, cls: int, rate: float, method: str) -> tuple[torch.Tensor, int, int]:
    """For watermarks that can only poison samples of one class (Label-Consistent, Sleeper Agent): the indices of
    that class, the requested count ``round(gamma * N)`` and the count used, capped at the class size (with a
    ``UserWarning`` that names both counts and the largest possible gamma)."""
    import warnings

    n = len(train_set)
    pool = torch.nonzero(train_set.labels.cpu() == cls).flatten()
    if len(pool) == 0:
        raise ValueError(f"class {cls} ({train_set.classes[cls]!r}) has no samples in {train_set.name}; {method} "
                         "can only poison samples of that class")
    requested = poison_count(rate, n)
    used = min(requested, len(pool))
    if used < requested:
        warnings.warn(
            f"{method}: gamma = {rate} requests {requested} poisons but only the {len(pool)} samples of class "
            f"{cls} can be poisoned; using {used} (maximum gamma = {len(pool)}/{n} = {len(pool) / n:.4g})",
            UserWarning,
            stacklevel=3,
        )
    return pool, requested, used


def choose_indices(n: int, count: int, generator: torch.Generator, pool: torch.Tensor | None = None) -> torch.Tensor:
    """``count`` distinct indices drawn uniformly (seeded) from ``range(n)`` or from ``pool``; sorted int64."""
    if pool is None:
        pool = torch.arange(n)
    if count > len(pool):
        raise ValueError(f"cannot choose {count} samples from {len(pool)} candidates")
    pick = pool[torch.randperm(len(pool), generator=generator)[:count]]
    return pick.sort().values


@dataclass(frozen=True, eq=False)
class WatermarkKey:
    """Everything needed to trigger and verify a watermark later.

    ``settings`` are the method's settings (JSON-able), ``tensors`` its trigger material (pattern, mask, warping
    grid...), ``image_shape``/``classes`` describe the dataset it was made for (``trigger`` refuses other shapes).
    """

    method: str
    settings: dict
    tensors: dict[str, torch.Tensor]
    image_shape: tuple[int, int, int]
    classes: tuple[str, ...]
    dataset: str
    seed: int
    target: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def save(self, path: str | Path) -> Path:
        """Write the key to one file (tensors + JSON metadata; read back without unpickling code)."""
        path = Path(path)
        meta = {
            "format": _FORMAT,
            "method": self.method,
            "settings": self.settings,
            "image_shape": list(self.image_shape),
            "classes": list(self.classes),
            "dataset": self.dataset,
            "seed": self.seed,
            "target": self.target,
        }
        payload = {"meta": json.dumps(meta), **{f"t/{k}": v.detach().cpu().contiguous() for k, v in self.tensors.items()}}
        _atomic_save(payload, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "WatermarkKey":
        payload = _load_payload(path, "ubwlib watermark key")
        if not isinstance(payload, dict) or "meta" not in payload:
            raise ValueError(f"{path} is not a ubwlib watermark key")
        meta = json.loads(payload["meta"])
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path}: unsupported watermark key format {meta.get('format')!r} (expected {_FORMAT})")
        return cls(
            method=meta["method"],
            settings=meta["settings"],
            tensors={k[2:]: v for k, v in payload.items() if k.startswith("t/")},
            image_shape=tuple(meta["image_shape"]),
            classes=tuple(meta["classes"]),
            dataset=meta["dataset"],
            seed=int(meta["seed"]),
            target=meta["target"],
        )

    def check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor N x C x H x W, got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 (0..255), got {images.dtype}; convert with "
                            "(x * 255).round().to(torch.uint8)")
        if tuple(images.shape[1:]) != tuple(self.image_shape):
            raise ValueError(f"this {self.method} key was made for images of shape {tuple(self.image_shape)} "
                             f"({self.dataset}), got {tuple(images.shape[1:])}")


@dataclass(frozen=True, eq=False)
class WatermarkedDataset:
    """The released dataset of a watermark (the one poisoned-dataset type of ubwlib).

    ``dataset`` holds the released images and labels; ``indices`` the samples that carry the watermark
    (sorted); ``noise_indices`` other modified samples whose labels are kept (WaNet's noise mode; empty
    otherwise); ``key`` the watermark key.
    """

    dataset: ImageDataset
    indices: torch.Tensor
    key: WatermarkKey
    noise_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    report: dict = field(default_factory=dict, repr=False)
    """Method-specific diagnostics of how the release was made (e.g. crafting curves); not saved."""

    @property
    def modified(self) -> torch.Tensor:
        """Indices of every sample whose image differs from the benign dataset (sorted)."""
        return torch.cat([self.indices, self.noise_indices]).unique(sorted=True)

    @property
    def poisoning_rate(self) -> float:
        return len(self.indices) / len(self.dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        payload = {
            "meta": json.dumps({"format": _FORMAT + "/dataset", "name": self.dataset.name,
                                "classes": list(self.dataset.classes)}),
            "images": self.dataset.images,
            "labels": self.dataset.labels,
            "indices": self.indices,
            "noise_indices": self.noise_indices,
        }
        _atomic_save(payload, path)
        os.chmod(path, 0o644)  # the release is public; the key (below) stays private (0600)
        key_path = path.with_name(path.name + ".key")
        self.key.save(key_path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "WatermarkedDataset":
        path = Path(path)
        payload = _load_payload(path, "ubwlib watermarked dataset")
        meta = json.loads(payload["meta"]) if isinstance(payload, dict) and isinstance(payload.get("meta"), str) else {}
        if meta.get("format") != _FORMAT + "/dataset":
            raise ValueError(f"{path} is not a ubwlib watermarked dataset (written by WatermarkedDataset.save)")
        ds = ImageDataset(payload["images"], payload["labels"], tuple(meta["classes"]), meta["name"])
        key = WatermarkKey.load(path.with_name(path.name + ".key"))
        return cls(ds, payload["indices"], key, payload["noise_indices"])


def _load_payload(path: str | Path, what: str) -> Any:
    """``torch.load(weights_only=True)``; a file torch cannot read (text, truncated, pickled code) -> ValueError."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:
        raise ValueError(f"{path} is not a {what}: torch.load(weights_only=True) failed "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Watermark:
    """Base class: subclasses set ``name``, ``label_type`` ("poisoned"/"clean"), ``targeted`` and a
    ``Settings`` dataclass, and implement :meth:`watermark` and :meth:`apply`."""

    name: ClassVar[str] = ""
    label_type: ClassVar[str] = "poisoned"
    targeted: ClassVar[bool] = True
    Settings: ClassVar[type]

    def __init__(self, settings=None, **overrides) -> None:
        if settings is None:
            settings = self.Settings(**overrides)
        elif overrides:
            settings = dataclasses.replace(settings, **overrides)
        if not isinstance(settings, self.Settings):
            raise TypeError(f"{type(self).__name__} takes {self.Settings.__name__}, got {type(settings).__name__}")
        self.settings = settings

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings})"

    def watermark(self, train_set: ImageDataset, seed: int = 0) -> WatermarkedDataset:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def apply(cls, images: torch.Tensor, key: WatermarkKey,
              generator: torch.Generator | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def trigger(self, images: torch.Tensor, key: WatermarkKey, seed: int | None = None) -> torch.Tensor:
        return trigger(images, key, seed=seed)

    def settings_dict(self) -> dict:
        return _jsonable(dataclasses.asdict(self.settings))

    @staticmethod
    def _check_train_set(train_set: ImageDataset) -> ImageDataset:
        if not isinstance(train_set, ImageDataset):
            raise TypeError(f"train_set must be an ubwlib.data.ImageDataset, got {type(train_set).__name__}")
        return train_set

    def _release(
        self,
        train_set: ImageDataset,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
        tensors: dict[str, torch.Tensor],
        seed: int,
        target: int | None,
        noise_indices: torch.Tensor | None = None,
    ) -> WatermarkedDataset:
        """Bundle the released images/labels with the key (shared by every watermark)."""
        key = WatermarkKey(
            method=self.name,
            settings=self.settings_dict(),
            tensors=tensors,
            image_shape=train_set.image_shape,
            classes=train_set.classes,
            dataset=train_set.name,
            seed=seed,
            target=target,
        )
        released = ImageDataset(images, labels, train_set.classes, f"{train_set.name}+{self.name}")
        if noise_indices is None:
            return WatermarkedDataset(released, indices, key)
        return WatermarkedDataset(released, indices, key, noise_indices)


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            continue  # tensors travel in WatermarkKey.tensors
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


REGISTRY: dict[str, type[Watermark]] = {}


def register(cls: type[Watermark]) -> type[Watermark]:
    REGISTRY[cls.name] = cls
    return cls


def get_watermark(name: str, **settings) -> Watermark:
    """A watermark by name (``badnets``, ``blended``, ``wanet``, ``ubw-p``...) with its settings."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown watermark {name!r}; choose one of {', '.join(REGISTRY)}") from None
    return cls(**settings)


def trigger(images: torch.Tensor, key: WatermarkKey, seed: int | None = None) -> torch.Tensor:
    """Apply ``key``'s test-time trigger to uint8 images (N x C x H x W); returns new uint8 images.

    ``seed`` fixes the randomness of triggers that have some (e.g. a patch at a random position); the
    triggers of BadNets, Blended, UBW-P and WaNet are deterministic and ignore it."""
    try:
        cls = REGISTRY[key.method]
    except KeyError:
        raise ValueError(f"no watermark named {key.method!r} is registered (known: {', '.join(REGISTRY)})") from None
    key.check_images(images)
    gen = torch.Generator().manual_seed(key.seed if seed is None else seed)
    return cls.apply(images, key, gen)
