"""Tests of ubwlib.defenses: fine-tuning, activation pruning and STRIP, on tiny synthetic data (CPU)."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from ubwlib.data import ImageDataset
from ubwlib.defenses import (
    ChannelMask,
    FineTuningSettings,
    StripSettings,
    fine_tune,
    fine_tune_size,
    get_layer,
    layer_activations,
    prune_by_activation,
    prune_channels,
    pruned_count,
    pruning_curve,
    rank_auc,
    strip_detect,
    strip_entropy,
)
from ubwlib.metrics import entropy
from ubwlib.models import build_model
from ubwlib.train import accuracy, predict_proba, train

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

FP32 = dict(precision="fp32")


@pytest.fixture(autouse=True)
def no_env_overrides(monkeypatch):
    monkeypatch.delenv("UBW_PRECISION", raising=False)
    monkeypatch.delenv("UBW_DEVICE", raising=False)


# --------------------------------------------------------------------------- helpers
def quadrant_dataset(n: int = 200, size: int = 12, seed: int = 0, bright=(180, 256), dark=(0, 60)) -> ImageDataset:
    """1 x size x size images; class k = which quadrant (TL, TR, BL, BR) is bright."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = torch.randint(dark[0], dark[1], (n, 1, size, size), generator=g, dtype=torch.uint8)
    h = size // 2
    for k, (r, c) in enumerate([(0, 0), (0, h), (h, 0), (h, h)]):
        sel = labels == k
        patch = torch.randint(bright[0], bright[1], (int(sel.sum()), 1, h, h), generator=g, dtype=torch.uint8)
        images[sel, :, r : r + h, c : c + h] = patch
    return ImageDataset(images, labels, ("tl", "tr", "bl", "br"), "quadrants")


def tiny_cnn(seed: int = 0) -> nn.Module:
    return build_model("smallcnn", 4, 1, width=0.25, seed=seed)


def tiny_resnet(seed: int = 0) -> nn.Module:
    return build_model("resnet18-cifar", 4, 1, width=0.0625, seed=seed)


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def ft_settings(**kw) -> FineTuningSettings:
    base = dict(fraction=0.25, epochs=2, batch_size=16, lr=0.05, precision="fp32")
    base.update(kw)
    return FineTuningSettings(**base)


@torch.no_grad()
def logits_of(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(images.float() / 255)


# --------------------------------------------------------------------------- fine-tuning
def test_fine_tune_copies_the_model_and_records_every_epoch():
    ds = quadrant_dataset(200)
    model = tiny_cnn()
    model.train()
    before = state_copy(model)
    ba0 = accuracy(model, ds, device="cpu", **FP32)
    model.train()
    calls = []

    def evaluate(m):
        calls.append((m, m.training))
        return {"BA": accuracy(m, ds, **FP32), "const": 7}

    tuned, hist = fine_tune(model, ds, ft_settings(), evaluate=evaluate, device="cpu")

    assert same_state(state_copy(model), before)  # the caller's model is untouched
    assert model.training and tuned is not model and not tuned.training
    assert not same_state(state_copy(tuned), before)  # ... and the copy was trained
    assert list(hist.columns) == ["epoch", "BA", "const", "loss", "train_acc", "lr", "samples", "seconds"]
    assert hist["epoch"].tolist() == [0, 1, 2]
    assert hist["samples"].tolist() == [50, 50, 50]
    assert hist["lr"].tolist() == [0.05] * 3  # constant learning rate
    assert hist["BA"].iloc[0] == pytest.approx(ba0)  # epoch 0: before any training
    assert math.isnan(hist["loss"].iloc[0]) and hist["loss"].iloc[1:].notna().all()
    assert len(calls) == 3 and all(m is tuned and not training for m, training in calls)
    assert (hist["const"] == 7).all()


@pytest.mark.parametrize("fraction, expected", [(0.25, 50), (0.33, 66), (0.1, 20), (1.0, 200)])
def test_fine_tune_trains_on_floor_fraction_samples(fraction, expected):
    ds = quadrant_dataset(200)
    model = tiny_cnn()
    seen = []
    # The hook is deep-copied with the model, so it also sees the tuned copy's training batches.
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]) if m.training else None)
    _, hist = fine_tune(model, ds, ft_settings(fraction=fraction, epochs=2, batch_size=64), device="cpu")
    assert sum(seen) == 2 * expected
    assert hist["samples"].iloc[-1] == expected == fine_tune_size(fraction, 200)


def test_fine_tune_size_floors_and_keeps_one_sample():
    assert fine_tune_size(0.3, 10) == 3  # 0.3 * 10 = 3.0000000000000004 in floating point
    assert fine_tune_size(0.29, 100) == 29  # 28.999999999999996
    assert fine_tune_size(0.1, 1009) == 100
    assert fine_tune_size(0.001, 10) == 1
    assert fine_tune_size(1.0, 7) == 7


def test_fine_tune_is_deterministic():
    ds = quadrant_dataset(120)
    model = tiny_cnn()
    a, ha = fine_tune(model, ds, ft_settings(seed=3), device="cpu")
    b, hb = fine_tune(model, ds, ft_settings(seed=3), device="cpu")
    c, _ = fine_tune(model, ds, ft_settings(seed=4), device="cpu")
    assert same_state(state_copy(a), state_copy(b))
    assert ha["loss"].equals(hb["loss"])
    assert not same_state(state_copy(a), state_copy(c))


def test_fine_tune_zero_epochs_and_bad_evaluate():
    ds = quadrant_dataset(40)
    model = tiny_cnn()
    tuned, hist = fine_tune(model, ds, ft_settings(epochs=0), evaluate=lambda m: {"x": 1.0}, device="cpu")
    assert same_state(state_copy(tuned), state_copy(model)) and hist["epoch"].tolist() == [0]
    with pytest.raises(TypeError, match="dict"):
        fine_tune(model, ds, ft_settings(epochs=0), evaluate=lambda m: 0.5, device="cpu")
    with pytest.raises(ValueError, match="reserved"):
        fine_tune(model, ds, ft_settings(epochs=0), evaluate=lambda m: {"loss": 1.0}, device="cpu")


def reference_fine_tune(model: nn.Module, ds: ImageDataset, st: FineTuningSettings) -> tuple[nn.Module, list]:
    """The loop fine_tune ran before it trained through ubwlib.train.train, written out (CPU, fp32): one SGD
    optimiser with a constant lr, data order from Generator(seed), flips from Generator(seed + 1)."""
    n = fine_tune_size(st.fraction, len(ds))
    subset = ds if n == len(ds) else ds.stratified_subset(n, st.seed)
    tuned = copy.deepcopy(model)
    order_gen, aug_gen = torch.Generator().manual_seed(st.seed), torch.Generator().manual_seed(st.seed + 1)
    opt = torch.optim.SGD(tuned.parameters(), lr=st.lr, momentum=st.momentum, weight_decay=st.weight_decay)
    losses = []
    for _ in range(st.epochs):
        tuned.train()
        total = 0.0
        perm = torch.randperm(n, generator=order_gen)
        for start in range(0, n, st.batch_size):
            idx = perm[start : start + st.batch_size]
            xb = subset.images[idx]
            if st.flip:
                coin = torch.rand(len(idx), generator=aug_gen) < 0.5
                xb = torch.where(coin.view(-1, 1, 1, 1), xb.flip(3), xb)
            loss = torch.nn.functional.cross_entropy(tuned(xb.float() / 255), subset.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / n)
    return tuned.eval(), losses


@pytest.mark.parametrize("flip, fraction", [(True, 0.25), (False, 1.0)])
def test_fine_tune_is_the_documented_loop(flip, fraction):
    ds = quadrant_dataset(120)
    model = tiny_cnn(seed=2)
    st = ft_settings(seed=5, flip=flip, fraction=fraction, epochs=3, batch_size=32)
    tuned, hist = fine_tune(model, ds, st, device="cpu")
    ref, losses = reference_fine_tune(model, ds, st)
    assert same_state(state_copy(tuned), state_copy(ref))
    assert hist["loss"].iloc[1:].tolist() == pytest.approx(losses, rel=1e-5)


def test_fine_tune_trains_through_train():
    """fine_tune = ubwlib.train.train(copy, subset, settings.train_config()) plus the evaluations."""
    ds = quadrant_dataset(120)
    model = tiny_cnn(seed=1)
    st = ft_settings(seed=2, epochs=2)
    cfg = st.train_config()
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.seed, cfg.precision) == (
        st.epochs, st.batch_size, st.lr, st.momentum, st.weight_decay, st.seed, st.precision)
    assert (cfg.schedule, cfg.flip, cfg.crop_padding, cfg.nesterov, cfg.label_smoothing, cfg.drop_last) == (
        "constant", st.flip, 0, False, 0.0, False)
    subset = ds.stratified_subset(fine_tune_size(st.fraction, len(ds)), st.seed)
    direct = train(copy.deepcopy(model), subset, cfg, device="cpu", progress=False)
    tuned, hist = fine_tune(model, ds, st, evaluate=lambda m: {"BA": accuracy(m, ds, **FP32)}, device="cpu")
    assert same_state(state_copy(tuned), state_copy(direct.model))  # evaluating after each epoch changes nothing
    cols = ["epoch", "loss", "train_acc", "lr"]
    pd.testing.assert_frame_equal(hist[cols].iloc[1:].reset_index(drop=True), direct.history[cols])
    assert hist["BA"].iloc[-1] == accuracy(direct.model, ds, **FP32)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.01, float("nan")])
def test_fine_tuning_settings_reject_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        FineTuningSettings(fraction=fraction)


def test_fine_tuning_settings_defaults_and_validation():
    s = FineTuningSettings()
    assert (s.fraction, s.epochs, s.lr, s.momentum, s.weight_decay, s.batch_size) == (0.1, 10, 0.001, 0.9, 5e-4, 128)
    for bad in (dict(epochs=-1), dict(lr=0), dict(batch_size=0), dict(momentum=1.0), dict(precision="fp16")):
        with pytest.raises(ValueError):
            FineTuningSettings(**bad)
    with pytest.raises(TypeError):
        FineTuningSettings(epochs=1.5)


# --------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("builder", [tiny_cnn, tiny_resnet], ids=["smallcnn", "resnet18"])
def test_layer_activations_match_a_manual_forward(builder):
    model = builder()
    images = quadrant_dataset(10).images
    act = layer_activations(model, images, batch_size=3, device="cpu", **FP32)  # 4 batches
    with torch.no_grad():
        model.eval()
        x = images.float() / 255
        feats = model.features(x) if hasattr(model, "features") else model.layer4(x)
    expected = feats.mean(dim=(0, 2, 3))
    assert act.dtype == torch.float32 and act.shape == (feats.shape[1],) == (32,)
    torch.testing.assert_close(act, expected, rtol=1e-5, atol=1e-6)


def test_layer_activations_restores_train_mode_and_reports_unknown_layers():
    model = tiny_cnn()
    model.train()
    layer_activations(model, quadrant_dataset(4), device="cpu", **FP32)
    assert model.training
    with pytest.raises(ValueError, match=r"no layer 'layer9'.*layer4, avgpool, fc"):
        layer_activations(model, quadrant_dataset(4), layer="layer9")
    with pytest.raises(ValueError, match="layer4"):
        prune_by_activation(model, quadrant_dataset(4).images, 0.5, layer="conv5")


@pytest.mark.parametrize("builder", [tiny_cnn, tiny_resnet], ids=["smallcnn", "resnet18"])
def test_prune_by_activation_masks_the_least_active_channels(builder):
    model = builder()
    before = state_copy(model)
    images = quadrant_dataset(24).images
    act = layer_activations(model, images, device="cpu", **FP32)
    pruned = prune_by_activation(model, images, 0.3, device="cpu", **FP32)

    assert same_state(state_copy(model), before) and not isinstance(model.layer4, ChannelMask)
    mask = pruned.layer4
    assert isinstance(mask, ChannelMask)
    idx = mask.pruned_channels
    assert len(idx) == math.floor(0.3 * 32) == 9
    kept = torch.tensor([c for c in range(32) if c not in set(idx.tolist())])
    assert act[idx].max() <= act[kept].min()  # the lowest mean activations
    torch.testing.assert_close(idx, torch.sort(act, stable=True).indices[:9].sort().values)

    with torch.no_grad():
        pruned.eval()
        model.eval()
        x = images.float() / 255
        if hasattr(model, "features"):
            out, ref = pruned.features(x), model.features(x)
        else:
            out, ref = pruned.layer4(x), model.layer4(x)
    assert torch.all(out[:, idx] == 0)  # exactly zero
    assert torch.equal(out[:, kept], ref[:, kept])  # the other channels are untouched
    assert ref[:, idx].abs().sum() > 0  # they were not zero before


def test_rate_zero_leaves_predictions_unchanged():
    model = tiny_resnet()
    images = quadrant_dataset(16).images
    pruned = prune_by_activation(model, images, 0.0, device="cpu", **FP32)
    assert len(pruned.layer4.pruned_channels) == 0
    assert torch.equal(logits_of(pruned, images), logits_of(model, images))


def test_pruned_models_survive_deepcopy_and_state_dict_round_trips():
    model = tiny_cnn()
    images = quadrant_dataset(16).images
    pruned = prune_by_activation(model, images, 0.5, device="cpu", **FP32)
    ref = logits_of(pruned, images)
    assert torch.equal(logits_of(copy.deepcopy(pruned), images), ref)

    buf = io.BytesIO()
    torch.save(pruned.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert "layer4.keep" in state and int((~state["layer4.keep"]).sum()) == 16
    fresh = prune_channels(tiny_cnn(seed=1), [])  # another model, nothing pruned yet
    fresh.load_state_dict(state)
    assert torch.equal(logits_of(fresh, images), ref)


def test_prune_channels_combines_masks_and_validates():
    model = tiny_cnn()
    once = prune_channels(model, [0, 1])
    twice = prune_channels(once, torch.tensor([1, 5]))
    assert twice.layer4.pruned_channels.tolist() == [0, 1, 5]
    assert once.layer4.pruned_channels.tolist() == [0, 1]  # the input copy is untouched
    assert isinstance(twice.layer4.module, nn.Sequential)  # not nested
    assert get_layer(twice, "layer4.module.0") is twice.layer4.module[0]
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        prune_channels(model, [32])
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        prune_channels(model, [-1])
    with pytest.raises(TypeError):
        prune_channels(model, [0.5])


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan")])
def test_pruning_rate_must_be_in_unit_interval(rate):
    images = quadrant_dataset(4).images
    with pytest.raises(ValueError, match="rate"):
        prune_by_activation(tiny_cnn(), images, rate)
    with pytest.raises(ValueError, match="rate"):
        pruning_curve(tiny_cnn(), images, [0.0, rate], lambda m: {})
    with pytest.raises(ValueError, match="rate"):
        pruned_count(rate, 32)


def test_pruning_curve_one_row_per_rate():
    model = tiny_cnn()
    ds = quadrant_dataset(24)
    seen = []

    def evaluate(m):
        seen.append(set(m.layer4.pruned_channels.tolist()))
        return {"BA": accuracy(m, ds, **FP32)}

    rates = [0.0, 0.25, 0.5, 0.9]
    curve = pruning_curve(model, ds.images, rates, evaluate, device="cpu", **FP32)
    assert list(curve.columns) == ["rate", "channels pruned", "BA"]
    assert curve["rate"].tolist() == rates
    assert curve["channels pruned"].tolist() == [0, 8, 16, 28]
    assert [len(s) for s in seen] == [0, 8, 16, 28]
    assert all(a <= b for a, b in zip(seen, seen[1:]))  # nested
    same = prune_by_activation(model, ds.images, 0.5, device="cpu", **FP32)
    assert set(same.layer4.pruned_channels.tolist()) == seen[2]
    assert curve["BA"].iloc[0] == pytest.approx(accuracy(model, ds, **FP32))
    assert not isinstance(model.layer4, ChannelMask)


# --------------------------------------------------------------------------- STRIP
class PatchOrQuadrant(nn.Module):
    """A hand-built backdoored classifier on 1 x 12 x 12 images in [0, 1].

    A bright 3 x 3 bottom-right corner (the trigger) gives a confident class 0; otherwise the logits are
    proportional to the four quadrants' mean brightness, so a blend of two clean images of different
    classes is ambiguous (high entropy) while a blend with a triggered image stays confident."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        corner = x[:, 0, -3:, -3:].mean(dim=(1, 2))
        gate = torch.sigmoid(100 * (corner - 0.45))[:, None]
        q = torch.stack(
            [x[:, 0, :6, :6].mean((1, 2)), x[:, 0, :6, 6:].mean((1, 2)),
             x[:, 0, 6:, :6].mean((1, 2)), x[:, 0, 6:, 6:].mean((1, 2))], dim=1
        )
        trigger = torch.tensor([15.0, 0.0, 0.0, 0.0])
        return gate * trigger + (1 - gate) * 15 * q + self.anchor


def strip_data(seed: int = 0):
    clean = quadrant_dataset(260, seed=seed, bright=(70, 90), dark=(0, 20))
    holdout, test, rest = clean.images[:100], clean.images[100:200], clean.images[200:]
    triggered = rest.clone()
    triggered[:, :, -3:, -3:] = 255
    return holdout, test, triggered


def test_strip_flags_triggered_inputs():
    model = PatchOrQuadrant()
    holdout, test, triggered = strip_data()
    s = StripSettings(n_overlays=8, frr=0.05)
    res = strip_detect(model, holdout, test, triggered, s, **FP32)
    assert set(res) == {"threshold", "detection rate", "false rejection rate", "AUC",
                        "entropy clean (mean)", "entropy triggered (mean)"}
    assert res["entropy triggered (mean)"] < 0.1 < 0.5 < res["entropy clean (mean)"]
    assert res["detection rate"] == 1.0
    assert res["false rejection rate"] <= 0.15
    assert res["AUC"] == 1.0


def test_strip_threshold_is_the_frr_quantile_of_the_holdout():
    model = PatchOrQuadrant()
    holdout, test, triggered = strip_data(seed=1)
    s = StripSettings(n_overlays=5, frr=0.1, seed=2)
    res = strip_detect(model, holdout, test, triggered, s, **FP32)
    h_hold = strip_entropy(model, holdout, holdout, s, exclude_self=True, **FP32)
    h_test = strip_entropy(model, test, holdout, s, **FP32)
    h_trig = strip_entropy(model, triggered, holdout, s, **FP32)
    assert res["threshold"] == pytest.approx(np.quantile(h_hold, 0.1), rel=1e-12)
    assert np.mean(h_hold < res["threshold"]) == pytest.approx(0.1, abs=0.011)
    assert res["false rejection rate"] == np.mean(h_test < res["threshold"])
    assert res["detection rate"] == np.mean(h_trig < res["threshold"])
    assert res["AUC"] == rank_auc(-h_trig, -h_test)
    assert res["entropy clean (mean)"] == pytest.approx(h_test.mean())


def test_strip_entropy_blends_as_documented():
    model = PatchOrQuadrant()
    holdout, _, triggered = strip_data()
    x = torch.cat([holdout[:3], triggered[:2]])
    overlay = holdout[7:8]
    pool = overlay.expand(4, -1, -1, -1).contiguous()  # every draw is the same image
    s = StripSettings(n_overlays=3, alpha=0.3)
    h = strip_entropy(model, x, pool, s, **FP32)
    blend = 0.7 * x.float() / 255 + 0.3 * overlay.float() / 255
    with torch.no_grad():
        expected = entropy(torch.softmax(model(blend), 1).double().numpy())
    np.testing.assert_allclose(h, expected, rtol=1e-6)
    # uint8 inputs and the same images as floats in [0, 1] give the same scores
    np.testing.assert_allclose(strip_entropy(model, x.float() / 255, pool.float() / 255, s, **FP32), h, rtol=1e-6)


def test_strip_exclude_self_uses_every_other_pool_image():
    model = PatchOrQuadrant()
    pool = quadrant_dataset(5, seed=3, bright=(70, 90), dark=(0, 20)).images
    h = strip_entropy(model, pool, pool, StripSettings(n_overlays=4), exclude_self=True, **FP32)
    x = pool.float() / 255
    with torch.no_grad():
        for i in range(5):
            blends = torch.stack([0.5 * x[i] + 0.5 * x[j] for j in range(5) if j != i])
            expected = entropy(torch.softmax(model(blends), 1).double().numpy()).mean()
            assert h[i] == pytest.approx(expected, rel=1e-6)


def test_strip_is_seeded_and_independent_of_batch_size():
    model = PatchOrQuadrant()
    holdout, test, _ = strip_data()
    s = StripSettings(n_overlays=6, seed=5)
    a = strip_entropy(model, test, holdout, s, **FP32)
    b = strip_entropy(model, test, holdout, s, **FP32)
    c = strip_entropy(model, test, holdout, s, batch_size=7, **FP32)
    d = strip_entropy(model, test, holdout, s.replace(seed=6), **FP32)
    assert np.array_equal(a, b)
    np.testing.assert_allclose(a, c, rtol=1e-6)
    assert not np.allclose(a, d)


def test_rank_auc_hand_computed():
    # pairs (pos > neg): 0.9 beats all 4; 0.8 beats 3 and ties 1; 0.3 beats 1 and ties 1 -> 9 / 12
    assert rank_auc([0.9, 0.8, 0.3], [0.5, 0.3, 0.1, 0.8]) == pytest.approx(0.75)
    assert rank_auc([2, 3], [0, 1]) == 1.0
    assert rank_auc([0, 1], [2, 3]) == 0.0
    assert rank_auc([1, 1], [1, 1, 1]) == 0.5
    with pytest.raises(ValueError):
        rank_auc([], [1.0])


def test_strip_validation():
    for bad in (dict(n_overlays=0), dict(alpha=0.0), dict(alpha=1.0), dict(frr=1.0), dict(frr=-0.1)):
        with pytest.raises(ValueError):
            StripSettings(**bad)
    with pytest.raises(TypeError):
        StripSettings(n_overlays=2.5)
    s = StripSettings()
    assert (s.n_overlays, s.alpha, s.frr) == (20, 0.5, 0.01)
    holdout, test, _ = strip_data()
    model = PatchOrQuadrant()
    with pytest.raises(ValueError, match="fewer than n_overlays"):
        strip_entropy(model, test, holdout[:5], StripSettings(n_overlays=6))
    with pytest.raises(ValueError, match="fewer than n_overlays"):
        strip_entropy(model, holdout[:6], holdout[:6], StripSettings(n_overlays=6), exclude_self=True)
    with pytest.raises(ValueError, match="shape"):
        strip_entropy(model, test[:, :, :6], holdout, s)
