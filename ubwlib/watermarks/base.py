"""The one interface of every watermark, and the one poisoned-dataset type.

A watermark is a frozen settings dataclass plus three operations:

- ``watermark(train_set, seed) -> WatermarkedDataset``: the dataset the owner releases (images and labels),
  the indices of the samples that were modified, and a :class:`WatermarkKey`: everything needed to trigger
  and verify later (pattern, mask, warping field, target...), serialisable to disk and back;
- ``trigger(images, key) -> images``: apply the key's test-time trigger to uint8 images;
- ``redraw(key, seed) -> key``: the same key with another random trigger of its kind, drawn from ``seed``
  (the Independent-T trigger of :func:`ubwlib.verify.independent_key`).

Every watermark registers itself in :data:`REGISTRY` under its ``name``, so that
:func:`ubwlib.watermarks.trigger` can dispatch on a key alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from ..cache import atomic_path
from ..data import ImageDataset

__all__ = [
    "WatermarkKey",
    "dataset_fingerprint",
    "WatermarkedDataset",
    "Watermark",
    "REGISTRY",
    "register",
    "get_watermark",
    "trigger",
    "check_redraw",
    "draw_different",
    "redrawn_key",
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


def dataset_fingerprint(ds: ImageDataset) -> str:
    """SHA-256 (64 hex digits) of a dataset's content, not its name.

    The digest covers, in this order: ``str((tuple(images.shape), classes))`` encoded as UTF-8, the bytes of the
    uint8 images (C order) and the bytes of the int64 labels (C order, native byte order), all read on the CPU.
    Two datasets get the same fingerprint iff (up to SHA-256 collisions) they hold the same images with the same
    labels in the same order and the same class names; any subset, reordering or modified image gives another
    one. On CPU datasets it equals ``ubwlib.experiments.core.fingerprint``, the key of the book's cached results.

    Remembered per dataset object while it lives, with its tensors' version counters: hashing 30,000 Fashion-MNIST
    images takes about 12 ms, and a chapter asks for the same dataset's fingerprint again and again (the report
    chapter asked 205 times, for 94 dataset objects of 19 distinct contents). Datasets of inference tensors
    (``torch.inference_mode``), which count no versions, are hashed every time. An in-place change made through torch (``images[0] = 0``,
    ``add_``...) counts as a change and is hashed again; one made behind torch's back, through a NumPy view
    (``images.numpy()``) or ``.data``, is not: ``ImageDataset`` is immutable by contract, so after such a change
    build a new one (``ImageDataset(images, labels, classes, name)``).
    """
    if not isinstance(ds, ImageDataset):
        raise TypeError(f"dataset_fingerprint takes an ubwlib.data.ImageDataset, got {type(ds).__name__}")
    # inference tensors (made under torch.inference_mode) have no version counter: hashed every time
    versions = None if ds.images.is_inference() or ds.labels.is_inference() else (ds.images._version,
                                                                                   ds.labels._version)
    known = _FINGERPRINTS.get(ds)
    if versions is not None and known is not None and known[0] == versions:
        return known[1]
    h = hashlib.sha256()
    h.update(str((tuple(ds.images.shape), ds.classes)).encode())
    h.update(memoryview(ds.images.detach().cpu().contiguous().numpy()).cast("B"))
    h.update(memoryview(ds.labels.detach().cpu().contiguous().numpy()).cast("B"))
    digest = h.hexdigest()
    if versions is not None:
        _FINGERPRINTS[ds] = (versions, digest)
    return digest


#: dataset -> ((images version, labels version), fingerprint); entries go with their datasets.
_FINGERPRINTS: weakref.WeakKeyDictionary[ImageDataset, tuple[tuple[int, int], str]] = weakref.WeakKeyDictionary()


def _is_sha256_hex(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


#: The metadata every key file must hold (``target`` is ``null`` for untargeted watermarks).
_REQUIRED_META = ("method", "settings", "image_shape", "classes", "dataset", "seed", "target")


@dataclass(frozen=True, eq=False)
class WatermarkKey:
    """Everything needed to trigger and verify a watermark later.

    ``settings`` are the method's settings (JSON-able), ``tensors`` its trigger material (pattern, mask, warping
    grid...), ``image_shape``/``classes``/``dataset`` describe the dataset it was made for (``dataset`` is the
    name of the training split that was watermarked; ``trigger`` refuses other image shapes), ``seed`` the
    watermark's seed and ``target`` the target class (None for untargeted watermarks).

    ``test_dataset`` and ``test_fingerprint`` identify the test split whose images verify the watermark: its name
    and its :func:`dataset_fingerprint`. A watermark only sees the training split, so a new key has neither
    (None); :meth:`bind_test_split` returns a copy that has both, and the CLI's ``ubw watermark`` binds the key
    it writes to the test split of its ``--data``. ``ubwlib.verify`` refuses test sets whose class names differ
    from ``classes`` and, when ``test_fingerprint`` is set, test sets with another fingerprint; an unbound key
    (including every key file written before these fields existed) skips the fingerprint check.
    """

    method: str
    settings: dict
    tensors: dict[str, torch.Tensor]
    image_shape: tuple[int, int, int]
    classes: tuple[str, ...]
    dataset: str
    seed: int
    target: int | None = None
    test_dataset: str | None = None
    test_fingerprint: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def bind_test_split(self, test_set: ImageDataset) -> "WatermarkKey":
        """A copy of this key bound to ``test_set``, the test split of the dataset it protects.

        The copy records ``test_set.name`` as ``test_dataset`` and :func:`dataset_fingerprint` ``(test_set)`` as
        ``test_fingerprint``; everything else (trigger tensors, settings, seed...) is shared unchanged. A test
        set whose image shape or class names differ from the key's is refused (``ValueError``): it cannot be a
        test split of the dataset the key was made for. Binding an already bound key rebinds it.
        """
        if not isinstance(test_set, ImageDataset):
            raise TypeError(f"test_set must be an ubwlib.data.ImageDataset, got {type(test_set).__name__}")
        if tuple(test_set.image_shape) != tuple(self.image_shape) or tuple(test_set.classes) != tuple(self.classes):
            raise ValueError(
                f"cannot bind the {self.method} key made for {self.dataset} (images {tuple(self.image_shape)}, "
                f"classes {_short_names(self.classes)}) to {test_set.name} (images {tuple(test_set.image_shape)}, "
                f"classes {_short_names(test_set.classes)}); bind it to the test split of the dataset whose training "
                f"split is {self.dataset}")
        return dataclasses.replace(self, tensors=dict(self.tensors), settings=dict(self.settings),
                                   test_dataset=test_set.name, test_fingerprint=dataset_fingerprint(test_set))

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
            "test_dataset": self.test_dataset,
            "test_fingerprint": self.test_fingerprint,
        }
        payload = {"meta": json.dumps(meta), **{f"t/{k}": v.detach().cpu().contiguous() for k, v in self.tensors.items()}}
        _atomic_save(payload, path, mode=0o600)  # the key is the owner's secret
        return path

    @classmethod
    def load(cls, path: str | Path) -> "WatermarkKey":
        """Read a key written by :meth:`save` (``torch.load(weights_only=True)``; no code is unpickled).

        The metadata must hold ``method``, ``settings``, ``image_shape``, ``classes``, ``dataset``, ``seed`` and
        ``target`` (``null`` for untargeted watermarks); a file that lacks one or holds one of the wrong type
        raises ``ValueError`` naming the file and the fields. ``test_dataset`` and ``test_fingerprint`` are
        optional: files written before they existed load as unbound keys.
        """
        payload = _load_payload(path, "ubwlib watermark key")
        if not isinstance(payload, dict) or not isinstance(payload.get("meta"), str):
            raise ValueError(f"{path} is not a ubwlib watermark key")
        try:
            meta = json.loads(payload["meta"])
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            raise ValueError(f"{path} is not a ubwlib watermark key (its metadata is not a JSON object)")
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path}: unsupported watermark key format {meta.get('format')!r} (expected {_FORMAT})")
        missing = [name for name in _REQUIRED_META if name not in meta]
        if missing:
            raise ValueError(
                f"{path}: the watermark key lacks the field{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                f"(a key needs {', '.join(_REQUIRED_META)}; target is null for untargeted watermarks); write keys "
                "with WatermarkKey.save")
        problems = _meta_problems(meta)
        if problems:
            raise ValueError(f"{path}: invalid watermark key: {'; '.join(problems)}")
        tensors = {k[2:]: v for k, v in payload.items() if isinstance(k, str) and k.startswith("t/")}
        bad = sorted(k for k, v in tensors.items() if not isinstance(v, torch.Tensor))
        if bad:
            raise ValueError(f"{path}: invalid watermark key: the entries {', '.join('t/' + k for k in bad)} are not "
                             "tensors")
        return cls(
            method=meta["method"],
            settings=meta["settings"],
            tensors=tensors,
            image_shape=tuple(int(v) for v in meta["image_shape"]),
            classes=tuple(meta["classes"]),
            dataset=meta["dataset"],
            seed=int(meta["seed"]),
            target=None if meta["target"] is None else int(meta["target"]),
            test_dataset=meta.get("test_dataset"),
            test_fingerprint=meta.get("test_fingerprint"),
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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _meta_problems(meta: dict) -> list[str]:
    """What is wrong with the fields of a key file's metadata (empty when nothing is)."""
    out = []
    if not isinstance(meta["method"], str) or not meta["method"]:
        out.append(f"method must be a watermark name, got {meta['method']!r}")
    if not isinstance(meta["settings"], dict):
        out.append(f"settings must be a JSON object, got {type(meta['settings']).__name__}")
    shape = meta["image_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(v) and v >= 1 for v in shape)):
        out.append(f"image_shape must be [C, H, W] (positive ints), got {shape!r}")
    classes = meta["classes"]
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        out.append(f"classes must be a non-empty list of class names, got {_short_repr(classes)}")
    elif len(set(classes)) != len(classes):
        out.append("classes must be unique names")
    if not isinstance(meta["dataset"], str):
        out.append(f"dataset must be a name, got {meta['dataset']!r}")
    if not _is_int(meta["seed"]):
        out.append(f"seed must be an int, got {meta['seed']!r}")
    target = meta["target"]
    n = len(classes) if isinstance(classes, list) else None
    if target is not None and not (_is_int(target) and target >= 0 and (n is None or target < n)):
        out.append(f"target must be null or a class index in [0, {n}), got {target!r}")
    if meta.get("test_dataset") is not None and not isinstance(meta["test_dataset"], str):
        out.append(f"test_dataset must be null or a name, got {meta['test_dataset']!r}")
    fp = meta.get("test_fingerprint")
    if fp is not None and not _is_sha256_hex(fp):
        out.append(f"test_fingerprint must be null or a SHA-256 hex digest (64 lowercase hex digits), got {fp!r}")
    return out


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short_names(classes: tuple[str, ...] | list[str], limit: int = 6) -> str:
    """Class names for a message: all of them, or the first ``limit`` and the count."""
    names = list(classes)
    if len(names) <= limit:
        return repr(names)
    return "[" + ", ".join(repr(n) for n in names[:limit]) + f", ...] ({len(names)} classes)"


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
        _atomic_save(payload, path, mode=0o644)  # the release is public; the key (below) stays private (0600)
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


def _atomic_save(obj: Any, path: Path, mode: int) -> None:
    """``torch.save`` through the one atomic-write helper (the file appears whole or not at all)."""
    with atomic_path(path, mode=mode) as tmp:
        torch.save(obj, tmp)


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

    @classmethod
    def redraw(cls, key: WatermarkKey, seed: int) -> WatermarkKey:
        """Another trigger of the same kind as ``key``'s, drawn from ``seed`` (an int other than ``key.seed``).

        Returns a copy of ``key`` (a key of this watermark) whose trigger tensors are replaced by a fresh random
        trigger of the same shape, dtype and value range, never equal to the key's own, with ``seed`` as its
        seed; the settings, target, dataset, classes, image shape and test-split binding stay. Deterministic in
        ``(key, seed)``. This is the Independent-T scenario's trigger (:func:`ubwlib.verify.independent_key`).
        Watermarks with a trigger to redraw override this (after :func:`check_redraw`, returning
        :func:`redrawn_key`); the base class raises ``NotImplementedError``.
        """
        raise NotImplementedError(f"{cls.__name__}.redraw is not implemented: the {cls.name or cls.__name__!r} "
                                  "watermark cannot draw another trigger of its kind (override Watermark.redraw)")

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
        """Bundle the released images/labels with the key (shared by every watermark).

        The key is unbound (``test_fingerprint`` None): a watermark sees only the training split. Whoever knows
        the test split that will verify the watermark binds the key with :meth:`WatermarkKey.bind_test_split`
        (``ubw watermark`` does, with the test split of its ``--data``)."""
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


def watermark_class(name: str) -> type[Watermark]:
    """The registered watermark class ``name`` (``badnets``, ``blended``, ``wanet``, ``ubw-p``...)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown watermark {name!r}; choose one of {', '.join(REGISTRY)}") from None


def get_watermark(name: str, **settings) -> Watermark:
    """A watermark by name (``badnets``, ``blended``, ``wanet``, ``ubw-p``...) with its settings."""
    return watermark_class(name)(**settings)


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


# --------------------------------------------------------------------------- building blocks of Watermark.redraw
#: How many draws :func:`draw_different` makes before it gives up.
MAX_REDRAWS = 1000


def check_redraw(cls: type[Watermark], key: WatermarkKey, seed: int, tensors: tuple[str, ...]) -> int:
    """The checks of ``cls.redraw(key, seed)``; returns ``seed`` as an int.

    ``key`` must be a :class:`WatermarkKey` of ``cls`` (``key.method == cls.name``) holding the trigger
    ``tensors``; ``seed`` an int that differs from ``key.seed`` (the same seed would draw the same trigger)."""
    if not isinstance(key, WatermarkKey):
        raise TypeError(f"key must be an ubwlib.watermarks.WatermarkKey, got {type(key).__name__}")
    if key.method != cls.name:
        raise ValueError(f"{cls.__name__}.redraw takes {cls.name!r} keys, got a {key.method!r} key")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    seed = int(seed)
    if seed == key.seed:
        raise ValueError(f"seed must differ from the key's own seed ({key.seed}) to give an independent trigger")
    missing = [name for name in tensors if name not in key.tensors]
    if missing:
        raise ValueError(f"this {key.method} key lacks the trigger tensor{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(missing)} (it holds {sorted(key.tensors)}); cannot draw another trigger")
    return seed


def draw_different(draw: Callable[[torch.Generator], torch.Tensor], original: torch.Tensor,
                   generator: torch.Generator, what: str) -> torch.Tensor:
    """``draw(generator)``, repeated until the result differs from ``original``; ``ValueError`` (naming ``what``)
    after :data:`MAX_REDRAWS` draws equal to it."""
    for _ in range(MAX_REDRAWS):
        new = draw(generator)
        if not torch.equal(new, original):
            return new
    raise ValueError(f"could not draw a {what} different from the key's own in {MAX_REDRAWS} tries")


def redrawn_key(key: WatermarkKey, seed: int, **tensors: torch.Tensor) -> WatermarkKey:
    """A copy of ``key`` with the given trigger ``tensors`` replaced (the others shared), ``seed`` as its seed and
    a copy of its settings; everything else (target, dataset, test-split binding...) unchanged."""
    return dataclasses.replace(key, tensors={**key.tensors, **tensors}, seed=seed, settings=dict(key.settings))
