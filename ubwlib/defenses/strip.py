"""The STRIP defense (Gao et al., 2019): a run-time detector of sample-agnostic triggers.

Each input is blended with ``n_overlays`` (N = 20) random clean images, ``(1 - alpha) * x + alpha * overlay``
with ``alpha = 0.5`` in float ``[0, 1]``, and scored by the mean entropy (nats) of the model's predictions
over the N blends. A trigger that survives the blending keeps the predictions confident, i.e. the entropy
low. The threshold is the ``frr`` quantile (default 1%) of the entropies of a clean hold-out set; an input
is flagged when its entropy is below it. :func:`strip_detect` reports the detection rate on triggered
inputs, the false rejection rate on clean test inputs and the ROC AUC (:func:`rank_auc`, a Mann-Whitney
statistic).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from ..data import ImageDataset
from ..metrics import entropy
from ..train import predict_proba
from ._common import as_images, check_int, check_real

__all__ = ["StripSettings", "strip_entropy", "strip_detect", "rank_auc"]


@dataclass(frozen=True)
class StripSettings:
    """STRIP settings (Gao et al., 2019).

    ``n_overlays``: clean images blended with each input (N). ``alpha``: the overlay's blend weight,
    ``blend = (1 - alpha) * x + alpha * overlay`` in float ``[0, 1]`` (0.5: an even superimposition).
    ``frr``: the false rejection rate that sets the threshold on the clean hold-out set (its ``frr``
    quantile of entropies). ``seed``: draws the overlays.
    """

    n_overlays: int = 20
    alpha: float = 0.5
    frr: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        check_int(self.n_overlays, "n_overlays", 1)
        if not 0 < check_real(self.alpha, "alpha") < 1:
            raise ValueError(f"alpha must be in (0, 1); got {self.alpha}")
        if not 0 <= check_real(self.frr, "frr") < 1:
            raise ValueError(f"frr must be in [0, 1); got {self.frr}")
        check_int(self.seed, "seed", 0)

    def replace(self, **changes: Any) -> "StripSettings":
        return dataclasses.replace(self, **changes)


#: Inputs whose overlay indices are drawn together (fixed, so the draws never depend on batch_size).
_DRAW_CHUNK = 64


def _overlay_indices(n: int, pool: int, n_overlays: int, seed: int, exclude_self: bool) -> torch.Tensor:
    """``n x n_overlays`` pool indices: for each input, distinct images drawn uniformly (seeded)."""
    available = pool - 1 if exclude_self else pool
    if available < n_overlays:
        raise ValueError(
            f"clean_pool has {available} usable images{' (excluding each input itself)' if exclude_self else ''}, "
            f"fewer than n_overlays={n_overlays}"
        )
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, _DRAW_CHUNK):
        stop = min(n, start + _DRAW_CHUNK)
        keys = torch.rand(stop - start, pool, generator=g)
        if exclude_self:
            rows = torch.arange(stop - start)
            keys[rows, rows + start] = 2.0  # never among the smallest
        out.append(torch.topk(keys, n_overlays, dim=1, largest=False, sorted=True).indices)
    return torch.cat(out) if out else torch.empty(0, n_overlays, dtype=torch.int64)


def strip_entropy(
    model: nn.Module,
    images: torch.Tensor | ImageDataset,
    clean_pool: torch.Tensor | ImageDataset,
    settings: StripSettings = StripSettings(),
    *,
    exclude_self: bool = False,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
    precision: str = "auto",
) -> np.ndarray:
    """STRIP score of each input: the mean prediction entropy (nats) over its ``n_overlays`` blends.

    For input ``i``, ``n_overlays`` distinct images of ``clean_pool`` are drawn (a generator seeded with
    ``settings.seed``; the same inputs and pool give the same draws, whatever ``batch_size``), and
    ``(1 - alpha) * x_i / 255 + alpha * overlay / 255`` (float in ``[0, 1]``) is classified with
    :func:`ubwlib.train.predict_proba` (``device``, ``precision``, ``batch_size`` are passed on; it treats
    float input as already scaled, exactly like uint8 input divided by 255). ``exclude_self=True`` when
    ``images`` *is* ``clean_pool`` (same order): input ``i`` is then never blended with itself.
    Returns a float64 array of length ``len(images)``.
    """
    if not isinstance(settings, StripSettings):
        raise TypeError(f"settings must be a StripSettings; got {type(settings).__name__}")
    x = as_images(images, "images")
    pool = as_images(clean_pool, "clean_pool")
    check_int(batch_size, "batch_size", 1)
    if x.shape[1:] != pool.shape[1:]:
        raise ValueError(f"images {tuple(x.shape[1:])} and clean_pool {tuple(pool.shape[1:])} differ in shape")
    if exclude_self and len(x) != len(pool):
        raise ValueError("exclude_self=True needs images to be clean_pool itself (same length)")
    if len(x) == 0:
        return np.zeros(0, dtype=np.float64)
    n_ov = settings.n_overlays
    idx = _overlay_indices(len(x), len(pool), n_ov, settings.seed, exclude_self)

    def scaled(t: torch.Tensor) -> torch.Tensor:
        return t.float() / 255.0 if t.dtype == torch.uint8 else t.float()

    out = np.empty(len(x), dtype=np.float64)
    per_chunk = max(1, batch_size // n_ov)
    for start in range(0, len(x), per_chunk):
        stop = min(len(x), start + per_chunk)
        base = scaled(x[start:stop].cpu()).unsqueeze(1)  # m x 1 x C x H x W
        over = scaled(pool[idx[start:stop].reshape(-1).to(pool.device)].cpu())
        over = over.view(stop - start, n_ov, *over.shape[1:])
        blends = ((1 - settings.alpha) * base + settings.alpha * over).clamp_(0, 1).flatten(0, 1)
        probs = predict_proba(model, blends, batch_size=batch_size, device=device, precision=precision)
        h = entropy(probs.double().numpy())
        out[start:stop] = h.reshape(stop - start, n_ov).mean(axis=1)
    return out


def rank_auc(positive: Any, negative: Any) -> float:
    """ROC AUC of scores where higher means positive: ``P(s_pos > s_neg) + P(s_pos = s_neg) / 2``.

    Computed from average ranks (the Mann-Whitney U statistic divided by ``n_pos * n_neg``)."""
    pos = np.asarray(positive, dtype=np.float64).reshape(-1)
    neg = np.asarray(negative, dtype=np.float64).reshape(-1)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("rank_auc needs at least one positive and one negative score")
    if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(neg))):
        raise ValueError("scores must be finite")
    ranks = rankdata(np.concatenate([pos, neg]))
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def strip_detect(
    model: nn.Module,
    clean_holdout: torch.Tensor | ImageDataset,
    clean_test: torch.Tensor | ImageDataset,
    triggered: torch.Tensor | ImageDataset,
    settings: StripSettings = StripSettings(),
    *,
    overlay_pool: torch.Tensor | ImageDataset | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """Run STRIP: set the threshold on ``clean_holdout`` and test ``clean_test`` and ``triggered`` inputs.

    Overlays come from ``overlay_pool`` (default: ``clean_holdout``, the defender's small clean set; its
    own entropies are then computed with ``exclude_self=True``). ``kwargs`` go to :func:`strip_entropy`.
    Returns ``threshold`` (the ``settings.frr`` quantile, numpy's linear interpolation, of the hold-out
    entropies), ``detection rate`` (fraction of ``triggered`` with entropy < threshold), ``false rejection
    rate`` (fraction of ``clean_test`` with entropy < threshold), ``AUC`` (:func:`rank_auc` with the
    negated entropy as the score and the triggered inputs as positives), ``entropy clean (mean)`` (on
    ``clean_test``) and ``entropy triggered (mean)``.
    """
    if not isinstance(settings, StripSettings):
        raise TypeError(f"settings must be a StripSettings; got {type(settings).__name__}")
    pool = clean_holdout if overlay_pool is None else overlay_pool
    for name, value in (("clean_holdout", clean_holdout), ("clean_test", clean_test), ("triggered", triggered)):
        if len(as_images(value, name)) == 0:
            raise ValueError(f"{name} is empty")
    h_hold = strip_entropy(model, clean_holdout, pool, settings, exclude_self=overlay_pool is None, **kwargs)
    h_clean = strip_entropy(model, clean_test, pool, settings, **kwargs)
    h_trig = strip_entropy(model, triggered, pool, settings, **kwargs)
    threshold = float(np.quantile(h_hold, settings.frr))
    return {
        "threshold": threshold,
        "detection rate": float(np.mean(h_trig < threshold)),
        "false rejection rate": float(np.mean(h_clean < threshold)),
        "AUC": rank_auc(-h_trig, -h_clean),
        "entropy clean (mean)": float(h_clean.mean()),
        "entropy triggered (mean)": float(h_trig.mean()),
    }
