"""`pipeline ... | head`: a reader that goes away ends the command quietly, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, cli_env, run_cli
from tests.faults import small_shards
from tests.reliability import record


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("closed_stdout")
    data = small_shards(tmp / "data", n_train=64, n_val=32)
    run = tmp / "run"
    args = ["train", "--config", str(TINY), f"data.train={data}/train-*.tar",
            f"data.val={data}/val-*.tar", f"run.dir={run}", "train.max_steps=2"]  # fmt: skip
    done = run_cli(args, cli_env(tmp), 180)
    assert done.returncode == 0, done.stderr[-3000:]
    return data, run / "checkpoints" / "last.pt"


def _with_closed_stdout(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the CLI with a stdout pipe whose reader has already gone (head exited)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, "-m", "pipeline", *args],
            stdout=write, stderr=subprocess.PIPE, env=env, cwd=ROOT, text=True, timeout=180,
        )  # fmt: skip
    finally:
        os.close(write)


@pytest.mark.parametrize("command", ["check-shards --json", "check-shards", "evaluate"])
def test_a_closed_stdout_exits_quietly(trained, tmp_path, command):
    data, checkpoint = trained
    args = {
        "check-shards --json": ["check-shards", "--json", f"{data}/*.tar"],
        "check-shards": ["check-shards", f"{data}/*.tar"],
        "evaluate": ["evaluate", "--checkpoint", str(checkpoint)],
    }[command]
    result = _with_closed_stdout(args, cli_env(tmp_path))
    noise = result.stderr.splitlines()  # evaluate's progress line only
    record(f"`pipeline {command}` into a closed pipe (as under `head`)", exit_code=result.returncode,
           seconds=None, lines=len(noise), checkpoint_ok=None, launcher="cli")  # fmt: skip
    assert result.returncode == 141, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
    assert "Exception ignored" not in result.stderr
    assert all(line.startswith("evaluate: ") for line in noise), noise
