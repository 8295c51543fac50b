"""Tests of ubwlib.models: shapes, stems, parameter counts, seeding and argument validation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from ubwlib.models import (MODEL_NAMES, BatchNorm2d, ResNet18, SmallCNN, SubsampledConv2d, build_model,
                           count_parameters)
from ubwlib.stacked import stack_models

TINY_WIDTH = {"smallcnn": 0.25, "resnet18-cifar": 0.0625, "resnet18-imagenet": 0.0625}

# (in_channels, num_classes, input size): 1-channel 28x28 (Fashion-MNIST), 3-channel 32x32 (CIFAR-10),
# 3-channel 64x64 (the ImageNet subset at reduced size), plus a tiny odd size.
SHAPE_CASES = [(1, 10, 28), (3, 10, 32), (3, 5, 64), (1, 2, 13)]


def test_model_names():
    assert set(MODEL_NAMES) == {"resnet18-cifar", "resnet18-imagenet", "smallcnn"}
    assert len(MODEL_NAMES) == len(set(MODEL_NAMES))


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("in_channels,num_classes,size", SHAPE_CASES)
def test_logits_shape(name, in_channels, num_classes, size):
    model = build_model(name, num_classes, in_channels, width=TINY_WIDTH[name], seed=0)
    x = torch.rand(3, in_channels, size, size)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, num_classes)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # train mode too (batch statistics), and the head is model.fc with num_classes outputs
    model.train()
    out_train = model(x)
    assert out_train.shape == (3, num_classes)
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == num_classes
    out_train.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("width", [0.0625, 0.3])
def test_width_multiplier_sets_head_width(name, width):
    model = build_model(name, 4, 3, width=width, seed=0)
    last = 512 if name.startswith("resnet") else 128
    assert model.fc.in_features == max(1, round(last * width))
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 3, 16, 16)).shape == (2, 4)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fc_and_layer4_exist(name):
    model = build_model(name, 10, 3, width=TINY_WIDTH[name], seed=0)
    assert isinstance(model.fc, nn.Linear)
    assert isinstance(model.layer4, nn.Module)
    assert any(isinstance(m, nn.Conv2d) for m in model.layer4.modules())
    # layer4 is the last conv stage: its output channels feed the head
    last_conv = [m for m in model.layer4.modules() if isinstance(m, nn.Conv2d)][-1]
    assert last_conv.out_channels == model.fc.in_features


def _after_stem(model: ResNet18, x: torch.Tensor) -> torch.Tensor:
    return model.maxpool(torch.relu(model.bn1(model.conv1(x))))


def test_resnet18_cifar_stem_keeps_resolution():
    model = build_model("resnet18-cifar", 10, 3, width=0.0625, seed=0).eval()
    assert model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1)
    assert model.conv1.padding == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert _after_stem(model, x).shape[-2:] == (32, 32)
        assert model.layer1(_after_stem(model, x)).shape[-2:] == (32, 32)
        # layer2..4 halve: 32 -> 16 -> 8 -> 4 (the reference code's 4x4 final map)
        assert model.features(x).shape == (2, model.fc.in_features, 4, 4)


def test_resnet18_imagenet_stem_downsamples_4x():
    model = build_model("resnet18-imagenet", 10, 3, width=0.0625, seed=0).eval()
    assert model.conv1.kernel_size == (7, 7)
    assert model.conv1.stride == (2, 2)
    assert model.conv1.padding == (3, 3)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert model.maxpool.kernel_size == 3 and model.maxpool.stride == 2
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert _after_stem(model, x).shape[-2:] == (16, 16)
        assert model.features(x).shape == (2, model.fc.in_features, 2, 2)


def test_resnet18_cifar_parameter_count():
    # the well-known count of the CIFAR ResNet-18 (kuangliu/pytorch-cifar) for 10 classes, 3 channels
    model = build_model("resnet18-cifar", 10, 3, width=1.0, seed=0)
    assert count_parameters(model) == 11_173_962
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    # layer widths 64-128-256-512
    assert model.conv1.out_channels == 64 and model.fc.in_features == 512


def test_resnet18_imagenet_parameter_count():
    # torchvision's resnet18 has 11,689,512 parameters with its 1000-class head (512*1000 + 1000);
    # with a 10-class head that is 11,689,512 - 990*513 = 11,181,642
    model = build_model("resnet18-imagenet", 10, 3, width=1.0, seed=0)
    assert count_parameters(model) == 11_689_512 - 990 * 513 == 11_181_642
    # the two stems differ only in conv1: 7x7 vs 3x3 kernels over 3 -> 64 channels
    cifar = count_parameters(build_model("resnet18-cifar", 10, 3, seed=0))
    assert count_parameters(model) - cifar == 64 * 3 * (49 - 9)


def test_count_parameters_small():
    lin = nn.Linear(3, 2)
    assert count_parameters(lin) == 3 * 2 + 2


def _assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_seed_same_weights_and_global_rng_untouched(name):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    m1 = build_model(name, 10, 3, width=TINY_WIDTH[name], seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)  # a different global state must not matter
    m2 = build_model(name, 10, 3, width=TINY_WIDTH[name], seed=7)
    _assert_state_dicts_equal(m1.state_dict(), m2.state_dict())
    # the global stream continues where it was
    torch.manual_seed(5)
    ref = torch.rand(4)
    torch.manual_seed(5)
    build_model(name, 10, 3, width=TINY_WIDTH[name], seed=1)
    assert torch.equal(torch.rand(4), ref)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_different_seeds_differ(name):
    m1 = build_model(name, 10, 3, width=TINY_WIDTH[name], seed=0)
    m2 = build_model(name, 10, 3, width=TINY_WIDTH[name], seed=1)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert not torch.equal(s1["fc.weight"], s2["fc.weight"])
    conv_keys = [k for k, v in s1.items() if v.dim() == 4]
    assert conv_keys and all(not torch.equal(s1[k], s2[k]) for k in conv_keys)


def test_unseeded_builds_use_global_rng():
    torch.manual_seed(3)
    a = build_model("smallcnn", 10, 3, width=0.25)
    torch.manual_seed(3)
    b = build_model("smallcnn", 10, 3, width=0.25)
    _assert_state_dicts_equal(a.state_dict(), b.state_dict())


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError) as exc:
        build_model("resnet50", 10, 3)
    msg = str(exc.value)
    assert "resnet50" in msg
    for name in MODEL_NAMES:
        assert name in msg


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("num_classes", [1, 0, -3])
def test_bad_num_classes(name, num_classes):
    with pytest.raises(ValueError, match=r"num_classes must be >= 2"):
        build_model(name, num_classes, 3, width=TINY_WIDTH[name])


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("width", [0.0, -0.5, math.nan])
def test_bad_width(name, width):
    with pytest.raises(ValueError, match=r"width must be > 0"):
        build_model(name, 10, 3, width=width)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bad_in_channels(name):
    with pytest.raises(ValueError, match=r"in_channels must be >= 1"):
        build_model(name, 10, 0, width=TINY_WIDTH[name])


def test_resnet_bad_stem():
    with pytest.raises(ValueError, match=r"'cifar' or 'imagenet'"):
        ResNet18(stem="tiny")


def test_classes_are_exported():
    assert isinstance(build_model("smallcnn", 3, 1, width=0.25), SmallCNN)
    assert isinstance(build_model("resnet18-cifar", 3, 1, width=0.0625), ResNet18)
    assert build_model("resnet18-imagenet", 3, 1, width=0.0625).stem_kind == "imagenet"


# --------------------------------------------------------------------------- BatchNorm2d
def _bn_pair(channels: int, train: bool) -> tuple[BatchNorm2d, nn.BatchNorm2d]:
    ours, ref = BatchNorm2d(channels), nn.BatchNorm2d(channels)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(channels)
        ours.weight.copy_(torch.rand(channels, generator=gen) + 0.5)
        ours.bias.copy_(torch.randn(channels, generator=gen))
        ours.running_mean.copy_(torch.randn(channels, generator=gen))
        ours.running_var.copy_(torch.rand(channels, generator=gen) + 0.5)
    ref.load_state_dict(ours.state_dict())
    return ours.train(train), ref.train(train)


@pytest.mark.parametrize("train, dtype", [(True, torch.float32), (True, torch.bfloat16), (False, torch.bfloat16)])
def test_batchnorm_narrow_channels_last_equals_the_contiguous_kernel_exactly(train, dtype):
    """8 channels, channels-last on a CPU: the result, the gradients and the running statistics are bit-equal to
    nn.BatchNorm2d on the contiguous copy, and the output stays channels-last (the next convolution's layout).
    (Eval mode in float32 takes the affine map instead: the next tests.)"""
    ours, ref = _bn_pair(8, train)
    x = (torch.randn(6, 8, 5, 7, generator=torch.Generator().manual_seed(0)) * 3 + 1).to(dtype)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    x_nc = x.clone().requires_grad_(True)
    y, y_ref = ours(x_cl), ref(x_nc)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert torch.equal(y, y_ref)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(y, [x_cl, ours.weight, ours.bias],
                                grad_out.contiguous(memory_format=torch.channels_last))
    grads_ref = torch.autograd.grad(y_ref, [x_nc, ref.weight, ref.bias], grad_out)
    for a, b in zip(grads, grads_ref):
        assert torch.equal(a, b)
    # the input's gradient comes back in the input's layout, for the convolution before it
    assert grads[0].is_contiguous(memory_format=torch.channels_last) and not grads[0].is_contiguous()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(ours, name), getattr(ref, name))
    assert int(ours.num_batches_tracked) == int(train)


@pytest.mark.parametrize("channels, memory_format", [(16, torch.channels_last), (8, torch.contiguous_format),
                                                     (3, torch.contiguous_format)])
def test_batchnorm_other_inputs_take_the_parents_path(channels, memory_format):
    """Wide or contiguous inputs: exactly nn.BatchNorm2d on the same tensor, in the same layout."""
    ours, ref = _bn_pair(channels, True)
    x = torch.randn(4, channels, 6, 6, generator=torch.Generator().manual_seed(2)).contiguous(memory_format=memory_format)
    y, y_ref = ours(x), ref(x)
    assert torch.equal(y, y_ref)
    assert y.stride() == y_ref.stride()


@pytest.mark.parametrize("channels", [8, 16, 64])
def test_batchnorm_eval_channels_last_under_autograd_is_the_affine_map(channels):
    """Eval mode, float32, channels-last, gradients wanted: autograd differentiates x * scale + shift (a
    multiplication and an addition, not the native backward). The output, the first and the second derivatives
    equal nn.BatchNorm2d's up to float32 rounding, and the output stays channels-last."""
    ours, ref = _bn_pair(channels, False)
    x = (torch.randn(5, channels, 6, 7, generator=torch.Generator().manual_seed(4)) * 2 - 1).contiguous(
        memory_format=torch.channels_last)
    xs = [x.clone().requires_grad_(True), x.clone().requires_grad_(True)]
    y, y_ref = ours(xs[0]), ref(xs[1])
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert type(y.grad_fn).__name__ == "AddBackward0" and "BatchNorm" in type(y_ref.grad_fn).__name__
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    firsts = []
    for out, xi, bn in ((y, xs[0], ours), (y_ref, xs[1], ref)):
        grads = torch.autograd.grad((out * w).sum(), [xi, bn.weight, bn.bias], create_graph=True)
        # a second derivative, as gradient matching takes: of a function of the parameter gradients, w.r.t. x
        second = torch.autograd.grad(sum((g * g).sum() for g in grads[1:]), xi)[0]
        firsts.append([g.detach() for g in grads] + [second])
    for a, b in zip(*firsts):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # no gradients, training mode or the default layout: the native kernel
    with torch.no_grad():
        assert torch.equal(ours(x), y_ref)
    assert "BatchNorm" in type(ours(xs[0].contiguous()).grad_fn).__name__
    assert type(ours.train()(xs[0]).grad_fn).__name__ != "AddBackward0"  # the native (or narrow-channel) path


def test_batchnorm_narrow_channels_last_has_a_second_derivative():
    """Gradient matching differentiates through the batch norm twice (eval mode, float64 gradcheck)."""
    ours, _ = _bn_pair(8, False)
    ours.double()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda t: ours(t).square().sum(), (x,))
    ours.train()
    assert torch.autograd.gradgradcheck(lambda t: (ours(t) * torch.arange(8.0, dtype=t.dtype).view(1, 8, 1, 1)).sum(),
                                        (x,))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_batch_norm_of_the_models_and_their_stacks_is_ubwlibs(name):
    models = [build_model(name, 10, 1, width=TINY_WIDTH[name], seed=s) for s in (0, 1)]
    for model in [*models, stack_models(models)]:
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert bns and all(type(m) is BatchNorm2d for m in bns)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_smallcnn_pools_before_relu_exactly(mode):
    """SmallCNN applies its ReLU after the max pooling: outputs, input and weight gradients equal the
    conv -> BN -> ReLU -> max-pool order bit for bit (ReLU is monotone), with the same state_dict keys."""
    model = build_model("smallcnn", 10, 1, width=0.5, seed=3)
    layers = list(model.layer4)
    kinds = [type(m).__name__ for m in layers]
    assert kinds == ["Conv2d", "BatchNorm2d", "MaxPool2d", "ReLU"] * 3
    reference = copy.deepcopy(model)
    reordered = []
    for i in range(0, len(layers), 4):
        conv, bn, pool, relu = reference.layer4[i : i + 4]
        reordered += [conv, bn, relu, pool]
    reference.layer4 = nn.Sequential(*reordered)
    assert reference.state_dict().keys() == model.state_dict().keys()
    getattr(model, mode)(), getattr(reference, mode)()
    # inputs with ties and all-negative pooling windows (zeros and a constant patch), where the order could matter
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x[0] = 0.0
    x[1, :, :8, :8] = -1.0
    outs, grads = [], []
    for m in (model, reference):
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        out.square().sum().backward()
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- layouts and the strided shortcut
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_are_built_channels_last_and_stay_so(name):
    """Every model's convolution weights are channels-last from the start, and stay so through deepcopy and
    load_state_dict (a model reloaded from the cache takes the kernels of the model trained)."""
    model = build_model(name, 10, 3, width=TINY_WIDTH[name], seed=0)
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                         for w in convs if w.shape[1] > 1 and w.shape[2] * w.shape[3] > 1)  # else both layouts
    fresh = build_model(name, 10, 3, width=TINY_WIDTH[name], seed=1)
    fresh.load_state_dict(copy.deepcopy(model).state_dict())
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b) and a.stride() == b.stride()


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_subsampled_conv_is_the_strided_1x1_convolution(stride):
    """SubsampledConv2d computes nn.Conv2d(c_in, c_out, 1, stride): the same output size, values and gradients
    (float64, default layout), with the same state_dict."""
    torch.manual_seed(0)
    ours = SubsampledConv2d(4, 6, stride).double()
    ref = nn.Conv2d(4, 6, 1, stride, bias=False).double()
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(ours.state_dict())
    for size in (7, 8):
        x = torch.randn(3, 4, size, size, dtype=torch.float64)
        xs = [x.clone().requires_grad_(True), x.clone().requires_grad_(True)]
        ys = [ours(xs[0]), ref(xs[1])]
        assert ys[0].shape == ys[1].shape == (3, 6, -(-size // stride), -(-size // stride))
        torch.testing.assert_close(ys[0], ys[1], rtol=1e-12, atol=1e-12)
        w = torch.randn(ys[0].shape, dtype=torch.float64)
        ga = torch.autograd.grad((ys[0] * w).sum(), [xs[0], ours.weight])
        gb = torch.autograd.grad((ys[1] * w).sum(), [xs[1], ref.weight])
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch", [3, 5, 127])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_narrow_resnet_trains_on_odd_batches(batch, dtype):
    """The 1/8-width ResNet, channels-last on a CPU, takes a training step on an odd batch: PyTorch's weight gradient
    of a narrow channels-last 1x1 stride-2 convolution corrupted the heap there (the process aborted), and the
    layer2 shortcut now picks its pixels first (SubsampledConv2d)."""
    model = build_model("resnet18-cifar", 10, 1, width=0.125, seed=0).train()
    assert isinstance(model.layer2[0].shortcut[0], SubsampledConv2d)
    x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = model(x.contiguous(memory_format=torch.channels_last))
    out.float().square().sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
