"""The candidate table: CSV rows, label rules, and problems reported by CSV row number.

Row numbers are line numbers in the CSV file as an editor shows them: the header is
line 1, the first data row is line 2. Every message a user sees about a row uses them.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError, DataError

ON_ERROR = ("skip", "fail")


@dataclass(slots=True)  # slots: LUNA16 lists run to ~750k rows
class Candidate:
    """One usable row: what the shard meta keeps, plus where its pixels come from."""

    row: int
    id: str
    group: str
    label: int
    coords: tuple[float, ...] | None
    source: str  # image path or seriesuid: rows sharing it are read together


@dataclass(frozen=True)
class Problem:
    """A row that could not be converted; `reason` is the summary bucket, `detail` the story."""

    row: int
    reason: str
    detail: str

    def message(self, csv_path: str | Path) -> str:
        return f"{csv_path} row {self.row}: {self.reason}: {self.detail}"


class RowError(Exception):
    """Raised while parsing one row; the driver turns it into a Problem for that row."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class LabelRule:
    """How a label cell becomes 0/1, and which probabilities are too uncertain to keep."""

    threshold: float | None = None
    drop_uncertain: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.drop_uncertain is not None:
            low, high = self.drop_uncertain
            if not low < high:
                raise ConfigError(f"--drop-uncertain: need LO < HI, got {low},{high}")

    def parse(self, text: str) -> int | None:
        """0 or 1, None when the row is dropped as uncertain; RowError when unreadable."""
        value = parse_float(text, "label")
        if self.drop_uncertain is not None:
            low, high = self.drop_uncertain
            if low < value < high:
                return None
        if self.threshold is not None:
            return int(value >= self.threshold)
        if value not in (0.0, 1.0):
            raise RowError("bad label", f"label {text!r} is not 0 or 1 (pass --label-threshold)")
        return int(value)


def parse_float(text: str, what: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise RowError(f"bad {what}", f"{what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise RowError(f"bad {what}", f"{what} {text!r} is not finite")
    return value


def parse_pair(text: str, flag: str) -> tuple[float, float]:
    """'LO,HI' -> (LO, HI) for flags like --window and --drop-uncertain."""
    parts = text.replace(" ", "").split(",")
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"{flag}: expected two numbers 'LO,HI', got {text!r}") from None
    return low, high


def read_rows(
    csv_path: str | Path, required: Sequence[str | None]
) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, row dict); DataError listing the columns if one is missing."""
    path = Path(csv_path)
    if not path.is_file():
        raise DataError(f"{path}: CSV file not found")
    with open(path, newline="", encoding="utf-8-sig") as stream:  # -sig: Excel's BOM
        reader = csv.DictReader(stream)
        columns = reader.fieldnames or []
        if not columns:
            raise DataError(f"{path}: empty CSV, expected a header row")
        missing = [c for c in required if c is not None and c not in columns]
        if missing:
            raise DataError(
                f"{path}: no column {', '.join(repr(m) for m in missing)}; "
                f"columns present: {', '.join(columns)}"
            )
        for row in reader:
            # line_num is the line of the row's last physical line; quoted newlines are rare
            # enough in candidate lists that this is the number users will look for.
            yield reader.line_num, row


def cell(row: dict[str, str], column: str) -> str:
    value = row.get(column)
    if value is None:
        raise RowError("bad row", f"row has no value for column {column!r} (too few fields)")
    return value.strip()
