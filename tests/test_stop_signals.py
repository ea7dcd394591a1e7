"""SIGTERM to the whole process group (a SLURM time limit, scancel, preemption) saves first.

SLURM signals every process of a job step, so the trainer, its DataLoader worker and (under
torchrun) the agent all get SIGTERM at once, and torchrun then forwards a second SIGTERM to
each worker. The run must still finish its step, save one checkpoint and resume from it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import checkpoint
from tests.conftest import ROOT, cli_env, run_cli, train_args
from tests.faults import small_shards

pytestmark = pytest.mark.slow

LAUNCHERS = {
    "single": [sys.executable, "-m", "pipeline"],
    "torchrun": [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "pipeline",
    ],
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return small_shards(tmp_path_factory.mktemp("signal_shards"), n_train=256, n_val=32)


def _args(shards: Path, run_dir: Path, max_steps: int) -> list[str]:
    return train_args(
        shards,
        run_dir,
        "data.num_workers=1",
        "train.batch_size=8",
        f"train.max_steps={max_steps}",
        "train.eval_every=0",
        "train.log_every=2",
        "checkpoint.every_steps=100000",
    )


def _trained(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return False
    return any(json.loads(line).get("event") == "train" for line in path.read_text().splitlines())


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_sigterm_to_the_process_group_checkpoints_then_resumes(launcher, shards, tmp_path):
    run_dir = tmp_path / "run"
    env = cli_env(tmp_path)
    job = subprocess.Popen(
        [*LAUNCHERS[launcher], *_args(shards, run_dir, max_steps=100000)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a SLURM job step
    )
    try:
        deadline = time.monotonic() + 180
        while not _trained(run_dir):
            assert job.poll() is None, job.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no training step logged in 180 s"
            time.sleep(0.5)
        os.killpg(job.pid, signal.SIGTERM)
        log, _ = job.communicate(timeout=90)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()

    if launcher == "single":
        assert job.returncode == 0, log[-3000:]
    assert "stopped on request (SIGTERM)" in log, log[-3000:]
    for crash in ("DataLoader worker", "ConnectionResetError", "exited unexpectedly"):
        assert crash not in log, log[-3000:]
    saved = checkpoint.load(run_dir / "checkpoints" / "last.pt")["step"]
    assert 0 < saved < 100000

    resumed = run_cli(_args(shards, run_dir, max_steps=saved + 4), env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {saved}" in resumed.stderr, resumed.stderr[-3000:]
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["step"] == saved + 4


def _started(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.exists() and '"event": "start"' in path.read_text()


def _start_single(
    shards: Path, run_dir: Path, env: dict, *extra: str, ready=_trained
) -> subprocess.Popen:
    job = subprocess.Popen(
        [*LAUNCHERS["single"], *_args(shards, run_dir, max_steps=100000), *extra],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # Ctrl-C in a terminal signals the whole foreground group
    )
    deadline = time.monotonic() + 180
    while not ready(run_dir):
        assert job.poll() is None, job.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no training step logged in 180 s"
        time.sleep(0.5)
    return job


def test_first_ctrl_c_checkpoints_like_sigterm(shards, tmp_path):
    run_dir = tmp_path / "run"
    job = _start_single(shards, run_dir, cli_env(tmp_path))
    try:
        os.killpg(job.pid, signal.SIGINT)
        log, _ = job.communicate(timeout=90)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 0, log[-3000:]
    assert "Ctrl-C: stopping at the next agreed step" in log, log[-3000:]
    assert "stopped on request (SIGINT)" in log and "Traceback" not in log, log[-3000:]
    assert 0 < checkpoint.load(run_dir / "checkpoints" / "last.pt")["step"] < 100000


def test_second_ctrl_c_exits_at_once_without_a_checkpoint(shards, tmp_path):
    run_dir = tmp_path / "run"
    # Stop requests are agreed every log_every steps: 400 keeps the first Ctrl-C pending.
    job = _start_single(shards, run_dir, cli_env(tmp_path), "train.log_every=400", ready=_started)
    time.sleep(5)  # well into set-up or the loop: our handlers are installed
    try:
        os.killpg(job.pid, signal.SIGINT)
        time.sleep(1.0)
        started = time.monotonic()
        os.killpg(job.pid, signal.SIGINT)
        log, _ = job.communicate(timeout=60)
        seconds = time.monotonic() - started
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 130, log[-3000:]
    assert "Ctrl-C: stopping at the next agreed step" in log, log[-3000:]  # 1st: our handler
    assert log.strip().splitlines()[-1] == "pipeline train: interrupted", log[-3000:]
    assert "stopped on request" not in log
    assert not (run_dir / "checkpoints" / "last.pt").exists()
    assert seconds < 30, seconds
