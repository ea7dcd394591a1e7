"""Helpers for tests that submit the project's sbatch scripts to the local SLURM cluster.

The cluster comes from `bash scripts/slurm_cluster.sh up` (2 nodes, partition `debug` or
$PIPELINE_SLURM_PARTITION). There is no slurmdbd, so job state comes from
`scontrol show job`, which keeps finished jobs for 30 minutes (MinJobAge).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
PARTITION = os.environ.get("PIPELINE_SLURM_PARTITION", "debug")
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
     "DEADLINE", "PREEMPTED"}
)  # fmt: skip

requires_slurm = pytest.mark.skipif(
    shutil.which("sbatch") is None,
    reason="SLURM is not installed (sbatch not found); run `bash scripts/slurm_cluster.sh up`",
)


def job_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The submitting environment: ours, with this venv's bin first on PATH.

    sbatch exports it to the job (--export=ALL), so `torchrun` and `python` resolve to the
    interpreter running the tests, the same way a user's activated venv would.
    """
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["SBATCH_PARTITION"] = PARTITION
    env.update(extra or {})
    return env


def submit(
    script: str | Path,
    *overrides: str,
    sbatch_args: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
) -> str:
    """`sbatch [sbatch_args] SCRIPT [overrides]`; returns the job id.

    `script` is a name in slurm/ or a path. With `log_dir`, the job runs there and its log
    is `log_dir/<job name>-<job id>.out`.
    """
    path = Path(script) if os.sep in str(script) else SLURM_DIR / script
    cmd = ["sbatch", "--parsable", *sbatch_args]
    if log_dir is not None:
        cmd += [f"--chdir={log_dir}", f"--output={log_dir}/%x-%j.out"]
    cmd += [str(path), *overrides]
    out = subprocess.run(
        cmd, env=dict(env) if env else job_env(), capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, f"{' '.join(cmd)} failed: {out.stderr.strip()}"
    return out.stdout.strip().split(";")[0]


def job_info(job_id: str) -> dict[str, str]:
    """Fields of `scontrol show job` (JobState, Restarts, NodeList, StdOut, ...); {} if unknown."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
    )
    if out.returncode != 0:
        return {}
    # Split before each ` Key=` so values that contain spaces (paths, reasons) stay whole.
    parts = re.split(r"\s+(?=[A-Za-z][A-Za-z:/_]*=)", out.stdout.strip())
    return dict(p.split("=", 1) for p in parts if "=" in p)


def job_state(job_id: str) -> str:
    return job_info(job_id).get("JobState", "UNKNOWN")


def log_path(job_id: str) -> Path:
    return Path(job_info(job_id)["StdOut"])


def log_text(job_id: str) -> str:
    try:
        return log_path(job_id).read_text(errors="replace")
    except (KeyError, OSError):
        return "<no job log>"


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, job_id: str = "") -> None:
    """Poll `predicate` until true; on timeout fail with the job's state and log tail."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            detail = f"\njob {job_id}: {job_info(job_id)}\nlog:\n{log_text(job_id)[-3000:]}"
            pytest.fail(
                f"timed out after {timeout:.0f}s waiting for {what}{detail if job_id else ''}"
            )
        time.sleep(0.5)


def wait_for_state(job_id: str, states: str | Iterable[str], timeout: float) -> dict[str, str]:
    """Wait until the job is in one of `states`; fail early if it ends in any other state."""
    wanted = {states} if isinstance(states, str) else set(states)
    info: dict[str, str] = {}

    def reached() -> bool:
        nonlocal info
        info = job_info(job_id)
        state = info.get("JobState", "UNKNOWN")
        if state in TERMINAL_STATES and state not in wanted:
            pytest.fail(
                f"job {job_id} ended {state} (wanted {sorted(wanted)}): "
                f"{info.get('Reason')}\nlog:\n{log_text(job_id)[-3000:]}"
            )
        return state in wanted

    wait_until(reached, timeout, f"job {job_id} to reach {sorted(wanted)}", job_id)
    return info


def scontrol(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30)


def cancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


def start_requeued_now(job_id: str, timeout: float = 30) -> None:
    """Make a requeued job eligible at once instead of after its ~120 s BeginTime hold.

    slurmd revokes a job's credential when a start ends and compares times in whole
    seconds, so a restart within the same second is killed ("Job credential revoked",
    state FAILED). Wait until 2 s after the requeue (the job's new SubmitTime) first.
    """
    requeued = datetime.fromisoformat(job_info(job_id)["SubmitTime"]).timestamp()
    time.sleep(max(0.0, requeued + 2 - time.time()))
    wait_until(
        lambda: scontrol("update", f"JobId={job_id}", "StartTime=now").returncode == 0,
        timeout,
        "the requeued job to accept StartTime=now",
        job_id,
    )


DUMMY_TRAINER = '''\
"""Stand-in for `pipeline train` under torchrun (written by tests/slurm_helpers.py).

Joins the gloo group from torchrun's env://, all-reduces, records where each rank ran,
and, with wait_for_stop=1, follows the trainer's stop-file contract: rank 0 polls
RUN_DIR/STOP, broadcasts the decision, a checkpoint is written, STOP is deleted, exit 0.
A start that finds checkpoints/last.pt records that it resumed and finishes at once.
"""
import os, socket, sys, time
from pathlib import Path

import torch
import torch.distributed as dist

assert sys.argv[1] == "train", sys.argv
opts = dict(a.split("=", 1) for a in sys.argv[2:])
run = Path(opts["run.dir"])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
total = torch.ones(1)
dist.all_reduce(total)
start = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
ranks = run / "ranks"
ranks.mkdir(parents=True, exist_ok=True)
node = os.environ.get("SLURMD_NODENAME", "")
# Write then rename: the test polls these files and must never read one half-written.
tmp = ranks / f".start{start}-rank{rank}.tmp"
tmp.write_text(f"{rank},{world},{int(total.item())},{socket.gethostname()},{node}\\n")
os.replace(tmp, ranks / f"start{start}-rank{rank}.txt")
if rank == 0:
    (run / "argv.txt").write_text(" ".join(sys.argv[1:]))
ckpt = run / "checkpoints" / "last.pt"
if opts.get("wait_for_stop") == "1":
    if ckpt.exists():
        (run / f"resumed-rank{rank}").write_text(ckpt.read_text())
    else:
        deadline = time.monotonic() + float(opts.get("stop_timeout", "120"))
        while True:
            flag = torch.tensor([int(rank == 0 and (run / "STOP").exists())])
            dist.broadcast(flag, 0)
            if flag.item():
                break
            if time.monotonic() > deadline:
                sys.exit(3)
            time.sleep(0.2)
        dist.barrier()
        if rank == 0:
            ckpt.parent.mkdir(exist_ok=True)
            ckpt.write_text(f"stopped at start {start}, world {world}")
            (run / "STOP").unlink()
dist.barrier()
dist.destroy_process_group()
'''


def write_dummy_trainer(directory: Path, module: str = "dummytrain") -> dict[str, str]:
    """Write the stand-in trainer package; returns env vars that make the scripts run it."""
    pkg = directory / module
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(DUMMY_TRAINER)
    pythonpath = os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))
    # The preflight checks a real pipeline config; the stand-in takes none.
    return {"PIPELINE_MODULE": module, "PYTHONPATH": pythonpath, "PIPELINE_PREFLIGHT": "0"}


def rank_records(run_dir: Path, start: int = 0) -> list[dict[str, str]]:
    """What each rank of one start wrote: rank, world, all_reduce total, hostname, node."""
    keys = ("rank", "world", "total", "hostname", "node")
    files = sorted((run_dir / "ranks").glob(f"start{start}-rank*.txt"))
    return [dict(zip(keys, f.read_text().strip().split(","), strict=True)) for f in files]
