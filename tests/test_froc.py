"""LUNA16 FROC/CPM per nodule (pipeline.froc) against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import froc, luna16
from pipeline.errors import DataError

# Five scans: A and B have marks; C has a nodule but no marks; D and E have neither.
NODULES = {
    "A": np.array([[0, 0, 0, 10.0], [50, 0, 0, 6.0]]),  # n1 (r 5), n2 (r 3)
    "B": np.array([[0, 0, 0, 8.0]]),  # n3 (r 4)
    "C": np.array([[10, 10, 10, 4.0]]),  # n4: never hit
}
EXCLUDED = {"A": np.array([[100, 0, 0, -1.0]])}  # no size: the challenge's 10 mm
MARKS = [
    ("A", (1, 0, 0), 0.9),  # hits n1
    ("A", (0, 2, 0), 0.6),  # hits n1 again: a double detection, not a hit nor an FP
    ("A", (50, 0, 2.9), 0.4),  # hits n2 (2.9^2 < 3^2)
    ("A", (100, 0, 4), 0.95),  # on the excluded finding: ignored
    ("A", (30, 0, 0), 0.8),  # FP
    ("A", (0, 0, 5), 0.7),  # exactly on n1's sphere: not inside, so an FP
    ("B", (0, 0, 3.9), 0.4),  # hits n3, tied with n2's mark and an FP below
    ("B", (20, 20, 20), 0.4),  # FP, tied
    ("B", (5, 5, 5), 0.1),  # FP
]
SCANS = ["A", "B", "C", "D", "E"]


def marks_of(rows) -> froc.Marks:
    return froc.Marks(
        [r[0] for r in rows],
        np.array([r[1] for r in rows], dtype=float).reshape(-1, 3),
        np.array([r[2] for r in rows], dtype=float),
    )


def test_cpm_matches_hand_computation_with_doubles_excluded_ties_misses_and_empty_scans():
    matched = froc.match(marks_of(MARKS), NODULES, EXCLUDED, SCANS)
    assert matched.counts == {
        "hits": 3,
        "misses": 1,
        "false_positives": 4,
        "ignored": 1,
        "double_detections": 1,
        "limited": 0,
        "scans": 5,
        "nodules": 4,
        "marks_outside_scans": 0,
        "nodules_outside_scans": 0,
    }
    assert sorted(matched.fp_scores.tolist()) == [0.1, 0.4, 0.7, 0.8]
    assert sorted(matched.hit_scores.tolist()) == [0.4, 0.4, 0.9]
    result = froc.froc_score(matched, bootstrap=0)
    # By hand, 5 scans and 4 nodules, thresholds 0.9 / 0.8 / 0.7 / 0.4 (2 hits + 1 FP tied) / 0.1:
    # (FP/scan, sens) = (0, 0) (0, .25) (.2, .25) (.4, .25) (.6, .75) (.8, .75).
    assert result.curve.fps.tolist() == pytest.approx([0, 0, 0.2, 0.4, 0.6, 0.8])
    assert result.curve.sensitivity.tolist() == pytest.approx([0, 0.25, 0.25, 0.25, 0.75, 0.75])
    # 1/8, 1/4: .25; 1/2 halfway from (.4, .25) to (.6, .75): .5; 1 and beyond: .75.
    assert result.sensitivities.tolist() == pytest.approx([0.25, 0.25, 0.5, 0.75, 0.75, 0.75, 0.75])
    assert result.cpm == pytest.approx(4 / 7)
    summary = result.summary()
    assert summary["cpm"] == pytest.approx(4 / 7) and summary["froc_0.5"] == pytest.approx(0.5)
    assert summary["false_positives"] == 4 and summary["ci"] == {}


def test_scans_without_marks_count_in_fp_per_scan():
    # Without the scan list only A and B (the scans with marks) are evaluated: C's nodule
    # drops out and FP/scan doubles relative to five scans.
    matched = froc.match(marks_of(MARKS), NODULES, EXCLUDED)
    assert matched.counts["scans"] == 2 and matched.counts["nodules"] == 3
    assert matched.counts["nodules_outside_scans"] == 1
    result = froc.froc_score(matched, bootstrap=0)
    assert result.curve.fps.tolist() == pytest.approx([0, 0, 0.5, 1.0, 1.5, 2.0])
    assert result.curve.sensitivity.tolist() == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3, 1, 1])


def test_excluded_finding_mark_is_a_false_positive_without_the_excluded_list():
    matched = froc.match(marks_of(MARKS), NODULES, None, SCANS)
    assert matched.counts["ignored"] == 0
    assert sorted(matched.fp_scores.tolist()) == [0.1, 0.4, 0.7, 0.8, 0.95]


def test_limit_keeps_the_best_marks_and_drops_those_tied_with_the_first_left_out():
    rows = [("A", (30 + i, 0, 0), s) for i, s in enumerate([0.9, 0.8, 0.5, 0.5, 0.2])]
    matched = froc.match(marks_of(rows), {}, None, ["A"], limit=3)
    # The 4th best is 0.5, tied with the 3rd: both go (the challenge keeps scores > 4th best).
    assert sorted(matched.fp_scores.tolist()) == [0.8, 0.9]
    assert matched.counts["limited"] == 3
    assert froc.match(marks_of(rows), {}, None, ["A"], limit=0).fp_scores.size == 5


def test_no_false_positives_reads_the_top_sensitivity_at_every_rate():
    rows = [("B", (0, 0, 0), 0.3)]
    result = froc.froc_score(froc.match(marks_of(rows), NODULES, None, ["B", "C"]), bootstrap=0)
    assert result.sensitivities.tolist() == [0.5] * 7


def random_case(scans: int = 40, seed: int = 0):
    """Scans with one nodule each; a hit near it scoring high-ish, FPs anywhere."""
    rng = np.random.default_rng(seed)
    nodules = {f"s{i}": np.array([[0, 0, 0, 6.0]]) for i in range(scans)}
    rows = []
    for i in range(scans):
        if rng.random() < 0.7:
            rows.append((f"s{i}", (1, 0, 0), float(rng.uniform(0.3, 1.0))))
        rows += [(f"s{i}", (40, 0, 0), float(s)) for s in rng.uniform(0, 0.8, rng.integers(0, 6))]
    return marks_of(rows), nodules


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    marks, nodules = random_case()
    matched = froc.match(marks, nodules)
    first = froc.froc_score(matched, bootstrap=300, seed=3)
    again = froc.froc_score(matched, bootstrap=300, seed=3)
    other = froc.froc_score(matched, bootstrap=300, seed=4)
    assert first.ci == again.ci and np.array_equal(first.band[1], again.band[1])
    assert first.ci != other.ci
    low, high = first.ci["cpm"]
    assert 0.0 <= low < first.cpm < high <= 1.0
    assert set(first.ci) == {"cpm", *(f"froc_{r:g}" for r in froc.LUNA16_FPS)}
    grid, lo, hi = first.band
    assert grid[0] == 0.125 and grid[-1] == 8 and (lo <= hi).all()


def test_files_round_trip_and_bad_files_name_the_flag(tmp_path):
    ann = tmp_path / "annotations.csv"
    ann.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\nA,0,0,0,10\nC,10,10,10,4\n")
    sub = tmp_path / "submission.csv"
    sub.write_text("seriesuid,coordX,coordY,coordZ,probability\nA,1,0,0,0.9\nA,30,0,0,0.8\n")
    scans = tmp_path / "seriesuids.csv"
    scans.write_text("A\nC\n")
    result = luna16.score_files(luna16.read_marks(sub), ann, scans=scans, bootstrap=0)
    assert result.counts["hits"] == 1 and result.counts["misses"] == 1
    # (0,0) (0,.5) (.5,.5): 0.5 at every rate.
    assert result.cpm == pytest.approx(0.5)
    bad = tmp_path / "bad.csv"
    bad.write_text("seriesuid,coordX,coordY\nA,1,2\n")
    with pytest.raises(DataError, match="--predictions .*missing column.*coordZ"):
        luna16.read_marks(bad)
    bad.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\nA,1,2,x,4\n")
    with pytest.raises(DataError, match="row 2"):
        luna16.read_findings(bad)


@pytest.mark.parametrize("seed", range(5))
def test_sensitivities_equal_the_challenge_procedure_with_sklearn_roc_and_np_interp(seed):
    # The challenge: sklearn roc_curve over hit/FP scores (misses left out), FP/scan =
    # fpr * FPs / scans, sensitivity = tpr * hits / nodules, np.interp at the rates.
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(seed)
    hits = np.round(rng.uniform(0.2, 1, 30), 2)  # rounded: many ties, also across classes
    fps = np.round(rng.uniform(0, 0.9, 200), 2)
    scans, nodules = 25, 40  # 10 nodules missed
    fpr, tpr, _ = roc_curve(np.r_[np.ones(30), np.zeros(200)], np.r_[hits, fps])
    expected = np.interp(froc.LUNA16_FPS, fpr * 200 / scans, tpr * 30 / nodules)

    matched = froc.Matched(
        [f"s{i}" for i in range(scans)],
        np.arange(nodules) % scans,
        hits,
        np.arange(30) % scans,
        fps,
        np.arange(200) % scans,
    )
    got = froc.froc_score(matched, bootstrap=0).sensitivities
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
