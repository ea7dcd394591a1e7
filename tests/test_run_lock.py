"""One job per run dir: real `pipeline train` processes contend for RUN_DIR/run.lock."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import checkpoint, run_lock
from pipeline.run_lock import LOCK_NAME, RunDirInUse, RunLock
from tests.conftest import ROOT, cli_env, run_cli, run_torchrun, train_args
from tests.reliability import record


def _plant(run: Path, age_s: float = 0.0, **fields) -> Path:
    """A lock file as another holder would have left it, its mtime `age_s` in the past."""
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    holder = {
        "host": "other-host.example",
        "pid": 4_000_000,
        "pid_start": None,
        "slurm_job_id": None,
        "slurm_restart": 0,
        "started": "2026-12-01T00:00:00Z",
        "lease_s": 90.0,
        "token": "planted",
        **fields,
    }
    path = run / LOCK_NAME
    path.write_text(json.dumps(holder))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _short(shards: Path, run: Path) -> list[str]:
    return train_args(shards, run, "train.max_steps=2", "train.eval_every=0")


@pytest.mark.slow
def test_second_train_on_a_live_run_dir_exits_2_naming_the_holder(small_data, tmp_path):
    run = tmp_path / "run"
    env = cli_env(tmp_path)
    first = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *train_args(small_data, run, "train.max_steps=100000",
                                                       "train.eval_every=0")],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists() and first.poll() is None:
            assert time.monotonic() < deadline, "the first run never started"
            time.sleep(0.2)
        assert (run / LOCK_NAME).exists() and first.poll() is None
        started = time.monotonic()
        second = run_cli(_short(small_data, run), env, 120)
        seconds = time.monotonic() - started
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2, second.stderr
        assert len(lines) == 1 and "Traceback" not in second.stderr, lines
        assert f"pid {first.pid} on {socket.gethostname()}" in lines[0], lines[0]
        assert f"run.dir {run} is in use" in lines[0]
        # The first run is untouched and stops cleanly; its lock goes with it.
        (run / "STOP").touch()
        assert first.wait(120) == 0, first.stderr.read()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert not (run / LOCK_NAME).exists()
    assert (run / "checkpoints" / "last.pt").exists()
    ends = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in ends].count("end") == 1
    record("second train on a live run dir (the first one's checkpoints and log kept)",
           exit_code=second.returncode, seconds=seconds, lines=len(lines), checkpoint_ok=True,
           launcher="cli")  # fmt: skip


@pytest.mark.slow
def test_two_ranks_on_a_locked_run_dir_both_stop_at_once(small_data, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / LOCK_NAME).write_text(json.dumps(run_lock.holder_record()))  # this test: alive
    started = time.monotonic()
    result = run_torchrun(2, _short(small_data, run), cli_env(tmp_path), 120)
    seconds = time.monotonic() - started
    errors = [line for line in result.stderr.splitlines() if " is in use by " in line]
    assert result.returncode != 0 and seconds < 60, result.stderr[-3000:]
    # Rank 0 read the lock; rank 1 learned it by broadcast (it never touches the lock), so
    # both raise at once. The first to exit is the one torchrun names; the agent may end
    # the other before it prints, so the holder is named at least once and by no rank twice.
    ranks = [e.split("]")[0] for e in errors]
    assert ranks and set(ranks) <= {"[rank 0", "[rank 1"}, result.stderr[-3000:]
    assert len(ranks) == len(set(ranks)), errors
    assert all(str(run) in e and f"pid {os.getpid()}" in e for e in errors), errors
    assert all(f"in use by pid {os.getpid()}" in e for e in errors)
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()  # left alone


def test_lock_of_a_dead_pid_is_taken_over_with_a_warning(small_data, tmp_path):
    run = tmp_path / "run"
    _plant(run, host=socket.gethostname(), pid=_dead_pid())
    result = run_cli(_short(small_data, run), cli_env(tmp_path), 120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "taking over the lock" in result.stderr and "is not running" in result.stderr
    assert not (run / LOCK_NAME).exists()  # released at the end


def test_lease_of_another_host_blocks_until_it_expires(small_data, tmp_path):
    run = tmp_path / "run"
    env = cli_env(tmp_path)
    _plant(run, age_s=10)  # renewed 10 s ago: a live holder elsewhere
    live = run_cli(_short(small_data, run), env, 120)
    assert live.returncode == 2, live.stderr[-3000:]
    assert "in use by pid 4000000 on other-host.example" in live.stderr
    assert len(live.stderr.strip().splitlines()) == 1
    assert json.loads((run / LOCK_NAME).read_text())["token"] == "planted"

    _plant(run, age_s=3600)  # not renewed for an hour: its holder is gone
    expired = run_cli(_short(small_data, run), env, 120)
    assert expired.returncode == 0, expired.stderr[-3000:]
    assert "taking over the lock of pid 4000000 on other-host.example" in expired.stderr
    assert "lease expired" in expired.stderr


def test_requeued_slurm_job_takes_over_its_own_lock(small_data, tmp_path):
    run = tmp_path / "run"
    # The first start ran on another node and was killed without releasing; its lease is
    # fresh, so only the job id can tell that this is the same job, requeued.
    _plant(run, age_s=5, slurm_job_id="4242", slurm_restart=0)
    other_job = run_cli(
        _short(small_data, run), cli_env(tmp_path, SLURM_JOB_ID="999", SLURM_RESTART_COUNT="1")
    )
    assert other_job.returncode == 2 and "SLURM job 4242, restart 0" in other_job.stderr
    requeued = run_cli(
        _short(small_data, run), cli_env(tmp_path, SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="1")
    )
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "SLURM job 4242 was requeued (restart 1)" in requeued.stderr


def _contend(run_dir: str, results, done) -> None:
    try:
        lock = RunLock(Path(run_dir))
        lock.acquire()
    except RunDirInUse:
        results.put("refused")
        return
    results.put("won")
    done.wait(60)  # a live holder until every contender has tried
    lock.release()


def _no_hard_links(src, dst):
    raise OSError(errno.ENOTSUP, "Operation not supported", str(dst))


@pytest.mark.parametrize("filesystem", ["hard links", "no hard links"])
def test_exactly_one_of_many_simultaneous_contenders_gets_the_lock(
    tmp_path, monkeypatch, filesystem
):
    if filesystem == "no hard links":  # as on some FUSE mounts; none here to run on
        monkeypatch.setattr(os, "link", _no_hard_links)
    ctx = multiprocessing.get_context("fork")
    results, done = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), results, done)) for _ in range(8)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=60) for _ in procs)
    done.set()
    for p in procs:
        p.join(30)
    assert outcomes == ["refused"] * 7 + ["won"]
    assert list(tmp_path.iterdir()) == []  # released, and no temp files left


def test_lock_is_released_after_an_error_and_after_a_sigterm_stop(small_data, tmp_path):
    env = cli_env(tmp_path)
    # An error after the lock is taken: the explicit checkpoint to resume from is missing
    # (data and model errors come earlier, before the run dir is touched).
    missing = tmp_path / "missing.pt"
    failed = run_cli([*_short(small_data, tmp_path / "err"), f"checkpoint.resume={missing}"], env)
    assert failed.returncode == 2 and str(missing) in failed.stderr, failed.stderr[-2000:]
    assert (tmp_path / "err").is_dir()  # created when the lock was taken
    assert not (tmp_path / "err" / LOCK_NAME).exists()

    # SIGTERM as soon as the lock is taken, still in set-up (model, tracker, loaders): a
    # preemption then is a stop request like any other, not a death (-15) without a
    # checkpoint, and the lock is released.
    run = tmp_path / "term"
    args = train_args(small_data, run, "train.max_steps=100000", "train.eval_every=0",
                      "train.log_every=2")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run / LOCK_NAME).exists():
            assert proc.poll() is None and time.monotonic() < deadline, "never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        code, stderr = proc.wait(120), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0 and "stopped on request (SIGTERM)" in stderr, stderr[-3000:]
    assert checkpoint.load(run / "checkpoints" / "last.pt")["step"] == 2  # the first agreed step
    assert not (run / LOCK_NAME).exists()


def test_holder_renews_its_lease_while_it_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "LEASE_S", 0.6)  # renewed every 0.1 s instead of 15 s
    lock = RunLock(tmp_path)
    lock.acquire()
    path = tmp_path / LOCK_NAME
    try:
        old = time.time() - 100
        os.utime(path, (old, old))  # as if not renewed for 100 s
        time.sleep(0.5)
        assert time.time() - path.stat().st_mtime < 5  # the lease thread touched it
    finally:
        lock.release()
    assert not path.exists()


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    from tests.faults import small_shards

    return small_shards(tmp_path_factory.mktemp("lock_shards"), n_train=256, n_val=32)


def test_preflight_refuses_a_live_lock_in_one_line_and_writes_nothing(small_data, tmp_path):
    # What the SLURM scripts run before torchrun (`pipeline train --preflight`).
    run, env = tmp_path / "run", cli_env(tmp_path)
    _plant(run, age_s=10)  # a live holder on another host
    live = run_cli(["train", "--preflight", *_short(small_data, run)[1:]], env, 60)
    assert live.returncode == 2, live.stderr[-3000:]
    assert live.stderr.strip().splitlines() == [
        line for line in live.stderr.splitlines() if "in use by pid 4000000 on other-host" in line
    ]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", LOCK_NAME]

    _plant(run, age_s=3600)  # a stale one: the run itself will take it over
    stale = run_cli(["train", "--preflight", *_short(small_data, run)[1:]], env, 60)
    assert stale.returncode == 0 and not stale.stderr.strip(), stale.stderr
    assert json.loads((run / LOCK_NAME).read_text())["token"] == "planted"  # left alone

    fresh = tmp_path / "fresh"
    free = run_cli(["train", "--preflight", *_short(small_data, fresh)[1:]], env, 60)
    assert free.returncode == 0 and not fresh.exists(), free.stderr
    bad = run_cli(["train", "--preflight", *_short(small_data, fresh)[1:], "optim.lr=-1"], env)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
