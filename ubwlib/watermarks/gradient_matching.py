"""Gradient matching (Geiping et al.'s Witches' Brew, as used by Sleeper Agent and UBW-C), written once.

Sample-specific perturbations ``delta_i`` (``|delta_i|_inf <= eps``) are crafted on a fixed set of poisons so
that the parameter gradient of the ordinary training loss on the poisons points where a *target gradient*
``g_t`` points:

    passenger loss = 1 - cos( grad_w sum_i CE(f(aug(x_i + delta_i)), y_i),  g_t )

(labels unchanged). Sleeper Agent's ``g_t`` pushes patched source images to the target class; UBW-C's
ascends the cross-entropy on the true label plus lambda times the prediction entropy (Eqs. 6-7). The loop:

- the surrogate ``f`` starts from a benign model (given, or trained from scratch by ``ubwlib.train``);
- each step visits every poison batch once, back-propagates the passenger loss through the double-backward
  graph (``create_graph=True``) to ``delta``, and takes one Adam step on the *signs* of the gradients
  (lr x0.1 at the milestones), then projects ``delta`` to the eps-ball and ``x + delta`` to [0, 1];
- ``aug`` is a differentiable random shift (up to ``max_shift * H`` pixels) and horizontal flip, via
  ``grid_sample``;
- every ``retrain_every`` steps the surrogate is retrained *from scratch* on the current poisoned dataset and
  the target gradient is recomputed (the bi-level problem's lower level);
- with a :class:`ubwlib.cache.Checkpoint`, the state is saved every ``checkpoint_every`` steps and an
  interrupted run resumes from its last saved step to the same result.

Poisons are chosen by the largest per-sample gradient norm (one batched backward pass with layer hooks;
``per_sample_grad_norms_func`` is the torch.func reference).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from .._progress import progress_bar

from ..data import ImageDataset
from ..models import build_model
from ..train import (
    TrainConfig,
    accuracy,
    augment_batch,
    autocast_context,
    predict_proba,
    resolve_compile,
    resolve_device,
    resolve_precision,
    train,
)
from .base import Watermark, WatermarkedDataset, WatermarkKey, check_redraw, check_target, choose_indices
from .patch import paste_random, redraw_patch

__all__ = [
    "GradientMatchingWatermark",
    "GradientMatchingSettings",
    "CraftResult",
    "differentiable_augment",
    "per_sample_grad_norms",
    "per_sample_grad_norms_func",
    "select_by_grad_norm",
    "passenger_loss",
    "apply_delta",
    "craft",
    "crafting_augment",
    "derived_seed",
    "ensemble_passenger_loss",
    "passenger_input_grad",
    "perturbation_grad",
    "CompiledPassengerGrad",
    "transfer_loss",
]


AUGMENTS = ("shift", "trainer", "none")
INITS = ("uniform", "zero", "trigger")
SELECTIONS = ("grad-norm", "random", "source-like")
MATCHINGS = ("cosine", "l2")


@dataclass(frozen=True)
class GradientMatchingSettings:
    """Budgets and hyper-parameters of gradient matching (defaults: the public code's)."""

    eps: float = 16 / 255
    """L_inf budget of the perturbations (images in [0, 1])."""
    steps: int = 250
    """Crafting steps (each visits every poison once)."""
    lr: float = 0.025
    """Adam learning rate on the signed gradients."""
    lr_milestones: tuple[float, ...] = (0.375, 0.625, 0.875)
    """Fractions of ``steps`` where lr is multiplied by ``lr_decay`` (93, 156, 218 of 250)."""
    lr_decay: float = 0.1
    retrain_every: int = 50
    """Retrain the surrogate from scratch every this many steps (0: never)."""
    batch_size: int = 128
    """Poisons per batch of the passenger loss."""
    augment: str = "shift"
    """Differentiable augmentation of the poisons while crafting: ``shift`` (the public code's: a random shift
    of up to ``max_shift`` of the size, bilinear, zero fill, and a horizontal flip), ``trainer`` (the
    retraining's own random crop with ``retrain.crop_padding`` and flip, as the victim's trainer draws them) or
    ``none``. ``True``/``False`` are read as ``shift``/``none``."""
    max_shift: float = 0.125
    """Largest shift of ``augment="shift"``, as a fraction of the image size (about H/8)."""
    init: str = "uniform"
    """Initial perturbation: ``uniform`` in the eps-ball (seeded), ``zero``, or ``trigger``: the test-time
    trigger pasted at a random position (seeded) and clipped to the eps-ball, i.e. a faint trigger that the
    crafting then reshapes (not in the paper; a lever of this book's study)."""
    model: str = "resnet18-cifar"
    width: float = 1.0
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=100, milestones=(50, 75)))
    """Schedule of the surrogate trained from scratch when none is given."""
    retrain: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=40, lr=0.1, momentum=0.0, weight_decay=1e-4, milestones=(20, 30))
    )
    """Schedule of each retraining of the surrogate (public code: 40 epochs, lr 0.1, no momentum, wd 1e-4)."""
    ensemble: int = 1
    """K surrogates crafted against at once (member 0: the given benign model, the others trained from scratch
    with their own seeds); the passenger loss of each batch is the mean of the K members' losses."""
    fresh_seeds: bool = True
    """Each retraining of each member starts from a seed never used before (new initial weights and data
    order, as the public code's advancing global RNG gives); False: every retraining reuses the member's seed."""
    restarts: int = 1
    """R independent crafting runs (own random start, batch order and augmentation); the release keeps the one
    with the lowest held-out passenger loss (the lowest crafting loss when ``held_out`` is 0)."""
    held_out: int = 0
    """Models trained from scratch on the benign data with seeds never used in crafting: the passenger loss of
    the current poisons against them (the transfer diagnostic) is logged every ``diagnostic_every`` steps."""
    stages: tuple[float, ...] = (1.0,)
    """Snapshots of each surrogate's training, as fractions of its epochs, that join the ensemble: ``(1.0,)``
    is the trained model only (the public code); e.g. ``(0.25, 0.5, 1.0)`` also matches the gradients of the
    same training after a quarter and half of it, where a victim trained from scratch does most of its
    learning (not in the paper; a lever of this book's study)."""
    diagnostic_every: int = 5
    matching: str = "cosine"
    """The passenger loss: ``cosine`` (``1 - cos``, the public code's: direction only) or ``l2``
    (``|g - g_t|^2 / |g_t|^2``: the poisons' gradient must also be as *large* as the target gradient, so that it
    weighs against the clean images' gradients; not in the paper, a lever of this book's study). The held-out
    diagnostic is ``1 - cos`` either way."""
    contrast: float = 0.0
    """Weight of the *unpatched* source images in the target objective (not in the paper; a lever of this book's
    study): the target gradient becomes ``grad L(x') - contrast * grad L(x)``, the same target loss on the same
    images with and without the trigger. At a trained model the two gradients nearly coincide (cosine about 0.99
    for UBW-C's loss on Fashion-MNIST): the paper's target is almost all "misclassify the source class", a
    direction that needs no trigger. With ``contrast`` 1 the poisons match what the trigger adds (triggered images
    worse than clean ones); 0 is the paper's objective."""
    selection: str = "grad-norm"
    """Which samples of the pool become poisons: ``grad-norm`` (the largest per-sample gradient norms under the
    surrogate, the public code's), ``random`` (seeded), or ``source-like`` (not in the paper; a lever of this
    book's study): the samples *outside* the source class that the surrogate finds most like the source class
    (:func:`select_source_like`), the images a victim can only tell from the source class by something extra."""
    checkpoint_every: int = 10
    precision: str = "fp32"
    """Precision of the double-backward passes (``fp32`` or ``auto``)."""

    def __post_init__(self) -> None:
        if not 0 < self.eps <= 1:
            raise ValueError(f"eps must be in (0, 1] (images in [0, 1]; 16/255 = {16 / 255:.4f}), got {self.eps}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.retrain_every < 0 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("retrain_every must be >= 0, batch_size and checkpoint_every >= 1")
        if isinstance(self.augment, bool):
            object.__setattr__(self, "augment", "shift" if self.augment else "none")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {self.augment!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.ensemble < 1 or self.restarts < 1 or self.held_out < 0 or self.diagnostic_every < 1:
            raise ValueError("ensemble, restarts and diagnostic_every must be >= 1, held_out >= 0; got "
                             f"{self.ensemble}, {self.restarts}, {self.diagnostic_every}, {self.held_out}")
        if not self.stages or any(not 0 < f <= 1 for f in self.stages) or list(self.stages) != sorted(set(self.stages)):
            raise ValueError(f"stages must be increasing fractions in (0, 1], got {self.stages}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.matching not in MATCHINGS:
            raise ValueError(f"matching must be one of {MATCHINGS}, got {self.matching!r}")
        if not 0 <= self.contrast <= 1:
            raise ValueError(f"contrast must be in [0, 1] (0: the paper's target objective), got {self.contrast}")
        if not 0 <= self.max_shift < 0.5:
            raise ValueError(f"max_shift must be in [0, 0.5), got {self.max_shift}")

    def lr_at(self, step: int) -> float:
        # floor, like the public code's ``steps // 2.667`` etc.: 93, 156, 218 of 250 (rounding gave 94 and 219)
        passed = sum(step >= int(m * self.steps) for m in self.lr_milestones)
        return self.lr * self.lr_decay**passed


@dataclass(frozen=True)
class CraftResult:
    images: torch.Tensor
    """The released poisons (uint8), in the order of ``indices``."""
    delta: torch.Tensor
    """The final float perturbations (N_poison x C x H x W, in [-eps, eps])."""
    history: pd.DataFrame
    """One row per step of each restart: restart, step, lr, passenger loss (mean over the ensemble), held-out
    passenger loss (the transfer diagnostic; NaN where not measured), seconds."""
    retrains: pd.DataFrame
    """One row per (re)training of the first member: restart, step, and what ``monitor`` returned."""
    surrogate: nn.Module
    """The first member's last surrogate of the released restart."""
    resumed_from: int
    """Step the run resumed from, counted over all restarts (0: it started fresh)."""
    best_restart: int = 0
    """The restart whose perturbations are released."""


# --------------------------------------------------------------------------- building blocks
def differentiable_augment(x: torch.Tensor, generator: torch.Generator, max_shift: float = 0.125,
                           flip: bool = True) -> torch.Tensor:
    """Random shift (up to ``max_shift`` of the size, zero fill) and horizontal flip of a float batch,
    differentiable with respect to ``x`` (``F.grid_sample`` on an affine grid)."""
    n = x.shape[0]
    dev = x.device
    shift = (torch.rand(n, 2, generator=generator, device=generator.device) * 2 - 1) * (2 * max_shift)
    sign = torch.ones(n, device=generator.device)
    if flip:
        sign = torch.where(torch.rand(n, generator=generator, device=generator.device) < 0.5, -sign, sign)
    theta = torch.zeros(n, 2, 3, device=generator.device)
    theta[:, 0, 0] = sign
    theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(dev, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def passenger_loss(grads: list[torch.Tensor], target: list[torch.Tensor], target_norm: torch.Tensor,
                   matching: str = "cosine") -> torch.Tensor:
    """``1 - cos(g, g_t)`` over all parameters (one flattened vector), or with ``matching="l2"``
    ``|g - g_t|^2 / |g_t|^2`` (direction *and* size; 1 at ``g = 0``, 0 only at ``g = g_t``)."""
    dot = sum((g * t).sum() for g, t in zip(grads, target))
    sq = sum((g * g).sum() for g in grads)
    if matching == "l2":
        return (sq - 2 * dot) / (target_norm**2 + 1e-12) + 1
    return 1 - dot / (torch.sqrt(sq) * target_norm + 1e-12)


def per_sample_grad_norms(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 256,
                          device: torch.device | None = None) -> torch.Tensor:
    """L2 norm of the parameter gradient of each sample's cross-entropy (model in eval mode); float32, CPU.

    Vectorised without a per-sample loop: one forward/backward per batch, with hooks that keep each layer's
    input and output gradient and form the per-sample gradients of every ``Conv2d`` (im2col + einsum),
    ``BatchNorm2d`` (eval mode: an affine map per channel) and ``Linear`` layer. A model with other
    parameterised layers raises ``NotImplementedError`` (use :func:`per_sample_grad_norms_func`)."""
    dev = device or next(model.parameters()).device
    model.eval()
    supported = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
    for mod in model.modules():
        if any(True for _ in mod.parameters(recurse=False)) and not isinstance(mod, supported):
            raise NotImplementedError(f"per-sample gradient norms: unsupported layer {type(mod).__name__}")
        if isinstance(mod, nn.BatchNorm2d) and mod.running_mean is None:
            raise NotImplementedError("per-sample gradient norms: BatchNorm2d without running statistics "
                                      "(batch statistics couple the samples)")
    store: dict[nn.Module, list] = {}

    def fwd_hook(mod, inp, out):
        rec = [inp[0].detach(), None, out.detach()]
        store[mod] = rec

        def grab(g, rec=rec):
            rec[1] = g.detach()

        out.register_hook(grab)

    handles = [m.register_forward_hook(fwd_hook) for m in model.modules() if isinstance(m, supported)]
    norms = []
    if dev.type == "cuda":  # one copy each way for the whole call: no wait for the device between batches
        images, labels = images.to(dev), labels.to(dev)
    try:
        for start in range(0, len(images), batch_size):
            store.clear()
            x = images[start : start + batch_size].to(dev).float().div_(255)
            y = labels[start : start + batch_size].to(dev)
            with torch.enable_grad():
                # gradients w.r.t. the input only: autograd then skips the weight gradients, which the
                # per-sample formulas below rebuild from the hooked activations and output gradients
                x.requires_grad_(True)
                loss = F.cross_entropy(model(x), y, reduction="sum")
                torch.autograd.grad(loss, x)
            sq = torch.zeros(len(x), device=dev)
            with torch.no_grad():
                for mod, (a, g, out) in store.items():
                    sq += _layer_sq_norms(mod, a, g, out)
            norms.append(sq.sqrt())
    finally:
        for h in handles:
            h.remove()
    return torch.cat(norms).cpu() if norms else torch.empty(0)


def _layer_sq_norms(mod: nn.Module, a: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    n = a.shape[0]
    total = torch.zeros(n, device=a.device)
    if isinstance(mod, nn.Linear):
        if mod.weight.requires_grad:
            total += g.pow(2).sum(1) * a.pow(2).sum(1)
        if mod.bias is not None and mod.bias.requires_grad:
            total += g.pow(2).sum(1)
    elif isinstance(mod, nn.Conv2d):
        if mod.groups != 1:
            raise NotImplementedError("per-sample gradient norms: grouped convolutions are not supported")
        if isinstance(mod.padding, str):
            raise NotImplementedError("per-sample gradient norms: string padding ('same'/'valid') is not supported")
        if mod.weight.requires_grad:
            total += _conv_weight_sq_norms(mod, a, g)
        if mod.bias is not None and mod.bias.requires_grad:
            total += g.sum((2, 3)).pow(2).sum(1)
    elif isinstance(mod, nn.BatchNorm2d):
        if mod.weight is not None and mod.weight.requires_grad:
            # the normalised input from the running statistics (not (out - beta) / gamma: NaN where gamma == 0)
            xhat = (a - mod.running_mean.view(1, -1, 1, 1)) * torch.rsqrt(mod.running_var.view(1, -1, 1, 1) + mod.eps)
            total += (g * xhat).sum((2, 3)).pow(2).sum(1)
        if mod.bias is not None and mod.bias.requires_grad:
            total += g.sum((2, 3)).pow(2).sum(1)
    return total


def _conv_weight_sq_norms(mod: nn.Conv2d, a: torch.Tensor, g: torch.Tensor,
                          grouped: bool | None = None) -> torch.Tensor:
    """Squared norm of each sample's ``Conv2d`` weight gradient ``dW_i[o, c, u, v] = sum_yx g_i[o, y, x] *
    a_i[c, y*s + u*d, x*s + v*d]`` (s: stride, d: dilation, a zero-padded).

    On a CPU, large outputs (early layers): one grouped convolution with the samples as groups, the input's
    channels as the batch and each sample's output gradient as its kernel (stride and dilation swap roles), about
    3x faster than im2col there; small outputs (late layers): im2col + batched matmul, the faster one there. On a
    GPU always im2col + batched matmul: a convolution with one group per sample and a kernel the size of the
    feature map (32 x 32 for ResNet-18's first stage) has no fast GPU algorithm, while the batched matmul is what
    a GPU does best (the unfolded input of ResNet-18's widest layer is 0.6 GB at 256 images). ``grouped`` forces
    a path (``None``: this rule)."""
    n = a.shape[0]
    kh, kw = mod.kernel_size
    if grouped is None:
        grouped = g.shape[2] * g.shape[3] > 64 and a.device.type == "cpu"
    if grouped:
        x = a.transpose(0, 1)  # C x n x H x W
        w = g.reshape(n * g.shape[1], 1, g.shape[2], g.shape[3])
        gw = F.conv2d(x, w, padding=mod.padding, dilation=mod.stride, stride=mod.dilation, groups=n)
        gw = gw[:, :, :kh, :kw]  # C x (n * O) x kh x kw
        return gw.reshape(a.shape[1], n, -1).pow(2).sum((0, 2))
    cols = F.unfold(a, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
    gw = torch.bmm(g.flatten(2), cols.transpose(1, 2))
    return gw.pow(2).flatten(1).sum(1)


def per_sample_grad_norms_func(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                               batch_size: int = 64) -> torch.Tensor:
    """Reference implementation with ``torch.func`` (vmap of grad; any layer type, much slower on CPU)."""
    from torch.func import functional_call, grad, vmap

    dev = next(model.parameters()).device
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p, x, y):
        return F.cross_entropy(functional_call(model, (p, buffers), (x.unsqueeze(0),)), y.unsqueeze(0))

    g_fn = vmap(grad(loss_one), in_dims=(None, 0, 0))
    norms = []
    for start in range(0, len(images), batch_size):
        gs = g_fn(params, images[start : start + batch_size].to(dev).float().div_(255),
                  labels[start : start + batch_size].to(dev))
        norms.append(sum(v.flatten(1).pow(2).sum(1) for v in gs.values()).sqrt().cpu())
    return torch.cat(norms) if norms else torch.empty(0)


def select_by_grad_norm(model: nn.Module, dataset: ImageDataset, count: int, pool: torch.Tensor | None = None,
                        batch_size: int = 256, norms: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (sorted) of the ``count`` samples of ``pool`` (default: all) with the largest gradient norm.

    ``norms``: the per-sample gradient norms of the *whole* dataset under ``model``, if already computed
    (:func:`per_sample_grad_norms`); they only depend on the model and the data, so several releases crafted
    from the same surrogate can share one pass."""
    pool = torch.arange(len(dataset)) if pool is None else torch.as_tensor(pool, dtype=torch.long)
    if count > len(pool):
        raise ValueError(f"cannot select {count} poisons from {len(pool)} candidates")
    if norms is not None:
        if norms.shape != (len(dataset),):
            raise ValueError(f"norms must hold one value per sample ({len(dataset)}), got {tuple(norms.shape)}")
        norms = norms[pool]
    else:
        norms = per_sample_grad_norms(model, dataset.images[pool], dataset.labels[pool], batch_size=batch_size)
    top = torch.topk(norms, count, largest=True, sorted=False).indices
    return pool[top].sort().values


def select_source_like(model: nn.Module, dataset: ImageDataset, count: int, source: int,
                       pool: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (sorted) of the ``count`` samples of ``pool`` (default: all) outside class ``source`` to which
    ``model`` gives the highest probability of ``source`` (ties: the lower index first)."""
    pool = torch.arange(len(dataset)) if pool is None else torch.as_tensor(pool, dtype=torch.long)
    pool = pool[dataset.labels[pool] != source].sort().values
    if count > len(pool):
        raise ValueError(f"cannot select {count} source-like poisons from the {len(pool)} candidates outside "
                         f"class {source}; lower poisoning_rate or choose another selection")
    p_source = predict_proba(model, dataset.images[pool])[:, source]
    order = torch.sort(p_source, descending=True, stable=True).indices[:count]
    return pool[order].sort().values


def apply_delta(images: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """uint8 images + float perturbation (in [0, 1] units) -> uint8, rounded and clipped."""
    return (images.float() + delta.float() * 255).round_().clamp_(0, 255).to(torch.uint8)


def _project(delta: torch.Tensor, base: torch.Tensor, eps: float) -> None:
    """In place: |delta| <= eps and base + delta in [0, 1]."""
    delta.clamp_(-eps, eps)
    torch.maximum(delta, -base, out=delta)
    torch.minimum(delta, 1 - base, out=delta)


# --------------------------------------------------------------------------- the crafting loop
def derived_seed(seed: int, *role) -> int:
    """A seed for one role of a crafting run (an ensemble member, a retraining, a restart, a held-out model):
    a hash of ``(seed, *role)`` in [0, 2^31), so roles never share a seed with each other nor, in practice,
    with the small seeds a user picks for the victims."""
    digest = hashlib.sha256(repr((int(seed), *role)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def crafting_augment(x: torch.Tensor, settings: GradientMatchingSettings, generator: torch.Generator) -> torch.Tensor:
    """The augmentation of the poisons while crafting (``settings.augment``), differentiable in ``x``."""
    if settings.augment == "shift":
        return differentiable_augment(x, generator, settings.max_shift, flip=True)
    if settings.augment == "trainer":  # the retraining's own crop + flip: padding and indexing, differentiable
        return augment_batch(x, flip=settings.retrain.flip, crop_padding=settings.retrain.crop_padding,
                             generator=generator)
    return x


def _poison_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, prec: str, create_graph: bool):
    with autocast_context(prec, x.device):
        out = model(x)
    loss = F.cross_entropy(out.float(), y)
    return torch.autograd.grad(loss, _params(model), create_graph=create_graph)


def ensemble_passenger_loss(models: list[nn.Module], targets: list[tuple[list[torch.Tensor], torch.Tensor]],
                            x: torch.Tensor, y: torch.Tensor, prec: str = "fp32",
                            create_graph: bool = True, matching: str = "cosine") -> torch.Tensor:
    """The passenger loss of one batch of poisons ``x`` (labels ``y``) averaged over an ensemble: each model's
    :func:`passenger_loss` against its own ``(target gradient, norm)``."""
    losses = [passenger_loss(_poison_grads(m, x, y, prec, create_graph), t, tn, matching)
              for m, (t, tn) in zip(models, targets)]
    return torch.stack(losses).mean()


def passenger_input_grad(models: list[nn.Module], targets: list[tuple[list[torch.Tensor], torch.Tensor]],
                         x: torch.Tensor, y: torch.Tensor, prec: str = "fp32",
                         matching: str = "cosine") -> tuple[torch.Tensor, torch.Tensor]:
    """``(d passenger loss / d x, passenger loss)`` of :func:`ensemble_passenger_loss` for a batch ``x`` (no graph
    needed on ``x``), written with ``torch.func``: the parameter gradient is ``grad`` of the cross-entropy in the
    (trainable) parameters, and the passenger loss of it is differentiated in ``x`` by ``grad_and_value``, so the
    double backward is one functional program that ``torch.compile`` traces as a single graph (its autograd
    cannot compile a ``create_graph`` backward). The chain rule through the augmentation is then one ordinary
    backward: ``torch.autograd.grad(x, delta, gx)``."""
    from torch.func import functional_call, grad, grad_and_value

    def loss_of_x(xx: torch.Tensor) -> torch.Tensor:
        losses = []
        for m, (t, tn) in zip(models, targets):
            params = {k: v for k, v in m.named_parameters() if v.requires_grad}

            def ce(p: dict[str, torch.Tensor]) -> torch.Tensor:
                with autocast_context(prec, xx.device):
                    out = functional_call(m, p, (xx,))
                return F.cross_entropy(out.float(), y)

            g = grad(ce)(params)
            losses.append(passenger_loss([g[k] for k in params], t, tn, matching))
        return torch.stack(losses).mean()

    return grad_and_value(loss_of_x)(x)


class CompiledPassengerGrad:
    """:func:`passenger_input_grad` through ``torch.compile`` (CUDA graphs on a GPU, one shape): ``__call__``
    returns ``(gx, loss)``, or ``None`` once a compilation has failed (with one warning), and the caller then takes
    the eager double backward (:func:`perturbation_grad` does both)."""

    def __init__(self, dev: torch.device) -> None:
        self.cuda = dev.type == "cuda"
        self.fn = torch.compile(passenger_input_grad, mode="reduce-overhead" if self.cuda else None, dynamic=False)
        self.failed = False

    def __call__(self, *args) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.failed:
            return None
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            gx, loss = self.fn(*args)
        except Exception as err:  # noqa: BLE001 (any failure of the compiler: the eager path takes over)
            self.failed = True
            first = str(err).splitlines()[0] if str(err) else ""
            warnings.warn(f"torch.compile failed on the crafting step ({type(err).__name__}: {first}); crafting goes "
                          "on without it (UBW_COMPILE=off skips the attempt)", stacklevel=2)
            return None
        return gx.clone(), loss.clone()  # a CUDA graph's outputs are overwritten by its next replay


def perturbation_grad(models: list[nn.Module], targets: list[tuple[list[torch.Tensor], torch.Tensor]],
                      x: torch.Tensor, d: torch.Tensor, y: torch.Tensor, prec: str = "fp32", matching: str = "cosine",
                      compiled: CompiledPassengerGrad | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d passenger loss / d d, passenger loss)`` of the poisons ``x = aug(base + d)`` (``x`` built from ``d``
    with autograd): the crafting step's gradient. With ``compiled``, through its single graph in ``x`` and one
    backward through the augmentation; without it (or once its compilation failed), the eager double backward."""
    fast = compiled(models, targets, x.detach(), y, prec, matching) if compiled is not None else None
    if fast is not None:
        g_x, loss = fast
        (g_d,) = torch.autograd.grad(x, d, g_x)
        return g_d, loss
    loss = ensemble_passenger_loss(models, targets, x, y, prec, matching=matching)
    (g_d,) = torch.autograd.grad(loss, d)
    return g_d, loss


def transfer_loss(models: list[nn.Module], targets: list[tuple[list[torch.Tensor], torch.Tensor]],
                  poisons: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    """The passenger loss of the poisons (float, in [0, 1]; no augmentation, batches in index order) against
    ``models`` (averaged over them and over the poisons). For models that took no part in the crafting, this
    is the transfer diagnostic: how far the perturbations fit models they were not crafted on."""
    if not models or not len(poisons):
        return float("nan")
    total = torch.zeros((), dtype=torch.float64, device=poisons.device)  # summed as a Python float would be
    with torch.enable_grad():
        for b in range(0, len(poisons), batch_size):
            x, y = poisons[b : b + batch_size], labels[b : b + batch_size]
            total += ensemble_passenger_loss(models, targets, x, y, create_graph=False).detach().double() * len(x)
    return float(total) / len(poisons)


def _state_tensors(prefix: str, model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu() for k, v in model.state_dict().items()}


def _load_from(tensors: dict, prefix: str, model: nn.Module) -> nn.Module:
    n = len(prefix) + 1
    model.load_state_dict({k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
    return model


def craft(
    train_set: ImageDataset,
    indices: torch.Tensor,
    target_gradient: Callable[[nn.Module], list[torch.Tensor]],
    settings: GradientMatchingSettings,
    *,
    seed: int = 0,
    surrogate: nn.Module | None = None,
    members: list[nn.Module] | None = None,
    held_out_models: list[nn.Module] | None = None,
    init_delta: torch.Tensor | None = None,
    monitor: Callable[[nn.Module], dict] | None = None,
    checkpoint=None,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "crafting",
    compile: str | None = None,
) -> CraftResult:
    """Craft perturbations for ``train_set[indices]`` by gradient matching (see the module docstring).

    ``target_gradient(model)`` returns the target gradient (one tensor per trainable parameter) for a model;
    ``monitor(model)`` returns numbers logged after each (re)training of the first ensemble member.
    ``checkpoint`` (a :class:`ubwlib.cache.Checkpoint`) makes the run resumable.

    Seeds: ensemble member 0 is ``surrogate`` (else trained with ``seed``); every other model (members, each
    retraining when ``fresh_seeds``, held-out models, restarts) gets its own :func:`derived_seed`.
    ``members`` (ensemble members 1..K-1) and ``held_out_models``: the models of those seeds trained on the
    benign ``train_set`` with ``settings.pretrain``, when the caller already has them (e.g. from a cache);
    else they are trained here. ``init_delta``: the starting perturbation when ``settings.init == "trigger"``
    (float, the poisons' shape, in [0, 1] units; projected to the eps-ball).

    ``compile`` (``auto``/``on``/``off``; ``None``: ``UBW_COMPILE``, else ``auto``: a long crafting on a GPU,
    :func:`ubwlib.train.resolve_compile` counting batches of poisons): full batches take the compiled
    :func:`passenger_input_grad` instead of the eager double backward (equal up to float rounding, so a compiled
    crafting is another draw); a failed compilation warns and the eager path goes on.
    """
    s = settings
    if members is not None and len(members) != s.ensemble - 1:
        raise ValueError(f"members must hold the {s.ensemble - 1} ensemble members besides the surrogate, "
                         f"got {len(members)}")
    if held_out_models is not None and len(held_out_models) != s.held_out:
        raise ValueError(f"held_out_models must hold {s.held_out} models (settings.held_out), got {len(held_out_models)}")
    dev = resolve_device(device)
    indices = torch.as_tensor(indices, dtype=torch.long)
    if s.init == "trigger" and (init_delta is None or tuple(init_delta.shape) != (len(indices), *train_set.image_shape)):
        raise ValueError("init='trigger' needs init_delta, one perturbation per poison "
                         f"({len(indices)} x {tuple(train_set.image_shape)})")
    base_u8 = train_set.images[indices]
    labels = train_set.labels[indices].to(dev)
    base = base_u8.to(dev).float().div_(255)
    n = len(indices)
    k, c = train_set.num_classes, train_set.image_shape[0]
    prec = resolve_precision(s.precision, dev)

    def build(model_seed: int) -> nn.Module:
        return build_model(s.model, k, c, s.width, seed=model_seed)

    def ready(m: nn.Module) -> nn.Module:
        m.to(dev).eval()
        for p in m.parameters():
            p.requires_grad_(True)
        return m

    def train_snapshots(model_seed: int | None, data: ImageDataset, cfg: TrainConfig, what: str,
                        stages: tuple[float, ...]) -> list[nn.Module]:
        """The model after each stage of its training (fractions of ``cfg.epochs``), the trained one last.
        ``model_seed`` None: the crafting seed with ``cfg`` as given (the public code's single-seed behaviour)."""
        at = sorted({min(cfg.epochs, max(1, round(f * cfg.epochs))) for f in stages})
        snaps: list[nn.Module] = []

        def keep(epoch: int, m: nn.Module, _row: dict) -> None:
            if epoch in at and epoch < cfg.epochs:
                snaps.append(ready(copy.deepcopy(m)))

        if model_seed is None:
            m, _ = train(build(seed), data, cfg, device=dev, progress=progress, desc=what, on_epoch=keep)
        else:
            m, _ = train(build(model_seed), data, cfg.replace(seed=model_seed), device=dev, progress=progress,
                         desc=what, on_epoch=keep)
        return snaps + [ready(m)]

    n_stages = len({min(s.retrain.epochs, max(1, round(f * s.retrain.epochs))) for f in s.stages})
    if n_stages != len({min(s.pretrain.epochs, max(1, round(f * s.pretrain.epochs))) for f in s.stages}):
        raise ValueError(f"stages {s.stages} give a different number of snapshots of pretrain "
                         f"({s.pretrain.epochs} epochs) and retrain ({s.retrain.epochs} epochs)")
    staged = n_stages > 1

    def poisoned_set(delta: torch.Tensor) -> ImageDataset:
        images = train_set.images.clone()
        images[indices] = apply_delta(base_u8, delta.cpu())
        return train_set.replace(images=images, name=f"{train_set.name}+crafting")

    def compute_target(m: nn.Module):
        m.eval()
        g = [t.detach() for t in target_gradient(m)]
        return g, torch.sqrt(sum((t * t).sum() for t in g))

    def retrain_seed(restart: int, step: int, member: int) -> int | None:
        if s.fresh_seeds:
            return derived_seed(seed, "retrain", restart, step, member)
        return None if member == 0 else derived_seed(seed, "member", member)

    def restart_gens(restart: int) -> tuple[torch.Generator, torch.Generator, int]:
        if restart == 0:  # the seeds of a single run
            return (torch.Generator().manual_seed(seed + 101), torch.Generator(device=dev).manual_seed(seed + 202),
                    seed + 303)
        return (torch.Generator().manual_seed(derived_seed(seed, "restart", restart, "order")),
                torch.Generator(device=dev).manual_seed(derived_seed(seed, "restart", restart, "augment")),
                derived_seed(seed, "restart", restart, "init"))

    state = checkpoint.load() if checkpoint is not None else None
    t_state = state.tensors if state is not None else {}
    data_state = state.data if state is not None else {}
    history: list[dict] = list(data_state.get("history", []))
    retrains: list[dict] = list(data_state.get("retrains", []))

    def log_retrain(restart: int, step: int, m: nn.Module, seconds: float) -> None:
        row = {"restart": restart, "step": step, "train seconds": seconds}
        if monitor is not None:
            row.update(monitor(m))
        retrains.append(row)

    # the initial ensemble (member 0: the given surrogate) and the held-out models, trained once
    # (with stages, every member contributes one model per stage: models[member * n_stages + stage])
    initial: list[nn.Module] = []
    t0 = time.perf_counter()
    for member in range(s.ensemble):
        if state is not None:
            initial += [ready(_load_from(t_state, f"init{member * n_stages + k}", build(seed)))
                        for k in range(n_stages)]
        elif member == 0 and surrogate is not None and not staged:
            initial.append(ready(surrogate))
        elif member > 0 and members is not None and not staged:
            initial.append(ready(members[member - 1]))
        else:
            initial += train_snapshots(None if member == 0 else derived_seed(seed, "member", member), train_set,
                                       s.pretrain, f"surrogate {member}", s.stages)
    last = n_stages - 1  # the trained model of member 0 (monitored, returned)
    if state is None:
        log_retrain(0, 0, initial[last], time.perf_counter() - t0)
    held_out: list[nn.Module] = []
    for j in range(s.held_out):
        if state is not None:
            m = _load_from(t_state, f"held{j}", build(seed)).to(dev).eval()
        elif held_out_models is not None:
            m = held_out_models[j].to(dev).eval()
        else:
            m = train_snapshots(derived_seed(seed, "held-out", j), train_set, s.pretrain, f"held-out model {j}",
                                (1.0,))[-1]
        held_out.append(m)
    held_targets = [compute_target(m) for m in held_out]

    def diagnostic(delta: torch.Tensor) -> float:
        return transfer_loss(held_out, held_targets, base + delta.detach(), labels, s.batch_size)

    # where the run stands: (restart, step), the best finished restart so far
    restart0, step0 = divmod(int(state.step), max(1, s.steps)) if state is not None and s.steps else (0, 0)
    if state is not None and s.steps == 0:
        restart0 = int(state.step)
    best = data_state.get("best")
    best_delta = t_state.get("best.delta")
    best_model = _load_from(t_state, "best.model", build(seed)).to(dev).eval() if best is not None else None
    resumed_from = int(state.step) if state is not None else 0

    def save(global_step: int, models, delta, opt, gens):
        if checkpoint is None:
            return
        tensors = {"delta": delta.detach().cpu(), "gen_order": gens[0].get_state(),
                   "gen_aug": gens[1].get_state().cpu()}
        for i, m in enumerate(initial):
            tensors.update(_state_tensors(f"init{i}", m))
        for j, m in enumerate(held_out):
            tensors.update(_state_tensors(f"held{j}", m))
        for i, m in enumerate(models):
            tensors.update(_state_tensors(f"model{i}", m))
        st = opt.state.get(delta, {}) if opt is not None else {}
        if st:
            tensors.update({"adam.step": torch.as_tensor(st["step"]).detach().cpu().clone(),
                            "adam.exp_avg": st["exp_avg"].detach().cpu(),
                            "adam.exp_avg_sq": st["exp_avg_sq"].detach().cpu()})
        if best is not None:
            tensors["best.delta"] = best_delta
            tensors.update(_state_tensors("best.model", best_model))
        checkpoint.save(global_step, tensors, {"history": history, "retrains": retrains, "best": best})

    full_batches = s.restarts * s.steps * (n // s.batch_size)
    compiled = CompiledPassengerGrad(dev) if resolve_compile(compile, dev, full_batches) else None
    for restart in range(restart0, s.restarts):
        gens = restart_gens(restart)
        gen_order, gen_aug, init_seed = gens
        resuming = state is not None and restart == restart0 and step0 > 0
        delta = torch.zeros_like(base)
        if s.init == "trigger":
            delta = init_delta.to(dev).float().clone()
        elif s.init == "uniform":
            g0 = torch.Generator().manual_seed(init_seed)
            delta = ((torch.rand(base.shape, generator=g0) * 2 - 1) * s.eps).to(dev)
        _project(delta, base, s.eps)
        delta.requires_grad_(True)
        opt = torch.optim.Adam([delta], lr=s.lr)
        models = list(initial)
        if resuming:
            with torch.no_grad():
                delta.copy_(t_state["delta"].to(dev))
            if "adam.exp_avg" in t_state:
                opt.state[delta] = {"step": t_state["adam.step"].clone(), "exp_avg": t_state["adam.exp_avg"].to(dev),
                                    "exp_avg_sq": t_state["adam.exp_avg_sq"].to(dev)}
            gen_order.set_state(t_state["gen_order"])
            gen_aug.set_state(t_state["gen_aug"].to(gen_aug.get_state().device))
            models = [ready(_load_from(t_state, f"model{i}", build(seed))) for i in range(s.ensemble * n_stages)]
        elif restart > 0:
            log_retrain(restart, 0, models[last], 0.0)
        targets = [compute_target(m) for m in models]
        first = step0 if resuming else 0
        if held_out and first == 0:
            history.append({"restart": restart, "step": 0, "lr": float("nan"), "passenger loss": float("nan"),
                            "held-out passenger loss": diagnostic(delta), "seconds": 0.0})
        bar = progress_bar(range(first, s.steps), progress=progress, leave=False, unit="step",
                           desc=desc if s.restarts == 1 else f"{desc} {restart + 1}/{s.restarts}")
        for step in bar:
            if s.retrain_every and step > 0 and step % s.retrain_every == 0 and not any(
                r["restart"] == restart and r["step"] == step for r in retrains
            ):
                t0 = time.perf_counter()
                data = poisoned_set(delta.detach())
                models = [m for i in range(s.ensemble) for m in train_snapshots(
                    retrain_seed(restart, step, i), data, s.retrain, f"retrain surrogate {i}", s.stages)]
                log_retrain(restart, step, models[last], time.perf_counter() - t0)
                targets = [compute_target(m) for m in models]
            t0 = time.perf_counter()
            lr = s.lr_at(step)
            for group in opt.param_groups:
                group["lr"] = lr
            grad_sign = torch.zeros_like(delta)
            # nothing in the batch loop waits for the device: the order is copied once per step, and the loss is
            # summed on the device in float64 (each batch's float32 loss times its size, in order: the same
            # number as a Python float sum)
            loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
            order = torch.randperm(n, generator=gen_order).to(dev)
            for b in range(0, n, s.batch_size):
                idx = order[b : b + s.batch_size]
                d = delta[idx].detach().requires_grad_(True)
                x = crafting_augment(base[idx] + d, s, gen_aug)
                g_d, p_loss = perturbation_grad(models, targets, x, d, labels[idx], prec, s.matching,
                                                compiled if len(idx) == s.batch_size else None)
                grad_sign[idx] = g_d.sign()
                loss_sum += p_loss.detach().double() * len(idx)
            delta.grad = grad_sign
            opt.step()
            with torch.no_grad():
                _project(delta, base, s.eps)
            row = {"restart": restart, "step": step + 1, "lr": lr, "passenger loss": float(loss_sum) / n,
                   "held-out passenger loss": float("nan"), "seconds": time.perf_counter() - t0}
            if held_out and ((step + 1) % s.diagnostic_every == 0 or step + 1 == s.steps):
                row["held-out passenger loss"] = diagnostic(delta)
            history.append(row)
            bar.set_postfix(loss=f"{row['passenger loss']:.4f}")
            if (step + 1) % s.checkpoint_every == 0 and step + 1 < s.steps:
                save(restart * s.steps + step + 1, models, delta, opt, gens)
        bar.close()
        # keep the restart with the lowest held-out passenger loss (without held-out models: crafting loss)
        final = [r for r in history if r["restart"] == restart and r["step"] == s.steps]
        if held_out:
            score = final[-1]["held-out passenger loss"] if final else diagnostic(delta)
        else:
            score = final[-1]["passenger loss"] if final else float("inf")
        if best is None or score < best["score"]:
            best = {"restart": restart, "score": score}
            best_delta = delta.detach().cpu().clone()
            best_model = models[last]
        save((restart + 1) * s.steps if s.steps else restart + 1, models, delta, None, gens)
        state, step0 = None, 0
    final_delta = best_delta if best_delta is not None else torch.zeros_like(base).cpu()
    return CraftResult(
        images=apply_delta(base_u8, final_delta),
        delta=final_delta,
        history=pd.DataFrame(history, columns=["restart", "step", "lr", "passenger loss", "held-out passenger loss",
                                               "seconds"]),
        retrains=pd.DataFrame(retrains),
        surrogate=best_model if best_model is not None else initial[last],
        resumed_from=resumed_from,
        best_restart=int(best["restart"]) if best is not None else 0,
    )


# --------------------------------------------------------------------------- the watermarks built on it
class GradientMatchingWatermark(Watermark):
    """Shared by Sleeper Agent and UBW-C: choose poisons, craft them by :func:`craft`, release (labels kept).

    Subclasses define :meth:`_pool` (which samples may be poisoned), :meth:`_patch` (the test-time patch),
    :meth:`_target_loss` (the loss whose parameter gradient is the target gradient) and ``_target_label``."""

    label_type = "clean"

    def _pool(self, train_set: ImageDataset) -> tuple[torch.Tensor | None, int]:  # pragma: no cover
        raise NotImplementedError

    def _patch(self, channels: int, generator: torch.Generator) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _target_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    _target_label: int | None = None

    def watermark(self, train_set: ImageDataset, seed: int = 0, *, surrogate: nn.Module | None = None,
                  members: list[nn.Module] | None = None, held_out_models: list[nn.Module] | None = None,
                  checkpoint=None, monitor_set: ImageDataset | None = None, device=None,
                  progress: bool = True, grad_norms: torch.Tensor | None = None) -> WatermarkedDataset:
        """Craft and release. ``surrogate``: a trained benign model to start from (else one is trained with
        ``crafting.pretrain``); ``checkpoint``: a :class:`ubwlib.cache.Checkpoint` for resumable crafting;
        ``monitor_set``: a test set on which each (re)trained surrogate is measured (crafting curves);
        ``grad_norms``: the surrogate's per-sample gradient norms over ``train_set``, if already computed;
        ``members``/``held_out_models``: see :func:`craft`. The crafting report is in ``released.report``."""
        self._check_train_set(train_set)
        s = self.settings
        gm: GradientMatchingSettings = s.crafting
        dev = resolve_device(device)
        source = check_target(s.source, train_set.num_classes)
        pool, count = self._pool(train_set)
        gen = torch.Generator().manual_seed(seed)
        patch = self._patch(train_set.image_shape[0], gen)
        t0 = time.perf_counter()
        if surrogate is None:
            model = build_model(gm.model, train_set.num_classes, train_set.image_shape[0], gm.width, seed=seed)
            surrogate, _ = train(model, train_set, gm.pretrain, device=dev, progress=progress, desc="surrogate")
        surrogate.to(dev)
        t_pre = time.perf_counter() - t0
        t0 = time.perf_counter()
        if gm.selection == "random":
            idx = choose_indices(len(train_set), count, torch.Generator().manual_seed(derived_seed(seed, "selection")),
                                 pool=pool)
        elif gm.selection == "source-like":
            idx = select_source_like(surrogate, train_set, count, source, pool)
        else:
            idx = select_by_grad_norm(surrogate, train_set, count, pool, norms=grad_norms)
        t_sel = time.perf_counter() - t0

        target_gradient = self._target_gradient(train_set, gen, patch, dev)

        monitor = None
        if monitor_set is not None:
            mon_src = monitor_set.images[monitor_set.labels == source]
            mon_y = monitor_set.labels[monitor_set.labels == source]

            def monitor(model: nn.Module) -> dict:
                from .. import metrics

                probs = predict_proba(model, paste_random(mon_src, patch, torch.Generator().manual_seed(seed)))
                pred = probs.argmax(1)
                out = {"surrogate accuracy": accuracy(model, monitor_set),
                       "D_s (triggered source)": metrics.sample_dispersibility(probs.double().numpy()),
                       "ASR-A (triggered source)": metrics.asr_all(pred.numpy(), mon_y.numpy())}
                if self._target_label is not None:
                    out["ASR (triggered source)"] = float((pred == self._target_label).float().mean())
                return out

        init_delta = None
        if gm.init == "trigger":  # the trigger at a random position, as the difference to each poison
            g_init = torch.Generator().manual_seed(derived_seed(seed, "trigger init"))
            poisons = train_set.images[idx]
            init_delta = (paste_random(poisons, patch, g_init).float() - poisons.float()) / 255
        result = craft(train_set, idx, target_gradient, gm, seed=seed, surrogate=surrogate, members=members,
                       held_out_models=held_out_models, init_delta=init_delta, monitor=monitor,
                       checkpoint=checkpoint, device=dev, progress=progress, desc=f"{self.name} crafting")
        images = train_set.images.clone()
        images[idx] = result.images
        released = self._release(train_set, images, train_set.labels.clone(), idx, {"patch": patch}, seed,
                                 self._target_label)
        report = {"history": result.history, "retrains": result.retrains, "resumed_from": result.resumed_from,
                  "best restart": result.best_restart,
                  "seconds": {"surrogate": t_pre, "selection": t_sel,
                              "crafting": float(result.history["seconds"].sum()) if len(result.history) else 0.0,
                              "retraining": float(result.retrains["train seconds"].iloc[1:].sum())
                              if len(result.retrains) > 1 else 0.0},
                  "delta": result.delta}
        return dataclasses.replace(released, report=report)

    def _target_gradient(self, train_set: ImageDataset, gen: torch.Generator, patch: torch.Tensor,
                         dev: torch.device) -> Callable[[nn.Module], list[torch.Tensor]]:
        """``model -> grad_w`` of :meth:`_target_loss` on the patched source-class training images (the
        ``n_source`` of them drawn from ``gen``, the patch positions from a seed drawn from ``gen`` next), minus
        ``crafting.contrast`` times the same gradient on the same images without the patch."""
        parts = self._target_gradient_parts(train_set, gen, patch, dev)
        contrast = self.settings.crafting.contrast

        def target_gradient(model: nn.Module) -> list[torch.Tensor]:
            patched, clean = parts(model, clean=bool(contrast))
            return patched if not contrast else [p - contrast * c for p, c in zip(patched, clean)]

        return target_gradient

    def _target_gradient_parts(self, train_set: ImageDataset, gen: torch.Generator, patch: torch.Tensor,
                               dev: torch.device):
        """``(model, clean=True) -> (grad on the patched images, grad on the same images unpatched or None)``."""
        s = self.settings
        source = check_target(s.source, train_set.num_classes)
        src_all = torch.nonzero(train_set.labels == source).flatten()
        if s.n_source is not None and s.n_source < len(src_all):
            src_all = choose_indices(len(train_set), s.n_source, gen, pool=src_all)
        src_images = train_set.images[src_all]
        src_labels = train_set.labels[src_all] if self._target_label is None else torch.full_like(
            train_set.labels[src_all], self._target_label)
        tgt_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))

        def parts(model: nn.Module, clean: bool = True):
            g_pos = torch.Generator().manual_seed(tgt_seed)
            params = _params(model)
            totals = [[torch.zeros_like(p) for p in params] for _ in range(2 if clean else 1)]
            for b in range(0, len(src_images), 256):
                images = src_images[b : b + 256]
                y = src_labels[b : b + 256].to(dev)
                batches = [paste_random(images, patch, g_pos)] + ([images] if clean else [])
                for total, x in zip(totals, batches):
                    x = x.to(dev).float().div_(255)
                    loss = self._target_loss(model(x).float(), y) * (len(x) / len(src_images))
                    for t, g in zip(total, torch.autograd.grad(loss, params)):
                        t += g
            return totals[0], (totals[1] if clean else None)

        return parts

    def target_gradient_fn(self, train_set: ImageDataset, seed: int = 0, device=None
                           ) -> Callable[[nn.Module], list[torch.Tensor]]:
        """The target gradient that :meth:`watermark` with the same ``seed`` matches (for diagnostics)."""
        gen = torch.Generator().manual_seed(seed)
        patch = self._patch(train_set.image_shape[0], gen)
        return self._target_gradient(train_set, gen, patch, resolve_device(device))

    def trigger_share(self, model: nn.Module, train_set: ImageDataset, seed: int = 0, device=None) -> dict:
        """How much of the paper's target gradient (``contrast`` 0) is due to the trigger, at ``model``: the
        cosine between the gradient of :meth:`_target_loss` on the patched source images and on the same images
        unpatched, their norms, and the norm of their difference (what the trigger adds) relative to the
        patched one. A cosine near 1 means the target direction barely depends on the trigger."""
        gen = torch.Generator().manual_seed(seed)
        patch = self._patch(train_set.image_shape[0], gen)
        dev = resolve_device(device)
        patched, clean = self._target_gradient_parts(train_set, gen, patch, dev)(model.to(dev).eval())
        p, c = (torch.cat([t.flatten() for t in g]).double() for g in (patched, clean))
        return {"cosine": float(p @ c / (p.norm() * c.norm())), "patched norm": float(p.norm()),
                "clean norm": float(c.norm()), "trigger share": float((p - c).norm() / p.norm())}

    @classmethod
    def apply(cls, images: torch.Tensor, key: WatermarkKey, generator: torch.Generator | None = None) -> torch.Tensor:
        return paste_random(images, key.tensors["patch"], generator or torch.Generator().manual_seed(key.seed))

    @classmethod
    def redraw(cls, key: WatermarkKey, seed: int) -> WatermarkKey:
        """Another patch of the same size (:func:`ubwlib.watermarks.patch.redraw_patch`): a random binary patch
        for a binary one (Sleeper Agent's), a random 3x3 binary square resized the same way for any other (UBW-C's
        resized square)."""
        return redraw_patch(key, check_redraw(cls, key, seed, ("patch",)))
