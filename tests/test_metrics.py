"""Exact metrics: cross-checked against scikit-learn and brute force, on tied, imbalanced data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from pipeline import metrics as M
from pipeline.errors import ConfigError

SEEDS = (0, 1, 2, 3)


def tied_imbalanced(seed: int, dtype=np.float64, n_neg: int = 3000, n_pos: int = 30):
    """1:100 imbalance; probabilities rounded to 2 decimals so ties are everywhere."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_neg, int), np.ones(n_pos, int)]
    logits = rng.normal(0, 1.5, labels.size) + 2.0 * labels
    probs = np.round(1 / (1 + np.exp(-logits)), 2).astype(dtype)
    perm = rng.permutation(labels.size)
    return labels[perm], probs[perm]


def brute_rates(labels, scores):
    """(threshold, tpr, fpr) for every candidate threshold, highest first, by direct counting."""
    y = np.asarray(labels).astype(bool)
    rows = []
    for t in np.r_[np.inf, np.unique(scores)[::-1]]:
        pred = scores >= t
        rows.append((t, (pred & y).sum() / y.sum(), (pred & ~y).sum() / (~y).sum()))
    return rows


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", SEEDS)
def test_curves_and_areas_equal_sklearn_on_tied_imbalanced_data(seed, dtype):
    y, p = tied_imbalanced(seed, dtype)
    assert len(np.unique(p)) < p.size / 10  # the data really is full of ties

    fpr, tpr, thr = M.roc_points(y, p)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(thr, sk_thr.astype(np.float64))

    prec, rec, pthr = M.pr_points(y, p)
    sk_prec, sk_rec, sk_pthr = skm.precision_recall_curve(y, p)
    np.testing.assert_allclose(prec, sk_prec, rtol=0, atol=1e-12)
    np.testing.assert_allclose(rec, sk_rec, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(pthr, sk_pthr.astype(np.float64))

    assert M.auroc(y, p) == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    assert M.average_precision(y, p) == pytest.approx(skm.average_precision_score(y, p), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_threshold_metrics_equal_sklearn_confusion_matrix(seed):
    y, p = tied_imbalanced(seed, np.float32)
    for threshold in (0.05, 0.5, 0.73, 0.99):
        got = M.binary_metrics(y, p, threshold=threshold)
        tn, fp, fn, tp = skm.confusion_matrix(y, p >= np.float32(threshold)).ravel()
        assert got["accuracy"] == pytest.approx((tp + tn) / y.size)
        assert got["sensitivity"] == pytest.approx(tp / (tp + fn))
        assert got["specificity"] == pytest.approx(tn / (tn + fp))
        if tp + fp:
            assert got["precision"] == pytest.approx(tp / (tp + fp))
        else:
            assert math.isnan(got["precision"])
        assert got["f1"] == pytest.approx(skm.f1_score(y, p >= np.float32(threshold)))
        assert (got["positives"], got["negatives"], got["count"]) == (30, 3000, 3030)
        assert got["threshold"] == threshold


@pytest.mark.parametrize("seed", SEEDS)
def test_sensitivity_at_fpr_equals_brute_force(seed):
    y, p = tied_imbalanced(seed)
    rows = brute_rates(y, p)
    for cap in (0.0, 0.001, 0.01, 0.05, 0.1, 0.5, 1.0):
        expected = max(tpr for _, tpr, fpr in rows if fpr <= cap)
        assert M.sensitivity_at_fpr(y, p, cap) == pytest.approx(expected, abs=1e-12)
    got = M.binary_metrics(y, p)
    assert got["sens_at_fpr_5pct"] == pytest.approx(M.sensitivity_at_fpr(y, p, 0.05))


def test_rank_metrics_are_the_same_on_logits_and_probabilities():
    rng = np.random.default_rng(7)
    y = (rng.random(2000) < 0.05).astype(int)
    logits = np.round(rng.normal(0, 2, y.size) + 1.5 * y, 1)  # tied logits
    probs = 1 / (1 + np.exp(-logits))
    scans = [f"s{i % 40}" for i in range(y.size)]
    for fn in (M.auroc, M.average_precision):
        assert fn(y, logits) == fn(y, probs)
    assert M.sensitivity_at_fpr(y, logits, 0.01) == M.sensitivity_at_fpr(y, probs, 0.01)
    assert M.froc(y, logits, scans) == M.froc(y, probs, scans)


def test_froc_and_cpm_match_hand_computation():
    # 3 scans, 10 candidates, P = 4 positives, N = 6 negatives.
    # Sorted by score:   .95P .90N .85N .80N .70P .60N .50P .30P .20N .10N
    # cumulative TP:       1    1    1    1    2    2    3    4    4    4
    # cumulative FP:       0    1    2    3    3    4    4    4    5    6
    # A rate r allows FP <= 3r:
    #   r=1/8, 1/4 -> FP <= 0.375, 0.75 -> FP 0 -> TP 1 -> 0.25
    #   r=1/2      -> FP <= 1.5        -> FP 1 -> TP 1 -> 0.25
    #   r=1        -> FP <= 3          -> up to .70P -> TP 2 -> 0.50
    #   r=2, 4, 8  -> FP <= 6, 12, 24  -> everything -> 1.00
    # CPM = (0.25 * 3 + 0.5 + 1 * 3) / 7 = 4.25 / 7
    scans = ["A", "A", "A", "B", "B", "B", "C", "C", "C", "C"]
    scores = np.array([0.95, 0.80, 0.30, 0.90, 0.70, 0.20, 0.85, 0.60, 0.50, 0.10])
    labels = np.array([1, 0, 1, 0, 1, 0, 0, 0, 1, 0])
    got = M.froc(labels, scores, scans)
    expected = {f"froc_candidate_{r}": 0.25 for r in ("0.125", "0.25", "0.5")}
    expected |= {"froc_candidate_1": 0.5, "froc_candidate_2": 1.0, "froc_candidate_4": 1.0}
    expected |= {"froc_candidate_8": 1.0, "cpm_candidate": 4.25 / 7}
    assert got == pytest.approx(expected)
    assert list(got) == list(expected)

    # Tie .70P with .60N (both .65): they flip together, giving FP 4 > 3 at r=1, so
    # froc_1 falls back to 0.25 and CPM = (0.25 * 4 + 1 * 3) / 7 = 4 / 7.
    tied = scores.copy()
    tied[[4, 7]] = 0.65
    got = M.froc(labels, tied, scans)
    assert got["froc_candidate_1"] == 0.25
    assert got["cpm_candidate"] == pytest.approx(4 / 7)

    via_metrics = M.binary_metrics(labels, scores, scan_ids=scans)
    assert via_metrics["cpm_candidate"] == pytest.approx(4.25 / 7)
    assert via_metrics["froc_candidate_8"] == 1.0


@pytest.mark.parametrize("seed", SEEDS)
def test_operating_points_satisfy_their_definitions(seed):
    y, p = tied_imbalanced(seed, np.float32)
    ops = M.operating_points(y, p)
    assert set(ops) == set(M.OPERATING_POINTS)
    rows = brute_rates(y, p)[1:]  # finite thresholds, highest first
    thr = np.array([r[0] for r in rows])
    tpr = np.array([r[1] for r in rows])
    fpr = np.array([r[2] for r in rows])
    pos, neg = y.sum(), (1 - y).sum()
    f1 = 2 * tpr * pos / (2 * tpr * pos + fpr * neg + (1 - tpr) * pos)

    def at(t):
        i = np.flatnonzero(thr == t)
        assert i.size == 1, f"operating point {t} is not one of the scores"
        return i[0]

    assert (tpr - fpr)[at(ops["youden"])] == pytest.approx((tpr - fpr).max())
    assert f1[at(ops["f1"])] == pytest.approx(f1.max())
    for name, target in (("sens90", 0.90), ("sens95", 0.95)):
        i = at(ops[name])
        assert tpr[i] >= target
        assert i == 0 or tpr[i - 1] < target  # the next higher threshold misses it
    i = at(ops["fpr01"])
    assert fpr[i] <= 0.01
    assert i == len(thr) - 1 or fpr[i + 1] > 0.01  # the next lower threshold exceeds it
    # Thresholds work as probabilities: applying them reproduces the definition.
    sens95 = M.binary_metrics(y, p, threshold=ops["sens95"])["sensitivity"]
    assert sens95 >= 0.95


RANK = {"auroc", "sens_at_fpr_1pct", "sens_at_fpr_5pct", "sens_at_fpr_10pct"}
NEED_POSITIVES = {"ap", "cpm_candidate", "froc_candidate_0.125", "froc_candidate_8", "sensitivity"}


@pytest.mark.parametrize(
    ("labels", "undefined"),
    [
        (np.zeros(50, int), RANK | NEED_POSITIVES),
        (np.ones(50, int), RANK | {"specificity"}),
    ],
    ids=["negatives-only", "positives-only"],
)
def test_single_class_gives_nan_where_undefined_and_numbers_elsewhere(labels, undefined):
    probs = np.linspace(0, 1, labels.size).astype(np.float32)
    scans = [str(i % 3) for i in range(labels.size)]
    got = M.binary_metrics(labels, probs, scan_ids=scans)
    for key in undefined:
        assert math.isnan(got[key]), key
    assert not math.isnan(got["accuracy"])
    if labels.any():
        assert got["ap"] == 1.0 and got["cpm_candidate"] == 1.0
    assert all(math.isnan(v) for v in M.operating_points(labels, probs).values())
    hist = M.probability_histogram(labels, probs)
    assert sum(hist["positive"]) + sum(hist["negative"]) == labels.size


def test_empty_input_gives_nan_everywhere_it_is_undefined():
    got = M.binary_metrics(np.array([]), np.array([]), scan_ids=[])
    undefined = {k for k, v in got.items() if isinstance(v, float) and math.isnan(v)}
    assert undefined == set(got) - {"positives", "negatives", "count", "threshold"}
    assert M.roc_points([], [])[2].tolist() == [np.inf]
    assert M.pr_points([], [])[2].size == 0
    assert all(math.isnan(v) for v in M.operating_points([], []).values())
    assert M.probability_histogram([], [])["positive"] == [0] * 20


def test_nan_scores_are_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="NaN"):
        M.auroc(np.array([0, 1]), np.array([0.2, np.nan]))


def test_resolve_threshold_accepts_numbers_and_named_points():
    points = {"youden": 0.42, "f1": 0.6, "sens90": 0.1, "sens95": 0.05, "fpr01": float("nan")}
    assert M.resolve_threshold("0.5", None) == 0.5
    assert M.resolve_threshold(0.3, None) == 0.3
    assert M.resolve_threshold(1, None) == 1.0
    assert M.resolve_threshold("youden", points) == 0.42
    assert M.resolve_threshold(" f1 ", points) == 0.6


@pytest.mark.parametrize(
    ("spec", "points", "message"),
    [
        ("median", {}, "'median' is neither a number"),
        (1.5, None, "outside \\[0, 1\\]"),
        ("-0.1", None, "outside \\[0, 1\\]"),
        ("nan", None, "outside \\[0, 1\\]"),
        ("youden", None, "'youden' needs operating points"),
        ("fpr01", {"fpr01": float("nan")}, "'fpr01' is undefined"),
        ("sens95", {"sens95": 3.0}, "operating point 'sens95' = 3.0 is outside"),
    ],
)
def test_resolve_threshold_errors_name_the_problem(spec, points, message):
    with pytest.raises(ConfigError, match=message):
        M.resolve_threshold(spec, points)


def test_probability_histogram_counts_every_sample_per_class():
    labels = np.array([0, 0, 0, 1, 1])
    probs = np.array([0.0, 0.04, 1.0, 0.5, 0.99], dtype=np.float32)
    hist = M.probability_histogram(labels, probs, bins=20)
    assert json.loads(json.dumps(hist)) == hist
    assert len(hist["bin_edges"]) == 21
    assert hist["negative"][0] == 2 and hist["negative"][19] == 1  # 1.0 lands in the last bin
    assert hist["positive"][10] == 1 and hist["positive"][19] == 1
    assert sum(hist["positive"]) == 2 and sum(hist["negative"]) == 3
