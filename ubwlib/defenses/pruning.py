"""The pruning defense (Figure 7): the pruning half of fine-pruning (Liu et al., 2018).

The channels of the last convolutional stage (``model.layer4`` of every model in :mod:`ubwlib.models`)
with the lowest mean activation on benign images are masked to zero; ``floor(rate * C)`` of the ``C``
channels for a pruning rate in ``[0, 1)``, swept 0..0.9 (Figure 7). Masking replaces the layer by a
:class:`ChannelMask` wrapper that holds the original layer and a boolean ``keep`` buffer, so a pruned model
survives ``copy.deepcopy``, pickling and ``state_dict`` round trips. Classic fine-pruning is
``fine_tune(prune_by_activation(model, images, rate), benign_train)``
(:func:`ubwlib.defenses.fine_tuning.fine_tune`).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterable, Sequence

import pandas as pd
import torch
from torch import nn

from .._progress import progress_bar
from ..data import ImageDataset
from ..train import autocast_context, resolve_precision, to_model_input
from ._common import FLOOR_EPS, Evaluate, as_images, check_int, check_real, evaluate_row, model_device

__all__ = [
    "ChannelMask",
    "get_layer",
    "layer_activations",
    "pruning_order",
    "prune_channels",
    "prune_by_activation",
    "pruned_count",
    "pruning_curve",
]


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
    imgs = as_images(images)
    if len(imgs) == 0:
        raise ValueError("images is empty")
    check_int(batch_size, "batch_size", 1)
    module = get_layer(model, layer)
    dev = model_device(model, device)
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
    rate = check_real(rate, "rate")
    if not 0 <= rate < 1:
        raise ValueError(f"pruning rate must be in [0, 1); got {rate}")
    num_channels = check_int(num_channels, "num_channels", 1)
    return min(num_channels - 1, math.floor(rate * num_channels + FLOOR_EPS))


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
    c = _infer_channels(original) if num_channels is None else check_int(num_channels, "num_channels", 1)
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
    rate = check_real(rate, "rate")
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
    rates = [check_real(r, "rate") for r in rates]
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
        row.update(evaluate_row(evaluate, pruned, row))
        rows.append(row)
        del pruned
    return pd.DataFrame(rows)
