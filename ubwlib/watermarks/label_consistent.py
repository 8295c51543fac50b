"""Label-Consistent watermark (Turner et al., 2019): adversarially perturbed target-class images + the square.

Only samples of the target class y_t are poisoned and their labels are kept (a clean-label watermark). Each
poisoned image is first made hard to classify by an untargeted L_inf PGD attack on a *benign* surrogate model
(maximise CE(f(x + delta), y), ``|delta| <= eps``, ``x + delta`` in [0, 1]), so that a model trained on the
released set relies on the trigger to classify it; then the paper's 3x3 white-black square is pasted into the
bottom-right corner (BadNets' trigger, :func:`ubwlib.watermarks.patch.blend`). At test time the square alone
is the trigger.

Settings (reference section 2): gamma = 0.1, y_t = 1, eps = 8/255, step 1.5/255, 100 steps. Since only
target-class samples can be poisoned, ``round(gamma * N)`` is capped at the size of the target class (on
CIFAR-10 gamma = 0.1 is the whole class; on the ImageNet subset the maximum gamma is 0.02); the cap is
reported by a ``UserWarning`` and in ``key.settings["poisons_requested"]`` / ``["poisons_used"]``.

The surrogate is a benign model trained by :func:`ubwlib.train.train`. Callers normally pass one
(``LabelConsistent().watermark(train_set, seed, surrogate=model)``); without one, a model is built and trained
on the benign ``train_set`` from the ``surrogate_*`` settings. The surrogate's weights are never changed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageDataset
from ..train import (
    PRECISIONS,
    TrainConfig,
    autocast_context,
    resolve_device,
    resolve_precision,
    to_model_input,
    train,
)
from .base import (
    Watermark,
    WatermarkedDataset,
    WatermarkKey,
    check_rate,
    check_redraw,
    check_target,
    choose_indices,
    class_capped_count,
    register,
)
from .patch import blend, redraw_pattern, square_trigger

__all__ = ["LabelConsistentSettings", "LabelConsistent", "pgd_perturb"]

LC_PATTERNS = ("square",)


@dataclass(frozen=True)
class LabelConsistentSettings:
    """Settings of the Label-Consistent watermark; defaults are the paper's (reference section 2)."""

    poisoning_rate: float = 0.1
    """gamma = |D_s| / |D|: round(gamma * N) samples are requested, capped at the size of the target class."""
    target: int = 1
    """Target label y_t (the paper: 1); only samples of this class are poisoned (labels unchanged)."""
    eps: float = 8 / 255
    """L_inf bound of the PGD perturbation, in [0, 1] image units (8/255)."""
    step: float = 1.5 / 255
    """PGD step size (signed gradient), in [0, 1] image units (1.5/255)."""
    steps: int = 100
    """Number of PGD steps (100)."""
    pattern: str = "square"
    """The trigger pasted after PGD: ``square`` = the 3x3 white-black square in the bottom-right corner."""
    alpha: float = 1.0
    """Blend weight of the trigger (1 = the corner pixels are replaced by the square)."""
    surrogate_model: str = "resnet18-cifar"
    """Architecture of the benign surrogate trained when none is passed (``ubwlib.models.build_model`` name)."""
    surrogate_width: float = 1.0
    """Width multiplier of that surrogate (1.0 = the paper's ResNet-18)."""
    surrogate_train: TrainConfig = field(default_factory=TrainConfig)
    """Training schedule of that surrogate (default: the paper's CIFAR-10 schedule, 200 epochs). A dict of
    ``TrainConfig`` fields is accepted too."""
    pgd_batch_size: int = 512
    """Images per PGD batch on the device (affects memory and speed, not the attack)."""
    precision: str = "auto"
    """PGD precision: ``auto`` (bfloat16 autocast where ``ubwlib.train.resolve_precision`` says so; the loss is
    always computed in float32), ``bf16`` or ``fp32``."""

    def __post_init__(self) -> None:
        check_rate(self.poisoning_rate)
        if isinstance(self.target, bool) or not isinstance(self.target, int) or self.target < 0:
            raise ValueError(f"target label must be an int >= 0, got {self.target!r}")
        if not isinstance(self.eps, (int, float)) or not 0 < self.eps <= 1:
            raise ValueError(f"eps (L_inf bound, image units in [0, 1]) must be in (0, 1], got {self.eps!r}; "
                             "the paper uses 8/255")
        if not isinstance(self.step, (int, float)) or not self.step > 0:
            raise ValueError(f"step (PGD step size) must be > 0, got {self.step!r}; the paper uses 1.5/255")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps (PGD iterations) must be an int >= 1, got {self.steps!r}")
        if self.pattern not in LC_PATTERNS:
            raise ValueError(f"pattern must be one of {LC_PATTERNS}, got {self.pattern!r}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha!r}")
        if not self.surrogate_width > 0:
            raise ValueError(f"surrogate_width must be > 0, got {self.surrogate_width!r}")
        if isinstance(self.surrogate_train, dict):
            object.__setattr__(self, "surrogate_train", TrainConfig(**self.surrogate_train))
        if not isinstance(self.surrogate_train, TrainConfig):
            raise TypeError(f"surrogate_train must be a TrainConfig (or a dict of its fields), got "
                            f"{type(self.surrogate_train).__name__}")
        if isinstance(self.pgd_batch_size, bool) or not isinstance(self.pgd_batch_size, int) or self.pgd_batch_size < 1:
            raise ValueError(f"pgd_batch_size must be an int >= 1, got {self.pgd_batch_size!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


def _model_device(model: nn.Module) -> torch.device | None:
    p = next(model.parameters(), None)
    if p is None:
        p = next(model.buffers(), None)
    return None if p is None else p.device


def pgd_perturb(
    model: nn.Module,
    images_uint8: torch.Tensor,
    labels: torch.Tensor,
    eps: float = 8 / 255,
    step: float = 1.5 / 255,
    steps: int = 100,
    generator: torch.Generator | None = None,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    precision: str = "auto",
) -> torch.Tensor:
    """Untargeted L_inf PGD against ``model``: maximise CE(f(x + delta), y); returns uint8 images on the CPU.

    ``delta`` starts uniform in [-eps, eps] (drawn on the CPU from ``generator`` for all images at once, so the
    result does not depend on ``batch_size``), then ``steps`` times ``delta += step * sign(grad)``, projected
    onto ``|delta| <= eps`` and ``x + delta`` in [0, 1]. The result is rounded to uint8, so
    ``|x' - x| <= ceil(255 * eps)`` in uint8 units. Batches of ``batch_size`` run on ``device`` (default: where
    the model is) under bfloat16 autocast when ``resolve_precision(precision, device)`` says bf16 (the loss in
    float32). The model runs in eval mode with ``requires_grad`` off; its weights, mode, device and
    ``requires_grad`` flags are restored/left unchanged.
    """
    if not isinstance(images_uint8, torch.Tensor) or images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise TypeError(f"images must be a uint8 tensor N x C x H x W, got "
                        f"{getattr(images_uint8, 'dtype', type(images_uint8).__name__)} "
                        f"{tuple(getattr(images_uint8, 'shape', ()))}")
    labels = torch.as_tensor(labels).reshape(-1).long()
    if len(labels) != len(images_uint8):
        raise ValueError(f"got {len(images_uint8)} images and {len(labels)} labels")
    if not 0 < eps <= 1:
        raise ValueError(f"eps must be in (0, 1], got {eps!r}")
    if not step > 0:
        raise ValueError(f"step must be > 0, got {step!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if len(images_uint8) == 0:
        return images_uint8.cpu().clone()
    if generator is None:
        generator = torch.Generator().manual_seed(0)

    home = _model_device(model)
    dev = resolve_device(device) if device is not None else (home or resolve_device(None))
    prec = resolve_precision(precision, dev)
    n = len(images_uint8)
    init = torch.rand(images_uint8.shape, generator=generator, dtype=torch.float32).mul_(2 * eps).sub_(eps)
    out = torch.empty(images_uint8.shape, dtype=torch.uint8)

    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    try:
        if home is not None and home != dev:
            model.to(dev)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            x = to_model_input(images_uint8[sl].to(dev), "fp32")
            y = labels[sl].to(dev)
            delta = init[sl].to(dev)
            delta = (x + delta).clamp_(0, 1) - x
            for _ in range(steps):
                delta.requires_grad_(True)
                with autocast_context(prec, dev):
                    logits = model(to_model_input(x + delta, prec))  # the layout the trainer feeds this precision
                loss = F.cross_entropy(logits.float(), y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, delta)
                with torch.no_grad():
                    delta = delta.detach() + step * grad.sign()
                    delta.clamp_(-eps, eps)
                    delta = (x + delta).clamp_(0, 1) - x
            with torch.no_grad():
                out[sl] = (x + delta).mul_(255).round_().clamp_(0, 255).to(torch.uint8).cpu()
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        if home is not None and home != dev:
            model.to(home)
        model.train(was_training)
    return out


@register
class LabelConsistent(Watermark):
    """Label-Consistent (Turner et al.): PGD-perturbed target-class images + the square, labels kept."""

    name = "label-consistent"
    label_type = "clean"
    targeted = True
    Settings = LabelConsistentSettings

    def watermark(
        self,
        train_set: ImageDataset,
        seed: int = 0,
        surrogate: nn.Module | None = None,
        *,
        device: str | torch.device | None = None,
        progress: bool = False,
    ) -> WatermarkedDataset:
        """Release ``train_set`` with ``min(round(gamma * N), n_target)`` target-class samples poisoned.

        ``surrogate``: an already-trained benign model (left unchanged); ``None`` trains one on ``train_set``
        (``surrogate_model``, ``surrogate_width``, ``surrogate_train``; initial weights seeded with ``seed``).
        ``device``: where PGD (and the surrogate's training) runs; default: the surrogate's device, else
        :func:`ubwlib.train.resolve_device`.
        """
        self._check_train_set(train_set)
        s = self.settings
        if surrogate is not None and not isinstance(surrogate, nn.Module):
            raise TypeError(f"surrogate must be a trained torch.nn.Module (or None), got {type(surrogate).__name__}")
        n = len(train_set)
        target = check_target(s.target, train_set.num_classes)
        labels_cpu = train_set.labels.cpu()
        pool, requested, used = class_capped_count(train_set, target, s.poisoning_rate, "label-consistent")
        n_target = len(pool)
        gen = torch.Generator().manual_seed(seed)
        idx = choose_indices(n, used, gen, pool=pool)

        surrogate_source = "argument"
        if surrogate is None:
            surrogate = self._train_surrogate(train_set, seed, device, progress)
            surrogate_source = "trained"
        dev = resolve_device(device) if device is not None else (_model_device(surrogate) or resolve_device(None))

        adv = pgd_perturb(surrogate, train_set.images[idx].cpu(), labels_cpu[idx], s.eps, s.step, s.steps,
                          gen, s.pgd_batch_size, dev, s.precision)
        pattern, alpha = square_trigger(train_set.image_shape, s.alpha)
        images = train_set.images.clone()
        images[idx.to(images.device)] = blend(adv, pattern, alpha).to(images.device)
        labels = train_set.labels.clone()
        released = self._release(train_set, images, labels, idx, {"pattern": pattern, "alpha": alpha}, seed, target)
        settings = dict(released.key.settings)
        settings.update(
            poisons_requested=requested,
            poisons_used=used,
            target_class_size=n_target,
            max_poisoning_rate=n_target / n,
            surrogate=surrogate_source,
        )
        return dataclasses.replace(released, key=dataclasses.replace(released.key, settings=settings))

    def _train_surrogate(self, train_set: ImageDataset, seed: int, device, progress: bool) -> nn.Module:
        from ..models import build_model

        s = self.settings
        model = build_model(s.surrogate_model, train_set.num_classes, train_set.image_shape[0],
                            s.surrogate_width, seed=seed)
        return train(model, train_set, s.surrogate_train, device=device, progress=progress,
                     desc="label-consistent surrogate").model

    @classmethod
    def apply(cls, images: torch.Tensor, key: WatermarkKey, generator: torch.Generator | None = None) -> torch.Tensor:
        return blend(images, key.tensors["pattern"].to(images.device), key.tensors["alpha"].to(images.device))

    @classmethod
    def redraw(cls, key: WatermarkKey, seed: int) -> WatermarkKey:
        """Another random binary pattern on the square's pixels, the blend weights kept
        (:func:`ubwlib.watermarks.patch.redraw_pattern`)."""
        return redraw_pattern(key, check_redraw(cls, key, seed, ("pattern", "alpha")))
