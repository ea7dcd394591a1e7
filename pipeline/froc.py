"""LUNA16 FROC and CPM per nodule, as the challenge scores a submission (Setio et al. 2017).

Pure numpy; reading the challenge's CSV files is `pipeline.luna16`. Inputs are marks (seriesuid, world x/y/z in mm, probability), the reference nodules
(`annotations.csv`: seriesuid, coordX, coordY, coordZ, diameter_mm), optional irrelevant
findings (`annotations_excluded.csv`, same columns) and the evaluated scans. Semantics,
matched to the challenge's `noduleCADEvaluationLUNA16.py`:

- Only scans of the evaluated set count; marks on other scans are dropped (counted).
- Per scan at most `limit` marks (100): the highest scores, and marks tied with the first
  mark left out are left out too (the challenge keeps scores strictly above it).
- A mark hits a finding when its squared distance to the centre is below (diameter / 2)^2;
  a finding with a negative diameter (the excluded list has -1) gets 10 mm.
- Each nodule is hit at most once, with the highest score of its marks; extra marks on it
  are double detections and are neither hits nor false positives. A mark on two nodules
  counts for both.
- A mark on an excluded finding and on no nodule is ignored, not a false positive.
- Every other mark is a false positive. FP/scan divides by every scan of the set,
  including scans without marks; sensitivity divides by every nodule, hit or missed.
- The FROC curve steps through the distinct scores, highest first; the sensitivity at a
  rate is read off it by linear interpolation between neighbouring points (the
  challenge's np.interp), and stays at its last value beyond the curve's end. The
  challenge samples a 10,001-point grid from 1/8 to 8; we interpolate at the rates exactly.
- CPM is the mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4, 8 FP/scan.
- The confidence interval resamples scans with replacement (seeded), recomputes the curve
  for each resample and takes percentiles of CPM and of each sensitivity.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import DataError

LUNA16_FPS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
EXCLUDED_DEFAULT_DIAMETER = 10.0  # the challenge's radius for findings without a size


@dataclass
class Marks:
    """A system's output: one row per mark."""

    scans: list[str]
    coords: np.ndarray  # [N, 3] world mm
    scores: np.ndarray  # [N]


@dataclass
class Matched:
    """Per-scan outcome of matching marks to findings, ready for the curve and bootstrap."""

    scans: list[str]
    nodule_scan: np.ndarray  # scan index of every nodule (hit or missed)
    hit_scores: np.ndarray  # score of each hit nodule (its best mark)
    hit_scan: np.ndarray
    fp_scores: np.ndarray
    fp_scan: np.ndarray
    counts: dict[str, int] = field(default_factory=dict)


def _within(points: np.ndarray, findings: np.ndarray) -> np.ndarray:
    """[marks, findings] bool: mark strictly inside the finding's sphere."""
    diameter = np.where(findings[:, 3] < 0, EXCLUDED_DEFAULT_DIAMETER, findings[:, 3])
    d2 = ((points[:, None, :] - findings[None, :, :3]) ** 2).sum(axis=2)
    return d2 < (diameter / 2.0) ** 2


def _kept_by_limit(scores: np.ndarray, limit: int) -> np.ndarray:
    """Mask of the marks a scan keeps: all, or those scoring above the (limit+1)-th best."""
    if limit <= 0 or scores.size <= limit:
        return np.ones(scores.size, dtype=bool)
    cut = np.sort(scores)[::-1][limit]
    return scores > cut


def match(
    marks: Marks,
    nodules: dict[str, np.ndarray],
    excluded: dict[str, np.ndarray] | None = None,
    scans: Sequence[str] | None = None,
    limit: int = 100,
) -> Matched:
    """Match marks to findings scan by scan; `scans` None means the scans the marks name."""
    excluded = excluded or {}
    scans = list(dict.fromkeys(marks.scans)) if scans is None else list(dict.fromkeys(scans))
    if not scans:
        raise DataError("no scans to evaluate (no marks, and no --scans list)")
    index = {uid: i for i, uid in enumerate(scans)}
    by_scan: dict[str, list[int]] = defaultdict(list)
    outside = 0
    for row, uid in enumerate(marks.scans):
        if uid in index:
            by_scan[uid].append(row)
        else:
            outside += 1
    counts = dict.fromkeys(
        ("hits", "misses", "false_positives", "ignored", "double_detections", "limited"), 0
    )
    nodule_scan, hit_scores, hit_scan, fp_scores, fp_scan = [], [], [], [], []
    for i, uid in enumerate(scans):
        rows = np.asarray(by_scan.get(uid, []), dtype=np.int64)
        scores, points = marks.scores[rows], marks.coords[rows]
        keep = _kept_by_limit(scores, limit)
        counts["limited"] += int((~keep).sum())
        scores, points = scores[keep], points[keep]
        real = nodules.get(uid, np.zeros((0, 4)))
        on_nodule = _within(points, real)  # [marks, nodules]
        nodule_scan += [i] * len(real)
        for j in range(len(real)):
            hits = np.flatnonzero(on_nodule[:, j])
            if hits.size:
                hit_scores.append(float(scores[hits].max()))
                hit_scan.append(i)
                counts["hits"] += 1
                counts["double_detections"] += int(hits.size - 1)
            else:
                counts["misses"] += 1
        claimed = on_nodule.any(axis=1)
        other = excluded.get(uid, np.zeros((0, 4)))
        ignored = ~claimed & _within(points, other).any(axis=1)
        counts["ignored"] += int(ignored.sum())
        false = ~claimed & ~ignored
        counts["false_positives"] += int(false.sum())
        fp_scores += scores[false].tolist()
        fp_scan += [i] * int(false.sum())
    counts.update(
        scans=len(scans),
        nodules=len(nodule_scan),
        marks_outside_scans=outside,
        nodules_outside_scans=sum(len(v) for k, v in nodules.items() if k not in index),
    )
    as_int = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    return Matched(
        scans,
        as_int(nodule_scan),
        np.asarray(hit_scores, dtype=np.float64),
        as_int(hit_scan),
        np.asarray(fp_scores, dtype=np.float64),
        as_int(fp_scan),
        counts,
    )


@dataclass
class Curve:
    """FROC points, highest threshold first; starts at (0, 0)."""

    fps: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray


class _Scorer:
    """Hit and FP scores sorted once; a curve per scan weighting (1 each, or a resample)."""

    def __init__(self, matched: Matched) -> None:
        scores = np.r_[matched.hit_scores, matched.fp_scores]
        is_hit = np.r_[
            np.ones(matched.hit_scores.size, bool), np.zeros(matched.fp_scores.size, bool)
        ]
        scan = np.r_[matched.hit_scan, matched.fp_scan]
        order = np.argsort(-scores, kind="stable")
        self.scores, self.is_hit, self.scan = scores[order], is_hit[order], scan[order]
        # Tied scores flip together: one curve point at the last of each tie group.
        s = self.scores
        self.ends = np.r_[np.flatnonzero(np.diff(s)), s.size - 1] if s.size else np.zeros(0, int)
        self.nodule_scan = matched.nodule_scan
        self.n_scans = len(matched.scans)

    def curve(self, weights: np.ndarray | None = None) -> Curve:
        w = np.ones(self.n_scans) if weights is None else weights
        per = w[self.scan]
        tp = np.cumsum(per * self.is_hit)[self.ends]
        fp = np.cumsum(per * ~self.is_hit)[self.ends]
        nodules = float(w[self.nodule_scan].sum())
        sens = np.r_[0.0, tp] / nodules if nodules > 0 else np.full(tp.size + 1, np.nan)
        return Curve(np.r_[0.0, fp] / float(w.sum()), sens, np.r_[np.inf, self.scores[self.ends]])


def sensitivity_at(curve: Curve, rates: Sequence[float] = LUNA16_FPS) -> np.ndarray:
    """Linear interpolation of the FROC curve at each rate; the last value past its end."""
    fps, sens = curve.fps, curve.sensitivity
    r = np.asarray(rates, dtype=np.float64)
    # The last point at or below the rate (of equal-FP points, the most sensitive) ...
    j = np.searchsorted(fps, r, side="right") - 1
    nxt = np.minimum(j + 1, fps.size - 1)
    span = fps[nxt] - fps[j]
    frac = np.divide(r - fps[j], span, out=np.zeros_like(r), where=span > 0)
    # ... joined by a straight line to the first point beyond it.
    return sens[j] + frac * (sens[nxt] - sens[j])


@dataclass
class FrocResult:
    curve: Curve
    sensitivities: np.ndarray
    cpm: float
    counts: dict[str, int]
    ci: dict[str, tuple[float, float]]
    band: tuple[np.ndarray, np.ndarray, np.ndarray]  # fps grid, lower, upper sensitivity
    rates: tuple[float, ...] = LUNA16_FPS

    def summary(self) -> dict[str, object]:
        """The flat, JSON-ready record `pipeline evaluate` prints."""
        out: dict[str, object] = {"cpm": _clean(self.cpm)}
        for rate, value in zip(self.rates, self.sensitivities, strict=True):
            out[f"froc_{rate:g}"] = _clean(value)
        out["ci"] = {k: [_clean(lo), _clean(hi)] for k, (lo, hi) in self.ci.items()}
        out.update(self.counts)
        return out


def _clean(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)


def froc_score(
    matched: Matched,
    rates: Sequence[float] = LUNA16_FPS,
    bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    band_points: int = 200,
) -> FrocResult:
    """Curve, sensitivities, CPM and the bootstrap confidence interval over scans."""
    scorer = _Scorer(matched)
    curve = scorer.curve()
    sens = sensitivity_at(curve, rates)
    keys = ["cpm", *(f"froc_{r:g}" for r in rates)]
    grid = np.geomspace(min(rates), max(rates), band_points)
    rng = np.random.default_rng(seed)
    draws = np.full((bootstrap, len(rates) + 1), np.nan)
    bands = np.full((bootstrap, grid.size), np.nan)
    for b in range(bootstrap):
        # Resampling scans = weighting each scan by how often it was drawn.
        picks = rng.integers(0, scorer.n_scans, scorer.n_scans)
        resampled = scorer.curve(np.bincount(picks, minlength=scorer.n_scans).astype(float))
        at = sensitivity_at(resampled, rates)
        draws[b] = np.r_[at.mean(), at]
        bands[b] = sensitivity_at(resampled, grid)
    tail = (1.0 - confidence) / 2.0 * 100.0
    ci: dict[str, tuple[float, float]] = {}
    lo = hi = np.full(grid.size, np.nan)
    if bootstrap > 0 and np.isfinite(draws).any():
        low, high = np.nanpercentile(draws, [tail, 100.0 - tail], axis=0)
        ci = {k: (float(a), float(z)) for k, a, z in zip(keys, low, high, strict=True)}
        lo, hi = np.nanpercentile(bands, [tail, 100.0 - tail], axis=0)
    return FrocResult(
        curve, sens, float(sens.mean()), dict(matched.counts), ci, (grid, lo, hi), tuple(rates)
    )


def candidate_matched(labels: np.ndarray, scores: np.ndarray, groups: Sequence[str]) -> Matched:
    """Candidates as their own findings (no annotations): each positive is one nodule.

    What the per-candidate `cpm_candidate` counts, in the form the curve and bootstrap take;
    used to draw a FROC band when no annotations are at hand.
    """
    labels = np.asarray(labels).reshape(-1).astype(bool)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    names = list(dict.fromkeys(groups))
    index = {g: i for i, g in enumerate(names)}
    scan = np.fromiter((index[g] for g in groups), dtype=np.int64, count=len(groups))
    counts = {"hits": int(labels.sum()), "false_positives": int((~labels).sum())}
    return Matched(
        names, scan[labels], scores[labels], scan[labels], scores[~labels], scan[~labels], counts
    )
