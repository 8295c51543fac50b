"""Tests of the Label-Consistent watermark (ubwlib.watermarks.label_consistent).

A tiny synthetic task (300 images 1 x 16 x 16, 4 classes, the class encoded by a bright quadrant) and a
tiny SmallCNN surrogate trained for a few epochs in a fixture keep everything fast. Expected values are
computed independently (hand-counted sizes, plain comparisons), never with the code under test.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from ubwlib.data import ImageDataset
from ubwlib.models import build_model
from ubwlib.train import TrainConfig, train
from ubwlib.watermarks import (
    REGISTRY,
    LabelConsistent,
    LabelConsistentSettings,
    WatermarkedDataset,
    WatermarkKey,
    evaluate,
    get_watermark,
    pgd_perturb,
    trigger,
)

K = 4
SHAPE = (1, 16, 16)
SQUARE = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.uint8) * 255
TINY_TRAIN = TrainConfig(epochs=3, batch_size=32, lr=0.05, schedule="constant", milestones=(), flip=False, seed=0)
EPS_U8 = math.ceil(255 * 8 / 255)


def make_dataset(n: int = 300, seed: int = 0, counts: list[int] | None = None, name: str = "quadrants") -> ImageDataset:
    """Dark noise, with the quadrant of the class (0: top-left, 1: top-right, 2: bottom-left, 3: bottom-right)
    bright."""
    g = torch.Generator().manual_seed(seed)
    if counts is None:
        labels = torch.arange(n) % K
        labels = labels[torch.randperm(n, generator=g)]
    else:
        labels = torch.cat([torch.full((c,), k, dtype=torch.long) for k, c in enumerate(counts)])
        n = len(labels)
    images = torch.randint(0, 80, (n, *SHAPE), dtype=torch.uint8, generator=g)
    bright = torch.randint(170, 256, (n, *SHAPE), dtype=torch.uint8, generator=g)
    h = SHAPE[1] // 2
    for k in range(K):
        r, c = divmod(k, 2)
        m = labels == k
        images[m, :, r * h : (r + 1) * h, c * h : (c + 1) * h] = bright[m, :, r * h : (r + 1) * h, c * h : (c + 1) * h]
    return ImageDataset(images, labels, tuple(f"q{k}" for k in range(K)), name)


def corner_mask() -> torch.Tensor:
    m = torch.zeros(SHAPE, dtype=torch.bool)
    m[:, -3:, -3:] = True
    return m


def mean_ce(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cross-entropy in float32 (the model in eval mode, on its own device)."""
    dev = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        logits = model(images.to(dev).float() / 255)
    return float(F.cross_entropy(logits.float(), labels.to(dev)))


def state_copy(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def data() -> ImageDataset:
    return make_dataset()


@pytest.fixture(scope="module")
def surrogate(data):
    model = build_model("smallcnn", K, SHAPE[0], width=0.25, seed=0)
    model = train(model, data, TINY_TRAIN, progress=False).model
    acc = float((model(data.images[:64].to(next(model.parameters()).device).float() / 255).argmax(1).cpu()
                 == data.labels[:64]).float().mean())
    assert acc > 0.9, f"the tiny surrogate did not learn the synthetic task (accuracy {acc:.2f})"
    return model


@pytest.fixture(scope="module")
def released(data, surrogate) -> WatermarkedDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gamma = 0.1 of 300 = 30 < 75 target samples: no cap warning
        return LabelConsistent().watermark(data, seed=3, surrogate=surrogate)


# --------------------------------------------------------------------------- registration and settings
def test_registered_with_paper_defaults():
    assert REGISTRY["label-consistent"] is LabelConsistent
    assert LabelConsistent.label_type == "clean" and LabelConsistent.targeted is True
    s = LabelConsistentSettings()
    assert (s.poisoning_rate, s.target, s.steps, s.pattern, s.alpha) == (0.1, 1, 100, "square", 1.0)
    assert s.eps == pytest.approx(8 / 255) and s.step == pytest.approx(1.5 / 255)
    assert s.surrogate_model == "resnet18-cifar" and s.surrogate_width == 1.0 and s.pgd_batch_size == 512
    assert s.surrogate_train == TrainConfig()
    with pytest.raises(Exception):
        s.eps = 0.1  # frozen
    wm = get_watermark("label-consistent", poisoning_rate=0.05, surrogate_train={"epochs": 2})
    assert isinstance(wm, LabelConsistent) and wm.settings.surrogate_train == TrainConfig(epochs=2)


# --------------------------------------------------------------------------- the released dataset
def test_release_poisons_only_target_class_within_eps(data, released):
    ds = released.dataset
    assert ds.images.dtype == torch.uint8 and ds.images.shape == data.images.shape
    assert torch.equal(ds.labels, data.labels)  # clean-label
    n_target = int((data.labels == 1).sum())
    assert len(released.indices) == min(round(0.1 * len(data)), n_target) == 30
    assert torch.equal(released.indices, released.indices.sort().values)
    assert len(released.indices.unique()) == 30 and len(released.noise_indices) == 0
    assert bool((data.labels[released.indices] == 1).all())
    changed = (ds.images != data.images).flatten(1).any(1)
    assert torch.equal(torch.nonzero(changed).flatten(), released.indices)  # untouched samples byte-identical
    assert released.poisoning_rate == pytest.approx(30 / 300)
    # every perturbation within eps outside the 3 x 3 corner (uint8 units), the corner carries the square
    outside = ~corner_mask()
    diff = (ds.images[released.indices].int() - data.images[released.indices].int()).abs()
    assert int(diff[:, outside].max()) <= EPS_U8
    assert int(diff[:, outside].max()) > 0
    assert torch.equal(ds.images[released.indices][:, :, -3:, -3:], SQUARE.expand(30, 1, 3, 3))
    key = released.key
    assert key.method == "label-consistent" and key.target == 1 and key.seed == 3
    assert key.settings["poisons_requested"] == 30 and key.settings["poisons_used"] == 30
    assert key.settings["target_class_size"] == n_target and key.settings["surrogate"] == "argument"
    assert key.settings["max_poisoning_rate"] == pytest.approx(n_target / 300)


def test_cap_at_target_class_size_warns(data, surrogate):
    n_target = int((data.labels == 1).sum())  # 75
    with pytest.warns(UserWarning, match=r"150.*75.*0\.25") as rec:
        out = LabelConsistent(poisoning_rate=0.5, steps=3).watermark(data, seed=0, surrogate=surrogate)
    assert "maximum gamma" in str(rec[0].message)
    assert len(out.indices) == n_target
    assert torch.equal(out.indices, torch.nonzero(data.labels == 1).flatten())
    assert out.key.settings["poisons_requested"] == 150 and out.key.settings["poisons_used"] == 75
    assert torch.equal(out.dataset.labels, data.labels)


def test_uneven_classes_exact_counts(surrogate):
    ds = make_dataset(counts=[50, 12, 30, 8])  # N = 100, target class 1 has 12 samples
    out = LabelConsistent(poisoning_rate=0.1, steps=2).watermark(ds, seed=1, surrogate=surrogate)
    assert len(out.indices) == 10 and bool((ds.labels[out.indices] == 1).all())
    with pytest.warns(UserWarning, match="12"):
        out = LabelConsistent(poisoning_rate=0.2, steps=2).watermark(ds, seed=1, surrogate=surrogate)
    assert len(out.indices) == 12


def test_deterministic_for_a_fixed_seed(data, surrogate, released):
    # on the CPU (cuDNN's backward pass need not be bitwise deterministic); the surrogate is moved back after
    wm = LabelConsistent(steps=30)
    first = wm.watermark(data, seed=3, surrogate=surrogate, device="cpu")
    again = wm.watermark(data, seed=3, surrogate=surrogate, device="cpu")
    assert torch.equal(first.indices, released.indices)  # the choice depends on the seed only
    assert torch.equal(again.indices, first.indices)
    assert torch.equal(again.dataset.images, first.dataset.images)
    other = wm.watermark(data, seed=4, surrogate=surrogate, device="cpu")
    assert not torch.equal(other.indices, first.indices)


def test_surrogate_left_unchanged(data, surrogate):
    before = state_copy(surrogate)
    flags = [p.requires_grad for p in surrogate.parameters()]
    grads = [None if p.grad is None else p.grad.detach().cpu().clone() for p in surrogate.parameters()]
    surrogate.train()  # the mode it is in is restored too
    try:
        LabelConsistent(steps=5).watermark(data, seed=0, surrogate=surrogate)
        assert surrogate.training
    finally:
        surrogate.eval()
    after = state_copy(surrogate)
    assert before.keys() == after.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert [p.requires_grad for p in surrogate.parameters()] == flags
    for g0, p in zip(grads, surrogate.parameters()):  # PGD accumulates no parameter gradients
        assert (g0 is None and p.grad is None) or torch.equal(g0, p.grad.cpu())


# --------------------------------------------------------------------------- the key
def test_key_roundtrip_and_trigger(tmp_path, data, released):
    key = released.key
    json.dumps(key.settings)  # JSON-able, TrainConfig as a dict
    assert key.settings["surrogate_train"]["epochs"] == 200
    assert set(key.tensors) == {"pattern", "alpha"}
    loaded = WatermarkKey.load(key.save(tmp_path / "lc.key"))
    assert loaded.method == key.method and loaded.target == 1 and loaded.settings == json.loads(json.dumps(key.settings))
    test = make_dataset(40, seed=9)
    t = trigger(test.images, loaded)
    assert t.dtype == torch.uint8
    assert torch.equal(t[:, :, -3:, -3:], SQUARE.expand(40, 1, 3, 3))
    assert torch.equal(t[:, ~corner_mask()], test.images[:, ~corner_mask()])
    assert torch.equal(LabelConsistent().trigger(test.images, key), t)
    back = WatermarkedDataset.load(released.save(tmp_path / "lc.pt"))
    assert torch.equal(back.dataset.images, released.dataset.images)
    assert torch.equal(back.indices, released.indices)
    assert back.key.settings["poisons_used"] == 30


def test_evaluate_reports_clean_targeted_row(surrogate, released):
    row = evaluate(surrogate, make_dataset(40, seed=9), released)
    assert row["method"] == "label-consistent" and row["labels"] == "clean" and row["targeted"]
    assert row["n eval"] == 30  # the non-target classes of 40 balanced samples


# --------------------------------------------------------------------------- PGD alone
def test_pgd_increases_surrogate_loss_within_eps(data, surrogate):
    idx = torch.nonzero(data.labels == 1).flatten()[:40]
    x, y = data.images[idx], data.labels[idx]
    adv = pgd_perturb(surrogate, x, y, 8 / 255, 1.5 / 255, 20, torch.Generator().manual_seed(0), 16, None)
    assert adv.dtype == torch.uint8 and adv.shape == x.shape and adv.device.type == "cpu"
    assert int((adv.int() - x.int()).abs().max()) <= EPS_U8
    clean, attacked = mean_ce(surrogate, x, y), mean_ce(surrogate, adv, y)
    assert attacked > 1.5 * clean
    # and more than random sign noise of the same size does
    g = torch.Generator().manual_seed(5)
    noise = (torch.randint(0, 2, x.shape, generator=g) * 2 - 1) * EPS_U8
    noisy = (x.int() + noise).clamp(0, 255).to(torch.uint8)
    assert attacked > mean_ce(surrogate, noisy, y)
    again = pgd_perturb(surrogate, x, y, 8 / 255, 1.5 / 255, 20, torch.Generator().manual_seed(0), 16, None)
    assert torch.equal(adv, again)


def test_pgd_respects_small_eps_and_pixel_range(surrogate):
    x = torch.tensor([0, 1, 254, 255], dtype=torch.uint8).repeat(64)[: 16 * 16].view(1, 1, 16, 16).repeat(3, 1, 1, 1)
    y = torch.tensor([0, 1, 2])
    adv = pgd_perturb(surrogate, x, y, eps=2 / 255, step=1 / 255, steps=4,
                      generator=torch.Generator().manual_seed(1), batch_size=2, device="cpu")
    assert int((adv.int() - x.int()).abs().max()) <= 2
    with pytest.raises(ValueError, match="eps"):
        pgd_perturb(surrogate, x, y, eps=0.0)
    with pytest.raises(ValueError, match="steps"):
        pgd_perturb(surrogate, x, y, steps=0)
    with pytest.raises(TypeError, match="uint8"):
        pgd_perturb(surrogate, x.float(), y)


# --------------------------------------------------------------------------- surrogate=None
def test_trains_its_own_surrogate_when_none(data):
    tiny = TrainConfig(epochs=1, batch_size=64, lr=0.05, schedule="constant", milestones=(), flip=False, seed=0)
    wm = LabelConsistent(surrogate_model="smallcnn", surrogate_width=0.25, surrogate_train=tiny, steps=5)
    out = wm.watermark(data, seed=2, device="cpu")
    assert out.key.settings["surrogate"] == "trained"
    assert out.key.settings["surrogate_train"]["epochs"] == 1 and out.key.settings["surrogate_model"] == "smallcnn"
    assert len(out.indices) == 30 and torch.equal(out.dataset.labels, data.labels)
    diff = (out.dataset.images[out.indices].int() - data.images[out.indices].int()).abs()
    assert int(diff[:, ~corner_mask()].max()) <= EPS_U8
    assert torch.equal(wm.watermark(data, seed=2, device="cpu").dataset.images, out.dataset.images)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bad, match", [
    ({"poisoning_rate": 0.0}, "poisoning_rate"),
    ({"poisoning_rate": 1.5}, "poisoning_rate"),
    ({"eps": 0.0}, "eps"),
    ({"eps": -1 / 255}, "eps"),
    ({"step": 0.0}, "step"),
    ({"steps": 0}, "steps"),
    ({"target": -1}, "target"),
    ({"pattern": "noise"}, "pattern"),
    ({"pgd_batch_size": 0}, "pgd_batch_size"),
])
def test_bad_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        LabelConsistentSettings(**bad)


def test_bad_inputs(data, surrogate):
    with pytest.raises(ValueError, match="target"):
        LabelConsistent(target=4).watermark(data, surrogate=surrogate)
    empty_target = make_dataset(counts=[10, 0, 10, 10])
    with pytest.raises(ValueError, match="no samples"):
        LabelConsistent().watermark(empty_target, surrogate=surrogate)
    with pytest.raises(TypeError, match="surrogate"):
        LabelConsistent().watermark(data, surrogate="resnet18")
    with pytest.raises(TypeError, match="ImageDataset"):
        LabelConsistent().watermark(data.images, surrogate=surrogate)
    with pytest.raises(TypeError, match="surrogate_train"):
        LabelConsistentSettings(surrogate_train=3)
