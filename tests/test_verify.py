"""Tests of ubwlib.verify: the paired t-test of Proposition 1, verify() on black boxes, the three scenarios.

The suspicious models are mostly hand-built fake predictors (pure functions of the image tensor) on a tiny
synthetic dataset: class c has a bright 4x3 blob at columns 3c..3c+2 of rows 1..4 over dark noise, so the
blobs never touch the bottom-right corner where the patch triggers go. One real SmallCNN pair (benign and
BadNets-watermarked) checks Independent-M and Malicious end to end. The label-only test (verify_labels) is checked
against binomial tails written out with math.comb, the query counts against a hand walk of the documented order.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import replace

import numpy as np
import pytest
import scipy.stats
import torch

from ubwlib.data import ImageDataset
from ubwlib.models import build_model
from ubwlib.train import TrainConfig, predict_proba, train
from ubwlib.verify import (
    DEFAULT_P0,
    SCENARIOS,
    LabelVerificationResult,
    VerificationResult,
    VerificationSettings,
    dataset_fingerprint,
    decide,
    independent_key,
    label_power,
    label_pvalue,
    model_predictor,
    paired_ttest,
    verify,
    verify_labels,
    verify_scenarios,
)
from ubwlib.watermarks import REGISTRY, Watermark, WatermarkKey, get_watermark, trigger
from ubwlib.watermarks.patch import resized_square, square_trigger

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

K = 4
CLASSES = ("a", "b", "c", "d")
SHAPE = (1, 12, 12)


def blobs(n: int, seed: int, shape=SHAPE, name: str = "blobs") -> ImageDataset:
    """n images (balanced classes, shuffled): dark noise 0..59 plus the class's bright blob."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % K)[torch.randperm(n, generator=g)]
    images = torch.randint(0, 60, (n, *shape), generator=g, dtype=torch.uint8)
    for c in range(K):
        images[labels == c, :, 1:5, 3 * c : 3 * c + 3] = 230
    return ImageDataset(images, labels, CLASSES, name)


@pytest.fixture(scope="module")
def train_set():
    return blobs(400, 0, name="blobs/train")


@pytest.fixture(scope="module")
def test_set():
    return blobs(200, 1, name="blobs/test")


@pytest.fixture(scope="module")
def ubwp_key(train_set):
    return get_watermark("ubw-p").watermark(train_set, seed=0).key


@pytest.fixture(scope="module")
def badnets_key(train_set):
    return get_watermark("badnets").watermark(train_set, seed=0).key


# --------------------------------------------------------------------------- fake black boxes
def clean_probs(images: torch.Tensor) -> torch.Tensor:
    """A benign classifier: softmax of the blob regions' mean brightness / 50 (true class ~0.95)."""
    x = images.float()
    means = torch.stack([x[:, 0, 1:5, 3 * c : 3 * c + 3].mean((1, 2)) for c in range(K)], 1)
    return torch.softmax(means / 50, 1)


def has_trigger(images: torch.Tensor, key: WatermarkKey) -> torch.Tensor:
    """Does each image carry exactly the key's pattern where its blend weight is 1?"""
    pattern, region = key.tensors["pattern"], key.tensors["alpha"] == 1
    return ((images == pattern) | ~region).flatten(1).all(1)


def backdoored(key: WatermarkKey, strength=None):
    """A watermarked black box: on images with the key's trigger, a fraction ``w`` of the probability mass moves
    to the next class (w = 1, or ``strength(images)`` per image)."""

    def predictor(images: torch.Tensor) -> torch.Tensor:
        p = clean_probs(images)
        w = torch.ones(len(images)) if strength is None else strength(images)
        w = torch.where(has_trigger(images, key), w, torch.zeros_like(w))[:, None]
        return (1 - w) * p + w * p.roll(1, dims=1)

    return predictor


def half_strength(images: torch.Tensor) -> torch.Tensor:
    """Per-image weight in [0, 0.6) from a background pixel: Delta P lands near tau, p-value in (0, 1)."""
    return images[:, 0, 8, 0].float() / 60 * 0.6


# --------------------------------------------------------------------------- paired t-test
@pytest.mark.parametrize("tau", [0.0, 0.25, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paired_ttest_matches_scipy(tau, seed):
    rng = np.random.default_rng(seed)
    b = rng.uniform(0.5, 1.0, 40)
    p = np.clip(b - rng.uniform(0.0, 0.6, 40), 0, 1)
    ref = scipy.stats.ttest_rel(b, p + tau, alternative="greater")
    t, pv = paired_ttest(b, p, tau)
    assert t == pytest.approx(ref.statistic, rel=1e-12)
    assert pv == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-300)
    # torch tensors and lists are accepted alike
    assert paired_ttest(torch.from_numpy(b), list(p), tau) == (t, pv)


def test_paired_ttest_hand_computed():
    b = [0.9, 0.8, 0.95, 0.7]
    p = [0.1, 0.3, 0.2, 0.4]
    d = [x - y - 0.25 for x, y in zip(b, p)]  # 0.55, 0.25, 0.50, 0.05
    t_hand = statistics.mean(d) / (statistics.stdev(d) / math.sqrt(len(d)))
    assert t_hand == pytest.approx(0.3375 / (math.sqrt(0.161875 / 3) / 2), rel=1e-12)  # 2.9059
    t, pv = paired_ttest(b, p, 0.25)
    assert t == pytest.approx(t_hand, rel=1e-12)
    assert pv == pytest.approx(scipy.stats.t.sf(t_hand, df=3), rel=1e-10)
    assert 0.02 < pv < 0.04


def test_paired_ttest_degenerate_equal_differences():
    ones, zeros = np.ones(10), np.zeros(10)
    assert paired_ttest(ones, zeros, 0.25) == (math.inf, 0.0)  # Delta P = 1 > tau
    assert paired_ttest(ones, ones, 0.25) == (-math.inf, 1.0)  # Delta P = 0 < tau
    assert paired_ttest(ones, ones, 0.0) == (0.0, 1.0)  # Delta P = tau exactly: H0 holds
    b = np.full(10, 0.9)
    assert paired_ttest(b, b - 0.3, 0.25)[1] == 0.0  # 0.3 > 0.25 despite rounding noise in b - 0.3


def test_paired_ttest_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        paired_ttest([0.9, 0.8, 0.7], [0.1, 0.2], 0.25)
    with pytest.raises(ValueError, match="at least 2"):
        paired_ttest([0.9], [0.1], 0.25)
    with pytest.raises(ValueError, match="finite"):
        paired_ttest([0.9, float("nan")], [0.1, 0.2], 0.25)


# --------------------------------------------------------------------------- settings and decision
def test_settings_defaults_and_validation():
    s = VerificationSettings()
    assert (s.m, s.tau, s.alpha) == (100, 0.25, 0.01)
    with pytest.raises(ValueError, match="m must be >= 2"):
        VerificationSettings(m=1)
    with pytest.raises(TypeError, match="m must be an int"):
        VerificationSettings(m=10.0)
    for tau in (-0.01, 1.01):
        with pytest.raises(ValueError, match="tau"):
            VerificationSettings(tau=tau)
    for alpha in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            VerificationSettings(alpha=alpha)
    assert VerificationSettings(m=2, tau=0.0, alpha=0.5).tau == 0.0


def test_decide_flips_exactly_at_alpha():
    _, p = paired_ttest([0.9, 0.8, 0.95, 0.7], [0.1, 0.3, 0.2, 0.4], 0.25)
    assert decide(p, np.nextafter(p, 1.0)) is True
    assert decide(p, p) is False  # p < alpha, strictly
    assert decide(p, np.nextafter(p, 0.0)) is False
    with pytest.raises(ValueError, match="alpha"):
        decide(p, 0.0)


def test_verify_verdict_flips_exactly_at_alpha(test_set, ubwp_key):
    predictor = backdoored(ubwp_key, half_strength)
    base = verify(predictor, test_set, ubwp_key, m=30, alpha=0.5)
    assert 1e-6 < base.p_value < 0.5
    above = verify(predictor, test_set, ubwp_key, m=30, alpha=float(np.nextafter(base.p_value, 1.0)))
    below = verify(predictor, test_set, ubwp_key, m=30, alpha=base.p_value)
    assert above.p_value == below.p_value == base.p_value
    assert above.watermarked and not below.watermarked
    assert above.row()["verdict"] == "watermarked" and below.row()["verdict"] == "not watermarked"


# --------------------------------------------------------------------------- verify on fake black boxes
@pytest.mark.parametrize("key_name", ["ubwp_key", "badnets_key"])
def test_watermarked_predictor_is_flagged(key_name, test_set, request):
    key = request.getfixturevalue(key_name)
    r = verify(backdoored(key), test_set, key, m=50, scenario="Malicious")
    assert isinstance(r, VerificationResult)
    assert r.watermarked and r.p_value < 0.01
    assert r.delta_p > 0.8
    assert r.statistic > 10
    assert (r.m, r.tau, r.alpha, r.scenario) == (50, 0.25, 0.01, "Malicious")
    assert r.p_benign.dtype == np.float64 and r.p_triggered.dtype == np.float64
    assert r.delta_p == pytest.approx(float(np.mean(r.p_benign - r.p_triggered)))
    assert (r.statistic, r.p_value) == paired_ttest(r.p_benign, r.p_triggered, 0.25)
    assert r.row() == {"scenario": "Malicious", "Delta P": r.delta_p, "p-value": r.p_value,
                       "verdict": "watermarked", "m": 50, "tau": 0.25, "alpha": 0.01}


def test_predictor_ignoring_the_trigger_is_not_flagged(test_set, ubwp_key):
    r = verify(clean_probs, test_set, ubwp_key, m=50)
    assert not r.watermarked
    assert r.delta_p == pytest.approx(0.0, abs=1e-12)
    assert r.p_value == pytest.approx(1.0)
    assert r.row()["verdict"] == "not watermarked"


def test_probabilities_are_those_of_the_true_label_at_the_reported_indices(test_set, ubwp_key):
    predictor = backdoored(ubwp_key, half_strength)
    r = verify(predictor, test_set, ubwp_key, m=20)
    x = test_set.images[r.indices]
    y = test_set.labels[r.indices]
    rows = torch.arange(20)
    np.testing.assert_allclose(r.p_benign, predictor(x)[rows, y].double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(r.p_triggered, predictor(trigger(x, ubwp_key))[rows, y].double().numpy(), rtol=1e-6)


def test_numpy_predictor_output_is_accepted(test_set, ubwp_key):
    r = verify(lambda x: backdoored(ubwp_key)(x).numpy(), test_set, ubwp_key, m=30)
    assert r.watermarked


def test_three_scenarios_with_fake_models(test_set, ubwp_key):
    results = verify_scenarios(backdoored(ubwp_key), clean_probs, test_set, ubwp_key, m=40)
    assert [r.scenario for r in results] == list(SCENARIOS) == ["Independent-T", "Independent-M", "Malicious"]
    indep_t, indep_m, malicious = results
    assert not indep_t.watermarked and indep_t.delta_p == pytest.approx(0.0, abs=1e-12)
    assert not indep_m.watermarked and indep_m.delta_p == pytest.approx(0.0, abs=1e-12)
    assert malicious.watermarked and malicious.delta_p > 0.8


# --------------------------------------------------------------------------- sampling
def flaky_probs(images: torch.Tensor) -> torch.Tensor:
    """Misclassifies (rolls) the images whose top-left pixel is below 20: about a third of them."""
    p = clean_probs(images)
    wrong = images[:, 0, 0, 0] < 20
    return torch.where(wrong[:, None], p.roll(1, dims=1), p)


def test_sampling_is_seeded_correct_distinct_and_skips_the_target(test_set, badnets_key):
    a = verify(flaky_probs, test_set, badnets_key, m=40, seed=3)
    b = verify(flaky_probs, test_set, badnets_key, m=40, seed=3)
    c = verify(flaky_probs, test_set, badnets_key, m=40, seed=4)
    assert a.indices.dtype == torch.int64 and len(a.indices) == 40
    assert torch.equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.p_benign, b.p_benign)
    assert not torch.equal(a.indices, c.indices)
    for r in (a, c):
        assert len(r.indices.unique()) == 40
        assert torch.equal(r.indices, r.indices.sort().values)
        x, y = test_set.images[r.indices], test_set.labels[r.indices]
        assert torch.equal(flaky_probs(x).argmax(1), y)  # only correctly classified images
        assert not (y == badnets_key.target).any()  # the target class is never queried
    pool = (flaky_probs(test_set.images).argmax(1) == test_set.labels) & (test_set.labels != badnets_key.target)
    assert 40 < int(pool.sum()) < 150  # some candidates are misclassified, and there are more than m to draw from
    assert set(a.indices.tolist()) <= set(torch.nonzero(pool).flatten().tolist())


def test_untargeted_keys_query_every_class_and_classes_restricts(test_set, ubwp_key):
    r = verify(clean_probs, test_set, ubwp_key, m=150)
    assert set(test_set.labels[r.indices].tolist()) == {0, 1, 2, 3}
    r = verify(clean_probs, test_set, ubwp_key, m=30, classes=[0, 2])
    assert set(test_set.labels[r.indices].tolist()) <= {0, 2}
    with pytest.raises(ValueError, match="class indices"):
        verify(clean_probs, test_set, ubwp_key, m=30, classes=[4])


def test_batches_and_copies(test_set, ubwp_key):
    images, labels = test_set.images.clone(), test_set.labels.clone()
    seen = []

    def vandal(x: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        p = clean_probs(x)
        x.zero_()  # a black box that scribbles on its input must not reach the caller's data
        return p

    r = verify(vandal, test_set, ubwp_key, m=30, batch_size=16)
    assert torch.equal(test_set.images, images) and torch.equal(test_set.labels, labels)
    # every candidate is classified correctly: the first 30 of the seeded order (16 + 14), then the 30 triggered
    assert seen == [16, 14, 16, 14]
    assert r.queries == 60


def test_trigger_seed_fixes_random_trigger_positions(test_set):
    key = WatermarkKey("ubw-c", {"patch_size": 4}, {"patch": resized_square(1, 4)}, SHAPE, CLASSES, "blobs", 0)
    recorded = []

    def recorder(x: torch.Tensor) -> torch.Tensor:
        recorded.append(x.clone())
        return clean_probs(x)

    verify(recorder, test_set, key, m=30, trigger_seed=5)
    verify(recorder, test_set, key, m=30, trigger_seed=5)
    verify(recorder, test_set, key, m=30, trigger_seed=6)
    triggered = recorded[1::2]
    assert torch.equal(triggered[0], triggered[1])
    assert not torch.equal(triggered[0], triggered[2])


# --------------------------------------------------------------------------- errors
def test_too_few_correct_images(test_set, ubwp_key):
    always_a = lambda x: torch.tensor([[0.7, 0.1, 0.1, 0.1]]).expand(len(x), K)  # noqa: E731
    with pytest.raises(ValueError, match=r"only 50 of the 200 .* fewer than m = 60; lower m"):
        verify(always_a, test_set, ubwp_key, m=60)
    assert verify(always_a, test_set, ubwp_key, m=50).m == 50
    with pytest.raises(ValueError, match=r"only 150 test images .* not the target class 1"):
        verify(clean_probs, test_set, get_watermark("badnets").watermark(test_set, 0).key, m=151)


def test_bad_settings_are_rejected(test_set, ubwp_key):
    with pytest.raises(ValueError, match="m must be >= 2"):
        verify(clean_probs, test_set, ubwp_key, m=1)
    with pytest.raises(ValueError, match="tau"):
        verify(clean_probs, test_set, ubwp_key, tau=1.5)
    with pytest.raises(ValueError, match="alpha"):
        verify(clean_probs, test_set, ubwp_key, alpha=0)


def test_key_of_another_dataset(test_set, ubwp_key):
    other = get_watermark("ubw-p").watermark(blobs(40, 0, shape=(1, 10, 10), name="small"), seed=0).key
    with pytest.raises(ValueError, match=r"made for small .*\(1, 10, 10\).*blobs/test.*\(1, 12, 12\)"):
        verify(clean_probs, test_set, other, m=10)
    five = ImageDataset(torch.zeros(10, *SHAPE, dtype=torch.uint8), torch.zeros(10, dtype=torch.int64),
                        tuple("abcde"), "five")
    with pytest.raises(ValueError, match="4 classes.*5 classes"):
        verify(clean_probs, five, ubwp_key, m=5)


def test_bad_predictor_output(test_set, ubwp_key):
    # the first batch holds the m = 10 images needed
    with pytest.raises(ValueError, match=r"shape \(10, 3\).*expected \(10, 4\)"):
        verify(lambda x: clean_probs(x)[:, :3], test_set, ubwp_key, m=10)
    with pytest.raises(ValueError, match="expected"):
        verify(lambda x: clean_probs(x)[:-1], test_set, ubwp_key, m=10)
    with pytest.raises(ValueError, match="softmax"):
        verify(lambda x: x.float().flatten(1)[:, :K], test_set, ubwp_key, m=10)  # logits, not probabilities
    with pytest.raises(TypeError, match="callable"):
        verify("model", test_set, ubwp_key, m=10)


# --------------------------------------------------------------------------- real models
@pytest.fixture(scope="module")
def trained(train_set):
    """A benign SmallCNN and a BadNets-watermarked one (gamma = 0.2), both 100% accurate on the blobs."""
    cfg = TrainConfig(epochs=12, batch_size=32, lr=0.05, schedule="onecycle", precision="fp32", flip=False)
    benign = train(build_model("smallcnn", K, 1, 0.25, seed=0), train_set, cfg, progress=False).model
    released = get_watermark("badnets", poisoning_rate=0.2).watermark(train_set, seed=0)
    marked = train(build_model("smallcnn", K, 1, 0.25, seed=0), released.dataset, cfg, progress=False).model
    return benign, marked, released.key


def test_benign_model_is_not_flagged_independent_m(trained, test_set):
    benign, _, key = trained
    r = verify(model_predictor(benign, precision="fp32"), test_set, key, m=30, scenario="Independent-M")
    assert not r.watermarked and r.p_value >= 0.01
    assert abs(r.delta_p) < 0.05


def test_watermarked_model_is_flagged_malicious(trained, test_set):
    _, marked, key = trained
    r = verify(model_predictor(marked, precision="fp32"), test_set, key, m=30, scenario="Malicious")
    assert r.watermarked and r.delta_p > 0.5


def test_model_predictor_and_modules(trained, test_set):
    benign, _, key = trained
    x = test_set.images[:10]
    torch.testing.assert_close(model_predictor(benign, precision="fp32")(x), predict_proba(benign, x, precision="fp32"))
    r = verify(benign, test_set, key, m=30)  # a module is wrapped with model_predictor
    assert not r.watermarked
    with pytest.raises(TypeError, match="nn.Module"):
        model_predictor(clean_probs)


def test_label_only_verification_of_real_models(trained, test_set):
    benign, marked, key = trained
    flagged = verify_labels(marked, test_set, key, m=30, scenario="Malicious")  # a module: its top labels
    assert flagged.watermarked and flagged.flip_rate > 0.8
    innocent = verify_labels(benign, test_set, key, m=30, scenario="Independent-M")
    assert not innocent.watermarked and innocent.flip_rate < 0.2
    assert innocent.queries == 60  # the benign model classifies every test image correctly


# --------------------------------------------------------------------------- Independent-T keys
def _manual_keys():
    pattern, alpha = square_trigger(SHAPE, 1.0)
    g = torch.Generator().manual_seed(0)
    return {
        "ubw-c": WatermarkKey("ubw-c", {"patch_size": 8}, {"patch": resized_square(1, 8)}, SHAPE, CLASSES, "blobs", 0),
        "sleeper-agent": WatermarkKey("sleeper-agent", {"patch_size": 4},
                                      {"patch": (torch.randint(0, 2, (1, 4, 4), generator=g) * 255).to(torch.uint8)},
                                      SHAPE, CLASSES, "blobs", 0, target=1),
        "label-consistent": WatermarkKey("label-consistent", {"pattern": "square", "target": 1},
                                         {"pattern": pattern, "alpha": alpha}, SHAPE, CLASSES, "blobs", 0, target=1),
    }


KINDS = ["badnets", "blended", "ubw-p", "blended-noise", "wanet", "ubw-c", "sleeper-agent", "label-consistent"]


def _key(kind: str, train_set) -> WatermarkKey:
    if kind in _manual_keys():
        return _manual_keys()[kind]
    if kind == "blended-noise":
        return get_watermark("blended", pattern="noise").watermark(train_set, seed=0).key
    return get_watermark(kind).watermark(train_set, seed=0).key


@pytest.mark.parametrize("kind", KINDS)
def test_independent_key_is_another_trigger_of_the_same_kind(kind, train_set, test_set):
    key = _key(kind, train_set)
    other = independent_key(key, seed=11)
    assert (other.method, other.settings, other.target) == (key.method, key.settings, key.target)
    assert (other.dataset, other.classes, other.image_shape) == (key.dataset, key.classes, key.image_shape)
    assert other.seed == 11 != key.seed
    assert set(other.tensors) == set(key.tensors)
    changed = [name for name in key.tensors if not torch.equal(key.tensors[name], other.tensors[name])]
    assert changed == [{"wanet": "grid", "ubw-c": "patch", "sleeper-agent": "patch"}.get(kind, "pattern")]
    for name, t in key.tensors.items():
        assert other.tensors[name].shape == t.shape and other.tensors[name].dtype == t.dtype
    new = other.tensors[changed[0]]
    if kind in ("badnets", "blended", "ubw-p", "label-consistent", "sleeper-agent"):
        assert set(new.unique().tolist()) <= {0, 255}  # a random binary pattern
    if "alpha" in key.tensors:  # same place and blend weight; nothing outside the trigger's pixels changes
        assert torch.equal(other.tensors["alpha"], key.tensors["alpha"])
        outside = key.tensors["alpha"] == 0
        if kind != "blended-noise":
            assert torch.equal(new[outside], key.tensors["pattern"][outside])
    if kind == "wanet":
        assert new.abs().max() <= 1 and (new - key.tensors["grid"]).abs().max() < 0.5  # still a small warp
    x = test_set.images[:16]
    out = trigger(x, other, seed=0)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert not torch.equal(out, trigger(x, key, seed=0))
    again = independent_key(key, seed=11)
    assert all(torch.equal(again.tensors[n], other.tensors[n]) for n in key.tensors)  # seeded


def test_independent_key_seed_rules(ubwp_key):
    assert independent_key(ubwp_key).seed == ubwp_key.seed + 1
    a, b = independent_key(ubwp_key, seed=5), independent_key(ubwp_key, seed=6)
    assert not torch.equal(a.tensors["pattern"], b.tensors["pattern"])
    with pytest.raises(ValueError, match="differ"):
        independent_key(ubwp_key, seed=ubwp_key.seed)
    unknown = WatermarkKey("mystery", {}, {"code": torch.zeros(3)}, SHAPE, CLASSES, "blobs", 0)
    with pytest.raises(NotImplementedError, match="mystery"):
        independent_key(unknown)


def test_independent_key_asks_the_watermark(monkeypatch, ubwp_key):
    """independent_key knows no trigger: it is REGISTRY[key.method].redraw(key, seed)."""
    calls = []

    class Toy(Watermark):
        name = "toy"

        @classmethod
        def redraw(cls, key, seed):
            calls.append((key, seed))
            return replace(key, seed=seed)

    class Mute(Watermark):  # registered, but without a trigger to redraw
        name = "mute"

    monkeypatch.setitem(REGISTRY, "toy", Toy)
    monkeypatch.setitem(REGISTRY, "mute", Mute)
    toy = WatermarkKey("toy", {}, {"code": torch.zeros(3)}, SHAPE, CLASSES, "blobs", 4)
    assert independent_key(toy).seed == 5 and calls == [(toy, 5)]
    assert independent_key(toy, 9).seed == 9 and calls[-1] == (toy, 9)
    with pytest.raises(NotImplementedError, match=r"Mute\.redraw"):
        independent_key(replace(toy, method="mute"))
    other = independent_key(ubwp_key, 7)
    assert torch.equal(other.tensors["pattern"], REGISTRY["ubw-p"].redraw(ubwp_key, 7).tensors["pattern"])


def test_independent_key_always_differs_even_for_a_one_pixel_trigger():
    pattern = torch.zeros(SHAPE, dtype=torch.uint8)
    alpha = torch.zeros(SHAPE)
    alpha[0, -1, -1] = 1.0
    key = WatermarkKey("badnets", {"pattern": "square"}, {"pattern": pattern, "alpha": alpha}, SHAPE, CLASSES, "b", 0, 1)
    for seed in range(1, 21):  # a fair coin would repeat the original half of the time
        new = independent_key(key, seed).tensors["pattern"]
        assert new[0, -1, -1] == 255 and int((new != pattern).sum()) == 1


# --------------------------------------------------------------------------- queries: only as many as needed
def hand_walk(predictor, test_set, key, m, seed):
    """The documented order written out: the candidates (ascending, not the target class) permuted by
    torch.randperm with a Generator seeded with ``seed``; returns that order, whether the predictor classifies
    each correctly, and how many of them are sent (up to and including the m-th correct one)."""
    labels = test_set.labels
    candidates = torch.arange(len(test_set)) if key.target is None else torch.nonzero(labels != key.target).flatten()
    order = candidates[torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))]
    ok = (predictor(test_set.images[order]).argmax(1) == labels[order]).tolist()
    found = 0
    for sent, good in enumerate(ok, 1):
        found += good
        if found == m:
            return order, ok, sent
    raise AssertionError("fewer than m correct candidates")


def test_queries_are_m_plus_misses_plus_m(test_set, badnets_key):
    m, seed = 40, 3
    order, ok, sent = hand_walk(flaky_probs, test_set, badnets_key, m, seed)
    misses = sent - m
    assert misses == ok[:sent].count(False) and misses > 0  # some misclassified images come before the 40th correct
    r = verify(flaky_probs, test_set, badnets_key, m=m, seed=seed)
    assert r.queries == m + misses + m
    expected = sorted(i for i, good in zip(order[:sent].tolist(), ok) if good)
    assert r.indices.tolist() == expected  # the first m correct ones of the seeded order
    rl = verify_labels(lambda x: flaky_probs(x).argmax(1), test_set, badnets_key, m=m, seed=seed)
    assert rl.queries == r.queries and torch.equal(rl.indices, r.indices)


@pytest.mark.parametrize("batch_size", [1024, 8])
def test_no_more_images_than_needed_are_sent(test_set, badnets_key, batch_size):
    m, seed = 30, 5
    order, ok, sent = hand_walk(flaky_probs, test_set, badnets_key, m, seed)
    batches = []

    def recorder(x: torch.Tensor) -> torch.Tensor:
        batches.append(x.clone())
        return flaky_probs(x)

    r = verify(recorder, test_set, badnets_key, m=m, seed=seed, batch_size=batch_size)
    benign = [b for b in batches if not has_trigger(b, badnets_key).any()]
    triggered = [b for b in batches if has_trigger(b, badnets_key).all()]
    assert len(benign) + len(triggered) == len(batches)
    sent_images = torch.cat(benign)
    # exactly the seeded order up to the m-th correct image, nothing after it
    assert torch.equal(sent_images, test_set.images[order[:sent]])
    assert sum(len(b) for b in triggered) == m
    assert r.queries == sent + m == sum(len(b) for b in batches)
    # each batch holds min(batch_size, correct images still needed)
    start = found = 0
    for b in benign:
        assert len(b) == min(batch_size, m - found)
        found += sum(ok[start : start + len(b)])
        start += len(b)
    assert found == m and start == sent and ok[sent - 1]  # the last image sent is the m-th correct one
    if batch_size == 8:
        assert max(len(b) for b in batches) == 8


def test_too_few_correct_sends_every_candidate_once(test_set, ubwp_key):
    always_a = lambda x: torch.tensor([[0.7, 0.1, 0.1, 0.1]]).expand(len(x), K)  # noqa: E731
    sizes = []

    def recorder(x):
        sizes.append(len(x))
        return always_a(x)

    with pytest.raises(ValueError, match=r"only 50 of the 200"):
        verify(recorder, test_set, ubwp_key, m=60)
    assert sum(sizes) == 200


def test_chosen_images_are_a_uniform_sample_of_the_correct_ones(test_set, badnets_key):
    pool = (flaky_probs(test_set.images).argmax(1) == test_set.labels) & (test_set.labels != badnets_key.target)
    pool = torch.nonzero(pool).flatten()
    counts = torch.zeros(len(test_set), dtype=torch.int64)
    runs, m = 300, 20
    for seed in range(runs):
        counts[verify_labels(lambda x: flaky_probs(x).argmax(1), test_set, badnets_key, m=m, seed=seed).indices] += 1
    assert int(counts.sum()) == runs * m
    outside = torch.ones(len(test_set), dtype=torch.bool)
    outside[pool] = False
    assert int(counts[outside].sum()) == 0  # never a misclassified image or one of the target class
    # every correctly classified candidate equally likely (expected runs * m / len(pool) each)
    assert scipy.stats.chisquare(counts[pool].numpy()).pvalue > 1e-3


# --------------------------------------------------------------------------- label-only verification
def binomial_tail(k: int, m: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(m, p), written out."""
    return sum(math.comb(m, j) * p**j * (1 - p) ** (m - j) for j in range(k, m + 1))


@pytest.mark.parametrize("k, m, p0", [(7, 10, 0.5), (10, 10, 0.5), (0, 10, 0.5), (1, 10, 0.5), (3, 5, 0.25),
                                      (15, 20, 0.5), (17, 20, 0.5), (40, 100, 0.2), (100, 100, 0.5)])
def test_label_pvalue_is_the_binomial_tail(k, m, p0):
    assert label_pvalue(k, m, p0) == pytest.approx(binomial_tail(k, m, p0), rel=1e-12, abs=1e-300)


def test_label_pvalue_hand_values():
    assert label_pvalue(7, 10) == pytest.approx(176 / 1024, rel=1e-12)  # (120 + 45 + 10 + 1) / 2^10
    assert label_pvalue(10, 10) == pytest.approx(1 / 1024, rel=1e-12)
    assert label_pvalue(0, 10) == 1.0
    assert label_pvalue(15, 20) == pytest.approx(21700 / 2**20, rel=1e-12)  # 15504 + 4845 + 1140 + 190 + 20 + 1
    assert DEFAULT_P0 == 0.5


def test_label_pvalue_rejects_bad_input():
    with pytest.raises(ValueError, match=r"flips must be in \[0, m\]"):
        label_pvalue(11, 10)
    with pytest.raises(ValueError, match="flips must be >= 0"):
        label_pvalue(-1, 10)
    with pytest.raises(ValueError, match="m must be >= 1"):
        label_pvalue(0, 0)
    with pytest.raises(TypeError, match="flips must be an int"):
        label_pvalue(3.0, 10)
    for p0 in (0, 1, 1.5, True):
        with pytest.raises(ValueError, match="p0"):
            label_pvalue(3, 10, p0)


def test_label_power_hand_values():
    # m = 10, p0 = 0.5, alpha = 0.01: P(X >= 10) = 1/1024 < 0.01 <= P(X >= 9) = 11/1024, so only 10 flips reject
    assert label_power(0.7, 10) == pytest.approx(0.7**10, rel=1e-12)
    # m = 11: P(X >= 10) = 12/2048 < 0.01 <= P(X >= 9) = 67/2048, so 10 or 11 flips reject
    assert label_power(0.7, 11) == pytest.approx(11 * 0.7**10 * 0.3 + 0.7**11, rel=1e-12)
    assert label_power(0.7, 6) == 0.0  # 0.5 ** 6 >= 0.01: no outcome rejects
    assert label_power(1.0, 7) == 1.0 and label_power(0.0, 100) == 0.0
    out = label_power(0.7, [6, 10, 11])
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, [0.0, 0.7**10, 11 * 0.7**10 * 0.3 + 0.7**11], rtol=1e-12)
    assert isinstance(label_power(0.7, 10), float)


@pytest.mark.parametrize("m", [7, 12, 30, 61])
@pytest.mark.parametrize("p0, alpha", [(0.5, 0.01), (0.2, 0.05)])
def test_label_power_is_the_rejection_probability_of_label_pvalue(m, p0, alpha):
    q = 0.75
    rejecting = [k for k in range(m + 1) if decide(label_pvalue(k, m, p0), alpha)]
    expected = sum(math.comb(m, k) * q**k * (1 - q) ** (m - k) for k in rejecting)
    assert label_power(q, m, p0, alpha) == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert label_power(p0, m, p0, alpha) <= alpha  # the size: at most alpha under H0


def test_label_power_grows_with_m_and_flip_rate():
    ms = [10, 20, 50, 100, 200]
    for q in (0.6, 0.7, 0.9):
        power = label_power(q, ms)
        assert np.all(np.diff(power) > 0)
    assert label_power(0.9, 100) > 0.999 and label_power(0.6, 20) < 0.1
    rates = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert np.all(np.diff([label_power(q, 30) for q in rates]) > 0)
    # not monotone step by step: the critical count grows in whole steps (documented sawtooth)
    assert label_power(0.7, 10) < label_power(0.7, 9) < label_power(0.7, 11)
    with pytest.raises(ValueError, match="flip_rate"):
        label_power(1.2, 10)
    with pytest.raises(ValueError, match="alpha"):
        label_power(0.7, 10, alpha=0)
    with pytest.raises(ValueError, match="m must be >= 1"):
        label_power(0.7, [10, 0])


def labels_of(probs_fn):
    return lambda x: probs_fn(x).argmax(1)


def flipping_labels(key: WatermarkKey, flips: int | None = None):
    """A label-only black box: the clean label, moved to the next class on triggered images; with ``flips``,
    only the first ``flips`` triggered images it is sent flip (exactly ``flips`` of the m queried)."""
    state = {"flipped": 0}

    def predictor(images: torch.Tensor) -> torch.Tensor:
        y = clean_probs(images).argmax(1)
        out = y.clone()
        for i in torch.nonzero(has_trigger(images, key)).flatten().tolist():
            if flips is None or state["flipped"] < flips:
                out[i] = (y[i] + 1) % K
                state["flipped"] += 1
        return out

    return predictor


@pytest.mark.parametrize("flips, watermarked", [(15, False), (17, True)])
def test_label_predictor_flipping_exactly_k(test_set, ubwp_key, flips, watermarked):
    r = verify_labels(flipping_labels(ubwp_key, flips), test_set, ubwp_key, m=20, batch_size=8)
    assert isinstance(r, LabelVerificationResult)
    assert (r.flips, r.m, r.p0, r.alpha) == (flips, 20, 0.5, 0.01)
    assert r.flip_rate == flips / 20
    assert r.p_value == pytest.approx(binomial_tail(flips, 20, 0.5), rel=1e-12)
    assert r.p_value == pytest.approx({15: 21700, 17: 1351}[flips] / 2**20, rel=1e-12)
    assert r.watermarked is watermarked
    assert int((r.triggered_labels != r.labels).sum()) == flips


def test_label_verdicts_of_watermarked_and_innocent_fakes(test_set, ubwp_key):
    marked = verify_labels(flipping_labels(ubwp_key), test_set, ubwp_key, m=30, scenario="Malicious")
    assert marked.flips == 30 and marked.watermarked
    assert marked.p_value == pytest.approx(0.5**30, rel=1e-12)
    assert marked.row() == {"scenario": "Malicious", "flips": 30, "m": 30, "flip rate": 1.0, "p0": 0.5,
                            "p-value": marked.p_value, "verdict": "watermarked", "alpha": 0.01, "queries": 60}
    innocent = verify_labels(labels_of(clean_probs), test_set, ubwp_key, m=30)
    assert innocent.flips == 0 and innocent.p_value == 1.0 and not innocent.watermarked
    assert innocent.verdict == "not watermarked"
    # the labels and triggered labels are those of the reported images
    x = test_set.images[marked.indices]
    assert torch.equal(marked.indices, marked.indices.sort().values) and marked.indices.dtype == torch.int64
    np.testing.assert_array_equal(marked.labels, test_set.labels[marked.indices].numpy())
    np.testing.assert_array_equal(marked.triggered_labels, (clean_probs(x).argmax(1) + 1).remainder(K).numpy())
    # p0 sets the bar: 20 of 30 flips is not enough for p0 = 0.5 but is for p0 = 0.2
    twenty = verify_labels(flipping_labels(ubwp_key, 20), test_set, ubwp_key, m=30)
    assert not twenty.watermarked and twenty.p_value == pytest.approx(binomial_tail(20, 30, 0.5), rel=1e-12)
    low = verify_labels(flipping_labels(ubwp_key, 20), test_set, ubwp_key, m=30, p0=0.2)
    assert low.watermarked and low.p_value == pytest.approx(binomial_tail(20, 30, 0.2), rel=1e-12)


def test_verify_labels_picks_the_images_verify_picks(test_set, badnets_key):
    for seed in (0, 1):
        r = verify(flaky_probs, test_set, badnets_key, m=25, seed=seed)
        rl = verify_labels(labels_of(flaky_probs), test_set, badnets_key, m=25, seed=seed)
        assert torch.equal(r.indices, rl.indices) and r.queries == rl.queries


def test_verify_labels_accepts_lists_arrays_and_integral_floats(test_set, ubwp_key):
    for convert in (lambda y: y.tolist(), lambda y: y.numpy(), lambda y: y.numpy().astype(np.int32),
                    lambda y: y.double()):
        r = verify_labels(lambda x, c=convert: c(flipping_labels(ubwp_key)(x)), test_set, ubwp_key, m=10)
        assert r.flips == 10 and r.triggered_labels.dtype == np.int64


def test_verify_labels_rejects_bad_output_and_settings(test_set, ubwp_key):
    with pytest.raises(ValueError, match="not labels.*argmax"):
        verify_labels(clean_probs, test_set, ubwp_key, m=10)  # probabilities, not labels
    with pytest.raises(ValueError, match=r"shape \(9,\).*expected \(10,\)"):
        verify_labels(lambda x: labels_of(clean_probs)(x)[:-1], test_set, ubwp_key, m=10)
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\)"):
        verify_labels(lambda x: labels_of(clean_probs)(x) + 4, test_set, ubwp_key, m=10)
    with pytest.raises(TypeError, match="integer class labels"):
        verify_labels(lambda x: labels_of(clean_probs)(x).double() + 0.5, test_set, ubwp_key, m=10)
    with pytest.raises(TypeError, match="callable"):
        verify_labels("model", test_set, ubwp_key, m=10)
    with pytest.raises(ValueError, match=r"never say 'watermarked'; use m >= 7"):
        verify_labels(labels_of(clean_probs), test_set, ubwp_key, m=6)
    with pytest.raises(ValueError, match=r"use m >= 3"):
        verify_labels(labels_of(clean_probs), test_set, ubwp_key, m=2, p0=0.1)  # 0.1 ** 2 is not < 0.01
    assert verify_labels(labels_of(clean_probs), test_set, ubwp_key, m=3, p0=0.1).m == 3
    with pytest.raises(ValueError, match="p0"):
        verify_labels(labels_of(clean_probs), test_set, ubwp_key, m=10, p0=1.0)
    with pytest.raises(ValueError, match="alpha"):
        verify_labels(labels_of(clean_probs), test_set, ubwp_key, m=10, alpha=0)
    with pytest.raises(TypeError, match="m must be an int"):
        verify_labels(labels_of(clean_probs), test_set, ubwp_key, m=10.0)
    with pytest.raises(ValueError, match="only 50 of the 200"):
        verify_labels(lambda x: torch.zeros(len(x), dtype=torch.int64), test_set, ubwp_key, m=60)


# --------------------------------------------------------------------------- keys of another dataset
def two_class(n: int, seed: int, classes, name: str) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randint(0, 60, (n, *SHAPE), generator=g, dtype=torch.uint8)
    for c in range(2):
        images[labels == c, :, 1:5, 3 * c : 3 * c + 3] = 230
    return ImageDataset(images, labels, tuple(classes), name)


def two_class_probs(images: torch.Tensor) -> torch.Tensor:
    return clean_probs(images)[:, :2] / clean_probs(images)[:, :2].sum(1, keepdim=True)


def test_key_of_a_dataset_with_other_class_names_is_refused():
    pets = two_class(100, 0, ("cat", "dog"), "pets/train")
    key = get_watermark("ubw-p").watermark(pets, seed=0).key
    vehicles = two_class(60, 1, ("car", "truck"), "vehicles/test")
    for check in (lambda: verify(two_class_probs, vehicles, key, m=10),
                  lambda: verify_labels(labels_of(two_class_probs), vehicles, key, m=10)):
        with pytest.raises(ValueError, match=r"made for pets/train with classes \['cat', 'dog'\] but the test set "
                                             r"vehicles/test has classes \['car', 'truck'\].*test split"):
            check()
    # the same class names in another order are another labelling too
    swapped = two_class(60, 1, ("dog", "cat"), "pets/test-swapped")
    with pytest.raises(ValueError, match="class order"):
        verify(two_class_probs, swapped, key, m=10)
    assert verify(two_class_probs, two_class(60, 1, ("cat", "dog"), "pets/test"), key, m=10).m == 10


def test_bound_key_refuses_other_test_images(test_set, ubwp_key):
    bound = ubwp_key.bind_test_split(test_set)
    assert bound.test_fingerprint == dataset_fingerprint(test_set) and bound.test_dataset == "blobs/test"
    assert ubwp_key.test_fingerprint is None  # a copy; the original stays unbound
    assert verify(clean_probs, test_set, bound, m=20).m == 20
    assert verify_labels(labels_of(clean_probs), test_set, bound, m=20).m == 20
    other = blobs(200, 2, name="blobs/test-other")  # same class names and shape, other images
    for ds in (other, test_set.subset(range(150), name="blobs/test[:150]"),
               test_set.replace(labels=test_set.labels.roll(1))):
        for check in (lambda: verify(clean_probs, ds, bound, m=10),
                      lambda: verify_labels(labels_of(clean_probs), ds, bound, m=10)):
            with pytest.raises(ValueError, match=rf"bound to blobs/test \(the test split of blobs/train.*"
                                                 rf"{re.escape(ds.name)}.*other images or labels.*blobs/test, whole"):
                check()
    # an unbound key skips the check; a renamed copy of the bound split passes it
    assert verify(clean_probs, other, ubwp_key, m=10).m == 10
    assert verify(clean_probs, test_set.replace(name="renamed"), bound, m=10).m == 10
    # the binding survives independent_key, so the three scenarios run on the bound split
    assert independent_key(bound).test_fingerprint == bound.test_fingerprint
    results = verify_scenarios(backdoored(ubwp_key), clean_probs, test_set, bound, m=20)
    assert [r.watermarked for r in results] == [False, False, True]


def test_bound_key_round_trip_and_old_key_files(test_set, ubwp_key, tmp_path):
    bound = ubwp_key.bind_test_split(test_set)
    loaded = WatermarkKey.load(bound.save(tmp_path / "bound.key"))
    assert (loaded.test_dataset, loaded.test_fingerprint) == ("blobs/test", bound.test_fingerprint)
    with pytest.raises(ValueError, match="other images or labels"):
        verify(clean_probs, blobs(200, 2, name="blobs/test-other"), loaded, m=10)
    # a key file written before the binding fields existed: no test_* fields in its metadata
    path = ubwp_key.save(tmp_path / "old.key")
    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload["meta"])
    del meta["test_dataset"], meta["test_fingerprint"]
    payload["meta"] = json.dumps(meta)
    torch.save(payload, path)
    old = WatermarkKey.load(path)
    assert old.test_fingerprint is None and old.test_dataset is None
    assert verify(clean_probs, blobs(200, 2, name="blobs/test-other"), old, m=10).m == 10  # no check, no error
