"""A stand-in for `wandb agent` in the SLURM sweep test: no W&B server can run here.

    python tests/sweep_agent_standin.py --count N SWEEP.yaml

For each of its N runs it does what the agent does for a run: takes the next point of the
sweep (grid order, shared by all tasks through SWEEP.yaml.taken), sets WANDB_SWEEP_ID and
a fresh WANDB_RUN_ID, and runs the sweep file's command with `--key=value` arguments.
The command is built by pipeline.sweep.point_command, as `pipeline sweep` builds it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

from pipeline import sweep


def next_point(space_path: Path, total: int) -> int | None:
    taken_path = space_path.with_name(space_path.name + ".taken")
    with open(space_path.with_name(space_path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        taken = json.loads(taken_path.read_text()) if taken_path.is_file() else []
        if len(taken) >= total:
            return None
        taken.append(len(taken))
        taken_path.write_text(json.dumps(taken))
        return taken[-1]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("sweep")
    args = parser.parse_args()
    space = sweep.load_space(args.sweep)
    points = sweep.points(space)
    for _ in range(args.count):
        index = next_point(Path(args.sweep), len(points))
        if index is None:
            return 0
        env = {
            **os.environ,
            "WANDB_SWEEP_ID": Path(args.sweep).stem,
            "WANDB_RUN_ID": secrets.token_hex(4),
        }
        command = sweep.point_command(space, points[index], None)
        print(f"standin agent: point {index}: {' '.join(command)}", flush=True)
        code = subprocess.run(command, env=env, check=False).returncode
        print(f"standin agent: run exited {code}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
