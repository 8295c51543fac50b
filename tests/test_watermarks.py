"""Tests of ubwlib.watermarks: BadNets, Blended, UBW-P, WaNet (incl. noise mode), keys and evaluate().

Everything runs on small synthetic uint8 datasets built here; the expected values are computed
independently (plain float32 formulas, hand-counted rates), never with the code under test.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from ubwlib.data import ImageDataset
from ubwlib.verify import independent_key
from ubwlib.watermarks import (
    REGISTRY,
    Watermark,
    WatermarkedDataset,
    WatermarkKey,
    evaluate,
    get_watermark,
    poison_count,
    trigger,
)
from ubwlib.watermarks.base import dataset_fingerprint
from ubwlib.watermarks.patch import resized_square, square_trigger
from ubwlib.watermarks.wanet import warp_field

K = 10
CLASSES = tuple(f"c{i}" for i in range(K))
SQUARE = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.uint8) * 255
SHAPES = [(1, 28, 28), (3, 32, 32)]
ALL = ["badnets", "blended", "ubw-p", "wanet", "wanet-noise"]
TARGETED = ["badnets", "blended", "wanet", "wanet-noise"]


def make_dataset(n: int, shape=(1, 28, 28), seed: int = 0, num_classes: int = K, name: str = "synth") -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return ImageDataset(images, labels, tuple(f"c{i}" for i in range(num_classes)), name)


def make(name: str, **settings):
    """A watermark by test name ("wanet-noise" = WaNet with noise mode)."""
    if name == "wanet-noise":
        return get_watermark("wanet", noise_mode=True, **settings)
    return get_watermark(name, **settings)


def corner_mask(shape) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    m[:, -3:, -3:] = True
    return m


def ref_blend(x: torch.Tensor, t: torch.Tensor, a: float) -> torch.Tensor:
    """round((1 - a) x + a t) in float32, written independently of ubwlib's torch.lerp."""
    a32 = torch.tensor(a, dtype=torch.float32)
    y = (1 - a32) * x.float() + a32 * t.float()
    return torch.floor(y + 0.5).clamp(0, 255).to(torch.uint8)


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def ds28():
    return make_dataset(400, (1, 28, 28), seed=1)


@pytest.fixture(scope="module")
def ds32():
    return make_dataset(300, (3, 32, 32), seed=2)


@pytest.fixture(scope="module", params=SHAPES, ids=["1x28x28", "3x32x32"])
def ds(request, ds28, ds32):
    return ds28 if request.param == (1, 28, 28) else ds32


# --------------------------------------------------------------------------------------------
# Counts, indices, untouched samples
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rate, n, expected",
    [(0.1, 25, 3), (0.1, 45, 5), (0.1, 15, 2), (0.1, 5, 1), (0.1, 4, 1), (0.1, 1, 1), (0.1, 400, 40),
     (0.25, 10, 3), (1.0, 7, 7), (0.5, 3, 2)],
)
def test_poison_count_rounds_half_away_from_zero(rate, n, expected):
    assert poison_count(rate, n) == expected


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n", [25, 45])
def test_half_fraction_counts(name, n):
    # 0.1 * 25 = 2.5 -> 3 and 0.1 * 45 = 4.5 -> 5 (Python's round() would give 2 and 4)
    released = make(name, poisoning_rate=0.1).watermark(make_dataset(n, (1, 8, 8), seed=n), seed=0)
    assert len(released.indices) == (3 if n == 25 else 5)
    assert released.poisoning_rate == len(released.indices) / n


@pytest.mark.parametrize("name", ALL)
def test_indices_modified_and_untouched_samples(name, ds):
    orig_images, orig_labels = ds.images.clone(), ds.labels.clone()
    n = len(ds)
    released = make(name).watermark(ds, seed=3)
    idx, noise = released.indices, released.noise_indices
    # the input dataset is never modified in place
    assert torch.equal(ds.images, orig_images) and torch.equal(ds.labels, orig_labels)
    assert isinstance(released, WatermarkedDataset) and len(released) == n
    assert released.dataset.images.dtype == torch.uint8 and released.dataset.images.shape == ds.images.shape
    assert released.dataset.classes == ds.classes
    # exact count, sorted, unique, in range
    assert idx.dtype == torch.int64 and noise.dtype == torch.int64
    assert len(idx) == poison_count(0.1, n) == round(0.1 * n)
    assert torch.all(idx[1:] > idx[:-1])
    assert 0 <= int(idx.min()) and int(idx.max()) < n
    if name == "wanet-noise":
        assert len(noise) == min(2 * len(idx), n - len(idx))
        assert torch.all(noise[1:] > noise[:-1]) and 0 <= int(noise.min()) and int(noise.max()) < n
        assert not set(idx.tolist()) & set(noise.tolist())
    else:
        assert len(noise) == 0
    assert released.modified.tolist() == sorted(set(idx.tolist()) | set(noise.tolist()))
    # outside `modified` the images are byte-identical; inside they all changed
    keep = torch.ones(n, dtype=torch.bool)
    keep[released.modified] = False
    assert torch.equal(released.dataset.images[keep], orig_images[keep])
    changed = (released.dataset.images != orig_images).flatten(1).any(1)
    assert torch.equal(changed, ~keep)


@pytest.mark.parametrize("name", ALL)
def test_poisoning_rate_one_poisons_everything(name):
    ds = make_dataset(30, (1, 8, 8), seed=5)
    released = make(name, poisoning_rate=1.0).watermark(ds, seed=0)
    assert released.indices.tolist() == list(range(30))
    assert len(released.noise_indices) == 0  # nothing left for noise mode


# --------------------------------------------------------------------------------------------
# Trigger pixels
# --------------------------------------------------------------------------------------------


def test_badnets_pixels(ds):
    released = get_watermark("badnets").watermark(ds, seed=0)
    idx = released.indices
    x, y = ds.images[idx], released.dataset.images[idx]
    corner = corner_mask(ds.image_shape).expand_as(x)
    assert torch.equal(y[~corner], x[~corner])
    for c in range(ds.image_shape[0]):
        assert torch.equal(y[:, c, -3:, -3:], SQUARE.expand(len(idx), 3, 3))
    # the key's trigger is the same operation
    assert torch.equal(trigger(x, released.key), y)
    assert torch.equal(trigger(ds.images, released.key)[idx], y)


def test_ubwp_uses_the_badnets_trigger(ds):
    ubw = get_watermark("ubw-p").watermark(ds, seed=4)
    bad = get_watermark("badnets").watermark(ds, seed=4)
    assert torch.equal(ubw.indices, bad.indices)
    assert torch.equal(ubw.dataset.images, bad.dataset.images)
    assert torch.equal(trigger(ds.images, ubw.key), trigger(ds.images, bad.key))


def test_blended_square_pixels(ds):
    released = get_watermark("blended").watermark(ds, seed=0)
    assert released.key.settings["alpha"] == 0.2
    idx = released.indices
    x, y = ds.images[idx], released.dataset.images[idx]
    corner = corner_mask(ds.image_shape).expand_as(x)
    assert torch.equal(y[~corner], x[~corner])
    t = torch.zeros(ds.image_shape, dtype=torch.uint8)
    t[:, -3:, -3:] = SQUARE
    expected = ref_blend(x, t.expand_as(x), 0.2)
    assert torch.equal(y, torch.where(corner, expected, x))
    assert torch.equal(trigger(x, released.key), y)
    # untouched samples stay byte-identical
    keep = torch.ones(len(ds), dtype=torch.bool)
    keep[idx] = False
    assert torch.equal(released.dataset.images[keep], ds.images[keep])


def test_blended_noise_pattern_blends_whole_image(ds):
    released = get_watermark("blended", pattern="noise").watermark(ds, seed=6)
    pattern = released.key.tensors["pattern"]
    assert pattern.dtype == torch.uint8 and tuple(pattern.shape) == ds.image_shape
    assert pattern.float().std() > 50  # a real full-image pattern, not the square
    idx = released.indices
    x, y = ds.images[idx], released.dataset.images[idx]
    assert torch.equal(y, ref_blend(x, pattern.expand_as(x), 0.2))
    # pixels far from the corner change too
    assert (y[:, :, :-3, :-3] != x[:, :, :-3, :-3]).float().mean() > 0.5
    assert torch.equal(trigger(x, released.key), y)
    # the pattern is a function of the seed
    again = get_watermark("blended", pattern="noise").watermark(ds, seed=6)
    other = get_watermark("blended", pattern="noise").watermark(ds, seed=7)
    assert torch.equal(again.key.tensors["pattern"], pattern)
    assert not torch.equal(other.key.tensors["pattern"], pattern)


def test_trigger_returns_new_tensor(ds28):
    released = get_watermark("badnets").watermark(ds28, seed=0)
    x = ds28.images[:10].clone()
    before = x.clone()
    out = trigger(x, released.key)
    assert torch.equal(x, before) and out.data_ptr() != x.data_ptr()


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TARGETED)
def test_targeted_labels(name, ds):
    released = make(name).watermark(ds, seed=2)
    labels = released.dataset.labels
    assert released.key.target == 1
    in_idx = torch.zeros(len(ds), dtype=torch.bool)
    in_idx[released.indices] = True
    assert torch.all(labels[in_idx] == 1)
    assert torch.equal(labels[~in_idx], ds.labels[~in_idx])  # incl. noise-mode samples
    # some poisoned samples had another label, so the labels really were changed
    assert (ds.labels[in_idx] != 1).sum() > 0


@pytest.mark.parametrize("name", TARGETED)
def test_target_override(name, ds28):
    released = make(name, target=7).watermark(ds28, seed=2)
    assert released.key.target == 7
    assert torch.all(released.dataset.labels[released.indices] == 7)


def test_wanet_noise_mode_keeps_labels(ds28):
    released = get_watermark("wanet", noise_mode=True).watermark(ds28, seed=0)
    noise = released.noise_indices
    assert len(noise) == 2 * len(released.indices)
    assert torch.equal(released.dataset.labels[noise], ds28.labels[noise])
    assert (ds28.labels[noise] != 1).sum() > 0


def test_ubwp_labels_only_at_poisoned_indices(ds):
    released = get_watermark("ubw-p").watermark(ds, seed=0)
    assert released.key.target is None
    in_idx = torch.zeros(len(ds), dtype=torch.bool)
    in_idx[released.indices] = True
    labels = released.dataset.labels
    assert torch.equal(labels[~in_idx], ds.labels[~in_idx])
    assert labels.dtype == torch.int64
    assert int(labels.min()) >= 0 and int(labels.max()) < K


def test_ubwp_labels_uniform():
    n = 20000
    g = torch.Generator().manual_seed(11)
    labels = torch.randint(0, K, (n,), generator=g)
    ds = ImageDataset(torch.zeros(n, 1, 3, 3, dtype=torch.uint8), labels, CLASSES, "tiny")
    released = get_watermark("ubw-p", poisoning_rate=0.5).watermark(ds, seed=0)
    idx = released.indices
    assert len(idx) == 10000
    new = released.dataset.labels[idx]
    assert int(new.min()) >= 0 and int(new.max()) < K
    counts = torch.bincount(new, minlength=K).numpy()
    assert len(counts) == K
    assert scipy.stats.chisquare(counts).pvalue > 1e-3
    same = (new == labels[idx]).float().mean().item()
    assert abs(same - 1 / K) < 0.02  # about 1/K keep their true label (sd 0.003)
    # the new labels do not depend on the old ones: all classes still reach all classes
    cm = np.zeros((K, K), dtype=int)
    np.add.at(cm, (labels[idx].numpy(), new.numpy()), 1)
    assert (cm > 0).all()


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL + ["blended-noise"])
def test_determinism(name, ds28):
    def run(seed):
        if name == "blended-noise":
            return get_watermark("blended", pattern="noise").watermark(ds28, seed=seed)
        return make(name).watermark(ds28, seed=seed)

    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a.dataset.images, b.dataset.images)
    assert torch.equal(a.dataset.labels, b.dataset.labels)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.noise_indices, b.noise_indices)
    assert a.key.tensors.keys() == b.key.tensors.keys()
    for k in a.key.tensors:
        assert torch.equal(a.key.tensors[k], b.key.tensors[k])
    assert a.key.settings == b.key.settings and a.key.seed == 5
    assert not torch.equal(a.indices, c.indices)
    if name.startswith("wanet"):
        assert not torch.equal(a.key.tensors["grid"], c.key.tensors["grid"])


# --------------------------------------------------------------------------------------------
# Keys: save / load
# --------------------------------------------------------------------------------------------


def assert_same_key(a: WatermarkKey, b: WatermarkKey):
    assert a.method == b.method
    assert a.settings == b.settings
    assert a.target == b.target
    assert tuple(a.image_shape) == tuple(b.image_shape)
    assert tuple(a.classes) == tuple(b.classes)
    assert a.dataset == b.dataset and a.seed == b.seed
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        assert a.tensors[k].dtype == b.tensors[k].dtype
        assert torch.equal(a.tensors[k], b.tensors[k])


@pytest.mark.parametrize("name", ALL + ["blended-noise"])
def test_key_round_trip(name, ds32, tmp_path):
    if name == "blended-noise":
        released = get_watermark("blended", pattern="noise").watermark(ds32, seed=9)
    else:
        released = make(name).watermark(ds32, seed=9)
    key = released.key
    path = key.save(tmp_path / "key.pt")
    loaded = WatermarkKey.load(path)
    assert_same_key(key, loaded)
    assert loaded.num_classes == K
    x = ds32.images[:50]
    assert torch.equal(trigger(x, loaded), trigger(x, key))


@pytest.mark.parametrize("name", ["badnets", "ubw-p", "wanet-noise"])
def test_watermarked_dataset_round_trip(name, ds28, tmp_path):
    released = make(name).watermark(ds28, seed=1)
    path = released.save(tmp_path / "released.pt")
    loaded = WatermarkedDataset.load(path)
    assert torch.equal(loaded.dataset.images, released.dataset.images)
    assert torch.equal(loaded.dataset.labels, released.dataset.labels)
    assert loaded.dataset.classes == released.dataset.classes
    assert loaded.dataset.name == released.dataset.name
    assert torch.equal(loaded.indices, released.indices)
    assert torch.equal(loaded.noise_indices, released.noise_indices)
    assert torch.equal(loaded.modified, released.modified)
    assert_same_key(loaded.key, released.key)
    # the release is public, the key the owner's secret; neither leaves a temporary file behind
    assert path.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "released.pt.key").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["released.pt", "released.pt.key"]


def test_load_rejects_files_that_are_not_keys(ds28, tmp_path):
    released = get_watermark("badnets").watermark(ds28, seed=0)
    other = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), other)
    plain_dict = tmp_path / "dict.pt"
    torch.save({"foo": torch.zeros(3)}, plain_dict)
    dataset_file = ds28.save(tmp_path / "dataset.pt")
    released_file = released.save(tmp_path / "released.pt")
    text = tmp_path / "text.pt"
    text.write_text("this is not a key\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path in (other, plain_dict, dataset_file, released_file, text, empty):
        with pytest.raises(ValueError, match="watermark key"):
            WatermarkKey.load(path)
    # and a key file is not a released dataset
    key_file = released.key.save(tmp_path / "k.pt")
    for path in (key_file, other, text):
        with pytest.raises(ValueError):
            WatermarkedDataset.load(path)


def test_dataset_fingerprint_is_remembered_per_object_and_sees_in_place_changes(monkeypatch):
    """The digest is computed once per dataset object; an in-place change through torch (pixel or label) is seen
    and hashed again, and the entry goes with the dataset."""
    import gc

    from ubwlib.watermarks import base

    ds = make_dataset(50, seed=3)
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    first = dataset_fingerprint(ds)
    assert dataset_fingerprint(ds) == first and len(calls) == 1
    ds.images[3, 0, 0, 0] += 1  # in place, through torch
    moved = dataset_fingerprint(ds)
    assert moved != first and len(calls) == 2
    assert moved == dataset_fingerprint(ds.replace(images=ds.images.clone()))  # what a fresh hash gives
    ds.labels[0] = (ds.labels[0] + 1) % K
    assert dataset_fingerprint(ds) not in (first, moved) and len(calls) == 4
    n = len(base._FINGERPRINTS)
    del ds
    gc.collect()
    assert len(base._FINGERPRINTS) == n - 1

def test_dataset_fingerprint_of_inference_tensors_is_hashed_each_time(ds28):
    """Tensors made under torch.inference_mode count no versions: their dataset is hashed on every call, and
    gives the same digest as the same content made normally."""
    with torch.inference_mode():
        frozen = ImageDataset(ds28.images.clone(), ds28.labels.clone(), ds28.classes, "inference")
    assert dataset_fingerprint(frozen) == dataset_fingerprint(frozen) == dataset_fingerprint(ds28)


# --------------------------------------------------------------------------------------------
# Keys: the test split they protect; hand-made key files
# --------------------------------------------------------------------------------------------


def test_dataset_fingerprint(ds28):
    h = hashlib.sha256()
    h.update(str(((400, 1, 28, 28), CLASSES)).encode())
    h.update(ds28.images.numpy().tobytes())
    h.update(ds28.labels.numpy().tobytes())
    fp = dataset_fingerprint(ds28)
    assert fp == h.hexdigest() and len(fp) == 64
    assert dataset_fingerprint(ds28.replace(name="renamed")) == fp  # the content, not the name
    assert dataset_fingerprint(ds28.subset(range(400))) == fp
    images = ds28.images.clone()
    images[7, 0, 3, 3] ^= 1
    labels = ds28.labels.clone()
    labels[7] = (labels[7] + 1) % K
    changed = [
        ds28.replace(images=images),  # one pixel
        ds28.replace(labels=labels),  # one label
        ds28.subset(range(399)),  # a subset
        ds28.subset(torch.arange(400).flip(0)),  # another order
        ds28.replace(classes=tuple(f"k{i}" for i in range(K))),  # other class names
    ]
    assert len({fp, *(dataset_fingerprint(d) for d in changed)}) == 1 + len(changed)
    with pytest.raises(TypeError, match="ImageDataset"):
        dataset_fingerprint(ds28.images)


def test_new_keys_are_unbound_and_bind_test_split(ds28, tmp_path):
    key = get_watermark("badnets").watermark(ds28, seed=0).key
    assert key.test_dataset is None and key.test_fingerprint is None  # a watermark sees only the training split
    test = make_dataset(100, (1, 28, 28), seed=9, name="synth/test")
    bound = key.bind_test_split(test)
    assert (bound.test_dataset, bound.test_fingerprint) == ("synth/test", dataset_fingerprint(test))
    assert key.test_fingerprint is None  # the original is unchanged
    assert_same_key(key, bound)  # the same trigger, settings, dataset, seed and target
    assert torch.equal(trigger(test.images, bound), trigger(test.images, key))
    rebound = bound.bind_test_split(test.subset(range(50), name="synth/test[:50]"))
    assert rebound.test_dataset == "synth/test[:50]" and rebound.test_fingerprint != bound.test_fingerprint
    loaded = WatermarkKey.load(bound.save(tmp_path / "key.pt"))
    assert (loaded.test_dataset, loaded.test_fingerprint) == (bound.test_dataset, bound.test_fingerprint)
    released = get_watermark("badnets").watermark(ds28, seed=0)
    released = WatermarkedDataset(released.dataset, released.indices, released.key.bind_test_split(test))
    assert WatermarkedDataset.load(released.save(tmp_path / "released.pt")).key.test_fingerprint == \
        bound.test_fingerprint
    with pytest.raises(ValueError, match=r"cannot bind .*synth.*\(3, 32, 32\)"):
        key.bind_test_split(make_dataset(20, (3, 32, 32)))
    with pytest.raises(ValueError, match=r"cannot bind .*classes \['c0'.*\['k0'"):
        key.bind_test_split(test.replace(classes=tuple(f"k{i}" for i in range(K))))
    with pytest.raises(TypeError, match="ImageDataset"):
        key.bind_test_split(test.images)


def _rewrite_meta(path, edit):
    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload["meta"])
    edit(meta)
    payload["meta"] = json.dumps(meta)
    torch.save(payload, path)


def test_old_key_files_without_test_fields_load(ds28, tmp_path):
    key = get_watermark("wanet").watermark(ds28, seed=0).key
    path = key.save(tmp_path / "old.key")

    def drop(meta):
        del meta["test_dataset"], meta["test_fingerprint"]

    _rewrite_meta(path, drop)
    loaded = WatermarkKey.load(path)
    assert_same_key(key, loaded)
    assert loaded.test_dataset is None and loaded.test_fingerprint is None


@pytest.mark.parametrize("missing", ["method", "settings", "image_shape", "classes", "dataset", "seed", "target"])
def test_key_file_missing_a_field_names_the_file_and_field(missing, ds28, tmp_path):
    path = get_watermark("badnets").watermark(ds28, seed=0).key.save(tmp_path / "hand-made.key")
    _rewrite_meta(path, lambda meta: meta.pop(missing))
    with pytest.raises(ValueError, match=rf"hand-made\.key: the watermark key lacks the field {missing} "):
        WatermarkKey.load(path)


def test_hand_made_key_files_get_clear_errors(tmp_path):
    pattern = torch.zeros(1, 28, 28, dtype=torch.uint8)
    path = tmp_path / "hand.key"
    torch.save({"meta": json.dumps({"format": "ubwlib.watermark/1", "method": "badnets"}), "t/pattern": pattern}, path)
    with pytest.raises(ValueError, match=r"hand\.key: .*lacks the fields settings, image_shape, classes, dataset, "
                                         r"seed, target .*null for untargeted"):
        WatermarkKey.load(path)
    good = {"format": "ubwlib.watermark/1", "method": "badnets", "settings": {}, "image_shape": [1, 28, 28],
            "classes": list(CLASSES), "dataset": "hand", "seed": 0, "target": 1}
    bad_values = {
        "image_shape": ([28, 28], "image_shape must be"),
        "classes": ("c0 c1", "classes must be"),
        "seed": ("0", "seed must be an int"),
        "target": (10, r"target must be null or a class index in \[0, 10\)"),
        "settings": ([], "settings must be"),
        "test_fingerprint": ("abc", "test_fingerprint must be"),
    }
    for name, (value, message) in bad_values.items():
        torch.save({"meta": json.dumps({**good, name: value}), "t/pattern": pattern}, path)
        with pytest.raises(ValueError, match=rf"hand\.key: invalid watermark key: {message}"):
            WatermarkKey.load(path)
    for meta in ("not json", json.dumps([1, 2])):
        torch.save({"meta": meta}, path)
        with pytest.raises(ValueError, match=r"hand\.key is not a ubwlib watermark key"):
            WatermarkKey.load(path)
    torch.save({"meta": json.dumps(good), "t/pattern": pattern}, path)
    key = WatermarkKey.load(path)
    assert (key.image_shape, key.target, key.test_fingerprint) == ((1, 28, 28), 1, None)


class _Evil:
    """Unpickling this object writes a marker file (it must never be unpickled)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_key_load_never_unpickles_code(how, ds28, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "key.pt"
    if how == "pickle":
        path.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    else:
        torch.save({"meta": "{}", "x": _Evil(marker)}, path)
    assert not marker.exists()
    with pytest.raises(Exception):
        WatermarkKey.load(path)
    assert not marker.exists()
    # a released dataset whose key file is malicious
    released = get_watermark("badnets").watermark(ds28, seed=0)
    data_path = released.save(tmp_path / "released.pt")
    key_path = data_path.with_name(data_path.name + ".key")
    key_path.write_bytes(path.read_bytes())
    with pytest.raises(Exception):
        WatermarkedDataset.load(data_path)
    data_path.write_bytes(path.read_bytes())
    with pytest.raises(Exception):
        WatermarkedDataset.load(data_path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# WaNet
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("noise_mode", [False, True])
def test_wanet_same_warp_at_training_and_test(noise_mode, ds):
    released = get_watermark("wanet", noise_mode=noise_mode).watermark(ds, seed=0)
    idx = released.indices
    assert torch.equal(trigger(ds.images[idx], released.key), released.dataset.images[idx])
    # batch composition does not matter
    assert torch.equal(trigger(ds.images, released.key)[idx], released.dataset.images[idx])
    grid = released.key.tensors["grid"]
    _, h, w = ds.image_shape
    assert tuple(grid.shape) == (1, h, w, 2)
    assert grid.dtype == torch.float32
    assert float(grid.min()) >= -1 and float(grid.max()) <= 1
    assert float(grid.abs().max()) > 0.9  # it spans the image


def test_wanet_grid_is_a_small_displacement_of_identity(ds28):
    s, h = 0.5, 28
    released = get_watermark("wanet", s=s).watermark(ds28, seed=0)
    grid = released.key.tensors["grid"][0]
    ys, xs = torch.linspace(-1, 1, h), torch.linspace(-1, 1, h)
    identity = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=2)
    disp = grid - identity
    assert float(disp.abs().max()) > 0
    # the control grid is normalised to mean |.| = 1; bicubic overshoot stays well below 3x that
    assert float(disp.abs().max()) <= 3 * s / h
    assert 0.2 * s / h < float(disp.abs().mean()) < 2 * s / h


def test_wanet_tiny_strength_is_almost_identity(ds):
    released = get_watermark("wanet", s=1e-4).watermark(ds, seed=0)
    idx = released.indices
    diff = (released.dataset.images[idx].int() - ds.images[idx].int()).abs()
    assert int(diff.max()) <= 1
    strong = get_watermark("wanet", s=0.5).watermark(ds, seed=0)
    sdiff = (strong.dataset.images[idx].int() - ds.images[idx].int()).abs()
    assert float(sdiff.float().mean()) > 5  # a visible warp on random images


def test_wanet_noise_images_differ_from_exact_warp(ds):
    released = get_watermark("wanet", noise_mode=True).watermark(ds, seed=0)
    noise = released.noise_indices
    exact = trigger(ds.images[noise], released.key)
    got = released.dataset.images[noise]
    differs = (exact != got).flatten(1).any(1)
    assert differs.float().mean() > 0.9
    # but they are still a warp close to it (not e.g. the clean image)
    assert (exact.int() - got.int()).abs().float().mean() < (ds.images[noise].int() - got.int()).abs().float().mean()


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["badnets", "blended", "ubw-p", "wanet"])
@pytest.mark.parametrize("rate", [0, 0.0, -0.1, 1.5])
def test_bad_poisoning_rate(name, rate):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        get_watermark(name, poisoning_rate=rate)


@pytest.mark.parametrize("name", TARGETED)
@pytest.mark.parametrize("target", [10, -1])
def test_bad_target(name, target, ds28):
    wm = make(name, target=target)
    with pytest.raises(ValueError, match="target"):
        wm.watermark(ds28, seed=0)


@pytest.mark.parametrize("name", ["badnets", "blended", "ubw-p", "wanet"])
def test_trigger_checks_images(name, ds28, ds32):
    key = make(name).watermark(ds28, seed=0).key
    with pytest.raises(ValueError, match=r"\(1, 28, 28\)"):
        trigger(ds32.images[:4], key)
    with pytest.raises(ValueError, match=r"\(1, 28, 28\)"):
        trigger(torch.zeros(4, 3, 28, 28, dtype=torch.uint8), key)
    with pytest.raises(TypeError, match="uint8"):
        trigger(ds28.images[:4].float() / 255, key)
    with pytest.raises(ValueError):
        trigger(ds28.images[0], key)  # C x H x W, not a batch


def test_watermark_requires_image_dataset(ds28):
    with pytest.raises(TypeError):
        get_watermark("badnets").watermark(ds28.images, seed=0)
    with pytest.raises(TypeError):
        get_watermark("wanet").watermark(ds28.images, seed=0)


def test_unknown_watermark_name():
    with pytest.raises(ValueError, match="unknown watermark") as err:
        get_watermark("no-such-watermark")
    for name in ("badnets", "blended", "ubw-p", "wanet"):
        assert name in str(err.value)
        assert name in REGISTRY


def test_bad_settings():
    with pytest.raises(ValueError, match="pattern"):
        get_watermark("badnets", pattern="circle")
    with pytest.raises(ValueError, match="alpha"):
        get_watermark("blended", alpha=0)
    with pytest.raises(ValueError, match="k"):
        get_watermark("wanet", k=1)
    with pytest.raises(ValueError, match="s"):
        get_watermark("wanet", s=0)


# --------------------------------------------------------------------------------------------
# evaluate()
# --------------------------------------------------------------------------------------------


class ScriptedModel(nn.Module):
    """A model whose predictions are written into the image.

    pixel [0, 0, 0] = 10 * y (true label); [0, 0, 1] = 1: clean prediction is wrong ((y + 1) % K);
    [0, 0, 2] = behaviour when triggered (bottom-right pixel 255): 0 -> class 1, 1 -> y (trigger
    ignored), 2 -> (y + 2) % K. Clean images have a 0 bottom-right pixel.
    """

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))  # pins the device (CPU)

    def forward(self, x):
        v = torch.round(x.float() * 255).long()
        y = v[:, 0, 0, 0] // 10
        clean = torch.where(v[:, 0, 0, 1] == 1, (y + 1) % K, y)
        mode = v[:, 0, 0, 2]
        trig = torch.where(mode == 0, torch.ones_like(y), torch.where(mode == 1, y, (y + 2) % K))
        pred = torch.where(v[:, 0, -1, -1] == 255, trig, clean)
        return nn.functional.one_hot(pred, K).float() * 10 + self.dummy * 0


CLEAN_WRONG = {2, 5, 11}
RESIST = {3, 5, 13}  # triggered -> true label
SHIFT = {4, 14}  # triggered -> (y + 2) % K


@pytest.fixture(scope="module")
def scripted_test_set():
    n = 20
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    labels = torch.arange(n) % K  # two images per class
    images[:, 0, 0, 0] = (labels * 10).to(torch.uint8)
    for i in CLEAN_WRONG:
        images[i, 0, 0, 1] = 1
    for i in RESIST:
        images[i, 0, 0, 2] = 1
    for i in SHIFT:
        images[i, 0, 0, 2] = 2
    return ImageDataset(images, labels, CLASSES, "scripted")


def _entropy_of_confident():
    p = torch.softmax(torch.tensor([10.0] + [0.0] * (K - 1), dtype=torch.float64), 0)
    return float(-(p * p.log()).sum())


def test_scripted_model_sanity(scripted_test_set):
    from ubwlib.train import predict

    pred = predict(ScriptedModel(), scripted_test_set.images)
    expected = [(y + 1) % K if i in CLEAN_WRONG else y for i, y in enumerate(scripted_test_set.labels.tolist())]
    assert pred.tolist() == expected


def test_evaluate_targeted(scripted_test_set):
    key = get_watermark("badnets").watermark(make_dataset(50, (1, 28, 28)), seed=0).key
    row = evaluate(ScriptedModel(), scripted_test_set, key)
    # eval set: the 18 images of classes != 1
    # triggered: 13 -> class 1, 3 resist (3, 5, 13), 2 -> class 6 (4, 14)
    assert row["method"] == "badnets" and row["targeted"] is True and row["labels"] == "poisoned"
    assert row["n eval"] == 18
    assert "non-target" in row["eval set"] and "y_t = 1" in row["eval set"]
    assert row["BA"] == pytest.approx(17 / 20)
    assert row["ASR-A"] == pytest.approx(15 / 18)
    assert row["ASR (targeted)"] == pytest.approx(13 / 18)
    # clean-correct in the eval set: 18 - {2, 5} = 16; of these 3 and 13 resist
    assert row["ASR-C"] == pytest.approx(14 / 16)
    # only class 5 has mixed predictions ({5, 1}): D_p = (2 / 18) ln 2
    assert row["D_p"] == pytest.approx(2 / 18 * math.log(2))
    assert row["D_s (triggered)"] == pytest.approx(_entropy_of_confident(), rel=1e-3, abs=1e-5)
    # the same with the released dataset instead of the key
    released = get_watermark("badnets").watermark(make_dataset(50, (1, 28, 28)), seed=0)
    row2 = evaluate(ScriptedModel(), scripted_test_set, released)
    assert {k: row2[k] for k in ("BA", "ASR-A", "ASR-C", "D_p", "n eval")} == \
        {k: row[k] for k in ("BA", "ASR-A", "ASR-C", "D_p", "n eval")}


def test_evaluate_untargeted(scripted_test_set):
    key = get_watermark("ubw-p").watermark(make_dataset(50, (1, 28, 28)), seed=0).key
    row = evaluate(ScriptedModel(), scripted_test_set, key)
    # eval set: all 20; failures (triggered pred == y): 1, 11 (class 1 -> 1) and 3, 5, 13
    assert row["method"] == "ubw-p" and row["targeted"] is False
    assert row["eval set"] == "test, all classes" and row["n eval"] == 20
    assert row["BA"] == pytest.approx(17 / 20)
    assert row["ASR-A"] == pytest.approx(15 / 20)
    # clean-correct: 20 - {2, 5, 11} = 17; failures among them: 1, 3, 13
    assert row["ASR-C"] == pytest.approx(14 / 17)
    assert row["D_p"] == pytest.approx(2 / 20 * math.log(2))
    assert math.isnan(row["ASR (targeted)"])


def test_evaluate_source_class(scripted_test_set):
    key = get_watermark("badnets").watermark(make_dataset(50, (1, 28, 28)), seed=0).key
    row = evaluate(ScriptedModel(), scripted_test_set, key, source_class=5)
    # images 5 (clean wrong, resists) and 15 (-> class 1)
    assert row["n eval"] == 2
    assert "source class 5" in row["eval set"] and "c5" in row["eval set"]
    assert row["BA"] == pytest.approx(17 / 20)  # BA is always on the whole test set
    assert row["ASR-A"] == pytest.approx(1 / 2)
    assert row["ASR-C"] == pytest.approx(1.0)  # only 15 is clean-correct, and it flips
    assert row["ASR (targeted)"] == pytest.approx(1 / 2)
    assert row["D_p"] == pytest.approx(math.log(2))
    ubw = get_watermark("ubw-p").watermark(make_dataset(50, (1, 28, 28)), seed=0).key
    row = evaluate(ScriptedModel(), scripted_test_set, ubw, source_class=3)
    # images 3 and 13 both resist and are clean-correct
    assert row["n eval"] == 2 and row["ASR-A"] == 0 and row["ASR-C"] == 0 and row["D_p"] == 0
    with pytest.raises(ValueError, match="source_class"):
        evaluate(ScriptedModel(), scripted_test_set, key, source_class=K)


def test_evaluate_rejects_key_of_another_dataset(scripted_test_set):
    key32 = get_watermark("badnets").watermark(make_dataset(30, (3, 32, 32)), seed=0).key
    with pytest.raises(ValueError, match="key"):
        evaluate(ScriptedModel(), scripted_test_set, key32)
    key5 = get_watermark("badnets").watermark(make_dataset(30, (1, 28, 28), num_classes=5), seed=0).key
    with pytest.raises(ValueError, match="classes"):
        evaluate(ScriptedModel(), scripted_test_set, key5)


# --------------------------------------------------------------------------------------------
# redraw: another trigger of the same kind (the Independent-T trigger)
# --------------------------------------------------------------------------------------------

REDRAW_KINDS = ["badnets", "blended", "ubw-p", "blended-noise", "wanet", "ubw-c", "sleeper-agent",
                "label-consistent"]
CHANGED = {"wanet": "grid", "ubw-c": "patch", "sleeper-agent": "patch"}  # else "pattern"


def redraw_key(kind: str, ds: ImageDataset) -> WatermarkKey:
    """A key of each kind; the crafted (clean-label) ones are written by hand with the watermark's trigger."""
    shape = ds.image_shape
    if kind == "blended-noise":
        return get_watermark("blended", pattern="noise").watermark(ds, seed=3).key
    if kind == "ubw-c":
        return WatermarkKey("ubw-c", {"patch_size": 8}, {"patch": resized_square(shape[0], 8)}, shape, ds.classes,
                            ds.name, 3)
    if kind == "sleeper-agent":
        g = torch.Generator().manual_seed(3)
        patch = (torch.randint(0, 2, (shape[0], 8, 8), generator=g) * 255).to(torch.uint8)
        return WatermarkKey("sleeper-agent", {"patch_size": 8}, {"patch": patch}, shape, ds.classes, ds.name, 3, 1)
    if kind == "label-consistent":
        pattern, alpha = square_trigger(shape, 1.0)
        return WatermarkKey("label-consistent", {"pattern": "square", "target": 1},
                            {"pattern": pattern, "alpha": alpha}, shape, ds.classes, ds.name, 3, 1)
    return get_watermark(kind).watermark(ds, seed=3).key


def test_every_registered_watermark_redraws():
    assert set(REDRAW_KINDS) - {"blended-noise"} == set(REGISTRY)
    for cls in REGISTRY.values():
        assert cls.redraw.__func__ is not Watermark.redraw.__func__, cls


@pytest.mark.parametrize("kind", REDRAW_KINDS)
def test_redraw_draws_another_trigger_of_the_same_kind(kind, ds):
    key = redraw_key(kind, ds).bind_test_split(ds)
    cls = REGISTRY[key.method]
    new = cls.redraw(key, 11)
    assert new.seed == 11 and new.method == key.method
    assert new.settings == key.settings and new.settings is not key.settings
    assert (new.target, new.dataset, new.classes, new.image_shape) == (key.target, key.dataset, key.classes,
                                                                        key.image_shape)
    assert (new.test_dataset, new.test_fingerprint) == (key.test_dataset, key.test_fingerprint)
    name = CHANGED.get(kind, "pattern")
    assert new.tensors.keys() == key.tensors.keys()
    for t in key.tensors:  # only the trigger changes, keeping its shape and dtype
        assert new.tensors[t].shape == key.tensors[t].shape and new.tensors[t].dtype == key.tensors[t].dtype
        assert torch.equal(new.tensors[t], key.tensors[t]) == (t != name), t
    assert torch.equal(key.tensors[name], redraw_key(kind, ds).tensors[name])  # the key itself is unchanged
    again, other = cls.redraw(key, 11), cls.redraw(key, 12)
    assert torch.equal(again.tensors[name], new.tensors[name])  # deterministic in the seed
    assert not torch.equal(other.tensors[name], new.tensors[name])
    same = independent_key(key, 11)  # the Independent-T key is the watermark's redraw
    assert all(torch.equal(same.tensors[t], new.tensors[t]) for t in key.tensors) and same.seed == 11
    x = ds.images[:8]
    assert not torch.equal(trigger(x, new, seed=0), trigger(x, key, seed=0))


def test_redraw_streams_are_pinned(ds28):
    """What each redraw draws from seed 11, written out (these keys are the Independent-T triggers of the
    verification chapter's cached results, so the streams must not move)."""
    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    corner = corner_mask((1, 28, 28))
    key = redraw_key("badnets", ds28)
    bits = (torch.randint(0, 2, (1, 28, 28), generator=g(11)) * 255).to(torch.uint8)
    expected = torch.where(corner, bits, key.tensors["pattern"])
    assert torch.equal(REGISTRY["badnets"].redraw(key, 11).tensors["pattern"], expected)
    key = redraw_key("blended-noise", ds28)
    noise = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8, generator=g(11 + 7919))
    assert torch.equal(REGISTRY["blended"].redraw(key, 11).tensors["pattern"], noise)
    key = redraw_key("wanet", ds28)
    assert torch.equal(REGISTRY["wanet"].redraw(key, 11).tensors["grid"], warp_field(28, 28, 4, 0.5, 1.0, g(11)))
    key = redraw_key("ubw-c", ds28)
    square = torch.randint(0, 2, (1, 1, 3, 3), generator=g(11)).float() * 255
    resized = torch.nn.functional.interpolate(square, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.equal(REGISTRY["ubw-c"].redraw(key, 11).tensors["patch"],
                       resized[0].round().clamp(0, 255).to(torch.uint8))


def test_redraw_never_returns_the_original_trigger():
    shape = (1, 6, 6)
    pattern, alpha = torch.zeros(shape, dtype=torch.uint8), torch.zeros(shape)
    alpha[0, -1, -1] = 1.0  # a one-pixel trigger: a fair coin would repeat it half of the time
    key = WatermarkKey("badnets", {"pattern": "square"}, {"pattern": pattern, "alpha": alpha}, shape, CLASSES, "x",
                       0, 1)
    for seed in range(1, 21):
        assert REGISTRY["badnets"].redraw(key, seed).tensors["pattern"][0, -1, -1] == 255


def test_redraw_errors(ds28):
    wanet, badnets = redraw_key("wanet", ds28), redraw_key("badnets", ds28)
    BadNets = REGISTRY["badnets"]
    with pytest.raises(ValueError, match="differ"):
        BadNets.redraw(badnets, badnets.seed)
    with pytest.raises(TypeError, match="seed"):
        BadNets.redraw(badnets, True)
    with pytest.raises(TypeError, match="seed"):
        BadNets.redraw(badnets, 1.5)
    assert BadNets.redraw(badnets, np.int64(4)).seed == 4
    with pytest.raises(ValueError, match="'badnets' keys"):
        BadNets.redraw(wanet, 4)
    with pytest.raises(TypeError, match="WatermarkKey"):
        BadNets.redraw("key", 4)
    lacking = WatermarkKey("badnets", {}, {"pattern": badnets.tensors["pattern"]}, (1, 28, 28), CLASSES, "x", 0, 1)
    with pytest.raises(ValueError, match="lacks the trigger tensor alpha"):
        BadNets.redraw(lacking, 4)
    no_k = WatermarkKey("wanet", {"s": 0.5}, dict(wanet.tensors), (1, 28, 28), CLASSES, "x", 0, 1)
    with pytest.raises(NotImplementedError, match="'k'"):
        REGISTRY["wanet"].redraw(no_k, 4)

    class Plain(Watermark):  # a watermark that does not override redraw
        name = "plain"

    with pytest.raises(NotImplementedError, match=r"Plain\.redraw"):
        Plain.redraw(badnets, 4)


# --------------------------------------------------------------------------------------------
# Scale
# --------------------------------------------------------------------------------------------


def test_full_size_dataset_poisons():
    n = 60000
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 10, 10] = torch.arange(n, dtype=torch.int64).remainder(256).to(torch.uint8)
    labels = torch.arange(n) % K
    ds = ImageDataset(images, labels, CLASSES, "big")
    for name in ("badnets", "blended", "ubw-p", "wanet-noise"):
        released = make(name).watermark(ds, seed=0)
        assert len(released.indices) == 6000
        corner = released.dataset.images[released.indices][:, 0, -1, -1]
        if name in ("badnets", "ubw-p"):
            assert torch.all(corner == 255)
        elif name == "blended":
            assert torch.all(corner == 51)  # round(0.2 * 255)
