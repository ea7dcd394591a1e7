"""`pipeline evaluate --predictions/--annotations` and `pipeline cv` at the command line:
the hand-computed case through real files, and bad input as one line with exit code 2."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import CheckpointConfig
from pipeline.errors import ConfigError
from tests.test_froc import EXCLUDED, MARKS, NODULES, SCANS


def write(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    cols = ["seriesuid", "coordX", "coordY", "coordZ"]
    findings = lambda table: [[uid, *row] for uid, rows in table.items() for row in rows.tolist()]  # noqa: E731
    return {
        "sub": write(tmp_path / "sub.csv", [*cols, "probability"], [[u, *c, p] for u, c, p in MARKS]),
        "ann": write(tmp_path / "annotations.csv", [*cols, "diameter_mm"], findings(NODULES)),
        "exc": write(tmp_path / "excluded.csv", [*cols, "diameter_mm"], findings(EXCLUDED)),
        "scans": write(tmp_path / "seriesuids.csv", ["seriesuid"], [[s] for s in SCANS]),
    }  # fmt: skip


def test_submission_csv_scores_the_hand_computed_cpm(files, capsys):
    args = ["evaluate", "--predictions", str(files["sub"]), "--annotations", str(files["ann"])]
    args += ["--excluded", str(files["exc"]), "--scans", str(files["scans"]), "--bootstrap", "50"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cpm"] == pytest.approx(4 / 7)
    assert [result[f"froc_{r}"] for r in ("0.125", "0.25", "0.5", "1", "2", "4", "8")] == (
        pytest.approx([0.25, 0.25, 0.5, 0.75, 0.75, 0.75, 0.75])
    )
    counts = {k: result[k] for k in ("hits", "misses", "ignored", "double_detections", "scans")}
    assert counts == {"hits": 3, "misses": 1, "ignored": 1, "double_detections": 1, "scans": 5}
    assert set(result["ci"]) == {"cpm", "froc_0.125", "froc_0.25", "froc_0.5", "froc_1",
                                 "froc_2", "froc_4", "froc_8"}  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--predictions", "{sub}"], "--predictions needs --annotations annotations.csv"),
        (["--predictions", "{sub}", "--annotations", "{tmp}/none.csv"],
         "--annotations {tmp}/none.csv: file not found"),
        (["--predictions", "{ann}", "--annotations", "{ann}"],
         "--predictions {ann}: missing column(s) probability"),
        (["--predictions", "{sub}", "--annotations", "{ann}", "--max-marks", "-1"],
         "--max-marks must be >= 0"),
    ],
    ids=["no-annotations", "missing-file", "wrong-columns", "negative-limit"],
)  # fmt: skip
def test_bad_evaluate_input_is_one_line_exit_2(files, tmp_path, capsys, extra, words):
    names = {"sub": files["sub"], "ann": files["ann"], "tmp": tmp_path}
    assert main(["evaluate", *(a.format(**names) for a in extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pipeline evaluate: error: {words.format(**names)}"), err
    assert "\n" not in err and "Traceback" not in err


def test_cv_refuses_shards_without_the_asked_folds(tmp_path, capsys):
    assert main(["cv", "--folds", "3", "--shards", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has no fold<i>-*.tar shards" in err and "--folds 3" in err


def test_checkpoint_metric_cpm_is_refused_since_validation_has_no_annotations():
    with pytest.raises(ConfigError, match="checkpoint.metric.*cpm_candidate"):
        CheckpointConfig(metric="cpm")
