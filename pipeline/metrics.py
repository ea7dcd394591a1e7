"""Exact binary-classification metrics for candidate classifiers (numpy only, no binning).

All curves are built from the full, sorted score list, so results are exact and equal
scikit-learn's (`roc_curve(drop_intermediate=False)`, `precision_recall_curve`,
`roc_auc_score`, `average_precision_score`). Tied scores form one threshold step, as in
sklearn. Rank metrics use only the order of the scores, so logits and their sigmoids give
the same values (unless float saturation makes distinct logits equal probabilities).
Gathering predictions across ranks is `pipeline.distributed`'s job; these functions take the
complete arrays.

Conventions:
- A candidate is predicted positive when `score >= threshold`.
- Where a metric is undefined (empty input, one class only, nothing predicted positive
  for precision) it is NaN, never an exception. NaN scores raise ValueError: they mean
  the model diverged, and a metric computed from them would be meaningless.

Operating points (`operating_points`) are thresholds taken from the scores themselves:
- `youden`: maximises TPR - FPR;
- `f1`:     maximises F1 = 2TP / (2TP + FP + FN);
- `sens90`, `sens95`: the highest threshold whose sensitivity is >= 0.90 / 0.95;
- `fpr01`:  the lowest threshold whose FPR is <= 0.01 (NaN if even the top score
  already exceeds it).
Ties in the objective go to the higher threshold. All are NaN unless both classes occur.

Candidate-level FROC / CPM (`froc`; keys `froc_candidate_<rate>` and `cpm_candidate`),
the fallback when no annotations are at hand: candidates are sorted by score, descending, and
thresholds are walked one distinct score at a time. At each step sensitivity = TP / P
over all candidates and FP/scan = FP / (number of distinct scan ids). The sensitivity at
a target rate r is the highest sensitivity reached while FP/scan <= r (a step function,
no interpolation between steps). CPM is the mean over the seven rates
1/8, 1/4, 1/2, 1, 2, 4, 8 FP/scan. Simplifications against LUNA16: each positive
candidate is one finding (LUNA16 counts a nodule once, however many candidates hit it),
and the scan count is the scans that appear among the candidates (LUNA16 counts every
scan in the set, including those without candidates). The challenge's CPM (`cpm`), per
nodule from annotations.csv, is `pipeline.froc`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pipeline.errors import ConfigError

LUNA16_FPS = (0.125, 0.25, 0.5, 1, 2, 4, 8)
OPERATING_POINTS = ("youden", "f1", "sens90", "sens95", "fpr01")
_NAN = float("nan")


def _prepare(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and flatten: labels as bool, scores as float64 (lossless from float32)."""
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN (did training diverge?)")
    return y.astype(bool), s


def _steps(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative TP and FP counts at each distinct threshold, highest first.

    Index 0 is the empty prediction (threshold +inf), so every curve starts at (0, 0).
    """
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    # The last element of each tie group: all tied candidates flip together.
    ends = np.r_[np.flatnonzero(np.diff(s)), s.size - 1] if s.size else np.array([], int)
    tps = np.cumsum(y)[ends]
    fps = ends + 1 - tps
    return np.r_[0, tps], np.r_[0, fps], np.r_[np.inf, s[ends]]


def _rate(counts: np.ndarray, total: int) -> np.ndarray:
    return counts / total if total > 0 else np.full(counts.shape, np.nan)


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), as sklearn `roc_curve(drop_intermediate=False)`."""
    tps, fps, thr = _steps(*_prepare(labels, scores))
    return _rate(fps, fps[-1]), _rate(tps, tps[-1]), thr


def pr_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds), as sklearn `precision_recall_curve`.

    Thresholds ascend; precision/recall end with (1, 0). Recall is NaN with no positives.
    """
    tps, fps, thr = _steps(*_prepare(labels, scores))
    tps, fps, thr = tps[1:], fps[1:], thr[1:]  # sklearn has no +inf point here
    ps = tps + fps
    precision = np.divide(tps, ps, out=np.zeros(ps.shape), where=ps != 0)
    recall = _rate(tps, tps[-1] if tps.size else 0)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thr[::-1]


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; a tie between classes counts one half. NaN if one class."""
    fpr, tpr, _ = roc_points(labels, scores)
    if np.isnan(fpr[-1]) or np.isnan(tpr[-1]):
        return _NAN
    return float(np.trapezoid(tpr, fpr))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Step-wise AP = sum over thresholds of (R_n - R_{n-1}) P_n. NaN without positives."""
    precision, recall, _ = pr_points(labels, scores)
    if recall.size == 1 or np.isnan(recall[0]):
        return _NAN
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def sensitivity_at_fpr(labels: np.ndarray, scores: np.ndarray, max_fpr: float) -> float:
    """Highest TPR over thresholds whose FPR <= max_fpr. NaN if one class."""
    fpr, tpr, _ = roc_points(labels, scores)
    if np.isnan(fpr[-1]) or np.isnan(tpr[-1]):
        return _NAN
    # Both rates rise along the walk, so the answer is the last step still under the cap.
    i = np.searchsorted(fpr, max_fpr, side="right") - 1
    return float(tpr[i]) if i >= 0 else _NAN


def froc(
    labels: np.ndarray,
    scores: np.ndarray,
    scan_ids: Sequence[str],
    fps_per_scan: Sequence[float] = LUNA16_FPS,
) -> dict[str, float]:
    """Sensitivity at each FP/scan rate (`froc_candidate_<rate>`), their mean `cpm_candidate`."""
    y, s = _prepare(labels, scores)
    scan_ids = list(scan_ids)
    if len(scan_ids) != y.size:
        raise ValueError(f"scan_ids ({len(scan_ids)}) and scores ({y.size}) differ in length")
    tps, fps, _ = _steps(y, s)
    n_scans, positives = len(set(scan_ids)), int(tps[-1])
    out = {}
    for rate in fps_per_scan:
        # Compare counts (FP <= rate * scans), not rounded ratios.
        i = np.searchsorted(fps, rate * n_scans, side="right") - 1
        out[f"froc_candidate_{rate:g}"] = float(tps[i] / positives) if positives else _NAN
    out["cpm_candidate"] = float(np.mean(list(out.values()))) if positives else _NAN
    return out


def operating_points(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Thresholds (on the score scale) for the named operating points; see module doc."""
    y, s = _prepare(labels, scores)
    tps, fps, thr = _steps(y, s)
    pos, neg = int(tps[-1]), int(fps[-1])
    if pos == 0 or neg == 0:
        return dict.fromkeys(OPERATING_POINTS, _NAN)
    tps, fps, thr = tps[1:], fps[1:], thr[1:]  # +inf is not a usable probability
    tpr, fpr = tps / pos, fps / neg
    f1 = 2 * tps / (2 * tps + fps + (pos - tps))
    under = np.flatnonzero(fpr <= 0.01)
    # argmax / first index pick the highest threshold among equals (thr descends).
    return {
        "youden": float(thr[np.argmax(tpr - fpr)]),
        "f1": float(thr[np.argmax(f1)]),
        "sens90": float(thr[np.argmax(tpr >= 0.90)]),
        "sens95": float(thr[np.argmax(tpr >= 0.95)]),
        "fpr01": float(thr[under[-1]]) if under.size else _NAN,
    }


def resolve_threshold(spec: str | float, points: Mapping[str, float] | None) -> float:
    """Turn a config value ("0.5", 0.3, "youden", ...) into a probability threshold."""
    try:
        value = float(spec)
        name = None
    except (TypeError, ValueError):
        name = str(spec).strip()
        if name not in OPERATING_POINTS:
            raise ConfigError(
                f"threshold {spec!r} is neither a number in [0, 1] nor one of "
                f"{', '.join(OPERATING_POINTS)}"
            ) from None
        if points is None or name not in points:
            raise ConfigError(
                f"threshold {name!r} needs operating points from a validation run, "
                "and none are available"
            ) from None
        value = float(points[name])
        if np.isnan(value):
            raise ConfigError(
                f"threshold {name!r} is undefined on this validation set "
                "(one class only, or no threshold meets it)"
            ) from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        source = f"operating point {name!r}" if name else "threshold"
        raise ConfigError(f"{source} = {value} is outside [0, 1]; thresholds are probabilities")
    return value


def probability_histogram(labels: np.ndarray, probs: np.ndarray, bins: int = 20) -> dict:
    """Per-class counts of probabilities in `bins` equal bins over [0, 1] (JSON-safe)."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    y, p = _prepare(labels, probs)
    edges = np.linspace(0.0, 1.0, bins + 1)
    p = np.clip(p, 0.0, 1.0)  # so the counts always add up to the sample count
    counts = [np.histogram(p[mask], bins=edges)[0].tolist() for mask in (y, ~y)]
    return {"bin_edges": edges.tolist(), "positive": counts[0], "negative": counts[1]}


def _ratio(num: int, den: int) -> float:
    return num / den if den else _NAN


def binary_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    threshold: float = 0.5,
    scan_ids: Sequence[str] | None = None,
) -> dict[str, float]:
    """Every headline metric in one flat dict (the validation record)."""
    y, p = _prepare(labels, probs)
    # Sort once: every curve below re-sorts, and a stable sort of sorted data is cheap.
    order = np.argsort(-p, kind="stable")
    y, p = y[order], p[order]  # scan_ids need no reorder: froc only counts distinct scans
    pred = p >= threshold
    tp, fp = int(np.sum(pred & y)), int(np.sum(pred & ~y))
    pos, neg = int(y.sum()), int((~y).sum())
    fn, tn = pos - tp, neg - fp
    out: dict[str, float] = {
        "auroc": auroc(y, p),
        "ap": average_precision(y, p),
        "accuracy": _ratio(tp + tn, y.size),
        "sensitivity": _ratio(tp, pos),
        "specificity": _ratio(tn, neg),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }
    for pct in (1, 5, 10):
        out[f"sens_at_fpr_{pct}pct"] = sensitivity_at_fpr(y, p, pct / 100)
    out.update(positives=pos, negatives=neg, count=int(y.size), threshold=float(threshold))
    if scan_ids is not None:
        out.update(froc(y, p, scan_ids))
    return out
