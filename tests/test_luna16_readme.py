"""The README's LUNA16 commands, parsed from the README and run as written, in order.

convert volumes -> train -> evaluate --annotations -> predict --format luna16 ->
evaluate --predictions -> report, on the synthetic LUNA16-style case (scans as .mhd,
annotations with diameters, an excluded list, several candidates per nodule, scans
without candidates).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from pipeline.cli import build_parser
from tests.conftest import cli_env
from tests.luna16_helpers import read_rows

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## LUNA16: FROC, CPM and cross-validation"


def section_blocks() -> list[list[str]]:
    """Commands of each ```sh block of the README's LUNA16 section, continuations joined."""
    readme = (ROOT / "README.md").read_text()
    assert SECTION in readme
    text = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("\n```", 1)[0] for b in text.split("```sh\n")[1:]]
    return [[c for c in b.replace("\\\n", " ").splitlines() if c.strip()] for b in blocks]


def test_every_documented_luna16_command_parses():
    commands = [c for block in section_blocks() for c in block if c.startswith("pipeline ")]
    assert {shlex.split(c)[1] for c in commands} >= {
        "convert",
        "train",
        "evaluate",
        "predict",
        "cv",
    }
    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[1:])
        assert callable(args.func)


def run(command: str, cwd: Path):
    import subprocess

    argv = shlex.split(command)
    head = {"python": [sys.executable], "pipeline": [sys.executable, "-m", "pipeline"]}
    done = subprocess.run(
        head[argv[0]] + argv[1:], cwd=cwd, env=cli_env(cwd), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_readme_luna16_demo_runs_end_to_end(tmp_path):
    demo = section_blocks()[0]
    assert demo[0].startswith("python scripts/luna16_case.py")
    for name in ("scripts", "configs"):  # the commands use repository-relative paths
        (tmp_path / name).symlink_to(ROOT / name)
    outputs = {}
    for command in demo:
        outputs.setdefault(shlex.split(command)[1], []).append(run(command, tmp_path))

    from_checkpoint, from_file = (json.loads(o.stdout) for o in outputs["evaluate"])
    val_scans = {r["seriesuid"] for r in read_rows(tmp_path / "luna16_shards/scans-val.csv")}
    nodules = [r for r in read_rows(tmp_path / "luna16_demo/annotations.csv")]
    with_marks = {r["seriesuid"] for r in read_rows(tmp_path / "luna16_demo/candidates.csv")}
    assert val_scans - with_marks, "the val split should hold a scan without candidates"
    for result in (from_checkpoint, from_file):
        assert result["scans"] == len(val_scans)
        assert result["hits"] + result["misses"] == sum(
            r["seriesuid"] in val_scans for r in nodules
        )
        assert result["misses"] >= 1  # the nodules of the scan without candidates
        assert result["double_detections"] >= 1 and result["ignored"] >= 1
        low, high = result["ci"]["cpm"]
        assert low <= result["cpm"] <= high
    # The checkpoint's predictions and the submission written from them score the same.
    assert from_file["cpm"] == pytest.approx(from_checkpoint["cpm"], abs=1e-9)
    assert "cpm_candidate" in from_checkpoint and "cpm_candidate" not in from_file

    submission = (tmp_path / "submission.csv").read_text().splitlines()
    assert submission[0] == "seriesuid,coordX,coordY,coordZ,probability"
    assert {line.split(",")[0] for line in submission[1:]} <= val_scans
    assert "plots/froc.png" in outputs["report"][0].stdout  # the LUNA16 FROC, from evaluate
