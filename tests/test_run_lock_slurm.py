"""Two real SLURM jobs on one run dir: the second is refused in one line, the first goes on.

Needs the local cluster (`bash scripts/slurm_cluster.sh up`).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from pipeline.run_lock import LOCK_NAME
from tests.conftest import TINY, cli_env
from tests.reliability import record
from tests.slurm_helpers import (
    PARTITION,
    cancel,
    job_info,
    log_text,
    requires_slurm,
    submit,
    wait_for_state,
    wait_until,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow, requires_slurm]
SBATCH = ["--cpus-per-task=1", "--time=00:05:00", "--gpus-per-node=1"]


def test_second_sbatch_on_a_run_dir_in_use_fails_naming_the_first_job(tiny_shards, tmp_path):
    run = tmp_path / "run"
    env = cli_env(tmp_path, PATH=f"{Path(sys.executable).parent}:{cli_env(tmp_path)['PATH']}")
    env.update(SBATCH_PARTITION=PARTITION, RUN_DIR=str(run))
    args = ["--config", str(TINY), f"data.train={tiny_shards}/train-*.tar",
            "train.eval_every=0", "train.log_every=1"]  # fmt: skip
    first = submit("train.sbatch", *args, "train.max_steps=100000", sbatch_args=SBATCH,
                   env=env, log_dir=tmp_path)  # fmt: skip
    second = None
    try:
        wait_for_state(first, "RUNNING", timeout=120)
        wait_until(lambda: (run / "metrics.jsonl").exists(), 180, "the first job to train", first)
        assert (run / LOCK_NAME).exists()
        submitted = time.monotonic()
        second = submit("train.sbatch", *args, "train.max_steps=4", sbatch_args=SBATCH,
                        env=env, log_dir=tmp_path)  # fmt: skip
        info = wait_for_state(second, "FAILED", timeout=180)
        seconds = time.monotonic() - submitted
        log = log_text(second)
        # `pipeline train --preflight` refuses it before torchrun starts: exit 2, one line.
        assert info["ExitCode"].startswith("2:"), info
        lines = log.strip().splitlines()
        errors = [line for line in lines if line.startswith("pipeline train: error:")]
        assert len(errors) == 1 and lines == errors, lines
        assert re.search(rf"in use by pid \d+ on \S+ \(SLURM job {first}, restart 0\)", errors[0])
        # The first job never noticed: it still trains, and stops cleanly on request.
        assert job_info(first)["JobState"] == "RUNNING"
        (run / "STOP").touch()
        wait_for_state(first, "COMPLETED", timeout=180)
    finally:
        for job in (first, second):
            if job:
                cancel(job)
    assert not (run / LOCK_NAME).exists()
    assert (run / "checkpoints" / "last.pt").exists()
    record("second sbatch on a live run dir (refused by the preflight, before torchrun)",
           exit_code=int(info["ExitCode"].split(":")[0]), seconds=seconds,
           lines=len(lines), checkpoint_ok=True, launcher="sbatch+torchrun")  # fmt: skip
