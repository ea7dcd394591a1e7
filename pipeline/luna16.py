"""The LUNA16 challenge's files: annotations, excluded findings, scan lists, submissions.

`annotations.csv` and `annotations_excluded.csv` have columns seriesuid, coordX, coordY,
coordZ, diameter_mm (world mm); a submission (what `pipeline predict --format luna16`
writes) has seriesuid, coordX, coordY, coordZ, probability; a scan list is one
seriesuid per line (header optional). Scoring is `pipeline.froc`; this module turns the
files, or a checkpoint's predictions, into its inputs and its result into JSON.
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError
from pipeline.froc import LUNA16_FPS, FrocResult, Marks, froc_score, match

FINDING_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
SUBMISSION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")


def _read_table(path: str | Path, columns: Sequence[str], what: str) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path}: file not found")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{what} {path}: missing column(s) {', '.join(missing)}")
        return list(reader)


def _floats(row: dict[str, str], names: Sequence[str], path: str | Path, line: int) -> list[float]:
    try:
        values = [float(row[n]) for n in names]
    except (TypeError, ValueError):
        raise DataError(f"{path} row {line}: {', '.join(names)} must be numbers") from None
    if not np.isfinite(values).all():
        raise DataError(f"{path} row {line}: {', '.join(names)} must be finite")
    return values


def read_findings(path: str | Path, what: str = "--annotations") -> dict[str, np.ndarray]:
    """seriesuid -> [M, 4] (x, y, z, diameter mm) from an annotations.csv-style file."""
    found: dict[str, list[list[float]]] = defaultdict(list)
    for line, row in enumerate(_read_table(path, FINDING_COLUMNS, what), start=2):
        found[row["seriesuid"]].append(_floats(row, FINDING_COLUMNS[1:], path, line))
    return {uid: np.asarray(rows, dtype=np.float64) for uid, rows in found.items()}


def read_marks(path: str | Path) -> Marks:
    """A LUNA16 submission CSV (seriesuid,coordX,coordY,coordZ,probability)."""
    rows = _read_table(path, SUBMISSION_COLUMNS, "--predictions")
    values = [_floats(r, SUBMISSION_COLUMNS[1:], path, n) for n, r in enumerate(rows, start=2)]
    table = np.asarray(values, dtype=np.float64).reshape(-1, 4)
    return Marks([r["seriesuid"] for r in rows], table[:, :3], table[:, 3])


def read_scans(path: str | Path, what: str = "--scans") -> list[str]:
    """Scan ids from a one-column file (header `seriesuid` optional), order kept, unique."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path}: file not found")
    with open(path, newline="") as handle:
        cells = [row[0].strip() for row in csv.reader(handle) if row and row[0].strip()]
    if cells and cells[0] == "seriesuid":
        cells = cells[1:]
    if not cells:
        raise DataError(f"{what} {path}: lists no scans")
    return list(dict.fromkeys(cells))


def marks_of_predictions(preds: Any) -> Marks:
    """A checkpoint's predictions as marks: its scan ids, world x/y/z and probabilities."""
    coords = getattr(preds, "coords", None)
    if preds.groups is None or coords is None or coords.shape[1] != 3:
        raise DataError(
            "--annotations needs shards whose samples carry a seriesuid and world x, y, z "
            "(convert CT volumes with `pipeline convert volumes`); these do not"
        )
    return Marks(list(preds.groups), np.asarray(coords, np.float64), preds.probs.astype(np.float64))


def score_files(
    marks: Marks,
    annotations: str | Path,
    excluded: str | Path | None = None,
    scans: str | Path | Sequence[str] | None = None,
    limit: int = 100,
    bootstrap: int = 1000,
    seed: int = 0,
) -> FrocResult:
    """FROC/CPM of `marks` against the challenge's files (scans None: the marks' scans)."""
    nodules = read_findings(annotations)
    other = read_findings(excluded, "--excluded") if excluded is not None else None
    listed = read_scans(scans) if isinstance(scans, (str, Path)) else scans
    return froc_score(match(marks, nodules, other, listed, limit), bootstrap=bootstrap, seed=seed)


def write_curve(path: str | os.PathLike, result: FrocResult) -> None:
    """The FROC curve and its bootstrap band as JSON: what `pipeline report` draws."""
    Path(path).write_text(json.dumps(curve_record(result)))


def curve_record(result: FrocResult) -> dict[str, Any]:
    """Summary, curve points and band of a result, JSON-ready."""
    grid, low, high = result.band
    return {
        "summary": result.summary(),
        "fps": result.curve.fps.tolist(),
        "sensitivity": result.curve.sensitivity.tolist(),
        "band": {
            "fps": grid.tolist(),
            "low": [None if not np.isfinite(v) else float(v) for v in low],
            "high": [None if not np.isfinite(v) else float(v) for v in high],
        },
        "rates": list(LUNA16_FPS),
    }
