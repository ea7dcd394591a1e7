"""What a SLURM task of W&B sweep agents needs to resume its own run after a requeue.

`slurm/sweep.sbatch` sets PIPELINE_SWEEP_TASK_FILE. A `pipeline train` started there by a
W&B agent records in it how it was started (its arguments, the agent's WANDB_* settings
minus any secret, its run dir) and how it ended. A requeued task finds a run that did not
finish and starts it again itself, with the same run id and `WANDB_RESUME=allow`, instead
of asking the agent for a new one; the run resumes from its checkpoint in its run dir.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TASK_FILE_ENV = "PIPELINE_SWEEP_TASK_FILE"
# What identifies the run and where it logs; never WANDB_API_KEY or other secrets.
KEPT_ENV = (
    "WANDB_SWEEP_ID",
    "WANDB_RUN_ID",
    "WANDB_PROJECT",
    "WANDB_ENTITY",
    "WANDB_SWEEP_PARAM_PATH",
    "WANDB_RUN_GROUP",
    "WANDB_MODE",
    "WANDB_DIR",
)


def task_file() -> Path | None:
    path = os.environ.get(TASK_FILE_ENV)
    return Path(path) if path and os.environ.get("WANDB_SWEEP_ID") else None


def _write(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)  # the batch shell may read it at any moment (its USR1 trap)


def started(argv: list[str], run_dir: str | Path) -> None:
    """Record a run an agent started in this task (rank 0 of the run calls it)."""
    path = task_file()
    if path is None:
        return
    env = {k: os.environ[k] for k in KEPT_ENV if k in os.environ}
    _write(
        path,
        {"argv": argv, "env": env, "run_dir": str(Path(run_dir).resolve()), "state": "running"},
    )


def ended(stopped: bool) -> None:
    """`stopped` (checkpointed on a stop request: resume it) or `finished`."""
    path = task_file()
    if path is None or not path.is_file():
        return
    record = json.loads(path.read_text())
    record["state"] = "stopped" if stopped else "finished"
    _write(path, record)
