"""Rows of the README's reliability table, recorded by the tests that exercise each fault.

A test that provokes a fault (a failing rank, a second job on a run dir, a full disk, ...)
measures what a user would see and calls `record(...)`. Rows are appended as JSON lines to
the file named by $PIPELINE_RELIABILITY_JSONL when it is set (a no-op otherwise), and
`scripts/reliability_table.py` turns that file into the README's table. The test itself
asserts that the row passes; the table only reports what was measured.
"""

from __future__ import annotations

import json
import os
import time

ROWS_ENV = "PIPELINE_RELIABILITY_JSONL"


def record(
    fault: str,
    *,
    exit_code: int | list[int],
    seconds: float | None,
    lines: int,
    checkpoint_ok: bool | None,
    launcher: str = "",
) -> None:
    """One fault as a user meets it.

    exit_code: what the command (or every rank) exited with; seconds: until every process
    had exited (None where only one process runs and it is not measured); lines: lines
    printed to stderr; checkpoint_ok: whether the last good checkpoint survived (None where
    the fault happens before any checkpoint exists); launcher: `torchrun`, `srun`, `cli`...
    """
    path = os.environ.get(ROWS_ENV)
    if not path:
        return
    row = {
        "fault": fault,
        "launcher": launcher,
        "exit_code": exit_code,
        "seconds": None if seconds is None else round(float(seconds), 1),
        "lines": int(lines),
        "checkpoint_ok": checkpoint_ok,
        "recorded": time.strftime("%Y-%m-%d"),
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
