"""Metrics of the UBW paper: pure functions of predictions, probabilities and labels.

Nothing here touches a model. Every function accepts numpy arrays, torch tensors (moved to the CPU
and detached) or plain sequences, validates them the way scikit-learn does (a ``ValueError`` that
says what is wrong and what was expected) and returns Python floats (``entropy`` and
``confusion_matrix`` return arrays).

Conventions
-----------
- Labels and predicted labels are class indices in ``[0, K)`` (0-based, unlike the paper's 1..K).
- Logarithms are natural (entropies in nats), with ``0 * log 0 = 0``; the largest entropy of a
  K-class distribution is ``ln K`` (``ln 10 = 2.302585``).
- Probability rows must be finite, non-negative and sum to 1 within ``1e-4`` (``2 * eps`` of the
  dtype for float16 / bfloat16 inputs, which cannot do better); they are then renormalised exactly
  in float64 (as ``scipy.stats.entropy`` does), so float32 softmax outputs are fine.

Effectiveness: :func:`benign_accuracy` (BA), :func:`asr_all` (ASR-A), :func:`asr_correct` (ASR-C),
:func:`asr_targeted` (the targeted ASR of the baselines). Dispersibility: :func:`prediction_dispersibility`
(D_p, Definition 1), :func:`sample_dispersibility` (D_s, Eq. 4), :func:`class_dispersibility`
(D_c, Eq. 5) and :func:`dispersibility_gap` (D_c - D_s >= 0, Lemma 1).
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

__all__ = [
    "entropy",
    "benign_accuracy",
    "asr_all",
    "asr_correct",
    "asr_targeted",
    "confusion_matrix",
    "prediction_dispersibility",
    "sample_dispersibility",
    "class_dispersibility",
    "dispersibility_gap",
    "PROB_ATOL",
]

#: Tolerance on ``|sum(row) - 1|`` for probability vectors (16-bit float inputs get ``2 * eps``).
PROB_ATOL = 1e-4


# --------------------------------------------------------------------------------------------
# Input helpers
# --------------------------------------------------------------------------------------------


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Convert a torch tensor (detached, on the CPU), numpy array or sequence to a numpy array."""
    if x is None:
        raise ValueError(f"{name} is None; expected an array or tensor")
    if hasattr(x, "detach") and hasattr(x, "cpu") and hasattr(x, "numpy"):  # torch.Tensor, duck-typed
        t = x.detach().cpu()
        if str(t.dtype) in ("torch.bfloat16",):  # numpy has no bfloat16
            t = t.float()
        return t.numpy()
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:  # ragged nested lists etc.
        raise ValueError(f"{name} could not be converted to an array ({exc}); expected a rectangular "
                         "numpy array, torch tensor or sequence of numbers") from exc
    if arr.dtype == object:
        raise ValueError(f"{name} has dtype object (ragged or non-numeric input); expected a numeric array")
    return arr


def _as_labels(x: Any, name: str, num_classes: int | None = None) -> np.ndarray:
    """Validate a 1-D, non-empty array of class indices (integers >= 0, < num_classes if given)."""
    arr = _to_numpy(x, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices; got an array of shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; expected at least one sample")
    if arr.dtype == np.bool_:
        raise ValueError(f"{name} has dtype bool; expected integer class indices")
    if np.issubdtype(arr.dtype, np.integer):
        out = arr.astype(np.int64, copy=False)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains NaN or infinite values; expected integer class indices")
        if not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} contains non-integer values; expected integer class indices "
                             "(use argmax to turn probabilities or logits into predictions)")
        out = arr.astype(np.int64)
    else:
        raise ValueError(f"{name} has dtype {arr.dtype}; expected integer class indices")
    lo = int(out.min())
    if lo < 0:
        raise ValueError(f"{name} contains negative class index {lo}; expected indices in [0, K)")
    if num_classes is not None:
        hi = int(out.max())
        if hi >= num_classes:
            raise ValueError(f"{name} contains class index {hi}, outside [0, {num_classes}); "
                             f"expected indices in [0, num_classes={num_classes})")
    return out


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, (bool, np.bool_)):
        raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}")
    try:
        k = operator.index(num_classes)
    except TypeError:
        raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}") from None
    if k < 1:
        raise ValueError(f"num_classes must be a positive integer (>= 1); got {k}")
    return k


def _check_same_length(**arrays: np.ndarray) -> int:
    lengths = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        desc = ", ".join(f"{name} has {n}" for name, n in lengths.items())
        raise ValueError(f"inconsistent numbers of samples: {desc}; expected the same length")
    return next(iter(lengths.values()))


def _as_probs(x: Any, name: str, axis: int = -1, require_2d: bool = False) -> tuple[np.ndarray, int]:
    """Validate probability vectors along ``axis``; return float64 array (renormalised) and the axis."""
    # 16-bit floats cannot meet 1e-4: a correctly rounded softmax row sums to 1 only within ~eps/2.
    eps = {"torch.float16": 2.0**-10, "torch.bfloat16": 2.0**-7}.get(str(getattr(x, "dtype", "")), 0.0)
    arr = _to_numpy(x, name)
    if arr.dtype == np.float16:
        eps = 2.0**-10
    atol = max(PROB_ATOL, 2.0 * eps)
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} has dtype {arr.dtype}; expected real-valued probabilities")
    if arr.ndim == 0:
        raise ValueError(f"{name} is a scalar; expected a probability vector (1-D) or matrix")
    if require_2d and arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N samples x K classes) probability matrix; got an array "
                         f"of shape {arr.shape}" + (" (reshape a single vector to (1, K))" if arr.ndim == 1 else ""))
    try:
        ax = operator.index(axis)
    except TypeError:
        raise ValueError(f"axis must be an integer; got {axis!r}") from None
    if not -arr.ndim <= ax < arr.ndim:
        raise ValueError(f"axis {ax} is out of range for {name} with {arr.ndim} dimension(s)")
    ax %= arr.ndim
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); expected at least one probability vector "
                         "with at least one class")
    p = arr.astype(np.float64)
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name} contains NaN or infinite values; expected finite probabilities")
    if np.any(p < 0):
        raise ValueError(f"{name} contains negative entries (min {p.min():.3g}); expected probabilities >= 0 "
                         "(apply softmax to logits first)")
    s = p.sum(axis=ax, keepdims=True)
    err = np.abs(s - 1.0)
    if np.any(err > atol):
        raise ValueError(f"{name} has probability vectors that do not sum to 1 (worst sum {s.flat[int(np.argmax(err))]:.6g}); "
                         f"expected sums within {atol:g} of 1 along axis {ax} (apply softmax to logits first)")
    return p / s, ax


def _xlogx_sum(p: np.ndarray, axis: int) -> np.ndarray:
    """-sum p log p along axis with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -terms.sum(axis=axis)


def _fraction(mask: np.ndarray) -> float:
    return float(np.count_nonzero(mask)) / float(mask.size)


# --------------------------------------------------------------------------------------------
# Entropy
# --------------------------------------------------------------------------------------------


def entropy(p: Any, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats of probability vectors along ``axis``.

    ``H(p) = -sum_k p_k ln p_k`` with ``0 ln 0 = 0``. For a matrix (default ``axis=-1``) returns
    one entropy per row; for a 1-D vector returns a 0-d array (``float(entropy(p))`` works).
    Vectors must be non-negative and sum to 1 within ``PROB_ATOL``; they are renormalised, so the
    result matches ``scipy.stats.entropy(p, axis=axis)``. The maximum is ``ln K`` (uniform vector).
    """
    q, ax = _as_probs(p, "p", axis=axis)
    return np.asarray(_xlogx_sum(q, ax))


# --------------------------------------------------------------------------------------------
# Effectiveness metrics
# --------------------------------------------------------------------------------------------


def benign_accuracy(pred: Any, labels: Any) -> float:
    """Benign accuracy BA = (1/N) sum_i 1{pred_i == y_i}, a fraction in [0, 1].

    ``pred`` are predicted class indices on clean images, ``labels`` the ground truth.
    """
    pred_a = _as_labels(pred, "pred")
    lab = _as_labels(labels, "labels")
    _check_same_length(pred=pred_a, labels=lab)
    return _fraction(pred_a == lab)


def asr_all(pred_triggered: Any, labels: Any) -> float:
    """Untargeted attack success rate ASR-A = (1/N) sum_i 1{C(G(x_i)) != y_i}, in [0, 1].

    ``pred_triggered`` are predictions on triggered (watermarked) images, ``labels`` their true labels.
    """
    pt = _as_labels(pred_triggered, "pred_triggered")
    lab = _as_labels(labels, "labels")
    _check_same_length(pred_triggered=pt, labels=lab)
    return _fraction(pt != lab)


def asr_correct(pred_clean: Any, pred_triggered: Any, labels: Any) -> float:
    """ASR-C: among samples the model classifies correctly when clean, the fraction misclassified when triggered.

    ``ASR-C = sum_i 1{C(x_i) = y_i} 1{C(G(x_i)) != y_i} / sum_i 1{C(x_i) = y_i}``.
    Raises ``ValueError`` if no sample is correctly classified (the ratio is undefined).
    """
    pc = _as_labels(pred_clean, "pred_clean")
    pt = _as_labels(pred_triggered, "pred_triggered")
    lab = _as_labels(labels, "labels")
    _check_same_length(pred_clean=pc, pred_triggered=pt, labels=lab)
    correct = pc == lab
    n_correct = int(np.count_nonzero(correct))
    if n_correct == 0:
        raise ValueError("ASR-C is undefined: no sample is correctly classified on clean inputs "
                         "(pred_clean never equals labels); expected at least one correct clean prediction")
    return float(np.count_nonzero(pt[correct] != lab[correct])) / n_correct


def asr_targeted(pred_triggered: Any, labels: Any, target: Any) -> float:
    """Targeted attack success rate: fraction of triggered non-target images predicted as ``target``.

    ``ASR = sum_i 1{y_i != t} 1{C(G(x_i)) = t} / sum_i 1{y_i != t}``. Samples whose true label is
    already the target are excluded. Raises ``ValueError`` if every sample has label ``target``.
    """
    pt = _as_labels(pred_triggered, "pred_triggered")
    lab = _as_labels(labels, "labels")
    _check_same_length(pred_triggered=pt, labels=lab)
    if isinstance(target, (bool, np.bool_)):
        raise ValueError(f"target must be a non-negative integer class index; got {target!r}")
    try:
        t = operator.index(target)
    except TypeError:
        raise ValueError(f"target must be a non-negative integer class index; got {target!r}") from None
    if t < 0:
        raise ValueError(f"target must be a non-negative integer class index; got {t}")
    keep = lab != t
    n = int(np.count_nonzero(keep))
    if n == 0:
        raise ValueError(f"targeted ASR is undefined: every sample has true label target={t}; "
                         "expected at least one non-target sample")
    return float(np.count_nonzero(pt[keep] == t)) / n


# --------------------------------------------------------------------------------------------
# Dispersibility
# --------------------------------------------------------------------------------------------


def confusion_matrix(pred: Any, labels: Any, num_classes: int) -> np.ndarray:
    """Confusion counts ``M[j, i] = sum_k 1{y_k = j} 1{pred_k = i}`` (rows: true, columns: predicted).

    Returns an int64 array of shape ``(num_classes, num_classes)``; computed with one ``np.bincount``
    of ``labels * K + pred``.
    """
    k = _check_num_classes(num_classes)
    pred_a = _as_labels(pred, "pred", k)
    lab = _as_labels(labels, "labels", k)
    _check_same_length(pred=pred_a, labels=lab)
    return np.bincount(lab * k + pred_a, minlength=k * k).astype(np.int64).reshape(k, k)


def prediction_dispersibility(pred: Any, labels: Any, num_classes: int) -> float:
    """Averaged prediction dispersibility D_p (Definition 1), in nats, in [0, ln K].

    ``P^(j)_i = sum_k 1{C(x_k) = i} 1{y_k = j} / n_j`` is the normalised histogram of predicted
    labels over the ``n_j`` samples of true class ``j`` and

        ``D_p = (1/N) sum_j n_j H(P^(j))``.

    Classes absent from ``labels`` have weight 0. ``D_p = 0`` when each class's predictions are all
    the same (e.g. a targeted backdoor); ``D_p = ln K`` when each class's predictions are uniform.
    """
    cm = confusion_matrix(pred, labels, num_classes).astype(np.float64)
    n_j = cm.sum(axis=1)
    present = n_j > 0
    hist = cm[present] / n_j[present, None]
    return float(np.dot(n_j[present], _xlogx_sum(hist, axis=1)) / n_j.sum())


def sample_dispersibility(probs: Any) -> float:
    """Averaged sample-wise dispersibility D_s (Eq. 4): ``D_s = (1/N) sum_i H(f(x_i))``.

    ``probs`` is an ``N x K`` matrix whose rows are predicted probability vectors ``f(x_i)``.
    """
    p, _ = _as_probs(probs, "probs", require_2d=True)
    return float(_xlogx_sum(p, axis=1).mean())


def _class_means(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated rows, labels, and the per-class mean rows ``m`` (K x K'; zero rows for absent classes)."""
    p, _ = _as_probs(probs, "probs", require_2d=True)
    k = p.shape[1]
    lab = _as_labels(labels, "labels")
    if lab.shape[0] != p.shape[0]:
        raise ValueError(f"inconsistent numbers of samples: probs has {p.shape[0]} rows, labels has "
                         f"{lab.shape[0]}; expected one label per row")
    hi = int(lab.max())
    if hi >= k:
        raise ValueError(f"labels contains class index {hi}, outside [0, {k}); expected indices in [0, K) "
                         f"with K = probs.shape[1] = {k}")
    sums = np.zeros((k, k), dtype=np.float64)
    np.add.at(sums, lab, p)
    n_j = np.bincount(lab, minlength=k).astype(np.float64)
    means = np.divide(sums, n_j[:, None], out=np.zeros_like(sums), where=n_j[:, None] > 0)
    return p, lab, means


def class_dispersibility(probs: Any, labels: Any) -> float:
    """Averaged class-wise dispersibility D_c (Eq. 5).

    With ``m_j = (1/n_j) sum_{i: y_i = j} f(x_i)`` the mean probability vector of class ``j``,

        ``D_c = (1/N) sum_j n_j H(m_j)``.

    ``probs`` is ``N x K``; ``labels`` are ground-truth indices in ``[0, K)``.
    """
    p, lab, means = _class_means(probs, labels)
    n_j = np.bincount(lab, minlength=p.shape[1]).astype(np.float64)
    return float(np.dot(n_j, _xlogx_sum(means, axis=1)) / p.shape[0])


def dispersibility_gap(probs: Any, labels: Any) -> float:
    """The gap ``D_c - D_s`` of Lemma 1, always >= 0.

    By concavity of entropy (Jensen), the gap is exactly the mean Kullback-Leibler divergence of
    each prediction from the mean prediction of its class:

        ``D_c - D_s = (1/N) sum_i KL(f(x_i) || m_{y_i}),  KL(p || q) = sum_k p_k ln(p_k / q_k)``,

    which is why Lemma 1 (``D_s <= D_c``) holds. It is computed in this KL form (each term clipped
    at 0 against rounding), so it is non-negative and free of cancellation; it agrees with
    ``class_dispersibility - sample_dispersibility`` up to rounding. Equality ``D_s = D_c`` holds iff
    all rows *within each class* are equal; the paper states the condition as "all f(x_i) equal",
    which coincides with this when there is a single class.
    """
    p, lab, means = _class_means(probs, labels)
    m = means[lab]  # m_k > 0 wherever p_ik > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(np.where(p > 0, m, 1.0))), 0.0)
    kl = np.maximum(terms.sum(axis=1), 0.0)
    return float(kl.mean())
