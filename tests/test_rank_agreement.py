"""Ranks resume from one checkpoint or not at all: rank 0 chooses, everyone loads that file.

A node-local (or lagging) run dir is simulated for real: two srun-style task processes
(the variables srun sets per task), each started in its own working directory, with the
relative `run.dir=run`. Rank 0's `run/` holds a checkpoint; rank 1's holds none, or a
different one. Every rank must stop with one line naming rank 1 and the path, exit 2,
without waiting for a collective timeout and without training a single step.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY, cli_env, run_cli
from tests.faults import small_shards
from tests.reliability import record
from tests.test_distributed import free_slurm_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Shards, a run dir stopped at step 4, and one stopped at step 2 (same config)."""
    tmp = tmp_path_factory.mktemp("agree")
    shards = small_shards(tmp / "shards", n_train=128, n_val=32)
    made = []
    for steps in (4, 2):
        cwd = tmp / f"made{steps}"
        cwd.mkdir()
        result = run_cli(_args(shards, f"train.max_steps={steps}"), cli_env(tmp), cwd=cwd)
        assert result.returncode == 0, result.stderr[-3000:]
        made.append(cwd / "run")
    return shards, made[0], made[1]


def _args(shards: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(TINY), f"data.train={shards}/train-*.tar",
            f"data.val={shards}/val-*.tar", "run.dir=run", "train.batch_size=8",
            "train.eval_every=0", "dist.timeout_s=120", *extra]  # fmt: skip


def launch_tasks(args: list[str], cwds: list[Path], tmp: Path, timeout: float = 180):
    """One `python -m pipeline` per rank, as srun starts them, rank r in cwds[r]."""
    job_id = free_slurm_port() - 20000
    procs = []
    for rank, cwd in enumerate(cwds):
        env = cli_env(tmp, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                      SLURM_NTASKS=str(len(cwds)), SLURM_STEP_ID="0", SLURM_JOB_ID=str(job_id),
                      SLURM_JOB_NODELIST="localhost")  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=env,
                                      cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))  # fmt: skip
    started = time.monotonic()
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs, strict=True)], (
        time.monotonic() - started
    )


@pytest.mark.parametrize("rank1_sees", ["no checkpoint", "another checkpoint"])
def test_rank_that_sees_other_run_dir_content_stops_every_rank(setup, rank1_sees, tmp_path):
    shards, at4, at2 = setup
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    shutil.copytree(at4, cwds[0] / "run")
    if rank1_sees == "another checkpoint":
        shutil.copytree(at2, cwds[1] / "run")
    else:
        cwds[1].mkdir()
    results, seconds = launch_tasks(_args(shards, "train.max_steps=8"), cwds, tmp_path)
    for rank, (code, out, err) in enumerate(results):
        assert code == 2, f"rank {rank}: {err[-3000:]}"
        assert "Traceback" not in err, err[-3000:]
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1, err[-3000:]
        assert errors[0].startswith(f"[rank {rank}] pipeline train: error: rank 1 ")
        assert "run/checkpoints/last.pt" in errors[0], errors[0]
        assert "step " not in out  # no training step, no "done"
    # Rank 1's copy was never overwritten, and rank 0's checkpoint is still step 4.
    from pipeline import checkpoint

    assert checkpoint.load(cwds[0] / "run" / "checkpoints" / "last.pt")["step"] == 4
    assert seconds < 60, seconds
    record(f"resume: rank 1 sees {rank1_sees} in run.dir", exit_code=[r[0] for r in results],
           seconds=seconds, lines=sum(len(r[2].strip().splitlines()) for r in results),
           checkpoint_ok=True, launcher="srun-style")  # fmt: skip
