"""Defenses against backdoor watermarks: fine-tuning, pruning and STRIP (the paper's Section 5.4.2).

A watermark that is meant to protect a dataset must survive what a suspect might do to a model trained
on it. This package implements three such defenses, one module each. None of them ever sees a watermark
key: callers pass models, benign datasets, (already triggered) images and evaluation callables, e.g.
``evaluate = lambda m: {"BA": ..., "ASR-A": ...}`` built from :mod:`ubwlib.metrics`.

- :mod:`.fine_tuning` (:func:`fine_tune`, :class:`FineTuningSettings`): tune a copy of the model on a
  small benign subset with :func:`ubwlib.train.train`, evaluating it after every epoch (Figure 6);
- :mod:`.pruning` (:func:`layer_activations`, :func:`prune_channels`, :func:`prune_by_activation`,
  :func:`pruning_curve`): mask the least active channels of the last convolutional stage (Figure 7);
  classic fine-pruning is ``fine_tune(prune_by_activation(model, images, rate), benign_train)``;
- :mod:`.strip` (:func:`strip_entropy`, :func:`strip_detect`, :class:`StripSettings`): the STRIP run-time
  detector of sample-agnostic triggers (Gao et al., 2019).
"""

from . import fine_tuning, pruning, strip
from .fine_tuning import FineTuningSettings, fine_tune, fine_tune_size
from .pruning import (
    ChannelMask,
    get_layer,
    layer_activations,
    prune_by_activation,
    prune_channels,
    pruned_count,
    pruning_curve,
    pruning_order,
)
from .strip import StripSettings, rank_auc, strip_detect, strip_entropy

__all__ = [*fine_tuning.__all__, *pruning.__all__, *strip.__all__]
