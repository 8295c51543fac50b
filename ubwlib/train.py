"""A fast, seeded trainer for image classifiers (the one every method in ubwlib trains with).

Design, after airbench: the whole uint8 dataset stays a tensor on the training device; a batch is drawn
by indexing it with a seeded permutation; augmentation (random crop with zero padding, horizontal flip)
runs on the whole batch on the device; there is no per-sample Python work and no DataLoader. On CUDA and on
CPUs where native bfloat16 is the faster precision (:func:`prefers_bf16`) the forward/backward pass runs under
``torch.autocast`` in bfloat16 with channels-last tensors; elsewhere in float32. ``TrainConfig.precision="fp32"``
(or ``UBW_PRECISION=fp32``) forces float32 everywhere. Long trainings on a GPU run the step through
``torch.compile`` as CUDA graphs (:func:`resolve_compile`; ``UBW_COMPILE=on|off`` chooses), and nothing inside an
epoch waits for the device.

Every hyper-parameter is a field of :class:`TrainConfig`; its defaults are the paper's CIFAR-10 schedule
(SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 128, 200 epochs, lr x0.1 at epochs 150 and 180,
random horizontal flip only, seed 666).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import inspect
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterator, NamedTuple

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from ._progress import progress_bar

from .data import ImageDataset
from .stacked import split_outputs, stack_inputs, stack_models, unstack_models

__all__ = [
    "TrainConfig",
    "TrainResult",
    "EpochCallback",
    "train",
    "train_many",
    "prepare_model",
    "predict_proba",
    "predict",
    "accuracy",
    "augment_batch",
    "resolve_device",
    "resolve_precision",
    "cpu_supports_bf16",
    "cpu_prefers_bf16",
    "prefers_bf16",
    "cpu_features",
    "cpu_model",
    "autocast_context",
    "to_model_input",
    "channels_last",
    "keep_freed_memory",
    "quick_exit",
    "resolve_compile",
    "COMPILE_CHOICES",
    "COMPILE_MIN_STEPS",
]

SCHEDULES = ("multistep", "onecycle", "constant")
PRECISIONS = ("auto", "bf16", "fp32")

MALLOC_ENV = "UBW_MALLOC"
"""``UBW_MALLOC=system`` leaves the C library's allocator settings alone (see :func:`keep_freed_memory`)."""
_MALLOPT_PARAMS = {"M_TRIM_THRESHOLD": -1, "M_TOP_PAD": -2, "M_MMAP_THRESHOLD": -3}  # glibc's malloc.h
MALLOC_SETTINGS = {"M_MMAP_THRESHOLD": 32 * 2**20, "M_TRIM_THRESHOLD": 512 * 2**20, "M_TOP_PAD": 64 * 2**20}
"""What :func:`keep_freed_memory` sets: blocks up to 32 MiB (glibc's largest mmap threshold) come from the heap,
and the heap keeps up to 512 MiB of freed memory instead of returning it to the system, growing 64 MiB at once."""


@lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for the next allocation (once per process; called when this
    module is imported). Returns whether the settings were applied.

    A training step frees and allocates the same activations every step. With glibc's defaults, blocks of a few
    MiB are mapped from the system and unmapped when freed (or trimmed off the heap), so every step touches fresh
    pages: one float32 training of the ``lite`` model on 2 cores took about 4,900 page faults per step, and the
    step ran 10-20% slower than with these settings (measured with ``getrusage``; jemalloc and tcmalloc are
    the usual cure, ``mallopt`` needs no extra library). The cost is memory kept by the process: up to
    :data:`MALLOC_SETTINGS` ``M_TRIM_THRESHOLD`` beyond what it uses. Only glibc is tuned; ``UBW_MALLOC=system``
    (:data:`MALLOC_ENV`) opts out. Results do not depend on it: the same kernels run on the same numbers."""
    choice = os.environ.get(MALLOC_ENV, "").strip().lower()
    if choice in ("system", "default", "0", "off"):
        return False
    if choice not in ("", "ubwlib", "1", "on"):
        warnings.warn(f"{MALLOC_ENV}={os.environ[MALLOC_ENV]!r} is not understood; set it to 'system' (glibc's "
                      "defaults) or leave it unset (ubwlib's settings); glibc's defaults are kept", stacklevel=2)
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError):  # not glibc, or no confstr / mallopt on this system
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(_MALLOPT_PARAMS[name], value) == 1 for name, value in MALLOC_SETTINGS.items()])


keep_freed_memory()

QUICK_EXIT_ENV = "UBW_QUICK_EXIT"
"""``UBW_QUICK_EXIT=0`` keeps the garbage collector's full pass at interpreter exit (see :func:`quick_exit`)."""


@lru_cache(maxsize=None)
def quick_exit() -> bool:
    """Spare the process the garbage collector's pass over every object at exit (once per process; called when
    this module is imported). Returns whether it was arranged.

    With torch, pandas, scipy and matplotlib imported, the garbage collector tracks about 300,000 objects, and
    the interpreter's shutdown scans them all for reference cycles: 0.6-0.9 s per process measured on 2 cores, paid
    by every notebook kernel of the book (nine per build), every ``ubw`` command and every test subprocess. An
    ``atexit`` handler calls :func:`gc.freeze` instead, so the shutdown's collection skips them. Everything else
    about the exit is unchanged: the other ``atexit`` handlers run (those registered before this module's import
    run after it), modules are torn down and files flushed and closed as their references drop. What is skipped
    is only the ``__del__`` of objects still caught in reference cycles at exit, which Python does not promise
    to call anyway. ``UBW_QUICK_EXIT=0`` (:data:`QUICK_EXIT_ENV`) opts out."""
    if os.environ.get(QUICK_EXIT_ENV, "").strip().lower() in ("0", "off", "no", "false"):
        return False
    atexit.register(gc.freeze)
    return True


quick_exit()


@dataclass(frozen=True)
class TrainConfig:
    """Training settings. Defaults: the paper's CIFAR-10 schedule (reference section 1)."""

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "multistep"
    """``multistep`` (lr x ``lr_decay`` at each of ``milestones``), ``onecycle`` (linear warm-up for
    ``warmup_fraction`` of the steps to ``lr``, then linear decay to 0; for short schedules) or ``constant``."""
    milestones: tuple[int, ...] = (150, 180)
    lr_decay: float = 0.1
    warmup_fraction: float = 0.2
    flip: bool = True
    """Random horizontal flip (probability 1/2), batched on the device."""
    crop_padding: int = 0
    """Random crop with this much zero padding on each side (0 = off, the paper's setting)."""
    label_smoothing: float = 0.0
    precision: str = "auto"
    """``auto``: bfloat16 autocast + channels-last on CUDA with bf16 and on CPUs where bf16 is the faster
    (:func:`prefers_bf16`), else float32."""
    seed: int = 666
    drop_last: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {self.crop_padding}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing, got {self.milestones}")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


class TrainResult(NamedTuple):
    model: nn.Module
    history: pd.DataFrame


# --------------------------------------------------------------------------- devices and precision
def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else CPU."""
    if device is None or device == "auto":
        device = os.environ.get("UBW_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@lru_cache(maxsize=None)
def cpu_supports_bf16() -> bool:
    """True when this CPU has native bfloat16 arithmetic (AVX-512 BF16 or AMX). Without it, CPU bf16 is emulated
    and slower than float32. Whether ``auto`` uses it: :func:`cpu_prefers_bf16`."""
    try:
        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            flags = _cpu_flags()
            return not flags or bool(flags & {"avx512_bf16", "amx_bf16"})
    except (AttributeError, RuntimeError):
        pass
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


@lru_cache(maxsize=None)
def cpu_prefers_bf16() -> bool:
    """Whether ``precision="auto"`` trains in bfloat16 on this CPU (:func:`prefers_bf16` of its flags and vendor)."""
    return prefers_bf16(cpu_supports_bf16(), _cpu_flags(), _cpu_vendor())


def prefers_bf16(supported: bool, flags: set[str], vendor: str) -> bool:
    """The CPU precision rule of ``auto``: bfloat16 where the CPU has native bf16 (``supported``) and it is the
    faster of the two, which ``make bench`` found to depend on the CPU, not on the flag alone (the default model,
    2 cores): on an AMD EPYC with AVX-512 BF16 (Zen 4) bf16 trained 1.4x faster than float32 (817 against 571
    images/s); on an Intel Xeon with AVX-512 BF16 but no AMX, bf16 was the slower one in every hot loop (training
    0.86x, four models side by side 0.93x, crafting 0.84x), its bf16 dot products no faster than float32's full-width
    FMAs. So: AMX (the tile unit that makes oneDNN's bf16 convolutions fast on Intel; not measured here), or
    AVX-512 BF16 on a CPU that is not Intel's. Without ``/proc/cpuinfo`` (``flags`` empty), oneDNN's own check
    (``supported``) decides."""
    if not supported:
        return False
    if not flags:
        return True
    return "amx_bf16" in flags or ("avx512_bf16" in flags and vendor != "GenuineIntel")


def cpu_features() -> str:
    """What the CPU precision rule looks at, in words: vendor, the widest vector ISA, native bf16 and AMX, e.g.
    ``"GenuineIntel, AVX-512, AVX-512 BF16, no AMX"`` (``"unknown CPU features"`` without ``/proc/cpuinfo``)."""
    flags, vendor = _cpu_flags(), _cpu_vendor()
    if not flags:
        return "unknown CPU features"
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    bf16 = "AVX-512 BF16" if "avx512_bf16" in flags else "no native bf16"
    amx = "AMX" if "amx_bf16" in flags else "no AMX"
    return ", ".join(x for x in (vendor, isa, bf16, amx) if x)


def _cpuinfo_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_flags() -> set[str]:
    return set(_cpuinfo_field("flags").split())


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (else what :mod:`platform` knows, e.g. ``x86_64``)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def _cpu_vendor() -> str:
    """``GenuineIntel``, ``AuthenticAMD``, ... ("" where ``/proc/cpuinfo`` is missing)."""
    return _cpuinfo_field("vendor_id")


def resolve_precision(precision: str = "auto", device: torch.device | str = "cpu") -> str:
    """``"bf16"`` or ``"fp32"``. ``UBW_PRECISION`` (auto/bf16/fp32) overrides ``"auto"``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        precision = os.environ.get("UBW_PRECISION", "auto").lower()
        if precision not in PRECISIONS:
            raise ValueError(f"UBW_PRECISION must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_prefers_bf16() else "fp32"
    return "fp32"


COMPILE_CHOICES = ("auto", "on", "off")
COMPILE_ENV = "UBW_COMPILE"
"""``UBW_COMPILE`` (auto/on/off) overrides ``compile="auto"`` (:func:`resolve_compile`)."""
COMPILE_MIN_STEPS = 1000
"""The full batches below which ``auto`` does not compile a training on a GPU: compiling ResNet-18's forward and
backward graphs takes tens of seconds, which a short training (the tests, a smoke run) never wins back."""


def resolve_compile(compile: str | None = None, device: torch.device | str = "cpu", steps: int | None = None) -> bool:
    """Whether a training of ``steps`` full batches on ``device`` runs its forward and backward pass through
    ``torch.compile`` (``None``: ``UBW_COMPILE``, else ``auto``).

    ``on`` and ``off`` say so. ``auto``: on a CUDA device for a training of at least :data:`COMPILE_MIN_STEPS`
    full batches, where the step is captured as CUDA graphs (``mode="reduce-overhead"``) and a step is one graph
    launch instead of hundreds of kernel launches, which bound ResNet-18 at batch 128 to 3% of an H200's bf16
    rate; off on a CPU, where kernel launches cost little: there the compiled step of the default model ran 0.9-1.34x
    the eager one in ``python -m ubwlib.bench --compile`` and 1.2-1.3x timed alone (fp32, 2 cores, whose run-to-run
    noise is of that size), the ``lite`` small CNN's no faster, for 4-30 s of compilation (once per process and
    architecture; the lower figure with a warm inductor cache). Compilation changes float rounding (fused
    kernels), so a compiled training is another draw of the same recipe, as a model trained side by side is; CPU
    trainings stay what they were."""
    if compile is None or compile == "auto":
        compile = os.environ.get(COMPILE_ENV, "").strip().lower() or "auto"
        if compile not in COMPILE_CHOICES:
            raise ValueError(f"{COMPILE_ENV} must be one of {', '.join(COMPILE_CHOICES)}, got "
                             f"{os.environ[COMPILE_ENV]!r}; unset it for the default (auto)")
    elif compile not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {compile!r}")
    if compile != "auto":
        return compile == "on"
    return torch.device(device).type == "cuda" and (steps is None or steps >= COMPILE_MIN_STEPS)


def autocast_context(precision: str, device: torch.device):
    """``torch.autocast`` in bfloat16 when ``precision == "bf16"``, else a no-op context."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def channels_last(precision: str, device: torch.device) -> bool:
    """Whether the trainer lays out batches (and models) channels-last: on a CPU, and in bfloat16 on a GPU.
    ubwlib's models are built channels-last (:mod:`ubwlib.models`), so this decides the layout of the batches fed to
    them, and of a model built elsewhere. On a CPU oneDNN's channels-last convolutions took half the time of its
    default-layout ones for the default profile's narrow ResNet (float32, 2 cores), and four models side by side
    trained about 1.5x faster; a float32 model on a GPU keeps the default layout of its batches."""
    return precision == "bf16" or torch.device(device).type == "cpu"


def prepare_model(model: nn.Module, device: torch.device, precision: str) -> nn.Module:
    """Move ``model`` to ``device`` and, where :func:`channels_last` says so, to channels-last memory format (in
    place; returns it): how :func:`train` places a model before its first step."""
    model = model.to(device)
    if channels_last(precision, device):
        model = model.to(memory_format=torch.channels_last)
    return model


def to_model_input(images: torch.Tensor, precision: str) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] (float input is taken as already scaled), channels-last where
    :func:`channels_last` says so for the images' device."""
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    if x.dim() == 4 and channels_last(precision, x.device):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


# --------------------------------------------------------------------------- augmentation
def augment_batch(
    images: torch.Tensor, *, flip: bool, crop_padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop (zero padding) and horizontal flip on a whole N x C x H x W batch, on its device.

    Each sample gets its own offsets and flip coin from ``generator`` (a generator on the batch's device).
    """
    n, c, h, w = images.shape
    dev = images.device
    out = images
    if crop_padding > 0:
        p = crop_padding
        padded = F.pad(out, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=dev)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=dev)
        rows = (dy[:, None] + torch.arange(h, device=dev)).view(n, 1, h, 1)
        cols = (dx[:, None] + torch.arange(w, device=dev)).view(n, 1, 1, w)
        bidx = torch.arange(n, device=dev).view(n, 1, 1, 1)
        cidx = torch.arange(c, device=dev).view(1, c, 1, 1)
        out = padded[bidx, cidx, rows, cols]
    if flip:
        coin = torch.rand(n, generator=generator, device=dev) < 0.5
        out = torch.where(coin.view(n, 1, 1, 1), out.flip(3), out)
    return out


# --------------------------------------------------------------------------- training
def _make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Returns (scheduler, step_per_batch)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":
        warm = max(1, int(round(cfg.warmup_fraction * total)))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return max(0.0, (total - step) / max(1, total - warm))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor), True
    if cfg.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.milestones), cfg.lr_decay), False
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0), False


def _batches(n: int, batch_size: int, drop_last: bool, generator: torch.Generator,
             device: torch.device | None = None) -> Iterator[torch.Tensor]:
    """The epoch's batches of indices: a permutation drawn from ``generator`` (on the CPU, so every device gets
    the same order), copied to ``device`` once per epoch and sliced there. A copy per batch from pageable host
    memory would make a GPU's stream wait before each step (CUDA synchronises the stream before such a copy)."""
    perm = torch.randperm(n, generator=generator)
    if device is not None:
        perm = perm.to(device)
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield perm[start : start + batch_size]


#: ``on_epoch(epoch, model, row)`` of :func:`train`.
EpochCallback = Callable[[int, nn.Module, dict[str, Any]], None]


def _epoch_callback(on_epoch: Callable[..., None] | None) -> EpochCallback | None:
    """``on_epoch``, checked before any training: a callable that accepts ``(epoch, model, row)``."""
    if on_epoch is None:
        return None
    if not callable(on_epoch):
        raise TypeError(f"on_epoch must be a callable (epoch, model, row) -> None, got {type(on_epoch).__name__}")
    try:
        sig = inspect.signature(on_epoch)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return on_epoch
    try:
        sig.bind(0, None, {})
    except TypeError:
        raise TypeError(f"on_epoch must accept (epoch, model, row); its signature is {sig}") from None
    return on_epoch


def train(
    model: nn.Module,
    dataset: ImageDataset,
    config: TrainConfig = TrainConfig(),
    *,
    device: str | torch.device | None = None,
    eval_set: ImageDataset | None = None,
    progress: bool = True,
    desc: str = "train",
    on_epoch: EpochCallback | None = None,
    compile: str | None = None,
) -> TrainResult:
    """Train ``model`` on ``dataset`` with ``config``; returns ``(model, history)``.

    ``history`` has one row per epoch: ``epoch, lr, loss, train_acc, seconds`` (+ ``eval_acc`` when an
    ``eval_set`` is given). The model is trained in place (from its current weights, so a trained model is
    fine-tuned), moved to ``device`` (channels-last where :func:`channels_last`, :func:`prepare_model`) and left
    in eval mode.

    ``on_epoch(epoch, model, row)``, when given, is called after each epoch with the epoch number (1, 2, ...,
    ``config.epochs``), the model (the next epoch puts it back in training mode, so the callback may switch it
    to eval mode) and a copy of that epoch's history row (a dict of the columns above), e.g. to evaluate
    or keep snapshots along the way. Its time is not counted in ``seconds``.

    Seeded: the data order and augmentation come from generators seeded with ``config.seed``; build the model
    with ``ubwlib.models.build_model(..., seed=...)`` for reproducible initial weights. The same seed gives
    the same weights on the same CPU. Several models of one architecture: :func:`train_many`.

    ``compile`` (``auto``, ``on``, ``off``; ``None``: ``UBW_COMPILE``, else ``auto``) chooses whether the forward
    and backward pass go through ``torch.compile`` (CUDA graphs on a GPU): :func:`resolve_compile`; ``auto``
    compiles long trainings on a GPU only.
    """
    _check_dataset(dataset)
    callback = _epoch_callback(on_epoch)
    dev = resolve_device(device)
    precision = resolve_precision(config.precision, dev)
    model = prepare_model(model, dev, precision)

    def after_epoch(epoch: int, rows: list[dict]) -> None:
        if eval_set is not None:
            rows[0]["eval_acc"] = accuracy(model, eval_set, device=dev, precision=precision)
        if callback is not None:
            callback(epoch, model, dict(rows[0]))

    (hist,) = _fit(model, [_Stream(dataset, config.seed, dev)], config, dev, precision, progress, desc, after_epoch,
                   eval_col=eval_set is not None, compile=compile)
    model.eval()
    return TrainResult(model, hist)


def train_many(
    models: list[nn.Module],
    datasets: list[ImageDataset],
    configs: list[TrainConfig],
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "train",
    compile: str | None = None,
) -> list[TrainResult]:
    """Train ``G`` models of one architecture in one pass (:func:`ubwlib.stacked.stack_models`): model ``i`` on
    ``datasets[i]`` with ``configs[i]``, each with its own data order and augmentation drawn exactly as
    :func:`train` draws them for that config's seed. Returns one ``(model, history)`` per model (the models are
    trained in place). The datasets must have the same size and image shape, and the configs may differ in their
    ``seed`` only (the schedule is shared); otherwise train the models separately with :func:`train`.

    The weights are not bit-equal to :func:`train`'s (grouped and single convolutions sum in different orders;
    one step agrees to 1e-4 of the step, tested), and a from-scratch training amplifies such rounding like a change
    of data order: a model trained side by side is another draw of the same recipe. Faster than one at a time where
    the models are small for the device (``python -m ubwlib.bench``). ``compile``: as for :func:`train`."""
    if not (len(models) == len(datasets) == len(configs)) or not models:
        raise ValueError(f"train_many needs one dataset and one config per model, got {len(models)} models, "
                         f"{len(datasets)} datasets and {len(configs)} configs")
    for d in datasets:
        _check_dataset(d)
    if len({(len(d), tuple(d.image_shape)) for d in datasets}) > 1:
        raise ValueError("train_many needs datasets of one size and image shape, got "
                         f"{sorted({(len(d), tuple(d.image_shape)) for d in datasets})}; train the others separately")
    shared = {dataclasses.replace(c, seed=0) for c in configs}
    if len(shared) > 1:
        raise ValueError("train_many needs configs that differ in their seed only; train the others separately")
    config = configs[0]
    dev = resolve_device(device)
    precision = resolve_precision(config.precision, dev)
    if len(models) == 1:
        return [train(models[0], datasets[0], config, device=dev, progress=progress, desc=desc, compile=compile)]
    models = [prepare_model(m, dev, precision) for m in models]
    net = prepare_model(stack_models(models), dev, precision)
    streams = [_Stream(d, c.seed, dev) for d, c in zip(datasets, configs)]
    hists = _fit(net, streams, config, dev, precision, progress, f"{desc} (x{len(models)})", None, compile=compile)
    unstack_models(net, models)
    for m in models:
        m.eval()
    return [TrainResult(m, h) for m, h in zip(models, hists)]


def _check_dataset(dataset) -> None:
    if not isinstance(dataset, ImageDataset):
        raise TypeError(f"dataset must be an ubwlib.data.ImageDataset, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("cannot train on an empty dataset")


class _Stream:
    """One model's data in a training pass: its tensors on the device, its order and augmentation generators
    (seeded as :func:`train` seeds them)."""

    def __init__(self, dataset: ImageDataset, seed: int, dev: torch.device) -> None:
        self.images = dataset.images.to(dev)
        self.labels = dataset.labels.to(dev)
        self.order_gen = torch.Generator().manual_seed(seed)
        self.aug_gen = torch.Generator(device=dev).manual_seed(seed + 1)


class _TrainStep:
    """One training step's forward and backward pass: ``forward(xb, ys) -> (loss, losses, hits)``, then
    ``loss.backward()``; returns ``(losses, hits)``.

    Compiled (``compiled=True``), full batches of ``batch_size`` images run ``torch.compile(forward)`` (on CUDA in
    ``reduce-overhead`` mode: the forward and backward graphs are replayed as CUDA graphs, one launch each, and
    each step is marked as a new one for them; ``dynamic=False``: one graph for the one shape). A smaller last
    batch runs eagerly rather than compiling a second graph for one step per epoch. If one of the first
    :attr:`GUARDED` compiled steps fails (an unsupported operator, no C++ compiler for the CPU backend, a graph
    that cannot be captured: CUDA graphs are recorded on the second or third call, not the first), the training
    warns once and goes on eagerly from the same state: that step's gradients are discarded and the buffers it
    updated (batch-norm statistics) restored, so the steps before it stand and the rest is the eager training's.
    ``compile_seconds`` is the first compiled step's wall time (the compilation, mostly)."""

    GUARDED = 3
    """The compiled steps that may fail and fall back (compilation, warm-up and recording of the graphs)."""

    def __init__(self, net: nn.Module, forward: Callable, dev: torch.device, compiled: bool, batch_size: int) -> None:
        self.net, self.forward, self.batch_size = net, forward, batch_size
        self.cuda = dev.type == "cuda"
        self.compiled = torch.compile(forward, mode="reduce-overhead" if self.cuda else None,
                                      dynamic=False) if compiled else None
        self.calls = 0
        self.compile_seconds = 0.0

    def __call__(self, xb: torch.Tensor, ys: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compiled is None or len(xb) != self.batch_size:
            loss, losses, hits = self.forward(xb, ys)
            loss.backward()
            return losses, hits
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()
        self.calls += 1
        if self.calls > self.GUARDED:
            loss, losses, hits = self.compiled(xb, ys)
            loss.backward()
            return losses.clone(), hits.clone()  # the graphs' outputs are overwritten by the next replay
        buffers = [(b, b.detach().clone()) for b in self.net.buffers()]
        t0 = time.perf_counter()
        try:
            loss, losses, hits = self.compiled(xb, ys)
            loss.backward()
        except Exception as err:  # noqa: BLE001 (any failure of the compiler: fall back to the eager step)
            for p in self.net.parameters():
                p.grad = None
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            first = str(err).splitlines()[0] if str(err) else ""
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {first}); training goes on without it "
                          "(UBW_COMPILE=off skips the attempt)", stacklevel=3)
            self.compiled = None
            return self(xb, ys)
        if self.calls == 1:
            self.compile_seconds = time.perf_counter() - t0
        return losses.clone(), hits.clone()


def _fit(net: nn.Module, streams: list[_Stream], config: TrainConfig, dev: torch.device, precision: str,
         progress: bool, desc: str, after_epoch: Callable[[int, list[dict]], None] | None,
         eval_col: bool = False, compile: str | None = None) -> list[pd.DataFrame]:
    """The training loop of :func:`train` (one stream, ``net`` the model) and :func:`train_many` (``G`` streams,
    ``net`` the stacked module): one SGD step per batch on the sum of the ``G`` models' mean cross-entropies,
    so each model's gradient is its own. The forward pass goes through ``torch.compile`` where
    :func:`resolve_compile` says so (:class:`_TrainStep`). Returns one history per stream."""
    g = len(streams)
    n = len(streams[0].labels)
    steps_per_epoch = (n // config.batch_size) if (config.drop_last and n >= config.batch_size) else math.ceil(
        n / config.batch_size
    )
    opt = torch.optim.SGD(
        net.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov and config.momentum > 0,
    )
    sched, per_batch = _make_scheduler(opt, config, steps_per_epoch)

    def forward(xb: torch.Tensor, ys: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The summed loss, each model's mean cross-entropy and its count of correct predictions."""
        with autocast_context(precision, dev):
            logits = net(xb)
            outs = [logits] if g == 1 else list(split_outputs(logits, g).unbind(0))
            losses = [F.cross_entropy(o.float(), y, label_smoothing=config.label_smoothing)
                      for o, y in zip(outs, ys)]
            loss = losses[0] if g == 1 else torch.stack(losses).sum()
        hits = torch.stack([(o.detach().argmax(1) == y).sum() for o, y in zip(outs, ys)])
        return loss, torch.stack(losses).detach(), hits

    full_steps = config.epochs * (n // config.batch_size)
    step = _TrainStep(net, forward, dev, resolve_compile(compile, dev, full_steps), config.batch_size)
    rows: list[list[dict]] = [[] for _ in streams]
    bar = progress_bar(range(config.epochs), desc=desc, progress=progress, leave=False, unit="epoch")
    for epoch in bar:
        net.train()
        t0 = time.perf_counter()
        lr_epoch = opt.param_groups[0]["lr"]
        loss_sum = torch.zeros(g, device=dev)
        correct = torch.zeros(g, device=dev, dtype=torch.long)
        seen = 0
        orders = [_batches(n, config.batch_size, config.drop_last, s.order_gen, dev) for s in streams]
        for idxs in zip(*orders):
            xs, ys = [], []
            for s, idx in zip(streams, idxs):
                xs.append(augment_batch(s.images[idx], flip=config.flip, crop_padding=config.crop_padding,
                                        generator=s.aug_gen))
                ys.append(s.labels[idx])
            xb = to_model_input(stack_inputs(xs), precision)
            opt.zero_grad(set_to_none=True)
            losses, hits = step(xb, ys)
            opt.step()
            if per_batch:
                sched.step()
            with torch.no_grad():
                loss_sum += losses * len(xb)
                correct += hits
            seen += len(xb)
        if not per_batch:
            sched.step()
        seconds = time.perf_counter() - t0
        epoch_rows = [{"epoch": epoch + 1, "lr": lr_epoch, "loss": float(loss_sum[i]) / seen,
                       "train_acc": float(correct[i]) / seen, "seconds": seconds / g} for i in range(g)]
        if after_epoch is not None:
            after_epoch(epoch + 1, epoch_rows)
        for r, row in zip(rows, epoch_rows):
            r.append(row)
        bar.set_postfix(loss=f"{epoch_rows[0]['loss']:.3f}", acc=f"{epoch_rows[0]['train_acc']:.3f}")
    bar.close()
    net.eval()
    cols = ["epoch", "lr", "loss", "train_acc", "seconds"] + (["eval_acc"] if eval_col else [])
    return [pd.DataFrame(r, columns=cols) for r in rows]


# --------------------------------------------------------------------------- inference
@torch.inference_mode()
def predict_proba(
    model: nn.Module,
    images: torch.Tensor | ImageDataset,
    *,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
    precision: str = "auto",
) -> torch.Tensor:
    """Softmax probabilities (float32, CPU, N x K) of ``model`` on uint8 images (or float images in [0, 1]).

    The model is put in eval mode and run on ``device`` (default: where its parameters are). On a GPU the batches
    are queued without a wait between them: the images are copied there once, and the probabilities stay there
    until the end."""
    if isinstance(images, ImageDataset):
        images = images.images
    if images.dim() != 4:
        raise ValueError(f"images must be N x C x H x W, got shape {tuple(images.shape)}")
    if device is None:
        p = next(model.parameters(), None)
        dev = p.device if p is not None else resolve_device(None)
    else:
        dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    model.eval()
    model.to(dev)
    if dev.type == "cuda":
        images = images.to(dev)  # one copy for the whole call: a copy per batch would wait for the device each time
    out = []
    for start in range(0, len(images), batch_size):
        xb = to_model_input(images[start : start + batch_size].to(dev), prec)
        with autocast_context(prec, dev):
            logits = model(xb)
        out.append(torch.softmax(logits.float(), dim=1))
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out).cpu()  # one copy back (and one wait) for the whole call, not one per batch


def predict(model: nn.Module, images: torch.Tensor | ImageDataset, **kwargs) -> torch.Tensor:
    """Predicted class indices (int64, CPU)."""
    return predict_proba(model, images, **kwargs).argmax(1)


def accuracy(model: nn.Module, dataset: ImageDataset, **kwargs) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (0..1)."""
    return float((predict(model, dataset.images, **kwargs) == dataset.labels).float().mean())
