"""Several models of one architecture as one: grouped convolutions, so that seed repeats, victims of several
releases and crafting models train in one pass (:func:`ubwlib.train.train_many`).

:func:`stack_models` turns ``G`` models of the same architecture into one module whose every layer holds the ``G``
models' layers side by side: a ``Conv2d`` becomes one convolution with ``G`` times the channels and ``G`` times
the groups (group ``g`` sees only model ``g``'s channels), a ``BatchNorm2d`` one over ``G`` times the channels
(its statistics are per channel, so each model's stay its own), a ``Linear`` a :class:`StackedLinear` (each
model's own matrix on its slice). Parameter-free layers (ReLU, pooling, identity, flatten) are shared as they
are. The stacked module takes ``B x (G*C) x H x W`` (model ``g``'s batch in channels ``g*C .. (g+1)*C``) and
returns ``B x (G*K)``; :func:`unstack_models` copies the weights back into the ``G`` models.

Small models on a CPU run their narrow convolutions far below the cores' rate; ``G`` of them side by side fill
the vector units better (``python -m ubwlib.bench`` prints the ratio). The forward pass gives each model exactly
its own output (tested); the weight gradients of grouped and single convolutions sum in different orders, so they
agree to rounding, not bit for bit.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .models import BatchNorm2d

__all__ = ["StackedLinear", "stack_models", "unstack_models", "stack_inputs", "split_outputs"]

_SHARED = (nn.ReLU, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Sequential)


class StackedLinear(nn.Module):
    """``G`` linear layers side by side: ``B x (G*C) -> B x (G*K)``, model ``g``'s matrix on its slice (one
    ``F.linear`` per model, so each gives exactly what its own ``nn.Linear`` gives)."""

    def __init__(self, layers: list[nn.Linear]) -> None:
        super().__init__()
        self.groups = len(layers)
        self.in_features = layers[0].in_features
        self.out_features = layers[0].out_features
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]).clone())
        self.bias = (nn.Parameter(torch.stack([m.bias.detach() for m in layers]).clone())
                     if layers[0].bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.in_features
        return torch.cat([F.linear(x[:, g * c : (g + 1) * c], self.weight[g],
                                   None if self.bias is None else self.bias[g]) for g in range(self.groups)], 1)


def _check_same(models: list[nn.Module]) -> None:
    if not models:
        raise ValueError("stack_models needs at least one model")
    kinds = [[(n, type(m).__name__) for n, m in model.named_modules()] for model in models]
    shapes = [[(n, tuple(t.shape)) for n, t in model.state_dict().items()] for model in models]
    if any(k != kinds[0] for k in kinds) or any(s != shapes[0] for s in shapes):
        raise ValueError("stack_models needs models of one architecture (the same layers and shapes); "
                         "train the others separately with ubwlib.train.train")


def _stack_conv(layers: list[nn.Conv2d]) -> nn.Conv2d:
    m, g = layers[0], len(layers)
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        raise NotImplementedError(f"stack_models: Conv2d with padding={m.padding!r}, padding_mode={m.padding_mode!r}")
    out = nn.Conv2d(m.in_channels * g, m.out_channels * g, m.kernel_size, m.stride, m.padding, m.dilation,
                    m.groups * g, bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat([x.weight for x in layers]))
        if m.bias is not None:
            out.bias.copy_(torch.cat([x.bias for x in layers]))
    return out


def _stack_bn(layers: list[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    m, g = layers[0], len(layers)
    if len({int(x.num_batches_tracked) for x in layers if x.num_batches_tracked is not None}) > 1:
        raise ValueError("stack_models: the models' BatchNorm layers have seen different numbers of batches")
    out = BatchNorm2d(m.num_features * g, m.eps, m.momentum, m.affine, m.track_running_stats,
                      device=(m.weight if m.affine else m.running_mean).device)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(m, name) is not None:
                getattr(out, name).copy_(torch.cat([getattr(x, name) for x in layers]))
        if m.num_batches_tracked is not None:
            out.num_batches_tracked.copy_(m.num_batches_tracked)
    return out


def stack_models(models: list[nn.Module]) -> nn.Module:
    """One module that computes the ``G = len(models)`` models side by side (see the module docstring); the models
    are left as they are. Raises ``NotImplementedError`` for a layer it cannot stack (any parameterised layer
    other than ``Conv2d``, ``BatchNorm2d`` and ``Linear``)."""
    _check_same(models)
    stacked = copy.deepcopy(models[0])
    per_model = [dict(m.named_modules()) for m in models]
    for name, mod in list(stacked.named_modules()):
        if not name:
            continue
        layers = [pm[name] for pm in per_model]
        if isinstance(mod, nn.Conv2d):
            new: nn.Module = _stack_conv(layers)
        elif isinstance(mod, nn.BatchNorm2d):
            new = _stack_bn(layers)
        elif isinstance(mod, nn.Linear):
            new = StackedLinear(layers)
        elif isinstance(mod, _SHARED) or not (list(mod.parameters(recurse=False)) or list(mod.buffers(recurse=False))):
            continue
        else:
            raise NotImplementedError(f"stack_models: cannot stack layer {name!r} ({type(mod).__name__}); train "
                                      "these models one at a time with ubwlib.train.train")
        parent, _, attr = name.rpartition(".")
        setattr(stacked.get_submodule(parent) if parent else stacked, attr, new)
    return stacked


@torch.no_grad()
def unstack_models(stacked: nn.Module, models: list[nn.Module]) -> list[nn.Module]:
    """Copy the weights and statistics of each model's slice of ``stacked`` into ``models`` (in place; returns
    them). ``stacked`` must come from :func:`stack_models` of models like these."""
    g = len(models)
    parts = dict(stacked.named_modules())
    for i, model in enumerate(models):
        for name, mod in model.named_modules():
            src = parts.get(name)
            if isinstance(mod, nn.Linear):
                mod.weight.copy_(src.weight[i])
                if mod.bias is not None:
                    mod.bias.copy_(src.bias[i])
                continue
            if not isinstance(mod, (nn.Conv2d, nn.BatchNorm2d)):
                continue
            for pname, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                s = getattr(src, pname)
                if pname == "num_batches_tracked":
                    t.copy_(s)
                else:
                    n = s.shape[0] // g
                    t.copy_(s[i * n : (i + 1) * n])
    return models


def stack_inputs(batches: list[torch.Tensor]) -> torch.Tensor:
    """``G`` batches ``B x C x H x W`` -> ``B x (G*C) x H x W`` (the stacked module's input)."""
    return batches[0] if len(batches) == 1 else torch.cat(batches, 1)


def split_outputs(logits: torch.Tensor, groups: int) -> torch.Tensor:
    """The stacked module's ``B x (G*K)`` -> ``G x B x K``."""
    b = logits.shape[0]
    return logits.view(b, groups, -1).transpose(0, 1)
