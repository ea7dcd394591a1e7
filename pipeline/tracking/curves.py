"""What the ROC, PR and probability-histogram plots show, for W&B and `pipeline report`.

The curves come exact from `pipeline.metrics` (one sort of all samples), then are thinned
to a few hundred points so an eval of 100k+ samples stays cheap to log as a W&B table and
to draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline import metrics

MAX_POINTS = 500
"""Points kept per curve: smooth to the eye, small enough for one W&B table per eval."""
BINS = 50


@dataclass(frozen=True)
class CurvePoints:
    fpr: np.ndarray
    tpr: np.ndarray
    recall: np.ndarray
    precision: np.ndarray
    bin_edges: np.ndarray
    fractions: dict[str, np.ndarray]
    """Per class ("negative", "positive"): share of that class in each bin, so a 1:600
    imbalance does not flatten the positives."""
    counts: dict[str, int]
    auroc: float
    ap: float


def thin(
    x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` points, evenly spaced along the curve, both ends kept."""
    if x.size <= max_points:
        return x, y
    keep = np.unique(np.linspace(0, x.size - 1, max_points).round().astype(np.int64))
    return x[keep], y[keep]


def curve_points(
    labels: np.ndarray, probs: np.ndarray, max_points: int = MAX_POINTS
) -> CurvePoints:
    """Thinned ROC and PR curves, per-class histograms, AUROC and AP (exact, before thinning).

    Raises ValueError on NaN probabilities or labels other than 0/1 (from `pipeline.metrics`).
    """
    fpr, tpr, _ = metrics.roc_points(labels, probs)
    precision, recall, _ = metrics.pr_points(labels, probs)
    hist = metrics.probability_histogram(labels, probs, bins=BINS)
    counts = {cls: int(np.sum(hist[cls])) for cls in ("negative", "positive")}
    fractions = {cls: np.asarray(hist[cls]) / max(counts[cls], 1) for cls in counts}
    return CurvePoints(
        *thin(fpr, tpr, max_points),
        *thin(recall, precision, max_points),
        bin_edges=np.asarray(hist["bin_edges"]),
        fractions=fractions,
        counts=counts,
        auroc=metrics.auroc(labels, probs),
        ap=metrics.average_precision(labels, probs),
    )


@dataclass(frozen=True)
class FrocPoints:
    """Candidate-level FROC on a log grid of FP/scan (1/8..8) with a bootstrap band."""

    fps: np.ndarray
    sensitivity: np.ndarray
    low: np.ndarray
    high: np.ndarray
    cpm: float


def froc_points(
    labels: np.ndarray, probs: np.ndarray, groups: list[str], bootstrap: int = 200, seed: int = 0
) -> FrocPoints:
    """What the W&B FROC chart shows during training (no annotations: per candidate)."""
    from pipeline import froc

    result = froc.froc_score(
        froc.candidate_matched(labels, probs, groups), bootstrap=bootstrap, seed=seed
    )
    grid, low, high = result.band
    return FrocPoints(grid, froc.sensitivity_at(result.curve, grid), low, high, result.cpm)
