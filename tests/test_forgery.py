"""Forged keys (ubwlib.forgery): a trigger optimised after the fact against an innocent model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ubwlib.data import ImageDataset
from ubwlib.forgery import forge_key
from ubwlib.models import build_model
from ubwlib.train import TrainConfig, predict_proba, train
from ubwlib.watermarks import WatermarkKey, get_watermark, trigger
from ubwlib.watermarks.patch import resized_square

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

K = 4


def blobs(n: int, seed: int) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % K)[torch.randperm(n, generator=g)]
    images = torch.randint(0, 60, (n, 1, 12, 12), generator=g, dtype=torch.uint8)
    for c in range(K):
        images[labels == c, :, 1:5, 3 * c : 3 * c + 3] = 230
    return ImageDataset(images, labels, ("a", "b", "c", "d"), "blobs")


@pytest.fixture(scope="module")
def data():
    return blobs(240, 0)


@pytest.fixture(scope="module")
def innocent(data):
    cfg = TrainConfig(epochs=6, batch_size=32, lr=0.05, schedule="onecycle", precision="fp32", flip=False)
    return train(build_model("smallcnn", K, 1, 0.25, seed=0), data, cfg, progress=False).model.eval()


def _patch_key(data: ImageDataset) -> WatermarkKey:
    """A UBW-C-like key: a 4x4 white-black square pasted at a random position."""
    return WatermarkKey(method="ubw-c", settings={}, tensors={"patch": resized_square(1, 4)}, image_shape=(1, 12, 12),
                        classes=data.classes, dataset=data.name, seed=0)


def _true_prob(model, images, labels) -> float:
    return float(predict_proba(model, images)[torch.arange(len(labels)), labels].mean())


def test_forged_blend_key_keeps_the_geometry(data, innocent):
    template = get_watermark("ubw-p").watermark(data, seed=0).key
    images_before = data.images.clone()
    forged = forge_key(innocent, data.images, data.labels, template, steps=5, seed=3)
    assert torch.equal(data.images, images_before)
    assert forged.method == template.method and forged.seed == 3
    assert torch.equal(forged.tensors["alpha"], template.tensors["alpha"])
    outside = template.tensors["alpha"] == 0
    assert torch.equal(forged.tensors["pattern"][outside], template.tensors["pattern"][outside])
    assert forged.tensors["pattern"].dtype == torch.uint8
    # deterministic for a seed, different for another
    again = forge_key(innocent, data.images, data.labels, template, steps=5, seed=3)
    assert torch.equal(again.tensors["pattern"], forged.tensors["pattern"])
    assert all(p.requires_grad for p in innocent.parameters())


def test_forged_patch_lowers_the_true_class_probability(data, innocent):
    template = _patch_key(data)
    forged = forge_key(innocent, data.images, data.labels, template, steps=60, lr=0.2, seed=1)
    assert forged.tensors["patch"].shape == template.tensors["patch"].shape
    test = blobs(120, 5)
    clean = _true_prob(innocent, test.images, test.labels)
    with_template = _true_prob(innocent, trigger(test.images, template, seed=2), test.labels)
    with_forged = _true_prob(innocent, trigger(test.images, forged, seed=2), test.labels)
    assert with_forged < with_template and with_forged < clean - 0.05


def test_forge_key_rejects_bad_input(data, innocent):
    template = _patch_key(data)
    with pytest.raises(ValueError, match="same length"):
        forge_key(innocent, data.images, data.labels[:3], template)
    with pytest.raises(ValueError, match="steps"):
        forge_key(innocent, data.images, data.labels, template, steps=0)
    with pytest.raises(TypeError):
        forge_key(innocent, data.images, data.labels, {"patch": 1})
    odd = dataclasses.replace(template, tensors={"grid": torch.zeros(2)})
    with pytest.raises(NotImplementedError, match="neither a blend"):
        forge_key(innocent, data.images, data.labels, odd)
