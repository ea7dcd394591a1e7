"""A dead, failing or hung rank ends the whole job within a bound, and torchrun restarts resume.

Rank 1 misbehaves at a chosen training step through `tests.faults:FaultyNet` (SIGKILL
itself, raise, or hang), under torchrun with gloo on the CPU. The job must end non-zero
well before the 30-minute default collective timeout, with the culprit in the log.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline import checkpoint
from tests.conftest import cli_env, run_torchrun, train_args
from tests.faults import small_shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return small_shards(tmp_path_factory.mktemp("crash_shards"), n_train=128, n_val=32)


def _args(shards: Path, run_dir: Path, fault: str, *extra: str) -> list[str]:
    return train_args(
        shards,
        run_dir,
        "model.target=tests.faults:FaultyNet",
        f"model.kwargs={{fault: {fault}, at: 7, rank: 1}}",
        "train.batch_size=8",
        "train.max_steps=12",
        "train.eval_every=0",
        "train.log_every=4",
        "checkpoint.every_steps=4",
        "dist.timeout_s=20",
        *extra,
    )


def _timed(args: list[str], env: dict, extra: list[str] = ()) -> tuple:
    started = time.monotonic()
    result = run_torchrun(2, args, env, timeout=240, extra=list(extra))
    return result, time.monotonic() - started


def test_sigkilled_rank_ends_the_job_nonzero_within_the_bound(shards, tmp_path):
    result, seconds = _timed(_args(shards, tmp_path / "run", "kill"), cli_env(tmp_path))
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    assert seconds < 60, f"took {seconds:.0f} s"
    # torchrun's failure summary names the rank and the signal.
    assert "rank      : 1" in log or "rank: 1" in log, log[-3000:]
    assert "SIGKILL" in log or "Signal 9" in log, log[-3000:]


def test_restarted_workers_resume_from_the_last_checkpoint_and_finish(shards, tmp_path):
    run_dir = tmp_path / "run"
    # Without this, torch 2.13's restarted workers can read the dead attempt's addresses
    # from torchrun's shared store and fail to connect (pytorch#135712).
    env = cli_env(tmp_path, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    result, _ = _timed(_args(shards, run_dir, "kill"), env, extra=["--max-restarts=1"])
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    # Killed during step 7: the step-4 checkpoint is the last one; the restart resumes there.
    assert "resumed from step 4" in log, log[-3000:]
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["step"] == 12
    events = [
        json.loads(line)["event"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert events.count("resume") == 1


def test_exception_on_one_rank_ends_the_job_with_its_rank_in_the_log(shards, tmp_path):
    result, seconds = _timed(_args(shards, tmp_path / "run", "raise"), cli_env(tmp_path))
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    assert seconds < 60, f"took {seconds:.0f} s"
    assert "[rank 1] ERROR" in log, log[-3000:]
    assert "injected fault on rank 1 at training step 7" in log


def test_hung_rank_ends_the_job_after_dist_timeout(shards, tmp_path):
    args = _args(shards, tmp_path / "run", "hang", "dist.timeout_s=5")
    result, seconds = _timed(args, cli_env(tmp_path))
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    # Rank 0 gives up after dist.timeout_s (not NCCL's 30 min); torchrun then stops rank 1.
    assert seconds < 60, f"took {seconds:.0f} s"
    assert "[rank 0] ERROR" in log, log[-3000:]
    assert "Timed out waiting 5000ms" in log
