"""Tests of ubwlib.metrics: hand-computed values, scipy cross-checks, Lemma 1 properties, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ubwlib import metrics as M
from ubwlib.metrics import (
    asr_all,
    asr_correct,
    asr_targeted,
    benign_accuracy,
    class_dispersibility,
    confusion_matrix,
    dispersibility_gap,
    entropy,
    prediction_dispersibility,
    sample_dispersibility,
)

SETTINGS = settings(max_examples=200, deadline=None, database=None)  # no .hypothesis/ in the repo


# --------------------------------------------------------------------------------------------
# Reference implementations (plain loops + scipy)
# --------------------------------------------------------------------------------------------


def ref_ds(p):
    return float(np.mean(scipy.stats.entropy(np.asarray(p, float), axis=1)))


def ref_dc(p, y):
    p, y = np.asarray(p, float), np.asarray(y)
    total = 0.0
    for j in np.unique(y):
        rows = p[y == j]
        total += len(rows) / len(p) * scipy.stats.entropy(rows.mean(axis=0))
    return total


def _row_class_means(p, y):
    """Row i -> mean of the rows of class y_i (a loop over classes)."""
    m = np.empty_like(p)
    for j in np.unique(y):
        m[y == j] = p[y == j].mean(axis=0)
    return m


def ref_mean_kl(p, y):
    """(1/N) sum_i KL(p_i || mean_{y_i}) with scipy's KL (entropy(p, q)), row-wise."""
    p, y = np.asarray(p, float), np.asarray(y)
    return float(np.mean(scipy.stats.entropy(p, _row_class_means(p, y), axis=1)))


def ref_pinsker(p, y):
    """(1/N) sum_i 0.5 ||p_i - mean_{y_i}||_1^2 <= (1/N) sum_i KL(p_i || mean_{y_i}) (Pinsker)."""
    p, y = np.asarray(p, float), np.asarray(y)
    return float(np.mean(0.5 * np.abs(p - _row_class_means(p, y)).sum(axis=1) ** 2))


def ref_dp(pred, y, k):
    total = 0.0
    for j in np.unique(y):
        hist = np.bincount(pred[y == j], minlength=k) / np.sum(y == j)
        total += np.sum(y == j) / len(y) * scipy.stats.entropy(hist)
    return total


# --------------------------------------------------------------------------------------------
# Entropy
# --------------------------------------------------------------------------------------------


def test_entropy_hand_values():
    assert float(entropy([0.25, 0.75])) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    assert float(entropy([0.25, 0.75])) == pytest.approx(0.5623351446, abs=1e-10)
    assert float(entropy([1.0, 0.0, 0.0])) == 0.0  # 0 log 0 = 0, no NaN
    assert float(entropy(np.full(10, 0.1))) == pytest.approx(math.log(10))  # ln 10 = 2.302585
    assert float(entropy([0.5, 0.0, 0.5])) == pytest.approx(math.log(2))
    out = entropy([0.5, 0.5])
    assert isinstance(out, np.ndarray) and out.ndim == 0


def test_entropy_matches_scipy_random():
    rng = np.random.default_rng(0)
    p = rng.random((50, 7))
    p[rng.random(p.shape) < 0.3] = 0.0  # exact zeros
    p[:, 0] += 1e-3  # no all-zero rows
    p /= p.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(entropy(p), scipy.stats.entropy(p, axis=1), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(entropy(p.T, axis=0), scipy.stats.entropy(p.T, axis=0), rtol=1e-12, atol=1e-14)
    for row in p[:5]:
        assert float(entropy(row)) == pytest.approx(scipy.stats.entropy(row), rel=1e-12, abs=1e-14)
    # 3-D along a middle axis
    q = rng.random((3, 4, 5))
    q /= q.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(entropy(q, axis=1), scipy.stats.entropy(q, axis=1), rtol=1e-12)


def test_entropy_float32_softmax_within_tolerance():
    logits = torch.randn(20, 10, generator=torch.Generator().manual_seed(1))
    p = torch.softmax(logits, dim=1)  # float32; rows sum to 1 up to ~1e-7
    np.testing.assert_allclose(entropy(p), scipy.stats.entropy(p.double().numpy(), axis=1), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# BA / ASR
# --------------------------------------------------------------------------------------------

LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1])
PRED_CLEAN = np.array([0, 1, 2, 1, 1, 0, 0, 2])  # correct at 0,1,2,4,6 -> 5/8
PRED_TRIG = np.array([1, 1, 0, 2, 2, 0, 0, 0])  # != label at 0,2,3,4,5,7 -> 6/8


def test_benign_accuracy_hand():
    assert benign_accuracy(PRED_CLEAN, LABELS) == pytest.approx(5 / 8)
    assert benign_accuracy(LABELS, LABELS) == 1.0
    assert benign_accuracy([1, 0], [0, 1]) == 0.0
    assert isinstance(benign_accuracy(PRED_CLEAN, LABELS), float)


def test_asr_all_hand():
    assert asr_all(PRED_TRIG, LABELS) == pytest.approx(6 / 8)
    assert asr_all(LABELS, LABELS) == 0.0


def test_asr_correct_hand():
    # correctly classified clean: indices 0,1,2,4,6; triggered wrong among them: 0,2,4 -> 3/5
    assert asr_correct(PRED_CLEAN, PRED_TRIG, LABELS) == pytest.approx(3 / 5)
    # differs from ASR-A: the samples misclassified when clean (3,5,7) are excluded
    assert asr_correct(PRED_CLEAN, PRED_TRIG, LABELS) != asr_all(PRED_TRIG, LABELS)
    assert asr_correct(LABELS, LABELS, LABELS) == 0.0


def test_asr_correct_no_correct_sample_raises():
    with pytest.raises(ValueError, match="no sample is correctly classified"):
        asr_correct([1, 0], [1, 0], [0, 1])


def test_asr_targeted_hand():
    # target 0: non-target samples are indices 1,2,4,5,7 (labels 1,2,1,2,1);
    # predicted 0 among them: 2,5,7 -> 3/5 (index 6 has label 0 and is excluded)
    assert asr_targeted(PRED_TRIG, LABELS, 0) == pytest.approx(3 / 5)
    # target 2: non-target indices 0,1,3,4,6,7; predicted 2: 3,4 -> 2/6
    assert asr_targeted(PRED_TRIG, LABELS, 2) == pytest.approx(2 / 6)
    assert asr_targeted(PRED_TRIG, LABELS, np.int64(2)) == pytest.approx(2 / 6)
    assert asr_targeted(np.zeros(8, int), LABELS, 0) == 1.0


def test_asr_targeted_no_nontarget_raises():
    with pytest.raises(ValueError, match="every sample has true label target=3"):
        asr_targeted([0, 1], [3, 3], 3)


# --------------------------------------------------------------------------------------------
# Confusion matrix and D_p
# --------------------------------------------------------------------------------------------


def test_confusion_matrix_hand():
    cm = confusion_matrix(PRED_CLEAN, LABELS, 3)
    expected = np.array([[2, 1, 0],   # label 0: preds 0,1,0
                         [0, 2, 1],   # label 1: preds 1,1,2
                         [1, 0, 1]])  # label 2: preds 2,0
    np.testing.assert_array_equal(cm, expected)
    assert cm.dtype == np.int64
    assert confusion_matrix([0], [0], 4).shape == (4, 4)


def test_dp_hand_two_classes():
    # class 0 (4 samples) predictions [0,1,1,1] -> P = (1/4, 3/4)
    #   H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.3465735903 + 0.2157615543 = 0.5623351446
    # class 1 (2 samples) predictions [0,1] -> P = (1/2, 1/2), H = ln 2 = 0.6931471806
    # D_p = 4/6 * 0.5623351446 + 2/6 * 0.6931471806 = 0.3748900964 + 0.2310490602 = 0.6059391566
    labels = [0, 0, 0, 0, 1, 1]
    pred = [0, 1, 1, 1, 0, 1]
    assert prediction_dispersibility(pred, labels, 2) == pytest.approx(0.6059391566, abs=1e-9)


def test_dp_targeted_like_is_zero():
    labels = np.repeat(np.arange(10), 7)
    pred = np.full_like(labels, 3)
    assert prediction_dispersibility(pred, labels, 10) == 0.0
    # also zero when each class maps deterministically to some (class-dependent) label
    assert prediction_dispersibility((labels + 1) % 10, labels, 10) == 0.0


@pytest.mark.parametrize("k", [2, 3, 10])
def test_dp_uniform_is_ln_k(k):
    # each class has every predicted label exactly twice -> P^(j) uniform -> H = ln K for every j
    labels = np.repeat(np.arange(k), 2 * k)
    pred = np.tile(np.repeat(np.arange(k), 2), k)
    assert prediction_dispersibility(pred, labels, k) == pytest.approx(math.log(k), rel=1e-12)


def test_dp_absent_classes_and_extra_columns():
    # only classes 1 and 3 of K=5 present; absent classes get weight 0
    labels = [1, 1, 3, 3, 3, 3]
    pred = [0, 4, 3, 3, 3, 3]
    assert prediction_dispersibility(pred, labels, 5) == pytest.approx(2 / 6 * math.log(2))


def test_dp_matches_loop_random():
    rng = np.random.default_rng(3)
    for _ in range(20):
        k = int(rng.integers(1, 12))
        n = int(rng.integers(1, 300))
        y = rng.integers(0, k, n)
        pred = rng.integers(0, k, n)
        assert prediction_dispersibility(pred, y, k) == pytest.approx(ref_dp(pred, y, k), rel=1e-12, abs=1e-15)
        assert 0.0 <= prediction_dispersibility(pred, y, k) <= math.log(k) + 1e-12


# --------------------------------------------------------------------------------------------
# D_s, D_c
# --------------------------------------------------------------------------------------------


def _random_probs(rng, n, k, zero_frac=0.2):
    p = rng.random((n, k)) ** 3
    p[rng.random((n, k)) < zero_frac] = 0.0
    p[np.arange(n), rng.integers(0, k, n)] += 0.05
    return p / p.sum(axis=1, keepdims=True)


def test_ds_dc_match_loops():
    rng = np.random.default_rng(7)
    for _ in range(20):
        n, k = int(rng.integers(1, 60)), int(rng.integers(1, 12))
        p = _random_probs(rng, n, k)
        y = rng.integers(0, k, n)
        assert sample_dispersibility(p) == pytest.approx(ref_ds(p), rel=1e-12, abs=1e-15)
        assert class_dispersibility(p, y) == pytest.approx(ref_dc(p, y), rel=1e-12, abs=1e-15)


def test_ds_dc_hand():
    # rows (1,0) and (0,1) of one class: D_s = 0, mean (1/2,1/2) -> D_c = ln 2
    p = [[1.0, 0.0], [0.0, 1.0]]
    assert sample_dispersibility(p) == 0.0
    assert class_dispersibility(p, [0, 0]) == pytest.approx(math.log(2))
    assert dispersibility_gap(p, [0, 0]) == pytest.approx(math.log(2))
    # same rows in different classes: each class mean is one-hot -> D_c = 0
    assert class_dispersibility(p, [0, 1]) == 0.0
    assert dispersibility_gap(p, [0, 1]) == 0.0


# --------------------------------------------------------------------------------------------
# Lemma 1 (hypothesis)
# --------------------------------------------------------------------------------------------


def _rows_from_raw(raw, kinds, hot):
    """Turn raw values (n x k, in [0, 10], some exactly 0) into probability rows of three kinds:
    0 -> one-hot at ``hot``; 1 -> normalised non-negative weights (exact zeros kept); 2 -> softmax of
    logits ``6 * raw - 30`` (spanning [-30, 30], so some entries underflow to tiny values)."""
    n, k = raw.shape
    out = np.empty((n, k))
    for i in range(n):
        if kinds[i] == 0 or (kinds[i] == 1 and raw[i].sum() <= 0):
            out[i] = np.eye(k)[hot[i] % k]
        elif kinds[i] == 1:
            out[i] = raw[i] / raw[i].sum()
        else:
            z = 6.0 * raw[i] - 30.0
            e = np.exp(z - z.max())
            out[i] = e / e.sum()
    return out


@st.composite
def labelled_probs(draw, identical_within_class=False):
    """(probs N x K, labels) with edge cases: single row, single class (K=1), many classes (up to 40),
    one-hot rows, rows with exact zeros, all rows identical."""
    k = draw(st.one_of(st.integers(1, 4), st.integers(5, 40)))
    n = draw(st.integers(1, 25))
    n_labels = draw(st.integers(1, k))
    y = draw(hnp.arrays(np.int64, n, elements=st.integers(0, n_labels - 1)))
    m = n if not identical_within_class else n_labels  # one prototype row per class
    raw = draw(hnp.arrays(np.float64, (m, k), elements=st.one_of(st.just(0.0), st.floats(0.0, 10.0))))
    kinds = draw(hnp.arrays(np.int64, m, elements=st.integers(0, 2)))
    hot = draw(hnp.arrays(np.int64, m, elements=st.integers(0, k - 1)))
    rows = _rows_from_raw(raw, kinds, hot)
    if identical_within_class:
        p = rows[y]
    elif n > 1 and draw(st.booleans()) and draw(st.booleans()):  # all rows identical (1/4 of cases)
        p = np.tile(rows[0], (n, 1))
    else:
        p = rows
    return p, y


@SETTINGS
@given(labelled_probs())
def test_lemma1_ds_le_dc_and_jensen_identity(data):
    p, y = data
    ds, dc, gap = sample_dispersibility(p), class_dispersibility(p, y), dispersibility_gap(p, y)
    assert ds <= dc + 1e-9
    assert gap >= 0.0
    assert gap == pytest.approx(dc - ds, abs=1e-9)
    assert gap == pytest.approx(ref_mean_kl(p, y), abs=1e-9)
    assert ds == pytest.approx(ref_ds(p), abs=1e-12)
    assert dc == pytest.approx(ref_dc(p, y), abs=1e-12)
    # Pinsker: KL(p || q) >= 0.5 ||p - q||_1^2, so the gap is strictly positive when rows differ
    assert gap >= ref_pinsker(p, y) - 1e-9


@SETTINGS
@given(labelled_probs(identical_within_class=True))
def test_lemma1_equality_when_rows_identical_within_class(data):
    p, y = data
    assert dispersibility_gap(p, y) < 1e-9
    assert abs(class_dispersibility(p, y) - sample_dispersibility(p)) < 1e-9


@SETTINGS
@given(labelled_probs(), st.data())
def test_lemma1_strict_when_rows_differ(data, extra):
    p, y = data
    # force two rows of one class to differ: append two distinct one-hot rows with label 0
    k = p.shape[1]
    if k < 2:
        return
    a, b = extra.draw(st.lists(st.integers(0, k - 1), min_size=2, max_size=2, unique=True))
    p2 = np.vstack([p, np.eye(k)[[a, b]]])
    y2 = np.concatenate([y, [0, 0]])
    pinsker = ref_pinsker(p2, y2)
    assert pinsker > 0
    assert dispersibility_gap(p2, y2) >= pinsker - 1e-9
    assert class_dispersibility(p2, y2) - sample_dispersibility(p2) > 0


# --------------------------------------------------------------------------------------------
# torch inputs
# --------------------------------------------------------------------------------------------


def test_torch_inputs_match_numpy():
    rng = np.random.default_rng(11)
    p = _random_probs(rng, 40, 6)
    y = rng.integers(0, 6, 40)
    pc, pt = rng.integers(0, 6, 40), rng.integers(0, 6, 40)
    pc[:10] = y[:10]
    tp = torch.tensor(p, requires_grad=True)  # needs detach
    ty, tpc, tpt = torch.tensor(y), torch.tensor(pc), torch.tensor(pt)
    assert benign_accuracy(tpc, ty) == benign_accuracy(pc, y)
    assert asr_all(tpt, ty) == asr_all(pt, y)
    assert asr_correct(tpc, tpt, ty) == asr_correct(pc, pt, y)
    assert asr_targeted(tpt, ty, 2) == asr_targeted(pt, y, 2)
    assert asr_targeted(tpt, ty, torch.tensor(2)) == asr_targeted(pt, y, 2)
    np.testing.assert_array_equal(confusion_matrix(tpt, ty, 6), confusion_matrix(pt, y, 6))
    assert prediction_dispersibility(tpt, ty, 6) == prediction_dispersibility(pt, y, 6)
    assert sample_dispersibility(tp) == sample_dispersibility(p)
    assert class_dispersibility(tp, ty) == class_dispersibility(p, y)
    assert dispersibility_gap(tp, ty) == dispersibility_gap(p, y)
    np.testing.assert_array_equal(entropy(tp), entropy(p))
    # float32 / bfloat16 probabilities are accepted
    assert sample_dispersibility(tp.float()) == pytest.approx(sample_dispersibility(p), rel=1e-5)
    assert math.isfinite(sample_dispersibility(torch.softmax(torch.randn(4, 3), 1).bfloat16()))
    for f in (benign_accuracy(tpc, ty), sample_dispersibility(tp), prediction_dispersibility(tpt, ty, 6)):
        assert type(f) is float


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

GOOD_P = np.array([[0.5, 0.5], [1.0, 0.0]])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: benign_accuracy([0, 1, 1], [0, 1]), "inconsistent numbers of samples: pred has 3, labels has 2"),
        (lambda: asr_all([0, 1], [0, 1, 1]), "inconsistent numbers of samples"),
        (lambda: asr_correct([0, 1], [0], [0, 1]), "pred_triggered has 1"),
        (lambda: asr_targeted([0], [0, 1], 0), "inconsistent numbers of samples"),
        (lambda: benign_accuracy([], []), "pred is empty"),
        (lambda: asr_all(np.array([], dtype=int), np.array([], dtype=int)), "is empty"),
        (lambda: benign_accuracy([[0, 1]], [[0, 1]]), "must be a 1-D array of class indices; got .* shape \\(1, 2\\)"),
        (lambda: benign_accuracy(3, 3), "must be a 1-D array"),
        (lambda: benign_accuracy([0, -1], [0, 1]), "negative class index -1"),
        (lambda: benign_accuracy([0.5, 1.0], [0, 1]), "non-integer values"),
        (lambda: benign_accuracy([0.0, np.nan], [0, 1]), "NaN"),
        (lambda: benign_accuracy([True, False], [0, 1]), "dtype bool"),
        (lambda: benign_accuracy(["a", "b"], [0, 1]), "expected integer class indices"),
        (lambda: benign_accuracy([[0], [1, 2]], [0, 1]), "could not be converted|dtype object"),
        (lambda: benign_accuracy(None, [0]), "pred is None"),
        (lambda: asr_targeted([0, 1], [0, 1], -1), "target must be a non-negative integer"),
        (lambda: asr_targeted([0, 1], [0, 1], 1.5), "target must be a non-negative integer"),
        (lambda: confusion_matrix([0, 3], [0, 1], 3), "pred contains class index 3, outside \\[0, 3\\)"),
        (lambda: confusion_matrix([0, 1], [0, 5], 3), "labels contains class index 5"),
        (lambda: prediction_dispersibility([0, 1], [0, 2], 2), "labels contains class index 2, outside \\[0, 2\\)"),
        (lambda: prediction_dispersibility([0, 1], [0, 1], 0), "num_classes must be a positive integer"),
        (lambda: prediction_dispersibility([0, 1], [0, 1], 2.0), "num_classes must be a positive integer"),
        (lambda: prediction_dispersibility([0, 1], [0, 1], True), "num_classes must be a positive integer"),
        (lambda: sample_dispersibility([0.5, 0.5]), "must be a 2-D .* shape \\(2,\\)"),
        (lambda: sample_dispersibility(np.ones((2, 2, 2)) / 2), "must be a 2-D"),
        (lambda: sample_dispersibility(np.zeros((0, 3))), "probs is empty"),
        (lambda: sample_dispersibility(np.zeros((3, 0))), "probs is empty"),
        (lambda: sample_dispersibility([[0.5, 0.6]]), "do not sum to 1 \\(worst sum 1.1\\)"),
        (lambda: sample_dispersibility([[1.2, -0.2]]), "negative entries"),
        (lambda: sample_dispersibility([[np.nan, 1.0]]), "NaN or infinite"),
        (lambda: sample_dispersibility([[np.inf, 0.0]]), "NaN or infinite"),
        (lambda: sample_dispersibility([["a", "b"]]), "expected real-valued probabilities"),
        (lambda: class_dispersibility(GOOD_P, [0]), "probs has 2 rows, labels has 1"),
        (lambda: class_dispersibility(GOOD_P, [0, 2]), "labels contains class index 2, outside \\[0, 2\\).*probs.shape\\[1\\] = 2"),
        (lambda: class_dispersibility(GOOD_P, [0, -1]), "negative class index"),
        (lambda: class_dispersibility(GOOD_P, [[0, 1]]), "must be a 1-D"),
        (lambda: dispersibility_gap(GOOD_P, [0, 1, 1]), "inconsistent numbers of samples"),
        (lambda: dispersibility_gap([[0.3, 0.3]], [0]), "do not sum to 1"),
        (lambda: entropy(0.5), "scalar"),
        (lambda: entropy([]), "p is empty"),
        (lambda: entropy([0.2, 0.2]), "do not sum to 1"),
        (lambda: entropy([[0.5, 0.5]], axis=2), "axis 2 is out of range"),
        (lambda: entropy([0.5, 0.5], axis=0.5), "axis must be an integer"),
    ],
)
def test_validation_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_probability_tolerance_boundary():
    # within 1e-4 is accepted (and renormalised), beyond is rejected
    ok = np.array([[0.5, 0.5 + 0.9e-4]])
    assert sample_dispersibility(ok) == pytest.approx(scipy.stats.entropy(ok[0]))
    with pytest.raises(ValueError, match="within 0.0001"):
        sample_dispersibility(np.array([[0.5, 0.5 + 2e-4]]))
    # 16-bit inputs: tolerance 2 * eps of the dtype (bfloat16 eps = 2**-7), still rejects real errors
    assert math.isfinite(sample_dispersibility(torch.tensor([[0.5, 0.505]], dtype=torch.bfloat16)))
    assert math.isfinite(sample_dispersibility(np.array([[0.5, 0.5015]], dtype=np.float16)))
    with pytest.raises(ValueError, match="do not sum to 1"):
        sample_dispersibility(torch.tensor([[0.5, 0.6]], dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="do not sum to 1"):
        sample_dispersibility(np.array([[0.5, 0.6]], dtype=np.float16))


def test_all_exported():
    for name in M.__all__:
        assert hasattr(M, name)
    for name in ["entropy", "benign_accuracy", "asr_all", "asr_correct", "asr_targeted",
                 "prediction_dispersibility", "confusion_matrix", "sample_dispersibility",
                 "class_dispersibility", "dispersibility_gap"]:
        assert name in M.__all__
        assert getattr(M, name).__doc__
