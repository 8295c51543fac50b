"""Models: the ResNet-18 family (CIFAR and ImageNet stems) and a small fast net for smoke runs.

Names say which is which:

- ``resnet18-cifar``: 3x3 stride-1 stem, no max-pool (the paper's CIFAR-10 model).
- ``resnet18-imagenet``: 7x7 stride-2 stem + 3x3 max-pool (the paper's ImageNet-subset model).
- ``smallcnn``: three conv-BN-ReLU stages with max-pooling, for smoke tests.

Every builder takes ``num_classes``, ``in_channels`` and a ``width`` multiplier (1.0 = the paper's
64-128-256-512 channels). The classifier head is always ``model.fc`` and the last convolutional stage
of the ResNets is ``model.layer4`` (the pruning defense of the book masks its channels).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["BatchNorm2d", "SubsampledConv2d", "BasicBlock", "ResNet18", "SmallCNN", "build_model", "MODEL_NAMES",
           "count_parameters", "load_weights"]


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, buffers and results) that runs a narrow channels-last input on a CPU
    through the default layout.

    PyTorch's CPU kernels for a channels-last batch norm are slow when there are fewer channels than
    :attr:`NARROW` (measured on 2 cores, 128 x 8 x 28 x 28 float32, forward + backward, training mode: 7.7 ms in
    channels-last, 2.9 ms through a contiguous copy and back, 1.9 ms for a contiguous input; at 16 channels
    channels-last is the fast one, 0.5 ms against 1.4). The default model's first stage has 8 channels, and
    ubwlib's models are channels-last, where this took about a quarter of a training step and a fifth of a
    crafting step. Such an input is copied to the default layout, normalised by the same kernel as a contiguous
    input (so the result equals ``nn.BatchNorm2d`` on ``x.contiguous()`` exactly, gradients included) and copied
    back to channels-last; in the backward pass the gradient takes the same two copies (:class:`_Layout`), so the
    native backward too sees one layout. Every other input (wider, contiguous, on a GPU, or traced by
    ``torch.compile``) takes ``nn.BatchNorm2d``'s own path.

    In eval mode, a float32 channels-last CPU input that autograd will differentiate (crafting, adversarial
    perturbations, per-sample gradient norms, key forgery) is normalised as the affine map it is,
    ``x * scale + shift`` with ``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean *
    scale``, in plain tensor ops (the output equals the native kernel's up to float32 rounding, whose fused
    multiply-add rounds once), and autograd then differentiates a multiplication and an addition. Without gradients
    (prediction, evaluation) the native kernel runs as before. The native eval-mode backward and
    its double backward reduce a channels-last tensor over the batch dimension first, which took 3-3.6 ms per
    reduction at 128 x 16 x 28 x 28 on 2 cores; with the affine map the crafting step of the ``lite`` model ran
    1.9x as fast (1,436 against 2,800 poisons/s). Gradients then sum in another order (about 1e-7 apart), so
    crafting on channels-last models is a new draw; a model moved to the default layout is untouched."""

    NARROW = 16
    """Channels below which a channels-last CPU input goes through the default layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # both special cases are channels-last CPU inputs outside vmap (which cannot change a layout) and outside
        # torch.compile (whose generated kernels choose their own layouts)
        if torch.compiler.is_compiling() or not (x.dim() == 4 and x.device.type == "cpu" and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last)
                and not torch._C._functorch.is_functorch_wrapped_tensor(x)):
            return super().forward(x)
        if (not self.training and self.affine and self.running_mean is not None and self.running_var is not None
                and torch.is_grad_enabled() and x.dtype == self.weight.dtype == torch.float32):
            scale = self.weight * torch.rsqrt(self.running_var + self.eps)
            shift = self.bias - self.running_mean * scale
            return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        if self.num_features < self.NARROW:
            return _Layout.apply(super().forward(_Layout.apply(x, torch.contiguous_format)), torch.channels_last)
        return super().forward(x)


class _Layout(torch.autograd.Function):
    """``x.contiguous(memory_format=fmt)`` whose backward gives the gradient the layout of ``x``. Autograd's own
    copy passes the gradient through in whatever layout it arrives, so the narrow batch norm's native backward got
    a channels-last gradient for its default-layout input and ran a mixed-layout kernel, and the convolution before
    it got a default-layout gradient to reorder (together about 3x the kernels' time at 128 x 8 x 28 x 28 on 2
    cores). The values are copied, never changed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
        ctx.back = (torch.channels_last if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
                    else torch.contiguous_format)
        return x.contiguous(memory_format=fmt)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _Layout.apply(grad, ctx.back), None


class SubsampledConv2d(nn.Conv2d):
    """A 1x1 convolution with a stride (no padding), computed as the stride-1 convolution of every ``stride``-th
    pixel: the same function, parameters and state_dict as ``nn.Conv2d(in_channels, out_channels, 1, stride)``.

    PyTorch 2.14's CPU kernel for the weight gradient of a channels-last 1x1 convolution with stride 2 and fewer
    than 16 input channels writes out of bounds when the batch size is odd (glibc then aborts with "corrupted size
    vs. prev_size", or the process segfaults), in float32 and in bfloat16; the stride-1 kernel is sound. It is the
    shortcut of ``layer2`` in the default profile's 1/8-width ResNet (8 input channels at 28x28), so a batch of 3 or
    a last batch of 127 crashed the process. Picking the pixels first avoids that kernel on every device."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, 1, stride, 0, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sh, sw = self.stride
        if (sh, sw) != (1, 1):
            x = x[:, :, ::sh, ::sw]
        return nn.functional.conv2d(x, self.weight, self.bias, 1, 0, 1, self.groups)


def _channels(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


class BasicBlock(nn.Module):
    """The two-conv residual block of ResNet-18 (He et al., 2016)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                SubsampledConv2d(in_planes, planes, stride), BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with a selectable stem.

    ``stem="cifar"``: conv3x3(stride 1) -> BN -> ReLU, no max-pool (32x32 inputs keep their resolution
    until ``layer2``). ``stem="imagenet"``: conv7x7(stride 2) -> BN -> ReLU -> maxpool3x3(stride 2).
    Global average pooling makes the head independent of the input size (for 32x32 CIFAR inputs it is
    the 4x4 average pool of the reference code).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        stem: str = "cifar",
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.stem_kind = stem
        c = [_channels(b, width) for b in (64, 128, 256, 512)]
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, c[0], 3, 1, 1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, c[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = BatchNorm2d(c[0])
        self.layer1 = self._stage(c[0], c[0], 1)
        self.layer2 = self._stage(c[0], c[1], 2)
        self.layer3 = self._stage(c[1], c[2], 2)
        self.layer4 = self._stage(c[2], c[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Channels-last weights, as the small CNN's: every convolution then runs channels-last whatever the input's
        # layout. On a CPU oneDNN's channels-last kernels took half the time of its default-layout ones for the
        # default profile's 1/8-width model (convolutions 56 against 109 ms of a training step at batch 128, 2-core
        # Xeon, float32; 10 ms against 3.6 for one backward pass of an 8-channel 28x28 layer), and a training step
        # ran 1.04-1.22x as fast (the narrow layers' memory-bound batch norms and layout copies take back part of
        # it), the crafting step of gradient matching about 1.2x. The strides survive .to(device), deepcopy and
        # load_state_dict, so a model trained here, evaluated, or reloaded from the cache takes the same kernels.
        self.to(memory_format=torch.channels_last)

    @staticmethod
    def _stage(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Output of ``layer4`` (before pooling)."""
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


class SmallCNN(nn.Module):
    """A small, fast convnet: three conv-BN-ReLU-maxpool stages (32-64-128 channels x ``width``).

    Each stage runs as conv -> BN -> max-pool -> ReLU: the ReLU is applied after the pooling, to a quarter of the
    values. ReLU is monotone, so ``relu(max(a, b, c, d)) == max(relu(a), ..., relu(d))`` exactly and the pooling
    routes the gradient to the same element: outputs and gradients are bit-equal to conv -> BN -> ReLU -> max-pool
    (``tests/test_models.py``), and the state_dict keys are the same. It saved about 9% of a training step of the
    ``lite`` model (2-core Xeon, float32)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        c = [_channels(b, width) for b in (32, 64, 128)]
        layers: list[nn.Module] = []
        prev = in_channels
        for ch in c:
            layers += [nn.Conv2d(prev, ch, 3, 1, 1, bias=False), BatchNorm2d(ch), nn.MaxPool2d(2, ceil_mode=True),
                       nn.ReLU(inplace=True)]
            prev = ch
        self.layer4 = nn.Sequential(*layers)  # the last (and only) conv stack, named like the ResNets'
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c[-1], num_classes)
        # Channels-last weights make every convolution, and so every max pooling, run channels-last whatever the
        # input's layout: PyTorch's default-layout CPU max pooling took 12x as long (6.5 against 0.55 ms forward at
        # 128x16x28x28, 2-core Xeon), and the model trained 1.4-1.6x faster (ubwlib.bench). The strides survive
        # .to(device), deepcopy and load_state_dict, so training, evaluation and a model reloaded from the cache
        # all take the same kernels.
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.layer4(x)), 1))


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18-cifar": lambda **kw: ResNet18(stem="cifar", **kw),
    "resnet18-imagenet": lambda **kw: ResNet18(stem="imagenet", **kw),
    "smallcnn": lambda **kw: SmallCNN(**kw),
}
MODEL_NAMES = tuple(_BUILDERS)


def build_model(
    name: str, num_classes: int, in_channels: int, width: float = 1.0, seed: int | None = None
) -> nn.Module:
    """Build a model by name (see ``MODEL_NAMES``). With ``seed``, the initial weights are drawn from a
    generator seeded with it (the global RNG state is left untouched), so equal seeds give equal models."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}") from None
    if seed is None:
        return builder(num_classes=num_classes, in_channels=in_channels, width=width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(num_classes=num_classes, in_channels=in_channels, width=width)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_weights(path, arch: str, width: float, num_classes: int, channels: int) -> nn.Module:
    """The model ``arch`` (:data:`MODEL_NAMES`) with ``width``, ``num_classes`` and ``channels``, its weights
    from a state_dict file read with ``torch.load(path, map_location="cpu", weights_only=True)`` (no pickled code
    runs), in eval mode. A ``{"state_dict": ...}`` checkpoint is accepted too. Raises ``ValueError`` saying what
    to fix: a missing file, a file that is not a state_dict, weights made for another number of classes or
    channels (another dataset than the one the caller expects), or weights of another architecture or width
    (with the offending parameter names, e.g. a ``module.`` prefix left by ``DataParallel``)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"no model weights at {path}") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure: say what is expected
        raise ValueError(f"{path} is not a weights-only state_dict file ({type(exc).__name__}: {exc}); save the "
                         "model with torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state_dict (a dict of tensors); save the model with "
                         "torch.save(model.state_dict(), path)")
    model = build_model(arch, num_classes, channels, width)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if unexpected and all(k.startswith("module.") for k in state):
        raise ValueError(f"the parameter names in {path} start with 'module.' (saved from DataParallel or "
                         f"DistributedDataParallel), e.g. {unexpected[0]!r}; save model.module.state_dict() "
                         "instead, or strip the prefix")
    if missing or unexpected:
        raise ValueError(f"the weights in {path} are not those of {arch} at width {width}: missing "
                         f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                         f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}; check the architecture")
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if state[k].shape != v.shape]
    if shapes:
        first_w = next(k for k, v in own.items() if v.dim() == 4)
        last_w = [k for k, v in own.items() if v.dim() == 2][-1]
        only_io = {k for k, _, _ in shapes} <= {first_w, last_w, last_w.replace("weight", "bias")}
        a, b = state[first_w].shape, own[first_w].shape
        io_ok = (a[0], *a[2:]) == (b[0], *b[2:]) and state[last_w].shape[1:] == own[last_w].shape[1:]
        if only_io and io_ok:
            got_k, got_c = state[last_w].shape[0], state[first_w].shape[1]
            raise ValueError(f"the weights in {path} are for {got_k} classes and {got_c}-channel images, but "
                             f"{num_classes} classes and {channels} channels are expected: the model was trained "
                             "on another dataset than the one given (use the key and test data of the dataset "
                             "this model was trained on)")
        listed = ", ".join(f"{k}: {a} in the file, {b} expected" for k, a, b in shapes[:3])
        raise ValueError(f"the weights in {path} do not fit {arch} at width {width} ({listed}"
                         f"{', ...' if len(shapes) > 3 else ''}); check the architecture and its width")
    model.load_state_dict(state)
    return model.eval()
