"""Tests of gradient matching (ubwlib.watermarks.gradient_matching) and the two watermarks built on it,
Sleeper Agent and UBW-C, plus the patch helpers they use (resized_square, paste_random).

Everything runs on tiny synthetic datasets (160 images of 3x12x12 or 1x12x12, 4 classes, each class a bright
region in its own quadrant) with tiny models trained for one epoch. Expected values come from independent
computations: a per-sample Python loop of ``torch.autograd.grad`` for the gradient norms, ``torch.topk`` for the
selection, hand-written formulas for the losses.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil

import pandas as pd

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ubwlib.watermarks.gradient_matching as gm
from ubwlib.cache import Cache
from ubwlib.data import ImageDataset
from ubwlib.models import build_model
from ubwlib.train import TrainConfig, train
from ubwlib.watermarks import REGISTRY, UBWC, SleeperAgent, trigger
from ubwlib.watermarks.gradient_matching import (
    GradientMatchingSettings,
    apply_delta,
    craft,
    differentiable_augment,
    passenger_loss,
    per_sample_grad_norms,
    per_sample_grad_norms_func,
    select_by_grad_norm,
    select_source_like,
)
from ubwlib.watermarks.patch import SQUARE, paste_random, resized_square
from ubwlib.watermarks.sleeper_agent import SleeperAgentSettings
from ubwlib.watermarks.ubw_c import UBWCSettings

K = 4
SIZE = 12
EPS = 16 / 255
TINY = TrainConfig(epochs=1, batch_size=32, lr=0.05, schedule="onecycle", flip=False, precision="fp32")
MODELS = [("smallcnn", 0.25), ("resnet18-cifar", 0.0625)]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def make_dataset(n: int = 160, channels: int = 3, seed: int = 0, name: str = "quadrants") -> ImageDataset:
    """Dark noise plus a bright 4x4 square in the quadrant of the class (learnable in one epoch)."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % K)[torch.randperm(n, generator=g)]
    images = torch.randint(0, 90, (n, channels, SIZE, SIZE), dtype=torch.uint8, generator=g)
    for i, y in enumerate(labels.tolist()):
        r, c = 1 + 6 * (y // 2), 1 + 6 * (y % 2)
        images[i, :, r : r + 4, c : c + 4] = torch.randint(170, 256, (channels, 4, 4), dtype=torch.uint8, generator=g)
    return ImageDataset(images, labels, tuple(f"c{i}" for i in range(K)), name)


def settings(**kw) -> GradientMatchingSettings:
    base = dict(steps=4, retrain_every=0, batch_size=16, model="smallcnn", width=0.25, pretrain=TINY, retrain=TINY,
                precision="fp32", eps=EPS)
    base.update(kw)
    return GradientMatchingSettings(**base)


@pytest.fixture(scope="module")
def ds() -> ImageDataset:
    return make_dataset()


@pytest.fixture(scope="module")
def trained(ds):
    """{model name: a benign model trained one epoch on ``ds``} (copy before use if it may be modified)."""
    out = {}
    for name, width in MODELS:
        model, _ = train(build_model(name, K, 3, width, seed=0), ds, TINY, device="cpu", progress=False)
        out[name] = model.eval()
    return out


def loop_norms(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Reference: one autograd.grad per sample over all parameters, eval mode, float64 accumulation."""
    model.eval()
    params = list(model.parameters())
    out = []
    for i in range(len(images)):
        loss = F.cross_entropy(model(images[i : i + 1].float() / 255), labels[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        out.append(torch.sqrt(sum(g.double().pow(2).sum() for g in grads)))
    return torch.stack(out).float()


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


def _perturb_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (one gamma exactly 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(torch.rand(c, generator=g) - 0.5)
        first_bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        first_bn.weight[0] = 0.0  # (out - beta) / gamma would divide by zero here
    return model


# --------------------------------------------------------------------------- per-sample gradient norms
@pytest.mark.parametrize("name,width", MODELS)
def test_per_sample_grad_norms_match_loop_and_func(ds, trained, name, width):
    model = copy.deepcopy(trained[name])
    model.zero_grad(set_to_none=True)
    x, y = ds.images[:12], ds.labels[:12]
    ref = loop_norms(model, x, y)
    got = per_sample_grad_norms(model, x, y, batch_size=5)
    assert got.dtype == torch.float32 and got.shape == (12,)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(per_sample_grad_norms_func(model, x, y, batch_size=5), ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(per_sample_grad_norms(model, x, y, batch_size=64), got, rtol=1e-5, atol=1e-7)
    assert no_hooks_left(model)
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated into .grad


@pytest.mark.parametrize("name,width", MODELS)
def test_per_sample_grad_norms_batchnorm_zero_gamma(ds, name, width):
    """Eval-mode BatchNorm with arbitrary running statistics, including a channel with gamma == 0."""
    model = _perturb_bn(build_model(name, K, 3, width, seed=1))
    x, y = ds.images[20:28], ds.labels[20:28]
    got = per_sample_grad_norms(model, x, y, batch_size=3)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, loop_norms(model, x, y), rtol=1e-4, atol=1e-6)


class _BiasNet(nn.Module):
    """Conv with bias, stride and padding; BatchNorm without affine; Linear with bias; a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(4, affine=False)
        self.conv2 = nn.Conv2d(4, 4, 1, bias=True)
        self.fc = nn.Linear(4 * 6 * 6, K)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = h + torch.tanh(self.conv2(h))
        return self.fc(h.flatten(1))


def test_per_sample_grad_norms_bias_layers_and_1_channel():
    ds1 = make_dataset(20, channels=1, seed=3)
    torch.manual_seed(0)
    model = _BiasNet()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
    ref = loop_norms(model, ds1.images, ds1.labels)
    torch.testing.assert_close(per_sample_grad_norms(model, ds1.images, ds1.labels, batch_size=7), ref,
                               rtol=1e-4, atol=1e-6)
    # frozen parameters are left out of the norm (the layer's other parameters still count)
    model.conv.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = []
    for i in range(len(ds1)):
        loss = F.cross_entropy(model(ds1.images[i : i + 1].float() / 255), ds1.labels[i : i + 1])
        expected.append(torch.sqrt(sum(g.double().pow(2).sum() for g in torch.autograd.grad(loss, params))))
    torch.testing.assert_close(per_sample_grad_norms(model, ds1.images, ds1.labels),
                               torch.stack(expected).float(), rtol=1e-4, atol=1e-6)
    assert no_hooks_left(model)


@pytest.mark.parametrize("kernel,stride,padding,dilation,size", [
    ((3, 3), (1, 1), (1, 1), (1, 1), 12),   # output 12x12 > 64 positions: the grouped-convolution path
    ((3, 2), (2, 1), (1, 0), (1, 1), 20),   # non-square kernel, stride and padding, grouped path
    ((3, 3), (1, 1), (2, 2), (2, 2), 10),   # dilated convolution, grouped path
    ((1, 1), (2, 2), (0, 0), (1, 1), 17),   # 1x1 stride-2 shortcut with an odd input: 9x9 output, grouped path
    ((3, 3), (2, 2), (1, 1), (1, 1), 8),    # 4x4 output: the im2col path
    ((2, 3), (1, 2), (0, 1), (2, 1), 7),    # non-square everything, im2col path
])
def test_conv_weight_sq_norms_both_paths_match_autograd(kernel, stride, padding, dilation, size):
    """Each sample's conv weight-gradient norm, on both code paths, against autograd one sample at a time (the
    comments name the path a CPU chooses)."""
    from ubwlib.watermarks.gradient_matching import _conv_weight_sq_norms

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding, dilation=dilation, bias=False)
    a = torch.randn(6, 3, size, size)
    g = torch.randn((6,) + tuple(conv(a).shape[1:]))
    expected = []
    for i in range(len(a)):
        (gw,) = torch.autograd.grad(conv(a[i : i + 1]), conv.weight, g[i : i + 1])
        expected.append(gw.double().pow(2).sum())
    for path in (None, True, False):  # the CPU's choice, then each path forced (a GPU takes im2col everywhere)
        torch.testing.assert_close(_conv_weight_sq_norms(conv, a, g, grouped=path), torch.stack(expected).float(),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer", [nn.LayerNorm(8), nn.GroupNorm(2, 8)])
def test_per_sample_grad_norms_unsupported_layer(ds, layer):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), layer if isinstance(layer, nn.GroupNorm) else nn.Identity(),
                          nn.Flatten(), nn.Linear(8 * SIZE * SIZE, 8),
                          layer if isinstance(layer, nn.LayerNorm) else nn.Identity(), nn.Linear(8, K))
    x, y = ds.images[:4], ds.labels[:4]
    with pytest.raises(NotImplementedError, match=type(layer).__name__):
        per_sample_grad_norms(model, x, y)
    assert no_hooks_left(model)
    # the torch.func reference handles any layer
    torch.testing.assert_close(per_sample_grad_norms_func(model, x, y), loop_norms(model, x, y), rtol=1e-4, atol=1e-6)


def test_per_sample_grad_norms_no_hooks_left_after_error_in_forward(ds):
    """Hooks are removed even when the forward pass itself fails."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 8), nn.Linear(7, K))  # shape mismatch
    with pytest.raises(RuntimeError):
        per_sample_grad_norms(model, ds.images[:4], ds.labels[:4])
    assert no_hooks_left(model)


def test_per_sample_grad_norms_empty(trained):
    out = per_sample_grad_norms(trained["smallcnn"], torch.zeros(0, 3, SIZE, SIZE, dtype=torch.uint8),
                                torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)


# --------------------------------------------------------------------------- selection
def test_select_by_grad_norm_top_count(ds, trained):
    model = trained["smallcnn"]
    ref = loop_norms(model, ds.images, ds.labels)
    got = select_by_grad_norm(model, ds, 16, batch_size=50)
    assert got.dtype == torch.long
    assert torch.equal(got, got.sort().values)
    assert torch.equal(got, torch.topk(ref, 16).indices.sort().values)


def test_select_by_grad_norm_pool(ds, trained):
    model = trained["smallcnn"]
    pool = torch.nonzero(ds.labels == 2).flatten()
    ref = loop_norms(model, ds.images[pool], ds.labels[pool])
    got = select_by_grad_norm(model, ds, 7, pool=pool)
    assert set(got.tolist()) <= set(pool.tolist())
    assert torch.equal(got, pool[torch.topk(ref, 7).indices].sort().values)
    assert torch.equal(select_by_grad_norm(model, ds, len(pool), pool=pool), pool.sort().values)
    with pytest.raises(ValueError, match="cannot select"):
        select_by_grad_norm(model, ds, len(pool) + 1, pool=pool)
    with pytest.raises(ValueError):
        select_by_grad_norm(model, ds, len(ds) + 1)


def test_select_by_grad_norm_precomputed_norms(ds, trained):
    """Norms of the whole dataset computed once select the same poisons as a pass over the pool."""
    model = trained["smallcnn"]
    norms = per_sample_grad_norms(model, ds.images, ds.labels)
    pool = torch.nonzero(ds.labels == 2).flatten()
    assert torch.equal(select_by_grad_norm(model, ds, 7, pool=pool, norms=norms),
                       select_by_grad_norm(model, ds, 7, pool=pool))
    assert torch.equal(select_by_grad_norm(model, ds, 16, norms=norms), select_by_grad_norm(model, ds, 16))
    with pytest.raises(ValueError, match="one value per sample"):
        select_by_grad_norm(model, ds, 3, norms=norms[:-1])


# --------------------------------------------------------------------------- building blocks
def test_differentiable_augment():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(10, 3, SIZE, SIZE, generator=g)
    xr = x.clone().requires_grad_(True)
    out = differentiable_augment(xr, torch.Generator().manual_seed(1), 0.125, flip=True)
    assert out.shape == x.shape
    out.pow(2).sum().backward()
    assert xr.grad is not None and xr.grad.abs().sum() > 0
    # identity without shift and flip
    torch.testing.assert_close(differentiable_augment(x, torch.Generator().manual_seed(2), 0.0, flip=False), x,
                               rtol=0, atol=1e-6)
    # flip only: every sample is x or its mirror image, and both occur
    x = torch.rand(40, 3, SIZE, SIZE, generator=g)
    out = differentiable_augment(x, torch.Generator().manual_seed(3), 0.0, flip=True)
    kinds = []
    for a, b in zip(out, x):
        same, mirrored = torch.allclose(a, b, atol=1e-6), torch.allclose(a, b.flip(-1), atol=1e-6)
        assert same or mirrored
        kinds.append(mirrored)
    assert any(kinds) and not all(kinds)
    # seeded
    a = differentiable_augment(x, torch.Generator().manual_seed(4), 0.125)
    b = differentiable_augment(x, torch.Generator().manual_seed(4), 0.125)
    c = differentiable_augment(x, torch.Generator().manual_seed(5), 0.125)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_differentiable_augment_integer_shift():
    """A shift of exactly one pixel (2/W in normalised units) moves the image by one pixel, zero fill."""
    x = torch.rand(1, 1, 8, 8)
    theta = torch.tensor([[[1.0, 0.0, 2 / 8], [0.0, 1.0, 0.0]]])
    # the same construction as differentiable_augment, with a hand-chosen shift, as a sanity check of units
    grid = F.affine_grid(theta, [1, 1, 8, 8], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    torch.testing.assert_close(out[..., :-1], x[..., 1:])
    assert (out[..., -1] == 0).all()


def test_passenger_loss():
    g = torch.Generator().manual_seed(0)
    target = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    norm = torch.sqrt(sum((t * t).sum() for t in target))
    assert abs(float(passenger_loss([t.clone() for t in target], target, norm))) < 1e-6
    assert abs(float(passenger_loss([3 * t for t in target], target, norm))) < 1e-6  # scale-free
    assert abs(float(passenger_loss([-t for t in target], target, norm)) - 2) < 1e-6
    # orthogonal: the same vector with its two halves swapped in sign structure
    a = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])]
    b = [torch.tensor([0.0, 5.0]), torch.tensor([3.0, 0.0])]
    nb = torch.sqrt(sum((t * t).sum() for t in b))
    assert abs(float(passenger_loss(a, b, nb)) - 1) < 1e-6
    # against a hand-written cosine
    h = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    fa, fb = torch.cat([t.flatten() for t in h]), torch.cat([t.flatten() for t in target])
    assert float(passenger_loss(h, target, norm)) == pytest.approx(1 - float(F.cosine_similarity(fa, fb, dim=0)),
                                                                    abs=1e-6)


def test_apply_delta():
    images = torch.tensor([100, 100, 100, 250, 3, 0, 255], dtype=torch.uint8).view(1, 1, 1, 7)
    delta = torch.tensor([0.4, 0.6, -0.6, 10.0, -10.0, -1.0, 1.0]).view(1, 1, 1, 7) / 255
    out = apply_delta(images, delta)
    assert out.dtype == torch.uint8
    assert out.flatten().tolist() == [100, 101, 99, 255, 0, 0, 255]
    assert torch.equal(apply_delta(images, torch.zeros(1, 1, 1, 7)), images)
    assert torch.equal(apply_delta(images, torch.full((1, 1, 1, 7), 2.0)), torch.full_like(images, 255))


def test_settings_validation_and_lr_at():
    with pytest.raises(ValueError):
        GradientMatchingSettings(eps=0)
    with pytest.raises(ValueError):
        GradientMatchingSettings(init="gaussian")
    with pytest.raises(ValueError):
        GradientMatchingSettings(max_shift=0.5)
    s = GradientMatchingSettings()  # the public code: x0.1 at steps 93, 156, 218 of 250
    assert [s.lr_at(i) for i in (0, 92, 93, 155, 156, 217, 218, 249)] == pytest.approx(
        [0.025, 0.025, 0.0025, 0.0025, 0.00025, 0.00025, 0.000025, 0.000025])


# --------------------------------------------------------------------------- craft()
def _ubwc_like_target(source_images: torch.Tensor, source_labels: torch.Tensor, lam: float = 2.0):
    """A target gradient in the spirit of UBW-C: grad_w of -(CE + lam * H) on patched source images."""
    patch = resized_square(source_images.shape[1], 8)

    def target_gradient(model: nn.Module) -> list[torch.Tensor]:
        x = paste_random(source_images, patch, torch.Generator().manual_seed(7)).float() / 255
        logp = F.log_softmax(model(x), 1)
        loss = -(F.nll_loss(logp, source_labels) + lam * (-(logp.exp() * logp).sum(1).mean()))
        return list(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))

    return target_gradient


@pytest.fixture(scope="module")
def target_fn(ds):
    src = torch.nonzero(ds.labels == 0).flatten()
    return _ubwc_like_target(ds.images[src], ds.labels[src])


@pytest.fixture(scope="module")
def poison_idx(ds, trained):
    return select_by_grad_norm(trained["smallcnn"], ds, 24)


def _check_budget(ds: ImageDataset, idx: torch.Tensor, result, eps: float) -> None:
    base = ds.images[idx]
    assert result.images.dtype == torch.uint8 and result.images.shape == base.shape
    diff = (result.images.int() - base.int()).abs()
    assert int(diff.max()) <= math.ceil(255 * eps)
    assert int(result.images.min()) >= 0 and int(result.images.max()) <= 255
    assert result.delta.shape == base.shape and result.delta.dtype == torch.float32
    assert float(result.delta.abs().max()) <= eps + 1e-6
    b = base.float() / 255
    assert float((b + result.delta).min()) >= -1e-6 and float((b + result.delta).max()) <= 1 + 1e-6
    assert torch.equal(result.images, apply_delta(base, result.delta))


def test_craft_reduces_passenger_loss(ds, trained, target_fn, poison_idx):
    s = settings(steps=6, init="zero", augment=False, lr_milestones=())
    labels_before = ds.labels.clone()
    res = craft(ds, poison_idx, target_fn, s, seed=0, surrogate=copy.deepcopy(trained["smallcnn"]), device="cpu",
                progress=False)
    assert torch.equal(ds.labels, labels_before)
    loss = res.history["passenger loss"].tolist()
    assert len(loss) == 6
    assert loss[-1] < loss[0] - 1e-3, loss
    assert res.resumed_from == 0
    _check_budget(ds, poison_idx, res, s.eps)
    assert res.delta.abs().max() > 0  # something was crafted


def test_craft_budget_history_retrains_and_determinism(ds, trained, target_fn, poison_idx):
    s = settings(steps=5, retrain_every=2, eps=8 / 255, augment=True, init="uniform")
    calls = []

    def monitor(model):
        calls.append(model)
        return {"probe": float(len(calls))}

    sur = trained["smallcnn"]
    given = copy.deepcopy(sur)
    res = craft(ds, poison_idx, target_fn, s, seed=3, surrogate=given, monitor=monitor, device="cpu",
                progress=False)
    _check_budget(ds, poison_idx, res, s.eps)
    h = res.history
    assert list(h.columns) == ["restart", "step", "lr", "passenger loss", "held-out passenger loss", "seconds"]
    assert (h["restart"] == 0).all() and h["held-out passenger loss"].isna().all()  # no held-out models asked
    assert h["step"].tolist() == [1, 2, 3, 4, 5]
    assert h["lr"].tolist() == pytest.approx([s.lr_at(i) for i in range(5)])
    assert len(set(h["lr"].round(12))) > 1  # the milestones (2, 3, 4 of 5) do decay the lr
    assert h["passenger loss"].between(0, 2).all()
    assert res.retrains["step"].tolist() == [0, 2, 4]
    assert res.retrains["probe"].tolist() == [1.0, 2.0, 3.0]
    assert "train seconds" in res.retrains.columns
    assert res.surrogate is calls[-1]  # the last retrained surrogate is returned
    # the given surrogate's weights were not changed
    assert all(torch.equal(v, sur.state_dict()[k]) for k, v in given.state_dict().items())

    again = craft(ds, poison_idx, target_fn, s, seed=3, surrogate=copy.deepcopy(sur), device="cpu", progress=False)
    assert torch.equal(res.delta, again.delta) and torch.equal(res.images, again.images)
    other = craft(ds, poison_idx, target_fn, s, seed=4, surrogate=copy.deepcopy(sur), device="cpu", progress=False)
    assert not torch.equal(res.delta, other.delta)


@pytest.mark.parametrize("matching", ["cosine", "l2"])
def test_passenger_input_grad_equals_the_double_backward(ds, trained, matching):
    """The torch.func form (grad of the parameter gradient's passenger loss in the input) gives the passenger loss
    and its input gradient of the autograd double backward, for an ensemble of two models."""
    models = [trained["smallcnn"], build_model("smallcnn", K, 3, 0.25, seed=5).eval()]
    x = ds.images[:12].float() / 255
    y = ds.labels[:12]
    targets = []
    for i, m in enumerate(models):
        loss = F.cross_entropy(m(x.flip(0)), (y + i + 1) % K)
        t = [g.detach() for g in torch.autograd.grad(loss, list(m.parameters()))]
        targets.append((t, torch.sqrt(sum((v * v).sum() for v in t))))
    xr = x.clone().requires_grad_(True)
    want = gm.ensemble_passenger_loss(models, targets, xr, y, matching=matching)
    (want_gx,) = torch.autograd.grad(want, xr)
    gx, loss = gm.passenger_input_grad(models, targets, x, y, matching=matching)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gx, want_gx, rtol=1e-5, atol=1e-8)
    assert float(want_gx.abs().max()) > 0


def test_the_compiled_passenger_gradient_on_cuda_uses_cuda_graphs_and_owns_its_outputs(ds, trained, monkeypatch):
    """On a CUDA device: compiled with mode="reduce-overhead", each call marked as a new step, and the outputs
    cloned (a CUDA graph's next replay overwrites its own). Run with CPU tensors and torch.compile as the
    identity."""
    kwargs, marks = [], []
    monkeypatch.setattr(gm.torch, "compile", lambda fn, **kw: kwargs.append(kw) or fn)
    monkeypatch.setattr(gm.torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    fast = gm.CompiledPassengerGrad(torch.device("cuda"))
    m = trained["smallcnn"]
    x, y = ds.images[:8].float() / 255, ds.labels[:8]
    t = [torch.ones_like(p) for p in m.parameters()]
    targets = [(t, torch.sqrt(sum((v * v).sum() for v in t)))]
    gx, loss = fast([m], targets, x, y, "fp32", "cosine")
    want_gx, want_loss = gm.passenger_input_grad([m], targets, x, y)
    assert kwargs == [{"mode": "reduce-overhead", "dynamic": False}] and marks == [1]
    assert torch.equal(gx, want_gx) and torch.equal(loss, want_loss)


def test_craft_with_a_failed_compilation_is_the_eager_crafting(ds, trained, target_fn, poison_idx, monkeypatch):
    s = settings(steps=2, augment=True)
    eager = craft(ds, poison_idx, target_fn, s, seed=0, surrogate=copy.deepcopy(trained["smallcnn"]), device="cpu",
                  progress=False, compile="off")

    def broken(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no backend")
        return compiled

    monkeypatch.setattr(gm.torch, "compile", broken)
    with pytest.warns(UserWarning, match=r"torch.compile failed on the crafting step \(RuntimeError: no backend\)"):
        fallen = craft(ds, poison_idx, target_fn, s, seed=0, surrogate=copy.deepcopy(trained["smallcnn"]),
                       device="cpu", progress=False, compile="on")
    assert torch.equal(fallen.delta, eager.delta)
    assert fallen.history["passenger loss"].tolist() == eager.history["passenger loss"].tolist()


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_crafting_matches_the_eager_crafting(ds, trained, target_fn, poison_idx):
    """Compiled (inductor on the CPU), full batches take passenger_input_grad's single graph and the last partial
    batch the eager double backward; the losses agree to float rounding and the perturbations, stepped by the
    signs of their gradients, almost everywhere."""
    s = settings(steps=3, augment=True, batch_size=10)  # 24 poisons: two full batches and one of 4
    runs = {mode: craft(ds, poison_idx, target_fn, s, seed=0, surrogate=copy.deepcopy(trained["smallcnn"]),
                        device="cpu", progress=False, compile=mode) for mode in ("off", "on")}
    assert runs["on"].history["passenger loss"].tolist() == pytest.approx(
        runs["off"].history["passenger loss"].tolist(), rel=1e-5)
    same = (runs["on"].delta == runs["off"].delta).float().mean()
    assert float(same) > 0.99, float(same)


def test_craft_trains_surrogate_when_none_given(ds, target_fn):
    idx = torch.arange(0, 160, 20)
    s = settings(steps=1, batch_size=8)
    res = craft(ds, idx, target_fn, s, seed=0, device="cpu", progress=False)
    assert res.retrains["step"].tolist() == [0]
    assert isinstance(res.surrogate, type(build_model("smallcnn", K, 3, 0.25)))
    _check_budget(ds, idx, res, s.eps)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("retrain_every,fail_at_step,retrain_steps", [(2, 4, [0, 2, 4]), (2, 5, [0, 2, 4]),
                                                                     (3, 4, [0, 3])])
def test_craft_resumes_to_the_same_result(ds, trained, target_fn, poison_idx, tmp_path, monkeypatch, retrain_every,
                                          fail_at_step, retrain_steps):
    """Interrupted during step ``fail_at_step`` (0-based), then resumed from the last checkpoint (step 4):
    the same delta, images, history and retrains as an uninterrupted run, whether the surrogate is retrained
    right after the resume point (retrain_every=2) or must come back from the checkpoint (retrain_every=3)."""
    s = settings(steps=6, retrain_every=retrain_every, checkpoint_every=2, augment=True, init="uniform", model="resnet18-cifar",
                 width=0.0625)
    sur = trained["resnet18-cifar"]
    kw = dict(seed=1, device="cpu", progress=False)
    ref = craft(ds, poison_idx, target_fn, s, surrogate=copy.deepcopy(sur), **kw)

    batches = math.ceil(len(poison_idx) / s.batch_size)
    real = gm.passenger_loss
    count = {"n": 0}

    def failing(*a, **k):
        if count["n"] == fail_at_step * batches + 1:  # in the middle of step fail_at_step
            raise _Interrupt
        count["n"] += 1
        return real(*a, **k)

    ckpt = Cache(tmp_path).checkpoint("craft-test", {"x": 1}, "1")
    monkeypatch.setattr(gm, "passenger_loss", failing)
    with pytest.raises(_Interrupt):
        craft(ds, poison_idx, target_fn, s, surrogate=copy.deepcopy(sur), checkpoint=ckpt, **kw)
    monkeypatch.setattr(gm, "passenger_loss", real)
    state = ckpt.load()
    assert state is not None and state.step == 4

    resumed = craft(ds, poison_idx, target_fn, s, surrogate=copy.deepcopy(sur), checkpoint=ckpt, **kw)
    assert resumed.resumed_from == 4
    assert torch.equal(resumed.delta, ref.delta)
    assert torch.equal(resumed.images, ref.images)
    assert resumed.history["step"].tolist() == ref.history["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert resumed.history["passenger loss"].tolist() == ref.history["passenger loss"].tolist()
    assert resumed.history["lr"].tolist() == ref.history["lr"].tolist()
    assert resumed.retrains["step"].tolist() == ref.retrains["step"].tolist() == retrain_steps
    for (k, a), b in zip(resumed.surrogate.state_dict().items(), ref.surrogate.state_dict().values()):
        assert torch.equal(a, b), k
    assert ckpt.load().step == 6

    # a finished checkpoint: nothing left to do, same result
    done = craft(ds, poison_idx, target_fn, s, surrogate=copy.deepcopy(sur), checkpoint=ckpt, **kw)
    assert done.resumed_from == 6 and torch.equal(done.delta, ref.delta)


# --------------------------------------------------------------------------- UBW-C
def test_ubwc_identity_and_settings():
    assert REGISTRY["ubw-c"] is UBWC
    assert UBWC.name == "ubw-c" and UBWC.label_type == "clean" and UBWC.targeted is False
    s = UBWCSettings()
    assert s.lam == 2.0 and s.poisoning_rate == 0.1 and s.source == 0 and s.patch_size == 8
    assert s.crafting.eps == pytest.approx(16 / 255) and s.crafting.steps == 250 and s.crafting.lr == 0.025
    with pytest.raises(ValueError, match="lam"):
        UBWCSettings(lam=-0.5)
    for bad in (0, -0.1, 1.5, True):
        with pytest.raises(ValueError):
            UBWCSettings(poisoning_rate=bad)


def test_ubwc_target_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, K, generator=g) * 3
    labels = torch.randint(0, K, (9,), generator=g)
    for lam in (0.0, 2.0, 5.0):
        wm = UBWC(lam=lam)
        p = torch.softmax(logits.double(), 1)
        ce = -torch.log(p[torch.arange(9), labels]).mean()
        h = -(p * torch.log(p)).sum(1).mean()
        assert float(wm._target_loss(logits, labels)) == pytest.approx(float(-(ce + lam * h)), rel=1e-5)
    # its descent direction ascends CE + lam * H
    z = logits.clone().requires_grad_(True)
    (gt,) = torch.autograd.grad(-UBWC(lam=2.0)._target_loss(z, labels), z)
    z2 = logits.clone().requires_grad_(True)
    logp = F.log_softmax(z2, 1)
    (ga,) = torch.autograd.grad(F.nll_loss(logp, labels) - 2.0 * (logp.exp() * logp).sum(1).mean(), z2)
    assert float((gt * ga).sum()) > 0


@pytest.fixture(scope="module")
def ubwc_release(ds, trained):
    gms = settings(steps=2, retrain_every=0, batch_size=16)
    wm = UBWC(poisoning_rate=0.1, crafting=gms)
    sur = copy.deepcopy(trained["smallcnn"])
    expected = select_by_grad_norm(sur, ds, round(0.1 * len(ds)))
    images_before, labels_before = ds.images.clone(), ds.labels.clone()
    test = make_dataset(40, seed=9, name="quadrants-test")
    released = wm.watermark(ds, seed=0, surrogate=sur, monitor_set=test, device="cpu", progress=False)
    assert torch.equal(ds.images, images_before) and torch.equal(ds.labels, labels_before)
    return wm, released, expected


def test_ubwc_watermark(ds, ubwc_release):
    wm, released, expected = ubwc_release
    assert len(released.indices) == round(0.1 * len(ds)) == 16
    assert torch.equal(released.indices, expected)
    assert wm._pool(ds) == (None, 16)  # candidates: every class (the selection above is over the whole set)
    assert torch.equal(released.dataset.labels, ds.labels)
    changed = torch.nonzero((released.dataset.images != ds.images).flatten(1).any(1)).flatten()
    assert set(changed.tolist()) <= set(released.indices.tolist())
    assert len(changed) > 0
    diff = (released.dataset.images.int() - ds.images.int()).abs()
    assert int(diff.max()) <= math.ceil(255 * 16 / 255)
    key = released.key
    assert key.method == "ubw-c" and key.target is None
    assert torch.equal(key.tensors["patch"], resized_square(3, 8))
    rep = released.report
    assert set(rep) >= {"history", "retrains", "seconds", "delta", "resumed_from"}
    assert len(rep["history"]) == 2 and rep["resumed_from"] == 0
    assert rep["delta"].shape == (16, 3, SIZE, SIZE) and float(rep["delta"].abs().max()) <= 16 / 255 + 1e-6
    assert set(rep["seconds"]) == {"surrogate", "selection", "crafting", "retraining"}
    assert rep["seconds"]["crafting"] > 0
    assert {"surrogate accuracy", "D_s (triggered source)", "ASR-A (triggered source)"} <= set(rep["retrains"].columns)
    assert "ASR (triggered source)" not in rep["retrains"].columns  # untargeted


def _single_window(original: torch.Tensor, triggered: torch.Tensor, patch: torch.Tensor) -> tuple[int, int]:
    """The one position (y, x) such that ``triggered`` equals ``original`` outside the p x p window there and
    the patch inside it; fails if there is none."""
    c, h, w = original.shape
    p = patch.shape[-1]
    found = []
    for y in range(h - p + 1):
        for x in range(w - p + 1):
            expect = original.clone()
            expect[:, y : y + p, x : x + p] = patch
            if torch.equal(expect, triggered):
                found.append((y, x))
    assert found, "the triggered image is not the original with the patch pasted in one window"
    return found[0]


def test_ubwc_trigger(ds, ubwc_release):
    wm, released, _ = ubwc_release
    images = ds.images[:30]
    patch = resized_square(3, 8)
    out = trigger(images, released.key, seed=5)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    positions = {_single_window(a, b, patch) for a, b in zip(images, out)}
    assert len(positions) > 3  # random positions
    assert torch.equal(out, wm.trigger(images, released.key, seed=5))
    assert torch.equal(out, trigger(images, released.key, seed=5))
    assert not torch.equal(out, trigger(images, released.key, seed=6))
    assert torch.equal(trigger(images, released.key), trigger(images, released.key))  # default seed: the key's


# --------------------------------------------------------------------------- Sleeper Agent
def test_sleeper_agent_settings():
    assert REGISTRY["sleeper-agent"] is SleeperAgent
    assert SleeperAgent.label_type == "clean" and SleeperAgent.targeted is True
    with pytest.raises(ValueError, match="differ"):
        SleeperAgentSettings(source=2, target=2)
    with pytest.raises(ValueError):
        SleeperAgentSettings(poisoning_rate=0)


def test_sleeper_agent_watermark(ds, trained):
    sur = trained["smallcnn"]
    wm = SleeperAgent(poisoning_rate=0.1, source=0, target=1, crafting=settings(steps=1))
    released = wm.watermark(ds, seed=0, surrogate=copy.deepcopy(sur), device="cpu", progress=False)
    target_pool = torch.nonzero(ds.labels == 1).flatten()
    assert len(released.indices) == 16
    assert (ds.labels[released.indices] == 1).all()
    assert torch.equal(released.indices, select_by_grad_norm(sur, ds, 16, pool=target_pool))
    assert torch.equal(released.dataset.labels, ds.labels)
    changed = torch.nonzero((released.dataset.images != ds.images).flatten(1).any(1)).flatten()
    assert set(changed.tolist()) <= set(released.indices.tolist())
    key = released.key
    assert key.target == 1 == wm.settings.target and key.method == "sleeper-agent"
    patch = key.tensors["patch"]
    assert patch.shape == (3, 8, 8) and patch.dtype == torch.uint8
    assert set(patch.unique().tolist()) <= {0, 255} and len(patch.unique()) == 2
    out = trigger(ds.images[:10], key, seed=1)
    for a, b in zip(ds.images[:10], out):
        _single_window(a, b, patch)

    other = SleeperAgent(poisoning_rate=0.1, crafting=settings(steps=0, init="zero")).watermark(
        ds, seed=1, surrogate=copy.deepcopy(sur), device="cpu", progress=False)
    assert not torch.equal(other.key.tensors["patch"], patch)  # the patch is drawn from the seed
    assert len(other.report["history"]) == 0 and torch.equal(other.dataset.images, ds.images)


def test_sleeper_agent_cap_warning(ds, trained):
    n_target = int((ds.labels == 1).sum())
    wm = SleeperAgent(poisoning_rate=0.5, crafting=settings(steps=0))
    with pytest.warns(UserWarning) as record:
        released = wm.watermark(ds, seed=0, surrogate=copy.deepcopy(trained["smallcnn"]), device="cpu",
                                progress=False)
    msgs = [str(w.message) for w in record if "sleeper-agent" in str(w.message)]
    assert msgs and str(round(0.5 * len(ds))) in msgs[0] and str(n_target) in msgs[0]
    assert len(released.indices) == n_target and (ds.labels[released.indices] == 1).all()


def test_sleeper_agent_target_out_of_range(ds, trained):
    wm = SleeperAgent(target=K, source=0, crafting=settings(steps=0))
    with pytest.raises(ValueError, match="target"):
        wm.watermark(ds, seed=0, surrogate=copy.deepcopy(trained["smallcnn"]), device="cpu", progress=False)


# --------------------------------------------------------------------------- patch helpers
def test_resized_square():
    for c in (1, 3):
        p = resized_square(c, 8)
        assert p.shape == (c, 8, 8) and p.dtype == torch.uint8
        assert all(torch.equal(p[0], p[i]) for i in range(c))
    p = resized_square(3, 8)[0]
    ref = F.interpolate(SQUARE.float()[None, None] * 255, size=(8, 8), mode="bilinear", align_corners=False)[0, 0]
    assert torch.equal(p, ref.round().clamp(0, 255).to(torch.uint8))
    # SQUARE rows (0,0,1), (0,1,0), (1,0,1): dark top-left, white top-right / bottom-left / bottom-right corners
    assert int(p[0, 0]) == 0 and int(p[0, -1]) == 255 and int(p[-1, 0]) == 255 and int(p[-1, -1]) == 255
    assert int(p[3:5, 3:5].min()) > 128  # the white centre
    assert int(p[0, 3:5].max()) < 128  # the dark top-middle
    assert torch.equal(resized_square(1, 3)[0], SQUARE * 255)  # size 3: the square itself


def test_paste_random():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 200, (40, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    patch = torch.randint(0, 256, (3, 5, 4), dtype=torch.uint8, generator=g)
    before = images.clone()
    out = paste_random(images, patch, torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(images, before)  # the input is not modified
    positions = set()
    for a, b in zip(images, out):
        hits = [(y, x) for y in range(SIZE - 5 + 1) for x in range(SIZE - 4 + 1)
                if torch.equal(b[:, y : y + 5, x : x + 4], patch)]
        assert hits
        y, x = hits[0]
        mask = torch.ones(SIZE, SIZE, dtype=torch.bool)
        mask[y : y + 5, x : x + 4] = False
        assert torch.equal(a[:, mask], b[:, mask])
        positions.add((y, x))
    assert len(positions) > 10
    assert torch.equal(out, paste_random(images, patch, torch.Generator().manual_seed(1)))
    # a patch as large as the image covers it; a larger one does not fit
    full = torch.full((3, SIZE, SIZE), 7, dtype=torch.uint8)
    assert (paste_random(images, full, torch.Generator()) == 7).all()
    with pytest.raises(ValueError, match="does not fit"):
        paste_random(images, torch.zeros(3, SIZE + 1, 4, dtype=torch.uint8), torch.Generator())
    with pytest.raises(ValueError):
        paste_random(images, torch.zeros(3, 4, SIZE + 1, dtype=torch.uint8), torch.Generator())


# --------------------------------------------------------------------------- the levers of transfer (issue 9)
def test_lever_settings_validation():
    s = GradientMatchingSettings()
    assert (s.ensemble, s.restarts, s.held_out, s.fresh_seeds, s.augment, s.selection) == (
        1, 1, 0, True, "shift", "grad-norm")
    assert GradientMatchingSettings(augment=True).augment == "shift"
    assert GradientMatchingSettings(augment=False).augment == "none"
    for bad in (dict(augment="crop"), dict(selection="norm"), dict(ensemble=0), dict(restarts=0),
                dict(held_out=-1), dict(diagnostic_every=0)):
        with pytest.raises(ValueError):
            GradientMatchingSettings(**bad)


def test_derived_seed_distinct_and_deterministic():
    roles = [("member", 1), ("member", 2), ("held-out", 0), ("retrain", 0, 2, 0), ("retrain", 0, 2, 1),
             ("retrain", 0, 4, 0), ("retrain", 1, 2, 0), ("restart", 1, "init")]
    seeds = [gm.derived_seed(0, *r) for r in roles]
    assert len(set(seeds)) == len(seeds)
    assert seeds == [gm.derived_seed(0, *r) for r in roles]
    assert gm.derived_seed(1, "member", 1) != seeds[0]
    assert all(0 <= x < 2**31 and x > 1000 for x in seeds)  # far from the small seeds of victims


def test_ensemble_passenger_loss_is_the_mean_of_single_losses(ds, trained, target_fn):
    models = [copy.deepcopy(trained["smallcnn"]), build_model("smallcnn", K, 3, 0.25, seed=5).eval()]
    targets = []
    for m in models:
        t = [g.detach() for g in target_fn(m)]
        targets.append((t, torch.sqrt(sum((g * g).sum() for g in t))))
    x = ds.images[:16].float() / 255
    y = ds.labels[:16]
    both = gm.ensemble_passenger_loss(models, targets, x, y, create_graph=False)
    singles = []
    for m, (t, tn) in zip(models, targets):
        params = [p for p in m.parameters() if p.requires_grad]
        grads = torch.autograd.grad(F.cross_entropy(m(x), y), params)
        flat_g, flat_t = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in t])
        singles.append(1 - float(F.cosine_similarity(flat_g, flat_t, dim=0)))
    assert singles[0] != pytest.approx(singles[1], abs=1e-3)
    assert float(both) == pytest.approx(sum(singles) / 2, abs=1e-5)
    # and it is differentiable in the poisons (the crafting needs the double backward)
    xd = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(gm.ensemble_passenger_loss(models, targets, xd, y), xd)
    assert g.abs().sum() > 0


def test_transfer_loss_matches_the_batch_losses(ds, trained, target_fn):
    m = copy.deepcopy(trained["smallcnn"])
    t = [g.detach() for g in target_fn(m)]
    tn = torch.sqrt(sum((g * g).sum() for g in t))
    x, y = ds.images[:20].float() / 255, ds.labels[:20]
    want = (float(gm.ensemble_passenger_loss([m], [(t, tn)], x[:8], y[:8], create_graph=False)) * 8
            + float(gm.ensemble_passenger_loss([m], [(t, tn)], x[8:16], y[8:16], create_graph=False)) * 8
            + float(gm.ensemble_passenger_loss([m], [(t, tn)], x[16:], y[16:], create_graph=False)) * 4) / 20
    assert gm.transfer_loss([m], [(t, tn)], x, y, batch_size=8) == pytest.approx(want, abs=1e-6)
    assert math.isnan(gm.transfer_loss([], [], x, y, batch_size=8))


def test_crafting_augment_trainer_mode_is_the_trainers_augmentation():
    from ubwlib.train import augment_batch

    x = torch.rand(6, 1, 10, 10)
    cfg = TINY.replace(crop_padding=2, flip=True)
    s = settings(augment="trainer", retrain=cfg)
    got = gm.crafting_augment(x, s, torch.Generator().manual_seed(3))
    want = augment_batch(x, flip=True, crop_padding=2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, want)
    xd = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(gm.crafting_augment(xd, s, torch.Generator().manual_seed(3)).sum(), xd)
    assert g.shape == x.shape and 0 < float(g.sum()) <= x.numel()  # each output pixel comes from one input pixel
    assert torch.equal(gm.crafting_augment(x, settings(augment="none"), torch.Generator()), x)


def _record_training(monkeypatch):
    """Patch the trainer used by craft() to record (the model's initial weights digest, the config seed)."""
    seen = []
    real = gm.train

    def recording(model, data, cfg, **kw):
        seen.append((float(sum(p.detach().double().sum() for p in model.parameters())), cfg.seed))
        return real(model, data, cfg, **kw)

    monkeypatch.setattr(gm, "train", recording)
    return seen


@pytest.mark.parametrize("fresh", [True, False])
def test_retraining_seeds_differ(ds, trained, target_fn, poison_idx, monkeypatch, fresh):
    seen = _record_training(monkeypatch)
    s = settings(steps=5, retrain_every=2, fresh_seeds=fresh, ensemble=2)
    craft(ds, poison_idx, target_fn, s, seed=3, surrogate=copy.deepcopy(trained["smallcnn"]), device="cpu",
          progress=False)
    # member 1 trained once on the benign data, then both members retrained at steps 2 and 4
    assert len(seen) == 1 + 2 * 2
    retrain_inits = [w for w, _ in seen[1:]]
    retrain_seeds = [sd for _, sd in seen[1:]]
    if fresh:
        assert len(set(retrain_inits)) == 4 and len(set(retrain_seeds)) == 4  # new weights and data order each time
        assert 3 not in retrain_seeds and TINY.seed not in retrain_seeds
    else:  # each member reuses its seed: member 0 the crafting seed and the retrain config as given
        assert retrain_inits[0] == retrain_inits[2] and retrain_inits[1] == retrain_inits[3]
        assert retrain_inits[0] != retrain_inits[1]
        assert retrain_seeds[0] == retrain_seeds[2] == TINY.seed
        assert retrain_seeds[1] == retrain_seeds[3] == seen[0][1] == gm.derived_seed(3, "member", 1)


def test_held_out_diagnostic_is_logged(ds, trained, target_fn, poison_idx):
    s = settings(steps=4, held_out=1, diagnostic_every=2)
    res = craft(ds, poison_idx, target_fn, s, seed=0, surrogate=copy.deepcopy(trained["smallcnn"]), device="cpu",
                progress=False)
    h = res.history
    assert h["step"].tolist() == [0, 1, 2, 3, 4]
    measured = h.dropna(subset=["held-out passenger loss"])
    assert measured["step"].tolist() == [0, 2, 4]
    assert measured["held-out passenger loss"].between(0, 2).all()
    assert math.isnan(h["passenger loss"].iloc[0])  # step 0: only the diagnostic of the random start
    # the held-out model took no part in the crafting: its seed is a derived one, never the crafting seed
    held = build_model("smallcnn", K, 3, 0.25, seed=gm.derived_seed(0, "held-out", 0))
    held, _ = train(held, ds, TINY.replace(seed=gm.derived_seed(0, "held-out", 0)), device="cpu", progress=False)
    t = [g.detach() for g in target_fn(held)]
    tn = torch.sqrt(sum((g * g).sum() for g in t))
    base = ds.images[poison_idx].float() / 255
    want = gm.transfer_loss([held], [(t, tn)], base + res.delta, ds.labels[poison_idx], s.batch_size)
    assert float(h["held-out passenger loss"].iloc[-1]) == pytest.approx(want, abs=1e-5)


def test_restarts_keep_the_best(ds, trained, target_fn, poison_idx):
    s = settings(steps=3, restarts=3, held_out=1, diagnostic_every=3)
    kw = dict(seed=2, surrogate=copy.deepcopy(trained["smallcnn"]), device="cpu", progress=False)
    res = craft(ds, poison_idx, target_fn, s, **kw)
    h = res.history
    assert sorted(set(h["restart"])) == [0, 1, 2]
    final = h[h["step"] == 3].set_index("restart")["held-out passenger loss"]
    assert len(final) == 3 and final.nunique() == 3
    assert res.best_restart == int(final.idxmin())
    # restart 0 is the single run; the released delta is the best restart's
    single = craft(ds, poison_idx, target_fn, dataclasses.replace(s, restarts=1), **{**kw, "surrogate":
                                                                                       copy.deepcopy(trained["smallcnn"])})
    assert single.history["held-out passenger loss"].iloc[-1] == pytest.approx(final.loc[0], abs=1e-6)
    if res.best_restart == 0:
        assert torch.equal(res.delta, single.delta)
    else:
        assert not torch.equal(res.delta, single.delta)
    # without held-out models the crafting loss decides
    res2 = craft(ds, poison_idx, target_fn, dataclasses.replace(s, held_out=0), **{**kw, "surrogate":
                                                                                     copy.deepcopy(trained["smallcnn"])})
    fin2 = res2.history[res2.history["step"] == 3].set_index("restart")["passenger loss"]
    assert res2.best_restart == int(fin2.idxmin())


def test_craft_with_levers_resumes_to_the_same_result(ds, trained, target_fn, poison_idx, tmp_path, monkeypatch):
    """Two restarts, an ensemble of 2, a held-out model and fresh retraining seeds, interrupted in the middle of
    the second restart: the resumed run equals the uninterrupted one."""
    s = settings(steps=4, retrain_every=2, checkpoint_every=1, restarts=2, ensemble=2, held_out=1,
                 diagnostic_every=2)
    kw = dict(seed=1, device="cpu", progress=False)
    ref = craft(ds, poison_idx, target_fn, s, surrogate=copy.deepcopy(trained["smallcnn"]), **kw)
    batches = math.ceil(len(poison_idx) / s.batch_size)
    real = gm.crafting_augment  # called once per crafting batch (not by the diagnostic)
    count = {"n": 0}

    def failing(*a, **k):
        if count["n"] == (4 + 2) * batches + 1:  # in the middle of restart 1's step 2 (0-based)
            raise _Interrupt
        count["n"] += 1
        return real(*a, **k)

    ckpt = Cache(tmp_path).checkpoint("craft-levers", {"x": 2}, "1")
    monkeypatch.setattr(gm, "crafting_augment", failing)
    with pytest.raises(_Interrupt):
        craft(ds, poison_idx, target_fn, s, surrogate=copy.deepcopy(trained["smallcnn"]), checkpoint=ckpt, **kw)
    monkeypatch.setattr(gm, "crafting_augment", real)
    assert ckpt.load().step == 6  # restart 1, after its step 2
    resumed = craft(ds, poison_idx, target_fn, s, surrogate=copy.deepcopy(trained["smallcnn"]), checkpoint=ckpt, **kw)
    assert resumed.resumed_from == 6
    assert torch.equal(resumed.delta, ref.delta) and resumed.best_restart == ref.best_restart
    pd.testing.assert_frame_equal(resumed.history.drop(columns="seconds"), ref.history.drop(columns="seconds"))
    assert resumed.retrains["step"].tolist() == ref.retrains["step"].tolist()


def test_random_selection(ds, trained):
    a = UBWC(poisoning_rate=0.1, crafting=settings(steps=0, selection="random")).watermark(
        ds, seed=0, surrogate=trained["smallcnn"], progress=False)
    b = UBWC(poisoning_rate=0.1, crafting=settings(steps=0, selection="random")).watermark(
        ds, seed=0, surrogate=trained["smallcnn"], progress=False)
    c = UBWC(poisoning_rate=0.1, crafting=settings(steps=0)).watermark(ds, seed=0, surrogate=trained["smallcnn"],
                                                                      progress=False)
    assert len(a.indices) == 16 and torch.equal(a.indices, b.indices)
    assert torch.equal(c.indices, select_by_grad_norm(trained["smallcnn"], ds, 16))
    assert not torch.equal(a.indices, c.indices)
    d = UBWC(poisoning_rate=0.1, crafting=settings(steps=0, selection="source-like")).watermark(
        ds, seed=0, surrogate=trained["smallcnn"], progress=False)
    assert torch.equal(d.indices, select_source_like(trained["smallcnn"], ds, 16, source=0))
    assert (ds.labels[d.indices] != 0).all()  # never a source-class image


def test_trigger_init_starts_from_the_clipped_trigger(ds, trained):
    """init='trigger' with 0 steps releases each poison plus the trigger at a random position, clipped to eps:
    changes only inside one 8x8 window per poison, each at most eps."""
    s = settings(steps=0, init="trigger", eps=EPS)
    rel = UBWC(poisoning_rate=0.1, crafting=s).watermark(ds, seed=0, surrogate=trained["smallcnn"], progress=False)
    base = ds.images[rel.indices].int()
    diff = rel.dataset.images[rel.indices].int() - base
    assert int(diff.abs().max()) <= math.ceil(255 * EPS) and diff.abs().sum() > 0
    patch = resized_square(3, 8)
    for i in range(len(base)):
        rows = diff[i].abs().sum((0, 2)).nonzero().flatten()
        cols = diff[i].abs().sum((0, 1)).nonzero().flatten()
        if len(rows):
            assert rows.max() - rows.min() < 8 and cols.max() - cols.min() < 8
    # the sign of each change is the trigger's: towards white where the patch is white, towards black elsewhere
    g = torch.Generator().manual_seed(gm.derived_seed(0, "trigger init"))
    want = (paste_random(ds.images[rel.indices], patch, g).float() - base.float()).clamp(-255 * EPS, 255 * EPS)
    assert (diff - want.round().int()).abs().max() <= 1
    with pytest.raises(ValueError, match="init_delta"):
        craft(ds, rel.indices, lambda m: [], s, surrogate=trained["smallcnn"], device="cpu", progress=False)


def test_stages_add_snapshots_of_each_training_to_the_ensemble(ds, trained, target_fn, poison_idx, monkeypatch):
    """stages=(0.5, 1.0) on a 2-epoch schedule: every member contributes its model after epoch 1 and after epoch 2,
    so each crafting batch averages 2 x ensemble passenger losses; the snapshot after epoch 1 is the model that
    one epoch of the same training gives."""
    two = TINY.replace(epochs=2)
    s = settings(steps=2, retrain_every=1, ensemble=2, stages=(0.5, 1.0), pretrain=two, retrain=two)
    sizes = []
    real = gm.ensemble_passenger_loss

    def counting(models, targets, *a, **k):
        sizes.append(len(models))
        return real(models, targets, *a, **k)

    monkeypatch.setattr(gm, "ensemble_passenger_loss", counting)
    res = craft(ds, poison_idx, target_fn, s, seed=0, surrogate=copy.deepcopy(trained["smallcnn"]), device="cpu",
                progress=False)
    assert sizes and set(sizes) == {4}
    assert res.retrains["step"].tolist() == [0, 1]
    # the first snapshot of member 0 is one epoch of its 2-epoch training (the crafting seed, the config as given)
    half = build_model("smallcnn", K, 3, 0.25, seed=0)
    snaps = []
    train(half, ds, two, device="cpu", progress=False, on_epoch=lambda e, m, row: snaps.append(copy.deepcopy(m)) if e == 1
          else None)
    assert len(snaps) == 1
    with pytest.raises(ValueError, match="stages"):
        GradientMatchingSettings(stages=(1.0, 0.5))
    with pytest.raises(ValueError, match="stages"):
        GradientMatchingSettings(stages=())


@pytest.mark.parametrize("classes", ["source", "other"])
def test_ubwc_poison_classes(ds, trained, classes):
    wm = UBWC(poisoning_rate=0.1, poison_classes=classes, crafting=settings(steps=0))
    rel = wm.watermark(ds, seed=0, surrogate=trained["smallcnn"], progress=False)
    src = ds.labels[rel.indices] == 0
    assert len(rel.indices) == 16
    assert bool(src.all()) if classes == "source" else not bool(src.any())
    pool = torch.nonzero((ds.labels == 0) == (classes == "source")).flatten()
    assert torch.equal(rel.indices, select_by_grad_norm(trained["smallcnn"], ds, 16, pool))  # the largest norms there
    with pytest.raises(ValueError, match="poison_classes"):
        UBWC(poisoning_rate=0.5, poison_classes="source").watermark(ds, seed=0, surrogate=trained["smallcnn"],
                                                                     progress=False)
    with pytest.raises(ValueError, match="poison_classes"):
        UBWCSettings(poison_classes="target")


def _by_hand_target(wm, model: nn.Module, ds: ImageDataset, seed: int, patched: bool) -> list[torch.Tensor]:
    """grad_w of the watermark's target loss on all source images of ``ds`` (patched with the watermark's own
    patch and positions, or not), one autograd call."""
    gen = torch.Generator().manual_seed(seed)
    patch = wm._patch(ds.image_shape[0], gen)
    src = ds.images[ds.labels == wm.settings.source]
    labels = ds.labels[ds.labels == wm.settings.source]
    if wm._target_label is not None:
        labels = torch.full_like(labels, wm._target_label)
    tgt_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    x = paste_random(src, patch, torch.Generator().manual_seed(tgt_seed)) if patched else src
    loss = wm._target_loss(model(x.float() / 255).float(), labels)
    return list(torch.autograd.grad(loss, list(model.parameters())))


@pytest.mark.parametrize("contrast", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("cls", [UBWC, SleeperAgent])
def test_contrast_target_gradient_is_patched_minus_clean(ds, trained, cls, contrast):
    model = copy.deepcopy(trained["smallcnn"]).eval()
    wm = cls(crafting=settings(contrast=contrast))
    got = wm.target_gradient_fn(ds, seed=3, device="cpu")(model)
    patched = _by_hand_target(wm, model, ds, 3, patched=True)
    clean = _by_hand_target(wm, model, ds, 3, patched=False)
    for g, p, c in zip(got, patched, clean):
        torch.testing.assert_close(g, p - contrast * c, rtol=1e-4, atol=1e-6)
    # the patch changes the gradient, so contrast changes the target
    assert contrast == 0 or not all(torch.allclose(g, p) for g, p in zip(got, patched))


class _Constant(nn.Module):
    """Logits that do not depend on the input: patched and clean images give the same gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([0.3, -0.2, 0.1, 0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(x), K) + 0 * x.flatten(1)[:, :1]


def test_trigger_share(ds, trained):
    wm = UBWC(crafting=settings())
    const = wm.trigger_share(_Constant(), ds, seed=1, device="cpu")
    assert const["cosine"] == pytest.approx(1.0) and const["trigger share"] == pytest.approx(0.0, abs=1e-6)
    assert const["patched norm"] == pytest.approx(const["clean norm"])
    model = copy.deepcopy(trained["smallcnn"]).eval()
    share = wm.trigger_share(model, ds, seed=1, device="cpu")
    p = torch.cat([t.flatten() for t in _by_hand_target(wm, model, ds, 1, True)]).double()
    c = torch.cat([t.flatten() for t in _by_hand_target(wm, model, ds, 1, False)]).double()
    assert share["cosine"] == pytest.approx(float(p @ c / p.norm() / c.norm()), rel=1e-4)
    assert share["trigger share"] == pytest.approx(float((p - c).norm() / p.norm()), rel=1e-4)
    assert share["patched norm"] == pytest.approx(float(p.norm()), rel=1e-4)


def test_contrast_validation():
    assert GradientMatchingSettings().contrast == 0.0
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="contrast"):
            GradientMatchingSettings(contrast=bad)


def test_passenger_loss_l2_matching_by_hand():
    g = torch.Generator().manual_seed(4)
    target = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    grads = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    norm = torch.sqrt(sum((t * t).sum() for t in target))
    by_hand = sum(((a - b) ** 2).sum() for a, b in zip(grads, target)) / norm**2
    assert float(passenger_loss(grads, target, norm, "l2")) == pytest.approx(float(by_hand), rel=1e-5)
    assert abs(float(passenger_loss([t.clone() for t in target], target, norm, "l2"))) < 1e-5
    assert float(passenger_loss([torch.zeros_like(t) for t in target], target, norm, "l2")) == pytest.approx(1.0)
    # unlike 1 - cos, the size counts: the right direction at 3x the size is far from the target
    assert float(passenger_loss([3 * t for t in target], target, norm, "l2")) == pytest.approx(4.0, rel=1e-5)
    with pytest.raises(ValueError, match="matching"):
        GradientMatchingSettings(matching="dot")


def test_l2_matching_crafts_and_is_deterministic(ds, trained, target_fn, poison_idx):
    s = settings(steps=3, matching="l2")
    runs = [gm.craft(ds, poison_idx, target_fn, s, seed=2, surrogate=copy.deepcopy(trained["smallcnn"]),
                     device="cpu", progress=False) for _ in range(2)]
    assert torch.equal(runs[0].images, runs[1].images)
    cos = gm.craft(ds, poison_idx, target_fn, settings(steps=3), seed=2, surrogate=copy.deepcopy(trained["smallcnn"]),
                   device="cpu", progress=False)
    assert not torch.equal(runs[0].delta, cos.delta)
    loss = runs[0].history["passenger loss"].to_numpy()
    assert loss[-1] < loss[0]
