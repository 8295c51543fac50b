"""Evaluation of a watermarked model (reference section 4): BA, ASR-A, ASR-C, D_p, targeted ASR."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import metrics
from ..data import ImageDataset
from ..train import predict_proba
from .base import REGISTRY, WatermarkedDataset, WatermarkKey, trigger

__all__ = ["evaluate", "evaluation_mask"]


def evaluation_mask(test_set: ImageDataset, key: WatermarkKey, source_class: int | None = None) -> tuple[torch.Tensor, str]:
    """Which test images are triggered for the ASRs and D_p, and a description of that set.

    Targeted methods: the non-target classes. ``source_class`` given: that class only. Otherwise all classes.
    """
    if source_class is not None:
        if not 0 <= source_class < test_set.num_classes:
            raise ValueError(f"source_class must be in [0, {test_set.num_classes}), got {source_class}")
        return test_set.labels == source_class, f"test, source class {source_class} ({test_set.classes[source_class]})"
    if key.target is not None:
        return test_set.labels != key.target, f"test, non-target classes (y_t = {key.target})"
    return torch.ones(len(test_set), dtype=torch.bool), "test, all classes"


def evaluate(
    model: nn.Module,
    test_set: ImageDataset,
    watermarked: WatermarkedDataset | WatermarkKey,
    *,
    source_class: int | None = None,
    seed: int = 0,
    batch_size: int = 1024,
) -> dict:
    """One results row: BA on the whole clean test set; on the triggered evaluation set (see
    :func:`evaluation_mask`): ASR-A, ASR-C, D_p, the mean entropy D_s of the triggered predictions, and for
    targeted methods the targeted ASR. Rates are fractions in [0, 1]."""
    key = watermarked.key if isinstance(watermarked, WatermarkedDataset) else watermarked
    if tuple(test_set.image_shape) != tuple(key.image_shape) or test_set.num_classes != key.num_classes:
        raise ValueError(f"the key was made for {key.dataset} ({key.num_classes} classes, images "
                         f"{tuple(key.image_shape)}); the test set {test_set.name} has {test_set.num_classes} "
                         f"classes and images {tuple(test_set.image_shape)}")
    probs = predict_proba(model, test_set.images, batch_size=batch_size)
    pred = probs.argmax(1).numpy()
    labels = test_set.labels.numpy()
    mask, desc = evaluation_mask(test_set, key, source_class)
    m = mask.numpy()
    trig_probs = predict_proba(model, trigger(test_set.images[mask], key, seed=seed), batch_size=batch_size)
    trig_pred = trig_probs.argmax(1).numpy()
    y = labels[m]
    correct = pred[m] == y
    row = {
        "method": key.method,
        "labels": REGISTRY[key.method].label_type if key.method in REGISTRY else "",
        "targeted": key.target is not None,
        "BA": metrics.benign_accuracy(pred, labels),
        "ASR-A": metrics.asr_all(trig_pred, y),
        "ASR-C": metrics.asr_correct(pred[m], trig_pred, y) if correct.any() else math.nan,
        "D_p": metrics.prediction_dispersibility(trig_pred, y, test_set.num_classes),
        "D_s (triggered)": metrics.sample_dispersibility(trig_probs.double().numpy()),
        "ASR (targeted)": metrics.asr_targeted(trig_pred, y, key.target) if key.target is not None else math.nan,
        "eval set": desc,
        "n eval": int(m.sum()),
    }
    return row
