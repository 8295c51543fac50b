"""The fine-tuning defense (Figure 6): tune a copy of the model on a small benign subset.

The public toolbox's defaults: a stratified, seeded 10% of the benign training data, SGD with a constant
learning rate 0.001, momentum 0.9, weight decay 5e-4, batch 128, 10 epochs, random horizontal flips as in
:func:`ubwlib.train.train` (BatchNorm in training mode while tuning). A deep copy of the model is tuned by
:func:`ubwlib.train.train` with :meth:`FineTuningSettings.train_config`; ``evaluate`` is called before
training (epoch 0) and after every epoch, giving one history row per epoch (BA and ASR against epochs).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..data import ImageDataset
from ..train import PRECISIONS, TrainConfig, prepare_model, resolve_device, resolve_precision, train
from ._common import FLOOR_EPS, Evaluate, check_int, check_real, evaluate_row

__all__ = ["FineTuningSettings", "fine_tune", "fine_tune_size"]


@dataclass(frozen=True)
class FineTuningSettings:
    """Fine-tuning defense settings; the defaults are the public toolbox's (reference section 6).

    ``fraction`` of the benign training data (stratified by class, drawn with ``seed``), SGD with a
    constant ``lr``, ``momentum`` and ``weight_decay``, ``epochs`` passes in batches of ``batch_size``.
    ``flip``: random horizontal flips (the project's training augmentation; False for none).
    ``precision``: as in :class:`ubwlib.train.TrainConfig` (``auto``, ``bf16``, ``fp32``).
    """

    fraction: float = 0.1
    epochs: int = 10
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    seed: int = 0
    flip: bool = True
    precision: str = "auto"

    def __post_init__(self) -> None:
        fraction = check_real(self.fraction, "fraction")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
        check_int(self.epochs, "epochs", 0)
        check_int(self.batch_size, "batch_size", 1)
        check_int(self.seed, "seed", 0)
        if not check_real(self.lr, "lr") > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if not 0 <= check_real(self.momentum, "momentum") < 1:
            raise ValueError(f"momentum must be in [0, 1); got {self.momentum}")
        if check_real(self.weight_decay, "weight_decay") < 0:
            raise ValueError(f"weight_decay must be >= 0; got {self.weight_decay}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}; got {self.precision!r}")

    def replace(self, **changes: Any) -> "FineTuningSettings":
        return dataclasses.replace(self, **changes)

    def train_config(self) -> TrainConfig:
        """The :class:`ubwlib.train.TrainConfig` that fine-tuning trains with: SGD (no Nesterov) with these
        ``lr``, ``momentum``, ``weight_decay``, ``epochs`` and ``batch_size``, a ``constant`` schedule, ``flip``
        and no crop, no label smoothing, every batch kept, ``precision``, and ``seed`` (data order from a
        generator seeded with ``seed``, flips from one seeded with ``seed + 1``)."""
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            nesterov=False,
            schedule="constant",
            flip=self.flip,
            crop_padding=0,
            label_smoothing=0.0,
            precision=self.precision,
            seed=self.seed,
            drop_last=False,
        )


def fine_tune_size(fraction: float, n: int) -> int:
    """Number of samples fine-tuning draws: ``max(1, floor(fraction * n))`` (``n`` for ``fraction = 1``)."""
    fraction = check_real(fraction, "fraction")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    n = check_int(n, "n", 1)
    return max(1, min(n, math.floor(fraction * n + FLOOR_EPS)))


_FT_COLUMNS = ("epoch", "loss", "train_acc", "lr", "samples", "seconds")


def fine_tune(
    model: nn.Module,
    benign_train: ImageDataset,
    settings: FineTuningSettings = FineTuningSettings(),
    *,
    evaluate: Evaluate | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    desc: str = "fine-tune",
) -> tuple[nn.Module, pd.DataFrame]:
    """Fine-tune a deep copy of ``model`` on part of ``benign_train``; returns ``(tuned_model, history)``.

    ``model`` itself is never modified (not its weights, device or train/eval mode). The tuned copy is on
    ``device`` (default: CUDA when available, as in :func:`ubwlib.train.train`) and in eval mode.

    The training samples are ``benign_train.stratified_subset(fine_tune_size(fraction, N), seed)`` (the
    whole set for ``fraction = 1``). The copy is trained by one call of :func:`ubwlib.train.train` with
    ``settings.train_config()``: one SGD optimiser with a constant learning rate lives across all epochs
    (its momentum buffers carry over), the data order comes from a generator seeded with ``seed`` and the
    flips from one seeded with ``seed + 1``. BatchNorm layers are in training mode while tuning (the
    standard choice).

    ``evaluate(model) -> dict`` is called with the copy in eval mode before training (``epoch`` 0) and
    after each epoch (from ``train``'s ``on_epoch``). ``history`` has one row per epoch ``0..epochs``:
    ``epoch``, then the entries of ``evaluate``'s dict, then ``loss`` and ``train_acc`` (mean over the
    epoch's samples; NaN at epoch 0), ``lr``, ``samples`` (the number of fine-tuning samples, the same on
    every row) and ``seconds`` (training time of the epoch, without ``evaluate``; 0 at epoch 0).
    """
    if not isinstance(settings, FineTuningSettings):
        raise TypeError(f"settings must be a FineTuningSettings; got {type(settings).__name__}")
    if not isinstance(benign_train, ImageDataset):
        raise TypeError(f"benign_train must be an ubwlib.data.ImageDataset; got {type(benign_train).__name__}")
    if len(benign_train) == 0:
        raise ValueError("benign_train is empty")
    n_total = len(benign_train)
    n = fine_tune_size(settings.fraction, n_total)
    subset = benign_train if n == n_total else benign_train.stratified_subset(n, settings.seed)

    dev = resolve_device(device)
    # placed as train() places it, so that the epoch-0 evaluation sees the model the training starts from
    tuned = prepare_model(copy.deepcopy(model), dev, resolve_precision(settings.precision, dev))

    rows: list[dict[str, Any]] = []
    eval_keys: list[str] = []

    def record(epoch: int, stats: dict[str, Any]) -> None:
        row: dict[str, Any] = {"epoch": epoch}
        if evaluate is not None:
            metrics = evaluate_row(evaluate, tuned, _FT_COLUMNS)
            for key in metrics:
                if key not in eval_keys:
                    eval_keys.append(key)
            row.update(metrics)
        row.update(loss=stats["loss"], train_acc=stats["train_acc"], lr=stats["lr"], samples=n,
                   seconds=stats["seconds"])
        rows.append(row)

    record(0, {"loss": math.nan, "train_acc": math.nan, "lr": settings.lr, "seconds": 0.0})
    tuned = train(tuned, subset, settings.train_config(), device=dev, progress=progress, desc=desc,
                  on_epoch=lambda epoch, _model, stats: record(epoch, stats)).model
    history = pd.DataFrame(rows, columns=["epoch", *eval_keys, *_FT_COLUMNS[1:]])
    return tuned, history
