"""Ownership verification by a paired t-test (the UBW paper's Proposition 1).

The dataset owner holds the watermark key (its trigger ``G``) and can query a suspicious model ``f`` as a black
box (probabilities only). On ``m`` random test images ``x`` with label ``y`` that ``f`` classifies correctly, let
``P_b = f(x)_y`` and ``P_p = f(G(x))_y`` be the probabilities of the true label without and with the trigger.
A paired one-sided t-test of ``H0: P_b = P_p + tau`` against ``H1: P_b > P_p + tau``
(``scipy.stats.ttest_rel(P_b, P_p + tau, alternative="greater")``) claims that ``f`` was trained on the protected
dataset iff its p-value is below ``alpha``. Defaults: ``m = 100``, ``tau = 0.25``, ``alpha = 0.01``; the effect
size reported next to the p-value is ``Delta P = mean(P_b - P_p)``.

The paper evaluates three scenarios (:data:`SCENARIOS`):

- **Independent-T**: the watermarked model, queried with *another* trigger of the same kind
  (:func:`independent_key`) -- must not be flagged;
- **Independent-M**: a model trained on the benign dataset, queried with the true trigger -- must not be flagged;
- **Malicious**: the watermarked model, queried with the true trigger -- must be flagged.

Endpoints that return only the top label are verified by :func:`verify_labels`, an exact one-sided binomial test
on the number of correctly classified test images that the trigger flips (:func:`label_pvalue`,
:func:`label_power`).

Both tests query test images of the dataset the key protects, and both refuse a test set whose class names differ
from the key's or, for a key bound with :meth:`~ubwlib.watermarks.WatermarkKey.bind_test_split`, whose
:func:`dataset_fingerprint` differs from the bound one.

>>> result = verify(model_predictor(suspect), test_set, released.key, scenario="Malicious")
>>> result.watermarked, result.delta_p, result.p_value, result.queries
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from scipy import stats

from .data import ImageDataset
from .train import predict_proba as _model_predict_proba
from .watermarks import REGISTRY, WatermarkKey, trigger
from .watermarks.base import _short_names, dataset_fingerprint

__all__ = [
    "SCENARIOS",
    "VerificationSettings",
    "VerificationResult",
    "LabelVerificationResult",
    "DEFAULT_P0",
    "paired_ttest",
    "decide",
    "label_pvalue",
    "label_power",
    "verify",
    "verify_labels",
    "verify_scenarios",
    "model_predictor",
    "dataset_fingerprint",
    "independent_key",
]

#: The paper's three verification scenarios (Table 5), in its order.
SCENARIOS = ("Independent-T", "Independent-M", "Malicious")

#: Tolerance on ``|sum(row) - 1|`` for a predictor's probability rows (``1e-2`` for 16-bit float outputs).
_PROB_ATOL = 1e-3
_PROB_ATOL_16BIT = 1e-2

#: The default ``p0`` of :func:`verify_labels`: the largest flip rate allowed to an innocent model (see there).
DEFAULT_P0 = 0.5

Predictor = Callable[[torch.Tensor], Any]


# --------------------------------------------------------------------------- settings and the test
@dataclass(frozen=True)
class VerificationSettings:
    """Settings of the hypothesis test (the paper's defaults).

    ``m``: number of correctly classified test images queried (>= 2, a paired t-test needs two pairs);
    ``tau``: the margin of ``H0: P_b = P_p + tau``, in ``[0, 1]``; ``alpha``: the significance level, in ``(0, 1)``.
    """

    m: int = 100
    tau: float = 0.25
    alpha: float = 0.01

    def __post_init__(self) -> None:
        if isinstance(self.m, bool) or not isinstance(self.m, (int, np.integer)):
            raise TypeError(f"m must be an int (the number of test images queried), got {self.m!r}")
        if self.m < 2:
            raise ValueError(f"m must be >= 2 (a paired t-test needs at least two pairs), got {self.m}; "
                             "use e.g. m=100, the paper's setting")
        if isinstance(self.tau, bool) or not isinstance(self.tau, numbers.Real) or not 0 <= self.tau <= 1:
            raise ValueError(f"tau must be a probability margin in [0, 1], got {self.tau!r} (the paper: 0.25)")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real) or not 0 < self.alpha < 1:
            raise ValueError(f"alpha (significance level) must be in (0, 1), got {self.alpha!r} (the paper: 0.01)")
        object.__setattr__(self, "m", int(self.m))
        object.__setattr__(self, "tau", float(self.tau))
        object.__setattr__(self, "alpha", float(self.alpha))


def _as_vector(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite (no nan/inf)")
    return arr.copy()


def paired_ttest(p_benign: Any, p_triggered: Any, tau: float = 0.25) -> tuple[float, float]:
    """One-sided paired t-test of ``H0: P_b = P_p + tau`` against ``H1: P_b > P_p + tau``.

    Returns ``(statistic, p_value)`` of ``scipy.stats.ttest_rel(p_benign, p_triggered + tau,
    alternative="greater")``: ``t = mean(d) / (std(d, ddof=1) / sqrt(n))`` with ``d = P_b - P_p - tau``.

    Degenerate case: when every difference ``P_b - P_p`` is the same (zero variance, where scipy would return
    ``nan`` or an infinite statistic from rounding noise), the test is decided by the mean alone:
    ``p = 0.0`` and ``t = +inf`` if ``mean(P_b - P_p) > tau``, otherwise ``p = 1.0`` and ``t = -inf``
    (or ``t = 0.0`` when the mean equals ``tau`` exactly).
    """
    b = _as_vector(p_benign, "p_benign")
    p = _as_vector(p_triggered, "p_triggered")
    if len(b) != len(p):
        raise ValueError(f"p_benign and p_triggered must have the same length (paired samples), got "
                         f"{len(b)} and {len(p)}")
    if len(b) < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {len(b)}")
    tau = float(tau)
    if not math.isfinite(tau):
        raise ValueError(f"tau must be finite, got {tau}")
    d = b - p
    mean = float(d.mean())
    if float(np.ptp(d)) <= 8 * np.finfo(np.float64).eps * max(1.0, float(np.abs(d).max())):
        if mean > tau:
            return math.inf, 0.0
        return (0.0 if mean == tau else -math.inf), 1.0
    res = stats.ttest_rel(b, p + tau, alternative="greater")
    return float(res.statistic), float(res.pvalue)


def decide(p_value: float, alpha: float = 0.01) -> bool:
    """The verdict of Proposition 1: ``True`` ("trained on the protected dataset") iff ``p_value < alpha``."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < 1:
        raise ValueError(f"alpha (significance level) must be in (0, 1), got {alpha!r}")
    p_value = float(p_value)
    if not 0 <= p_value <= 1:
        raise ValueError(f"p_value must be in [0, 1], got {p_value}")
    return bool(p_value < float(alpha))


def _check_p0(p0: Any) -> float:
    if isinstance(p0, bool) or not isinstance(p0, numbers.Real) or not 0 < p0 < 1:
        raise ValueError(f"p0 (the largest flip rate of an innocent model) must be in (0, 1), got {p0!r} "
                         f"(default {DEFAULT_P0})")
    return float(p0)


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < 1:
        raise ValueError(f"alpha (significance level) must be in (0, 1), got {alpha!r} (the paper: 0.01)")
    return float(alpha)


def _smallest_m(p0: float, alpha: float) -> int:
    """The smallest ``m`` with ``p0 ** m < alpha``: below it the label-only test can never reject."""
    m = max(1, math.floor(math.log(alpha) / math.log(p0)))
    while p0 ** m >= alpha:
        m += 1
    while m > 1 and p0 ** (m - 1) < alpha:
        m -= 1
    return m


def _check_count(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def label_pvalue(flips: int, m: int, p0: float = DEFAULT_P0) -> float:
    """The p-value of the label-only test: ``P(X >= flips)`` for ``X ~ Binomial(m, p0)``.

    It is the exact one-sided binomial test of ``H0: flip rate <= p0`` against ``H1: flip rate > p0``,
    ``scipy.stats.binomtest(flips, m, p0, alternative="greater").pvalue``, i.e.
    ``sum(comb(m, j) * p0**j * (1 - p0)**(m - j) for j in range(flips, m + 1))``. Under ``H0`` it is at most
    ``alpha`` with probability at most ``alpha`` (the test is exact, and conservative for flip rates below p0).
    """
    m = _check_count(m, "m", 1)
    flips = _check_count(flips, "flips", 0)
    if flips > m:
        raise ValueError(f"flips must be in [0, m] = [0, {m}], got {flips}")
    return float(stats.binomtest(flips, m, _check_p0(p0), alternative="greater").pvalue)


def label_power(flip_rate: float, m_values: int | Iterable[int], p0: float = DEFAULT_P0,
                alpha: float = 0.01) -> float | np.ndarray:
    """The exact power of the label-only test: the probability that :func:`verify_labels` rejects ``H0`` (says
    "watermarked") when each queried image flips independently with probability ``flip_rate``.

    For each ``m`` the test rejects iff ``flips >= k*``, the smallest ``k`` with :func:`label_pvalue`
    ``(k, m, p0) < alpha`` (the p-value falls as ``k`` grows); the power is ``P(Y >= k*)`` for
    ``Y ~ Binomial(m, flip_rate)``, and 0 when no ``k <= m`` rejects (``p0 ** m >= alpha``). ``flip_rate = p0``
    gives the test's size (at most ``alpha``). Returns a float for an int ``m_values`` and a float64 array of the
    same length for an iterable.

    The power rises with ``flip_rate``; it is not monotone in ``m``: ``k*`` grows in whole steps, so the power
    follows a sawtooth that rises overall (with ``p0 = 0.5``, ``alpha = 0.01`` and ``flip_rate = 0.7``: 0.040 at
    m = 9, 0.028 at m = 10, 0.113 at m = 11).
    """
    if isinstance(flip_rate, bool) or not isinstance(flip_rate, numbers.Real) or not 0 <= flip_rate <= 1:
        raise ValueError(f"flip_rate must be a probability in [0, 1], got {flip_rate!r}")
    p0 = _check_p0(p0)
    alpha = _check_alpha(alpha)
    scalar = isinstance(m_values, (int, np.integer)) and not isinstance(m_values, bool)
    ms = [_check_count(m, "m", 1) for m in ([m_values] if scalar else list(m_values))]
    out = np.zeros(len(ms), dtype=np.float64)
    for i, m in enumerate(ms):
        k = np.arange(m + 1)
        pvalues = stats.binom.sf(k - 1, m, p0)  # what binomtest(k, m, p0, alternative="greater") returns
        rejecting = np.flatnonzero(pvalues < alpha)
        if len(rejecting):
            out[i] = float(stats.binom.sf(int(rejecting[0]) - 1, m, float(flip_rate)))
    return float(out[0]) if scalar else out


class _Verdict:
    """The verdict of a result with a boolean ``watermarked``."""

    watermarked: bool

    @property
    def verdict(self) -> str:
        """``"watermarked"`` or ``"not watermarked"``."""
        return "watermarked" if self.watermarked else "not watermarked"


@dataclass(frozen=True, eq=False)
class VerificationResult(_Verdict):
    """The outcome of :func:`verify`.

    ``delta_p = mean(P_b - P_p)``; ``p_value`` and ``statistic`` of :func:`paired_ttest`; ``watermarked`` the
    verdict ``p_value < alpha``; ``indices`` the test-set indices queried (sorted, int64) with their
    ``p_benign`` (``P_b``) and ``p_triggered`` (``P_p``) in the same order (float64); ``scenario`` a free label
    (e.g. one of :data:`SCENARIOS`); ``queries`` the number of images sent to the predictor, benign and triggered
    (``m`` plus the misclassified candidates met before the ``m``-th correct one, plus ``m``; None when not
    recorded).
    """

    delta_p: float
    p_value: float
    statistic: float
    watermarked: bool
    m: int
    tau: float
    alpha: float
    indices: torch.Tensor = field(repr=False)
    p_benign: np.ndarray = field(repr=False)
    p_triggered: np.ndarray = field(repr=False)
    scenario: str = ""
    queries: int | None = None

    def row(self) -> dict:
        """One table row: scenario, Delta P, p-value, verdict, m, tau, alpha (not ``queries``)."""
        return {
            "scenario": self.scenario,
            "Delta P": self.delta_p,
            "p-value": self.p_value,
            "verdict": self.verdict,
            "m": self.m,
            "tau": self.tau,
            "alpha": self.alpha,
        }


@dataclass(frozen=True, eq=False)
class LabelVerificationResult(_Verdict):
    """The outcome of :func:`verify_labels`.

    ``flips`` of the ``m`` queried images (correctly classified without the trigger) get another label with it;
    ``p_value`` is :func:`label_pvalue` ``(flips, m, p0)`` and ``watermarked`` the verdict ``p_value < alpha``.
    ``indices`` are the test-set indices queried (sorted, int64), ``labels`` their true labels and
    ``triggered_labels`` the predictor's labels on their triggered versions, in the same order (int64);
    ``queries`` the number of images sent to the predictor (``m`` plus the misclassified candidates met before
    the ``m``-th correct one, plus ``m`` triggered images); ``scenario`` a free label.
    """

    flips: int
    m: int
    p0: float
    p_value: float
    watermarked: bool
    alpha: float
    indices: torch.Tensor = field(repr=False)
    labels: np.ndarray = field(repr=False)
    triggered_labels: np.ndarray = field(repr=False)
    queries: int
    scenario: str = ""

    @property
    def flip_rate(self) -> float:
        """``flips / m``."""
        return self.flips / self.m

    def row(self) -> dict:
        """One table row: scenario, flips, m, flip rate, p0, p-value, verdict, alpha, queries."""
        return {
            "scenario": self.scenario,
            "flips": self.flips,
            "m": self.m,
            "flip rate": self.flip_rate,
            "p0": self.p0,
            "p-value": self.p_value,
            "verdict": self.verdict,
            "alpha": self.alpha,
            "queries": self.queries,
        }


# --------------------------------------------------------------------------- predictors
def model_predictor(model: torch.nn.Module, *, batch_size: int = 1024, device: str | torch.device | None = None,
                    precision: str = "auto") -> Callable[[torch.Tensor], torch.Tensor]:
    """A black-box predictor ``images -> probabilities`` for a torch model (softmax of its logits), built on
    :func:`ubwlib.train.predict_proba` (eval mode; ``device`` default: where the model's parameters are)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

    def predictor(images: torch.Tensor) -> torch.Tensor:
        return _model_predict_proba(model, images, batch_size=batch_size, device=device, precision=precision)

    return predictor


def _top_label_predictor(model: torch.nn.Module, batch_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A label-only black box for a torch model: the argmax of :func:`model_predictor`'s probabilities."""
    probabilities = model_predictor(model, batch_size=batch_size)

    def predictor(images: torch.Tensor) -> torch.Tensor:
        return probabilities(images).argmax(1)

    return predictor


def _query(predictor: Predictor, images: torch.Tensor, num_classes: int, batch_size: int, what: str) -> np.ndarray:
    """The predictor's probabilities (float64, N x K) on ``images``, ``batch_size`` at a time, validated."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].clone()  # the predictor gets its own copy
        raw = predictor(batch)
        out.append(_check_probs(raw, len(batch), num_classes, what))
    if not out:
        return np.zeros((0, num_classes))
    return np.concatenate(out)


def _check_probs(raw: Any, n: int, num_classes: int, what: str) -> np.ndarray:
    atol = _PROB_ATOL
    if isinstance(raw, torch.Tensor):
        if raw.dtype in (torch.float16, torch.bfloat16):
            atol = _PROB_ATOL_16BIT
        arr = raw.detach().cpu().double().numpy()
    else:
        try:
            if getattr(raw, "dtype", None) == np.float16:
                atol = _PROB_ATOL_16BIT
            arr = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"predict_proba must return probabilities (a torch tensor or numpy array N x K), "
                            f"got {type(raw).__name__}") from exc
    if arr.shape != (n, num_classes):
        raise ValueError(f"predict_proba returned shape {arr.shape} on {n} {what} images; expected "
                         f"({n}, {num_classes}): one row of {num_classes} class probabilities per image")
    if not np.isfinite(arr).all():
        raise ValueError(f"predict_proba returned non-finite values on {what} images")
    sums = arr.sum(1)
    if arr.min() < -atol or np.abs(sums - 1).max() > atol:
        raise ValueError(
            f"predict_proba must return probabilities (non-negative rows summing to 1), got values in "
            f"[{arr.min():.4g}, {arr.max():.4g}] with row sums in [{sums.min():.4g}, {sums.max():.4g}] on {what} "
            "images; if these are logits, apply torch.softmax(logits, dim=1) (or use model_predictor(model))")
    return np.clip(arr, 0.0, None)


def _check_labels(raw: Any, n: int, num_classes: int, what: str) -> np.ndarray:
    """A label-only predictor's output on ``n`` images as int64 labels in ``[0, num_classes)``."""
    if isinstance(raw, torch.Tensor):
        arr = raw.detach().cpu().numpy()
    else:
        try:
            arr = np.asarray(raw)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"predict_labels must return class labels (a tensor, array or list of {n} ints), got "
                            f"{type(raw).__name__}") from exc
    if arr.shape == (n, num_classes) and n != num_classes and arr.dtype.kind == "f":
        raise ValueError(f"predict_labels returned shape {arr.shape} on {n} {what} images: one row of class "
                         "scores per image, not labels; return scores.argmax(1), or use verify() for probabilities")
    if arr.shape != (n,):
        raise ValueError(f"predict_labels returned shape {arr.shape} on {n} {what} images; expected ({n},): one "
                         "class label per image")
    if arr.dtype.kind == "f" and np.isfinite(arr).all() and (arr == np.round(arr)).all():
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"predict_labels must return integer class labels, got dtype {arr.dtype} on {what} images")
    arr = arr.astype(np.int64)
    if n and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(f"predict_labels returned labels in [{arr.min()}, {arr.max()}] on {what} images; expected "
                         f"class indices in [0, {num_classes})")
    return arr


# --------------------------------------------------------------------------- verification
def _check_key(test_set: ImageDataset, key: WatermarkKey) -> None:
    """Refuse a test set that is not (or may not be) the test split of the dataset ``key`` protects."""
    if not isinstance(test_set, ImageDataset):
        raise TypeError(f"test_set must be an ubwlib.data.ImageDataset, got {type(test_set).__name__}")
    if not isinstance(key, WatermarkKey):
        raise TypeError(f"key must be an ubwlib.watermarks.WatermarkKey, got {type(key).__name__}")
    if tuple(key.image_shape) != tuple(test_set.image_shape) or key.num_classes != test_set.num_classes:
        raise ValueError(
            f"the {key.method} key was made for {key.dataset} (images {tuple(key.image_shape)}, "
            f"{key.num_classes} classes) but the test set {test_set.name} has images {tuple(test_set.image_shape)} "
            f"and {test_set.num_classes} classes; verify with a test split of the dataset the key protects")
    if tuple(key.classes) != tuple(test_set.classes):
        raise ValueError(
            f"the {key.method} key was made for {key.dataset} with classes {_short_names(key.classes)} but the test "
            f"set {test_set.name} has classes {_short_names(test_set.classes)}: another dataset (or another class "
            f"order); verify with the test split of the dataset the key protects")
    if key.test_fingerprint is not None:
        fingerprint = dataset_fingerprint(test_set)
        if fingerprint != key.test_fingerprint:
            bound = key.test_dataset or "its test split"
            raise ValueError(
                f"the {key.method} key is bound to {bound} (the test split of {key.dataset}, fingerprint "
                f"{key.test_fingerprint[:12]}...) but the test set {test_set.name} has fingerprint "
                f"{fingerprint[:12]}...: other images or labels (another dataset, a subset, or a modified copy); "
                f"verify with the test split the key protects, {bound}, whole and unmodified")


def _class_filter(classes: Iterable[int] | None, num_classes: int) -> torch.Tensor:
    if classes is None:
        return torch.ones(num_classes, dtype=torch.bool)
    if isinstance(classes, (int, np.integer)) and not isinstance(classes, bool):
        classes = [classes]
    chosen = list(classes)
    keep = torch.zeros(num_classes, dtype=torch.bool)
    for c in chosen:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < num_classes:
            raise ValueError(f"classes must be class indices in [0, {num_classes}), got {chosen!r}")
        keep[int(c)] = True
    if not keep.any():
        raise ValueError("classes must name at least one class (or be None for all classes)")
    return keep


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def _candidates(test_set: ImageDataset, key: WatermarkKey, classes: Iterable[int] | None, m: int) -> torch.Tensor:
    """Indices (CPU int64, ascending) of the test images whose label is in ``classes`` and not the key's target."""
    allowed = _class_filter(classes, test_set.num_classes)
    if key.target is not None:
        allowed[int(key.target)] = False
    candidates = torch.nonzero(allowed[test_set.labels.cpu()]).flatten()
    if len(candidates) < m:
        raise ValueError(
            f"only {len(candidates)} test images of {test_set.name} are candidates (labels in the chosen classes"
            f"{', not the target class ' + str(key.target) if key.target is not None else ''}), fewer than "
            f"m = {m}; lower m or use a larger test set")
    return candidates


def _draw_correct(
    query: Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]],
    test_set: ImageDataset,
    candidates: torch.Tensor,
    m: int,
    seed: int,
    batch_size: int,
) -> tuple[torch.Tensor, np.ndarray, int]:
    """The first ``m`` correctly classified candidates in a seeded random order, querying no image after them.

    The candidates are put in the order of ``torch.randperm(len(candidates), generator=torch.Generator()
    .manual_seed(seed))`` and sent to ``query`` in that order, each batch holding ``min(batch_size, still
    needed)`` images (still needed: ``m`` minus the correct ones found so far), until ``m`` correct ones are
    found. As the order is a uniformly random permutation, the first ``m`` correct candidates are a uniformly
    random sample of the correctly classified ones. ``query(images)`` returns the predicted labels and one row of
    output per image. Returns the chosen test-set indices (sorted), their output rows (same order) and the number
    of images queried: ``m`` plus the misclassified candidates met before the ``m``-th correct one.
    """
    labels = test_set.labels.cpu()
    gen = torch.Generator().manual_seed(int(seed))
    order = candidates[torch.randperm(len(candidates), generator=gen)]
    found: list[torch.Tensor] = []
    rows: list[np.ndarray] = []
    n_found = sent = 0
    while n_found < m and sent < len(order):
        batch = order[sent : sent + min(batch_size, m - n_found)]
        sent += len(batch)
        images = test_set.images.index_select(0, batch.to(test_set.images.device)).cpu()
        predicted, out = query(images)
        ok = torch.from_numpy(predicted) == labels[batch]
        found.append(batch[ok])
        rows.append(out[ok.numpy()])
        n_found += int(ok.sum())
    if n_found < m:
        raise ValueError(
            f"the model classifies only {n_found} of the {len(candidates)} candidate test images correctly, "
            f"fewer than m = {m}; lower m, or check that the model and the test set belong together "
            "(same dataset, same preprocessing)")
    indices = torch.cat(found)
    out_rows = np.concatenate(rows)
    order_sorted = torch.argsort(indices)
    return indices[order_sorted].clone(), out_rows[order_sorted.numpy()], sent


def _triggered(test_set: ImageDataset, indices: torch.Tensor, key: WatermarkKey,
               trigger_seed: int | None) -> torch.Tensor:
    images = test_set.images.index_select(0, indices.to(test_set.images.device)).cpu()
    return trigger(images, key, seed=trigger_seed)


def verify(
    predict_proba: Predictor | torch.nn.Module,
    test_set: ImageDataset,
    key: WatermarkKey,
    *,
    m: int = 100,
    tau: float = 0.25,
    alpha: float = 0.01,
    seed: int = 0,
    trigger_seed: int | None = None,
    classes: Iterable[int] | None = None,
    scenario: str = "",
    batch_size: int = 1024,
) -> VerificationResult:
    """Is the suspicious model behind ``predict_proba`` trained on the dataset that ``key`` watermarks?

    ``predict_proba``: any black box, a callable taking uint8 images (N x C x H x W, CPU tensor) and returning
    class probabilities (torch tensor or numpy array, N x K); a ``torch.nn.Module`` is wrapped with
    :func:`model_predictor`. ``test_set``: the test split of the protected dataset; ``key``: its watermark key.
    A test set whose image shape or class names differ from the key's, or (for a key bound with
    ``key.bind_test_split``) whose :func:`dataset_fingerprint` differs from the bound one, is refused
    (``ValueError``).

    Candidates are the test images whose label is in ``classes`` (None: all) and, for targeted keys, not the
    target class. They are queried in a random order seeded with ``seed`` (``torch.randperm`` of the candidates,
    ``torch.Generator().manual_seed(seed)``), each batch holding at most ``batch_size`` images and never more than
    the correct ones still needed, until ``m`` correctly classified ones are found: these are a uniformly random
    sample of the correctly classified candidates, and no image after the ``m``-th correct one is sent. They are
    triggered with ``ubwlib.watermarks.trigger(images, key, seed=trigger_seed)`` (in ascending index order) and
    queried again. ``P_b`` and ``P_p`` are the probabilities of the true label before and after;
    :func:`paired_ttest` with margin ``tau`` decides at level ``alpha``. The result's ``queries`` counts the images
    sent. The caller's tensors are never modified.
    """
    settings = VerificationSettings(m=m, tau=tau, alpha=alpha)
    if isinstance(predict_proba, torch.nn.Module):
        predict_proba = model_predictor(predict_proba, batch_size=batch_size)
    if not callable(predict_proba):
        raise TypeError(f"predict_proba must be a callable images -> probabilities, got "
                        f"{type(predict_proba).__name__}")
    _check_batch_size(batch_size)
    _check_key(test_set, key)
    k = test_set.num_classes
    candidates = _candidates(test_set, key, classes, settings.m)

    def query(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        probs = _query(predict_proba, images, k, batch_size, "benign")
        return probs.argmax(1), probs

    indices, probs, sent = _draw_correct(query, test_set, candidates, settings.m, seed, batch_size)
    chosen_labels = test_set.labels.cpu()[indices].numpy()
    rows = np.arange(settings.m)
    p_benign = probs[rows, chosen_labels].astype(np.float64)

    probs_t = _query(predict_proba, _triggered(test_set, indices, key, trigger_seed), k, batch_size, "triggered")
    p_triggered = probs_t[rows, chosen_labels].astype(np.float64)

    statistic, p_value = paired_ttest(p_benign, p_triggered, settings.tau)
    return VerificationResult(
        delta_p=float(np.mean(p_benign - p_triggered)),
        p_value=p_value,
        statistic=statistic,
        watermarked=decide(p_value, settings.alpha),
        m=settings.m,
        tau=settings.tau,
        alpha=settings.alpha,
        indices=indices,
        p_benign=p_benign,
        p_triggered=p_triggered,
        scenario=str(scenario),
        queries=sent + settings.m,
    )


def verify_labels(
    predict_labels: Predictor | torch.nn.Module,
    test_set: ImageDataset,
    key: WatermarkKey,
    *,
    m: int = 100,
    alpha: float = 0.01,
    p0: float = DEFAULT_P0,
    seed: int = 0,
    trigger_seed: int | None = None,
    classes: Iterable[int] | None = None,
    scenario: str = "",
    batch_size: int = 1024,
) -> LabelVerificationResult:
    """:func:`verify` for black boxes that return only the top label: an exact binomial test on flips.

    ``predict_labels``: a callable taking uint8 images (N x C x H x W, CPU tensor) and returning one class index
    per image (torch tensor, numpy array or list of ints, length N); a ``torch.nn.Module`` is wrapped as the
    argmax of :func:`model_predictor`. ``test_set``, ``key``, ``classes``, ``seed``, ``trigger_seed`` and
    ``batch_size`` are as in :func:`verify`, and the ``m`` images are drawn the same way (the first ``m``
    correctly classified candidates in a seeded random order; no image after them is sent).

    The trigger *flips* an image when the predicted label of its triggered version differs from its true label;
    the *flip rate* is the probability that a correctly classified test image flips. The test is
    ``H0: flip rate <= p0`` (an innocent model) against ``H1: flip rate > p0``, decided by :func:`label_pvalue`
    ``(flips, m, p0) < alpha``. When the test images are independent draws from the data distribution, the ``m``
    chosen ones are independent draws from its correctly classified part, the number of flips is
    ``Binomial(m, flip rate)`` and the test is exact for any ``m``, with no assumption on the model. (Read as a
    sample without replacement from a fixed test set, the count is hypergeometric, which is less spread out; the
    binomial p-value stays valid there: checked numerically for ``alpha <= 0.05`` over test sets of 10 to 300
    images and p0 from 0.05 to 0.5.) The smallest possible
    p-value is ``p0 ** m`` (every image flips), so ``m`` must satisfy ``p0 ** m < alpha`` (``m >= 7`` with the
    defaults); a smaller ``m`` raises ``ValueError``. :func:`label_power` gives the probability of a
    "watermarked" verdict for a given true flip rate.

    ``p0`` is the flip rate allowed to an innocent model. A black-box verifier cannot measure it on the suspect,
    so the default :data:`DEFAULT_P0` = 0.5 is derived from the paper's t-test instead: its null hypothesis lets
    an innocent model lose ``tau = 0.25`` of the true label's probability on average; flipping a confidently
    classified image (``P_b`` near 1) takes a loss of at least about 1/2, since a true label that is not the top
    one has ``P_p <= 1/2``; so by Markov's inequality (on the losses, taken as non-negative) at most
    ``tau / (1/2) = 0.5`` of such images flip. Innocent models usually flip far fewer, so 0.5 keeps false
    positives rare, and costs power only against watermarks whose flip rate is not well above 0.5. A verifier who has measured the
    flip rate of independently trained benign models under the trigger (the Independent-M scenario) may set
    ``p0`` just above it for more power.
    """
    m = _check_count(m, "m", 1)
    alpha = _check_alpha(alpha)
    p0 = _check_p0(p0)
    if p0 ** m >= alpha:
        raise ValueError(
            f"with m = {m} and p0 = {p0} the smallest possible p-value is p0 ** m = {p0 ** m:.3g} >= alpha = "
            f"{alpha}: the test could never say 'watermarked'; use m >= {_smallest_m(p0, alpha)}")
    if isinstance(predict_labels, torch.nn.Module):
        predict_labels = _top_label_predictor(predict_labels, batch_size)
    if not callable(predict_labels):
        raise TypeError(f"predict_labels must be a callable images -> labels, got {type(predict_labels).__name__}")
    _check_batch_size(batch_size)
    _check_key(test_set, key)
    k = test_set.num_classes
    candidates = _candidates(test_set, key, classes, m)

    def query_labels(images: torch.Tensor, what: str) -> np.ndarray:
        out = [np.zeros(0, dtype=np.int64)]
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].clone()  # the predictor gets its own copy
            out.append(_check_labels(predict_labels(batch), len(batch), k, what))
        return np.concatenate(out)

    def query(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        predicted = query_labels(images, "benign")
        return predicted, predicted

    indices, _, sent = _draw_correct(query, test_set, candidates, m, seed, batch_size)
    labels = test_set.labels.cpu()[indices].numpy().astype(np.int64)
    triggered_labels = query_labels(_triggered(test_set, indices, key, trigger_seed), "triggered")
    flips = int((triggered_labels != labels).sum())
    p_value = label_pvalue(flips, m, p0)
    return LabelVerificationResult(
        flips=flips,
        m=m,
        p0=p0,
        p_value=p_value,
        watermarked=decide(p_value, alpha),
        alpha=alpha,
        indices=indices,
        labels=labels,
        triggered_labels=triggered_labels,
        queries=sent + m,
        scenario=str(scenario),
    )


def verify_scenarios(
    watermarked: Predictor | torch.nn.Module,
    benign: Predictor | torch.nn.Module,
    test_set: ImageDataset,
    key: WatermarkKey,
    *,
    independent_seed: int | None = None,
    **kwargs,
) -> list[VerificationResult]:
    """The paper's three scenarios (:data:`SCENARIOS`, in order): Independent-T (``watermarked`` queried with
    :func:`independent_key` ``(key, independent_seed)``), Independent-M (``benign`` with ``key``) and Malicious
    (``watermarked`` with ``key``). ``kwargs`` go to :func:`verify` (``m``, ``tau``, ``alpha``, ``seed``...)."""
    other = independent_key(key, independent_seed)
    return [
        verify(watermarked, test_set, other, scenario=SCENARIOS[0], **kwargs),
        verify(benign, test_set, key, scenario=SCENARIOS[1], **kwargs),
        verify(watermarked, test_set, key, scenario=SCENARIOS[2], **kwargs),
    ]


# --------------------------------------------------------------------------- Independent-T: another trigger
def independent_key(key: WatermarkKey, seed: int | None = None) -> WatermarkKey:
    """Another trigger of the same kind, for the Independent-T scenario: the watermark redraws it.

    ``REGISTRY[key.method].redraw(key, seed)`` (:meth:`ubwlib.watermarks.Watermark.redraw`): same method,
    settings, target, dataset, classes and image shape; the trigger material is replaced by a fresh random one
    of the same shape, dtype and value range, drawn from ``seed`` (default ``key.seed + 1``; it must differ from
    ``key.seed``), and always different from the key's own:

    - ``pattern``/``alpha`` keys (BadNets, Blended, UBW-P, Label-Consistent): a random binary (0/255) pattern on
      the pixels the trigger covers (``alpha > 0``), the blend weights kept; a ``pattern="noise"`` key gets new
      uniform noise (:func:`ubwlib.watermarks.patch.redraw_pattern`);
    - ``patch`` keys (Sleeper Agent, UBW-C): a random binary patch of the same size; a non-binary patch (UBW-C's
      resized square) gets a random 3x3 binary square resized the same way
      (:func:`ubwlib.watermarks.patch.redraw_patch`);
    - ``grid`` keys (WaNet): a new warping field from :func:`ubwlib.watermarks.warp_field` with the key's
      ``k``, ``s`` and ``grid_rescale``.

    Keys of a method that is not registered, or whose watermark cannot redraw its trigger, raise
    ``NotImplementedError``.
    """
    if not isinstance(key, WatermarkKey):
        raise TypeError(f"key must be an ubwlib.watermarks.WatermarkKey, got {type(key).__name__}")
    if seed is None:
        seed = int(key.seed) + 1
    watermark = REGISTRY.get(key.method)
    if watermark is None:
        raise NotImplementedError(f"independent_key cannot draw another trigger for {key.method!r} keys: no "
                                  f"watermark of that name is registered (known: {', '.join(REGISTRY)})")
    return watermark.redraw(key, seed)
