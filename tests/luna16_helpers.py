"""The synthetic LUNA16-style case (scripts/luna16_case.py) and its tiny 3D overrides."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# 24^3 patches with crops 8/16/24: the tiny config's model, in 3D, in seconds.
TINY_3D = ["data.dims=3", "data.scales=[8,16,24]"]


def make_case(out: Path, **kwargs) -> dict:
    spec = importlib.util.spec_from_file_location("luna16_case", ROOT / "scripts/luna16_case.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.make_case(out, **kwargs)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
