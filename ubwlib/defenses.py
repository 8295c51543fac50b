"""Defenses against backdoor watermarks: fine-tuning, pruning and STRIP (the paper's Section 5.4.2).

A watermark that is meant to protect a dataset must survive what a suspect might do to a model trained
on it. This module implements three such defenses. None of them ever sees a watermark key: callers pass
models, benign datasets, (already triggered) images and evaluation callables, e.g.
``evaluate = lambda m: {"BA": ..., "ASR-A": ...}`` built from :mod:`ubwlib.metrics`.

Fine-tuning (:func:`fine_tune`, :class:`FineTuningSettings`)
    The public toolbox's defaults: a stratified, seeded 10% of the benign training data, SGD with a
    constant learning rate 0.001, momentum 0.9, weight decay 5e-4, batch 128, 10 epochs, random
    horizontal flips as in :func:`ubwlib.train.train` (BatchNorm in training mode while tuning).
    A deep copy of the model is tuned; ``evaluate`` is called before training (epoch 0) and after every
    epoch, giving one history row per epoch (Figure 6: BA and ASR against epochs).

Pruning (:func:`layer_activations`, :func:`prune_channels`, :func:`prune_by_activation`,
:func:`pruning_curve`)
    The pruning half of fine-pruning (Liu et al., 2018): the channels of the last convolutional stage
    (``model.layer4`` of every model in :mod:`ubwlib.models`) with the lowest mean activation on benign
    images are masked to zero; ``floor(rate * C)`` of the ``C`` channels for a pruning rate in
    ``[0, 1)``, swept 0..0.9 (Figure 7). Masking replaces the layer by a :class:`ChannelMask` wrapper
    that holds the original layer and a boolean ``keep`` buffer, so a pruned model survives
    ``copy.deepcopy``, pickling and ``state_dict`` round trips. Classic fine-pruning is
    ``fine_tune(prune_by_activation(model, images, rate), benign_train)``.

STRIP (:func:`strip_entropy`, :func:`strip_detect`, :class:`StripSettings`; Gao et al., 2019)
    A run-time detector of sample-agnostic triggers: each input is blended with ``n_overlays`` (N = 20)
    random clean images, ``(1 - alpha) * x + alpha * overlay`` with ``alpha = 0.5`` in float ``[0, 1]``,
    and scored by the mean entropy (nats) of the model's predictions over the N blends. A trigger that
    survives the blending keeps the predictions confident, i.e. the entropy low. The threshold is the
    ``frr`` quantile (default 1%) of the entropies of a clean hold-out set; an input is flagged when its
    entropy is below it. :func:`strip_detect` reports the detection rate on triggered inputs, the false
    rejection rate on clean test inputs and the ROC AUC (:func:`rank_auc`, a Mann-Whitney statistic).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn
from ._progress import progress_bar

from .data import ImageDataset
from .metrics import entropy
from .train import (
    PRECISIONS,
    augment_batch,
    autocast_context,
    predict_proba,
    resolve_device,
    resolve_precision,
    to_model_input,
)

__all__ = [
    "FineTuningSettings",
    "fine_tune",
    "fine_tune_size",
    "ChannelMask",
    "get_layer",
    "layer_activations",
    "pruning_order",
    "prune_channels",
    "prune_by_activation",
    "pruned_count",
    "pruning_curve",
    "StripSettings",
    "strip_entropy",
    "strip_detect",
    "rank_auc",
]

Evaluate = Callable[[nn.Module], Mapping[str, Any]]

#: Slack for products like ``0.3 * 10`` that land a hair below an integer in floating point.
_FLOOR_EPS = 1e-9


# --------------------------------------------------------------------------- small helpers
def _check_real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    return value


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return int(value)


def _as_images(images: torch.Tensor | ImageDataset, name: str = "images") -> torch.Tensor:
    """uint8 (or float in [0, 1]) N x C x H x W images from a tensor or an ImageDataset."""
    if isinstance(images, ImageDataset):
        return images.images
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or an ImageDataset; got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{name} must be N x C x H x W; got shape {tuple(images.shape)}")
    return images


def _model_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return resolve_device(device)
    p = next(model.parameters(), None)
    if p is None:
        p = next(model.buffers(), None)
    return p.device if p is not None else resolve_device(None)


def _evaluate_row(evaluate: Evaluate, model: nn.Module, reserved: Iterable[str]) -> dict[str, Any]:
    model.eval()
    out = evaluate(model)
    if not isinstance(out, Mapping):
        raise TypeError(f"evaluate(model) must return a dict of metrics; got {type(out).__name__}")
    clash = sorted(set(out) & set(reserved))
    if clash:
        raise ValueError(f"evaluate(model) returned reserved column names {clash}; rename them")
    return dict(out)


# --------------------------------------------------------------------------- fine-tuning
@dataclass(frozen=True)
class FineTuningSettings:
    """Fine-tuning defense settings; the defaults are the public toolbox's (reference section 6).

    ``fraction`` of the benign training data (stratified by class, drawn with ``seed``), SGD with a
    constant ``lr``, ``momentum`` and ``weight_decay``, ``epochs`` passes in batches of ``batch_size``.
    ``flip``: random horizontal flips (the project's training augmentation; False for none).
    ``precision``: as in :class:`ubwlib.train.TrainConfig` (``auto``, ``bf16``, ``fp32``).
    """

    fraction: float = 0.1
    epochs: int = 10
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    seed: int = 0
    flip: bool = True
    precision: str = "auto"

    def __post_init__(self) -> None:
        fraction = _check_real(self.fraction, "fraction")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
        _check_int(self.epochs, "epochs", 0)
        _check_int(self.batch_size, "batch_size", 1)
        _check_int(self.seed, "seed", 0)
        if not _check_real(self.lr, "lr") > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if not 0 <= _check_real(self.momentum, "momentum") < 1:
            raise ValueError(f"momentum must be in [0, 1); got {self.momentum}")
        if _check_real(self.weight_decay, "weight_decay") < 0:
            raise ValueError(f"weight_decay must be >= 0; got {self.weight_decay}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}; got {self.precision!r}")

    def replace(self, **changes: Any) -> "FineTuningSettings":
        return dataclasses.replace(self, **changes)


def fine_tune_size(fraction: float, n: int) -> int:
    """Number of samples fine-tuning draws: ``max(1, floor(fraction * n))`` (``n`` for ``fraction = 1``)."""
    fraction = _check_real(fraction, "fraction")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    n = _check_int(n, "n", 1)
    return max(1, min(n, math.floor(fraction * n + _FLOOR_EPS)))


_FT_COLUMNS = ("epoch", "loss", "train_acc", "lr", "samples", "seconds")


def fine_tune(
    model: nn.Module,
    benign_train: ImageDataset,
    settings: FineTuningSettings = FineTuningSettings(),
    *,
    evaluate: Evaluate | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    desc: str = "fine-tune",
) -> tuple[nn.Module, pd.DataFrame]:
    """Fine-tune a deep copy of ``model`` on part of ``benign_train``; returns ``(tuned_model, history)``.

    ``model`` itself is never modified (not its weights, device or train/eval mode). The tuned copy is on
    ``device`` (default: CUDA when available, as in :func:`ubwlib.train.train`) and in eval mode.

    The training samples are ``benign_train.stratified_subset(fine_tune_size(fraction, N), seed)`` (the
    whole set for ``fraction = 1``). Training is a plain loop rather than repeated one-epoch calls of
    :func:`ubwlib.train.train`, which would rebuild the optimiser (dropping the momentum buffers) and
    replay the same data order every epoch: one SGD optimiser with a constant learning rate lives across
    all epochs, the data order comes from a generator seeded with ``seed`` and the flips from one seeded
    with ``seed + 1``. BatchNorm layers are in training mode while tuning (the standard choice).

    ``evaluate(model) -> dict`` is called with the copy in eval mode before training (``epoch`` 0) and
    after each epoch. ``history`` has one row per epoch ``0..epochs``: ``epoch``, then the entries of
    ``evaluate``'s dict, then ``loss`` and ``train_acc`` (mean over the epoch's batches; NaN at epoch 0),
    ``lr``, ``samples`` (the number of fine-tuning samples, the same on every row) and ``seconds``.
    """
    if not isinstance(settings, FineTuningSettings):
        raise TypeError(f"settings must be a FineTuningSettings; got {type(settings).__name__}")
    if not isinstance(benign_train, ImageDataset):
        raise TypeError(f"benign_train must be an ubwlib.data.ImageDataset; got {type(benign_train).__name__}")
    if len(benign_train) == 0:
        raise ValueError("benign_train is empty")
    n_total = len(benign_train)
    n = fine_tune_size(settings.fraction, n_total)
    subset = benign_train if n == n_total else benign_train.stratified_subset(n, settings.seed)

    dev = resolve_device(device)
    precision = resolve_precision(settings.precision, dev)
    tuned = copy.deepcopy(model).to(dev)
    if precision == "bf16":
        tuned = tuned.to(memory_format=torch.channels_last)
    images = subset.images.to(dev)
    labels = subset.labels.to(dev)

    order_gen = torch.Generator().manual_seed(settings.seed)
    aug_gen = torch.Generator(device=dev).manual_seed(settings.seed + 1)
    opt = torch.optim.SGD(
        tuned.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )

    rows: list[dict[str, Any]] = []
    eval_keys: list[str] = []

    def record(epoch: int, loss: float, acc: float, seconds: float) -> None:
        row: dict[str, Any] = {"epoch": epoch}
        if evaluate is not None:
            metrics = _evaluate_row(evaluate, tuned, _FT_COLUMNS)
            for key in metrics:
                if key not in eval_keys:
                    eval_keys.append(key)
            row.update(metrics)
        row.update(loss=loss, train_acc=acc, lr=settings.lr, samples=n, seconds=seconds)
        rows.append(row)

    record(0, math.nan, math.nan, 0.0)
    bar = progress_bar(range(1, settings.epochs + 1), desc=desc, progress=progress, leave=False, unit="epoch")
    for epoch in bar:
        tuned.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), device=dev, dtype=torch.long)
        perm = torch.randperm(n, generator=order_gen)
        for start in range(0, n, settings.batch_size):
            idx = perm[start : start + settings.batch_size].to(dev)
            xb = augment_batch(images[idx], flip=settings.flip, crop_padding=0, generator=aug_gen)
            xb = to_model_input(xb, precision)
            yb = labels[idx]
            with autocast_context(precision, dev):
                logits = tuned(xb)
                loss = F.cross_entropy(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.detach().argmax(1) == yb).sum()
        record(epoch, float(loss_sum) / n, float(correct) / n, time.perf_counter() - t0)
        bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}")
    bar.close()
    tuned.eval()
    history = pd.DataFrame(rows, columns=["epoch", *eval_keys, *_FT_COLUMNS[1:]])
    return tuned, history


# --------------------------------------------------------------------------- pruning
class ChannelMask(nn.Module):
    """Wraps a layer and zeroes the channels (dimension 1) of its output where ``keep`` is False.

    ``module``: the original layer; ``keep``: a boolean buffer of length ``C`` (in the ``state_dict`` as
    ``<layer>.keep``; the layer's own parameters move to ``<layer>.module.*``). Masked channels are exactly
    zero (``masked_fill``), whatever the precision.
    """

    def __init__(self, module: nn.Module, keep: torch.Tensor) -> None:
        super().__init__()
        if isinstance(module, ChannelMask):
            raise TypeError("module is already a ChannelMask; combine the masks instead")
        keep = torch.as_tensor(keep)
        if keep.dtype != torch.bool or keep.dim() != 1 or keep.numel() < 1:
            raise ValueError(f"keep must be a non-empty 1-D bool tensor; got {keep.dtype} {tuple(keep.shape)}")
        self.module = module
        self.register_buffer("keep", keep.clone())

    @property
    def num_channels(self) -> int:
        return int(self.keep.numel())

    @property
    def pruned_channels(self) -> torch.Tensor:
        """Indices of the masked channels (int64, ascending, on the mask's device)."""
        return (~self.keep).nonzero().reshape(-1)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.module(*args, **kwargs)
        if out.dim() < 2 or out.shape[1] != self.keep.numel():
            raise RuntimeError(
                f"ChannelMask expects an output with {self.keep.numel()} channels in dimension 1; got shape "
                f"{tuple(out.shape)}"
            )
        drop = ~self.keep.view(1, -1, *([1] * (out.dim() - 2)))
        return out.masked_fill(drop, 0)

    def extra_repr(self) -> str:
        return f"pruned={self.num_channels - int(self.keep.sum())}/{self.num_channels}"


def get_layer(model: nn.Module, layer: str) -> nn.Module:
    """The submodule called ``layer`` (a dotted path like ``"layer4"`` or ``"layer4.1"``).

    Raises ``ValueError`` listing the model's top-level modules when there is none by that name."""
    if not isinstance(layer, str) or not layer:
        raise TypeError(f"layer must be a non-empty str; got {layer!r}")
    try:
        return model.get_submodule(layer)
    except AttributeError:
        names = [name for name, _ in model.named_children()]
        raise ValueError(
            f"{type(model).__name__} has no layer {layer!r}; its top-level modules are: {', '.join(names) or '(none)'}"
        ) from None


def _infer_channels(module: nn.Module) -> int | None:
    """Output channels of a conv stage: the last registered BatchNorm's / Conv's channel count."""
    if isinstance(module, ChannelMask):
        return module.num_channels
    count = None
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            count = m.num_features
        elif isinstance(m, nn.modules.conv._ConvNd):
            count = m.out_channels
    return count


@torch.inference_mode()
def layer_activations(
    model: nn.Module,
    images: torch.Tensor | ImageDataset,
    layer: str = "layer4",
    *,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    precision: str = "auto",
) -> torch.Tensor:
    """Mean activation of each channel of ``layer``'s output on ``images`` (float32, CPU, shape ``C``).

    A forward hook on the module records its output (N x C x ...); the mean is taken over the samples
    and all spatial positions, accumulated in float64. ``images``: uint8 (or float in ``[0, 1]``) as for
    :func:`ubwlib.train.predict_proba`. The model runs in eval mode on ``device`` (default: where its
    parameters are) and is put back in its previous train/eval mode.
    """
    imgs = _as_images(images)
    if len(imgs) == 0:
        raise ValueError("images is empty")
    _check_int(batch_size, "batch_size", 1)
    module = get_layer(model, layer)
    dev = _model_device(model, device)
    prec = resolve_precision(precision, dev)
    total: list[torch.Tensor] = []
    count = [0]

    def hook(_mod: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() < 2:
            raise RuntimeError(f"layer {layer!r} must output an N x C x ... tensor")
        dims = [0, *range(2, out.dim())]
        s = out.detach().double().sum(dim=dims)
        if total:
            total[0] += s
        else:
            total.append(s)
        count[0] += out.numel() // out.shape[1]

    was_training = model.training
    handle = module.register_forward_hook(hook)
    try:
        model.eval()
        model.to(dev)
        for start in range(0, len(imgs), batch_size):
            xb = to_model_input(imgs[start : start + batch_size].to(dev), prec)
            with autocast_context(prec, dev):
                model(xb)
    finally:
        handle.remove()
        model.train(was_training)
    if not total:
        raise RuntimeError(f"layer {layer!r} was not called in the model's forward pass")
    return (total[0] / count[0]).float().cpu()


def pruning_order(
    model: nn.Module, benign_images: torch.Tensor | ImageDataset, layer: str = "layer4", **kwargs: Any
) -> torch.Tensor:
    """The channels of ``layer`` sorted by mean benign activation, lowest first (int64; ties: lower index
    first). Pruning at rate ``r`` masks the first ``pruned_count(r, C)`` of them. ``kwargs`` go to
    :func:`layer_activations`."""
    act = layer_activations(model, benign_images, layer, **kwargs)
    return torch.sort(act, stable=True).indices


def pruned_count(rate: float, num_channels: int) -> int:
    """``floor(rate * num_channels)`` for a pruning rate in ``[0, 1)``."""
    rate = _check_real(rate, "rate")
    if not 0 <= rate < 1:
        raise ValueError(f"pruning rate must be in [0, 1); got {rate}")
    num_channels = _check_int(num_channels, "num_channels", 1)
    return min(num_channels - 1, math.floor(rate * num_channels + _FLOOR_EPS))


def prune_channels(
    model: nn.Module,
    channels: Sequence[int] | torch.Tensor,
    layer: str = "layer4",
    *,
    num_channels: int | None = None,
) -> nn.Module:
    """A deep copy of ``model`` whose ``layer`` outputs zeros in ``channels``.

    The layer is replaced by a :class:`ChannelMask` around (a copy of) it; when it already is one, the
    masks are combined. ``num_channels``: the layer's output channels, inferred from its last BatchNorm or
    convolution when not given. ``model`` is not modified.
    """
    original = get_layer(model, layer)
    c = _infer_channels(original) if num_channels is None else _check_int(num_channels, "num_channels", 1)
    if c is None:
        raise ValueError(f"cannot infer the output channels of layer {layer!r}; pass num_channels=")
    if isinstance(original, ChannelMask) and original.num_channels != c:
        raise ValueError(f"layer {layer!r} is masked with {original.num_channels} channels, not {c}")
    idx = torch.as_tensor(channels if not isinstance(channels, range) else list(channels))
    if idx.numel() and (idx.dtype == torch.bool or idx.dtype.is_floating_point or idx.dtype.is_complex):
        raise TypeError(f"channels must be integer channel indices; got dtype {idx.dtype}")
    idx = idx.reshape(-1).to(torch.int64).cpu()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= c):
        raise ValueError(f"channels must be in [0, {c}); got values in [{int(idx.min())}, {int(idx.max())}]")

    pruned = copy.deepcopy(model)
    target = get_layer(pruned, layer)
    keep = torch.ones(c, dtype=torch.bool)
    keep[idx] = False
    if isinstance(target, ChannelMask):
        target.keep &= keep.to(target.keep.device)
        return pruned
    p = next(target.parameters(), None)
    wrapper = ChannelMask(target, keep.to(p.device) if p is not None else keep)
    parent_name, _, leaf = layer.rpartition(".")
    parent = pruned.get_submodule(parent_name) if parent_name else pruned
    setattr(parent, leaf, wrapper)
    return pruned


def prune_by_activation(
    model: nn.Module,
    benign_images: torch.Tensor | ImageDataset,
    rate: float,
    layer: str = "layer4",
    **kwargs: Any,
) -> nn.Module:
    """A copy of ``model`` with the ``floor(rate * C)`` channels of ``layer`` that have the lowest mean
    activation on ``benign_images`` masked (rate in ``[0, 1)``). ``kwargs`` (``batch_size``, ``device``,
    ``precision``) go to :func:`layer_activations`. The pruned channels are
    ``get_layer(pruned, layer).pruned_channels``."""
    rate = _check_real(rate, "rate")
    if not 0 <= rate < 1:
        raise ValueError(f"pruning rate must be in [0, 1); got {rate}")
    order = pruning_order(model, benign_images, layer, **kwargs)
    k = pruned_count(rate, len(order))
    return prune_channels(model, order[:k], layer, num_channels=len(order))


def pruning_curve(
    model: nn.Module,
    benign_images: torch.Tensor | ImageDataset,
    rates: Iterable[float],
    evaluate: Evaluate,
    layer: str = "layer4",
    *,
    progress: bool = False,
    **kwargs: Any,
) -> pd.DataFrame:
    """Evaluate ``model`` pruned at each of ``rates`` (Figure 7); one row per rate, in the order given.

    The benign activations are computed once (``kwargs`` go to :func:`layer_activations`); each rate
    prunes a fresh copy of ``model`` (pruning is nested: a higher rate masks a superset of channels).
    Columns: ``rate``, ``channels pruned``, then the entries of ``evaluate(pruned_model)``.
    """
    rates = [_check_real(r, "rate") for r in rates]
    if not rates:
        raise ValueError("rates is empty")
    bad = [r for r in rates if not 0 <= r < 1]
    if bad:
        raise ValueError(f"pruning rates must be in [0, 1); got {bad}")
    if not callable(evaluate):
        raise TypeError("evaluate must be a callable model -> dict")
    order = pruning_order(model, benign_images, layer, **kwargs)
    rows = []
    for rate in progress_bar(rates, desc="pruning", progress=progress, leave=False):
        k = pruned_count(rate, len(order))
        pruned = prune_channels(model, order[:k], layer, num_channels=len(order))
        row: dict[str, Any] = {"rate": rate, "channels pruned": k}
        row.update(_evaluate_row(evaluate, pruned, row))
        rows.append(row)
        del pruned
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- STRIP
@dataclass(frozen=True)
class StripSettings:
    """STRIP settings (Gao et al., 2019).

    ``n_overlays``: clean images blended with each input (N). ``alpha``: the overlay's blend weight,
    ``blend = (1 - alpha) * x + alpha * overlay`` in float ``[0, 1]`` (0.5: an even superimposition).
    ``frr``: the false rejection rate that sets the threshold on the clean hold-out set (its ``frr``
    quantile of entropies). ``seed``: draws the overlays.
    """

    n_overlays: int = 20
    alpha: float = 0.5
    frr: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int(self.n_overlays, "n_overlays", 1)
        if not 0 < _check_real(self.alpha, "alpha") < 1:
            raise ValueError(f"alpha must be in (0, 1); got {self.alpha}")
        if not 0 <= _check_real(self.frr, "frr") < 1:
            raise ValueError(f"frr must be in [0, 1); got {self.frr}")
        _check_int(self.seed, "seed", 0)

    def replace(self, **changes: Any) -> "StripSettings":
        return dataclasses.replace(self, **changes)


#: Inputs whose overlay indices are drawn together (fixed, so the draws never depend on batch_size).
_DRAW_CHUNK = 64


def _overlay_indices(n: int, pool: int, n_overlays: int, seed: int, exclude_self: bool) -> torch.Tensor:
    """``n x n_overlays`` pool indices: for each input, distinct images drawn uniformly (seeded)."""
    available = pool - 1 if exclude_self else pool
    if available < n_overlays:
        raise ValueError(
            f"clean_pool has {available} usable images{' (excluding each input itself)' if exclude_self else ''}, "
            f"fewer than n_overlays={n_overlays}"
        )
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, _DRAW_CHUNK):
        stop = min(n, start + _DRAW_CHUNK)
        keys = torch.rand(stop - start, pool, generator=g)
        if exclude_self:
            rows = torch.arange(stop - start)
            keys[rows, rows + start] = 2.0  # never among the smallest
        out.append(torch.topk(keys, n_overlays, dim=1, largest=False, sorted=True).indices)
    return torch.cat(out) if out else torch.empty(0, n_overlays, dtype=torch.int64)


def strip_entropy(
    model: nn.Module,
    images: torch.Tensor | ImageDataset,
    clean_pool: torch.Tensor | ImageDataset,
    settings: StripSettings = StripSettings(),
    *,
    exclude_self: bool = False,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
    precision: str = "auto",
) -> np.ndarray:
    """STRIP score of each input: the mean prediction entropy (nats) over its ``n_overlays`` blends.

    For input ``i``, ``n_overlays`` distinct images of ``clean_pool`` are drawn (a generator seeded with
    ``settings.seed``; the same inputs and pool give the same draws, whatever ``batch_size``), and
    ``(1 - alpha) * x_i / 255 + alpha * overlay / 255`` (float in ``[0, 1]``) is classified with
    :func:`ubwlib.train.predict_proba` (``device``, ``precision``, ``batch_size`` are passed on; it treats
    float input as already scaled, exactly like uint8 input divided by 255). ``exclude_self=True`` when
    ``images`` *is* ``clean_pool`` (same order): input ``i`` is then never blended with itself.
    Returns a float64 array of length ``len(images)``.
    """
    if not isinstance(settings, StripSettings):
        raise TypeError(f"settings must be a StripSettings; got {type(settings).__name__}")
    x = _as_images(images, "images")
    pool = _as_images(clean_pool, "clean_pool")
    _check_int(batch_size, "batch_size", 1)
    if x.shape[1:] != pool.shape[1:]:
        raise ValueError(f"images {tuple(x.shape[1:])} and clean_pool {tuple(pool.shape[1:])} differ in shape")
    if exclude_self and len(x) != len(pool):
        raise ValueError("exclude_self=True needs images to be clean_pool itself (same length)")
    if len(x) == 0:
        return np.zeros(0, dtype=np.float64)
    n_ov = settings.n_overlays
    idx = _overlay_indices(len(x), len(pool), n_ov, settings.seed, exclude_self)

    def scaled(t: torch.Tensor) -> torch.Tensor:
        return t.float() / 255.0 if t.dtype == torch.uint8 else t.float()

    out = np.empty(len(x), dtype=np.float64)
    per_chunk = max(1, batch_size // n_ov)
    for start in range(0, len(x), per_chunk):
        stop = min(len(x), start + per_chunk)
        base = scaled(x[start:stop].cpu()).unsqueeze(1)  # m x 1 x C x H x W
        over = scaled(pool[idx[start:stop].reshape(-1).to(pool.device)].cpu())
        over = over.view(stop - start, n_ov, *over.shape[1:])
        blends = ((1 - settings.alpha) * base + settings.alpha * over).clamp_(0, 1).flatten(0, 1)
        probs = predict_proba(model, blends, batch_size=batch_size, device=device, precision=precision)
        h = entropy(probs.double().numpy())
        out[start:stop] = h.reshape(stop - start, n_ov).mean(axis=1)
    return out


def rank_auc(positive: Any, negative: Any) -> float:
    """ROC AUC of scores where higher means positive: ``P(s_pos > s_neg) + P(s_pos = s_neg) / 2``.

    Computed from average ranks (the Mann-Whitney U statistic divided by ``n_pos * n_neg``)."""
    pos = np.asarray(positive, dtype=np.float64).reshape(-1)
    neg = np.asarray(negative, dtype=np.float64).reshape(-1)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("rank_auc needs at least one positive and one negative score")
    if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(neg))):
        raise ValueError("scores must be finite")
    ranks = rankdata(np.concatenate([pos, neg]))
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def strip_detect(
    model: nn.Module,
    clean_holdout: torch.Tensor | ImageDataset,
    clean_test: torch.Tensor | ImageDataset,
    triggered: torch.Tensor | ImageDataset,
    settings: StripSettings = StripSettings(),
    *,
    overlay_pool: torch.Tensor | ImageDataset | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """Run STRIP: set the threshold on ``clean_holdout`` and test ``clean_test`` and ``triggered`` inputs.

    Overlays come from ``overlay_pool`` (default: ``clean_holdout``, the defender's small clean set; its
    own entropies are then computed with ``exclude_self=True``). ``kwargs`` go to :func:`strip_entropy`.
    Returns ``threshold`` (the ``settings.frr`` quantile, numpy's linear interpolation, of the hold-out
    entropies), ``detection rate`` (fraction of ``triggered`` with entropy < threshold), ``false rejection
    rate`` (fraction of ``clean_test`` with entropy < threshold), ``AUC`` (:func:`rank_auc` with the
    negated entropy as the score and the triggered inputs as positives), ``entropy clean (mean)`` (on
    ``clean_test``) and ``entropy triggered (mean)``.
    """
    if not isinstance(settings, StripSettings):
        raise TypeError(f"settings must be a StripSettings; got {type(settings).__name__}")
    pool = clean_holdout if overlay_pool is None else overlay_pool
    for name, value in (("clean_holdout", clean_holdout), ("clean_test", clean_test), ("triggered", triggered)):
        if len(_as_images(value, name)) == 0:
            raise ValueError(f"{name} is empty")
    h_hold = strip_entropy(model, clean_holdout, pool, settings, exclude_self=overlay_pool is None, **kwargs)
    h_clean = strip_entropy(model, clean_test, pool, settings, **kwargs)
    h_trig = strip_entropy(model, triggered, pool, settings, **kwargs)
    threshold = float(np.quantile(h_hold, settings.frr))
    return {
        "threshold": threshold,
        "detection rate": float(np.mean(h_trig < threshold)),
        "false rejection rate": float(np.mean(h_clean < threshold)),
        "AUC": rank_auc(-h_trig, -h_clean),
        "entropy clean (mean)": float(h_clean.mean()),
        "entropy triggered (mean)": float(h_trig.mean()),
    }
