"""Several models trained side by side: ``ubwlib.stacked`` (grouped layers) and ``ubwlib.train.train_many``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ubwlib.data import ImageDataset
from ubwlib.models import build_model
from ubwlib.stacked import StackedLinear, split_outputs, stack_inputs, stack_models, unstack_models
from ubwlib.train import TrainConfig, train, train_many

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

ARCHS = [("resnet18-cifar", 0.125), ("smallcnn", 0.25)]


def _data(n: int = 64, seed: int = 0, c: int = 1, hw: int = 12) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, hw, hw), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return ImageDataset(images, labels, tuple(f"c{i}" for i in range(10)), f"random{seed}")


def _models(arch: str, width: float, seeds=(1, 2, 3), c: int = 1) -> list[nn.Module]:
    return [build_model(arch, 10, c, width, seed=s) for s in seeds]


@pytest.mark.parametrize("arch,width", ARCHS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_stacked_forward_equals_each_model(arch, width, mode):
    models = _models(arch, width)
    stacked = stack_models(models)
    xs = [torch.rand(5, 1, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for m in [*models, stacked]:
        getattr(m, mode)()
    with torch.no_grad():
        out = split_outputs(stacked(stack_inputs(xs)), 3)
        for g, (m, x) in enumerate(zip(models, xs)):
            if all(p.is_contiguous() for p in m.parameters()):
                assert torch.equal(out[g], m(x)), g  # exactly: each group computes its own model
            else:  # the small CNN's channels-last weights: oneDNN's grouped and plain kernels round apart (~1e-8)
                torch.testing.assert_close(out[g], m(x), rtol=1e-5, atol=1e-6)
    assert out.shape == (3, 5, 10)


@pytest.mark.parametrize("arch,width", ARCHS)
def test_unstack_of_stack_gives_the_models_back(arch, width):
    models = _models(arch, width)
    for m in models:  # give the BatchNorm statistics distinct values
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
                mod.num_batches_tracked.fill_(7)
    stacked = stack_models(models)
    copies = _models(arch, width, seeds=(10, 11, 12))
    unstack_models(stacked, copies)
    for a, b in zip(models, copies):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


def test_stack_layout():
    models = _models("resnet18-cifar", 0.125, seeds=(1, 2))
    stacked = stack_models(models)
    assert stacked.conv1.in_channels == 2 and stacked.conv1.out_channels == 16 and stacked.conv1.groups == 2
    assert stacked.bn1.num_features == 16
    assert isinstance(stacked.fc, StackedLinear) and stacked.fc.weight.shape == (2, 10, 64)
    assert torch.equal(stacked.conv1.weight[8:], models[1].conv1.weight)  # model 1's filters after model 0's
    # the models themselves are untouched
    assert models[0].conv1.groups == 1 and isinstance(models[0].fc, nn.Linear)


def test_stack_rejects_other_architectures_and_layers():
    with pytest.raises(ValueError, match="one architecture"):
        stack_models([build_model("smallcnn", 10, 1, 0.25, seed=0), build_model("smallcnn", 10, 1, 0.5, seed=0)])
    with pytest.raises(ValueError, match="at least one"):
        stack_models([])
    odd = [nn.Sequential(nn.Conv2d(1, 2, 3), nn.LayerNorm(2)) for _ in range(2)]
    with pytest.raises(NotImplementedError, match="one at a time"):
        stack_models(odd)


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=1, batch_size=16, lr=0.05, schedule="onecycle", crop_padding=2, flip=True, precision="fp32")
    return TrainConfig(**{**base, **kw})


def test_train_many_one_step_equals_train_per_model():
    """One SGD step (momentum, weight decay, each model its own data, order and augmentation): the same weights
    as training each model alone, to float rounding (grouped and single convolutions sum in different orders)."""
    datasets = [_data(16, seed=s) for s in (0, 1, 2)]
    configs = [_cfg(seed=s) for s in (5, 6, 7)]
    alone = [train(m, d, c, progress=False) for m, d, c in zip(_models("resnet18-cifar", 0.125), datasets, configs)]
    together = train_many(_models("resnet18-cifar", 0.125), datasets, configs, progress=False)
    init = _models("resnet18-cifar", 0.125)
    for (a, ha), (b, hb), m0 in zip(alone, together, init):
        sa, sb, s0 = a.state_dict(), b.state_dict(), m0.state_dict()
        for k in sa:
            if sa[k].is_floating_point():
                moved = (sa[k] - s0[k]).abs().max()
                assert (sa[k] - sb[k]).abs().max() <= 1e-4 * float(moved) + 1e-6, k  # 1e-6: a few ulps near 1
            else:
                assert torch.equal(sa[k], sb[k]), k
        assert hb["loss"].iloc[0] == pytest.approx(ha["loss"].iloc[0], rel=1e-5)
        assert hb["train_acc"].iloc[0] == ha["train_acc"].iloc[0]
        assert list(hb.columns) == list(ha.columns) and len(hb) == 1
        assert not b.training


def test_train_many_of_one_is_train():
    d, c = _data(40), _cfg(epochs=2, seed=3)
    (a, ha), = train_many(_models("smallcnn", 0.25, seeds=(1,)), [d], [c], progress=False)
    b, hb = train(_models("smallcnn", 0.25, seeds=(1,))[0], d, c, progress=False)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert ha["loss"].tolist() == hb["loss"].tolist()


def test_train_many_is_deterministic_and_histories_are_per_model():
    datasets = [_data(48, seed=s) for s in (0, 1)]
    configs = [_cfg(epochs=2, seed=s) for s in (1, 2)]
    r1 = train_many(_models("smallcnn", 0.25, seeds=(1, 2)), datasets, configs, progress=False)
    r2 = train_many(_models("smallcnn", 0.25, seeds=(1, 2)), datasets, configs, progress=False)
    for (a, ha), (b, hb) in zip(r1, r2):
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), k
        assert len(ha) == 2 and ha["epoch"].tolist() == [1, 2]
    assert r1[0][1]["loss"].tolist() != r1[1][1]["loss"].tolist()  # two different models, two histories


def test_train_many_checks_its_inputs():
    models = _models("smallcnn", 0.25, seeds=(1, 2))
    with pytest.raises(ValueError, match="one dataset and one config per model"):
        train_many(models, [_data()], [_cfg(), _cfg()])
    with pytest.raises(ValueError, match="one size and image shape"):
        train_many(models, [_data(32), _data(48)], [_cfg(), _cfg()])
    with pytest.raises(ValueError, match="differ in their seed only"):
        train_many(models, [_data(), _data()], [_cfg(), _cfg(lr=0.2)])
    with pytest.raises(TypeError, match="ImageDataset"):
        train_many(models, [_data(), "x"], [_cfg(), _cfg()])
