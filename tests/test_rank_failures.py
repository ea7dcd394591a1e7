"""A failure on one rank ends every rank, fast, with one line each and the culprit named.

Two real gloo processes, under torchrun and under a real `srun` with one task per rank on
the local SLURM cluster. One rank fails (a dynamic-guard error, a DataError from a loader
worker, a DataError in evaluation, a planted out-of-memory RuntimeError) while the other
waits in a collective with `dist.timeout_s=120`: without the failure watcher it would wait
those 120 s. We measure the seconds from the failing rank's error line until every
process has exited, and check what each rank printed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli_env, train_args
from tests.faults import small_shards
from tests.reliability import record

pytestmark = pytest.mark.slow
BOUND_S = 30.0
ERROR = re.compile(r"\[rank (\d)\] pipeline train: error: (.*)")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = small_shards(tmp_path_factory.mktemp("fail_shards"), n_train=256, n_val=64)
    broken = tmp_path_factory.mktemp("broken_shards")
    for path in out.iterdir():
        shutil.copy(path, broken / path.name)
    # Truncated mid-record: whichever rank reads it raises a DataError (data.on_error=fail).
    for name in ("train-000001.tar", "val-000001.tar"):  # val shard 1 belongs to rank 1
        target = broken / name
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    return out, broken


def _faulty(fault: str) -> list[str]:
    return [
        "model.target=tests.faults:FaultyNet",
        f"model.kwargs={{fault: {fault}, at: 3, rank: 1}}",
    ]


CASES = {
    # kind: (which shards, extra overrides, exit code, what the failing line says)
    "guard": ("good", [*_faulty("bounded"), "guard.dynamic=error", "guard.check_every=1",
                         "train.batch_size=16"], 2,
              "logits of this batch"),
    "data_worker": ("broken", ["data.num_workers=1", "data.on_error=fail"], 2, "shard"),
    "evaluation": ("broken_val", ["train.eval_every=2", "data.on_error=fail"], 2, "val-000001"),
    "out_of_memory": ("good", _faulty("oom"), 1, "out of memory on rank 1"),
}  # fmt: skip


def _launcher(name: str) -> list[str]:
    if name == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "-m", "pipeline"]  # fmt: skip
    partition = os.environ.get("PIPELINE_SLURM_PARTITION", "debug")
    return ["srun", f"--partition={partition}", "--nodes=1", "--ntasks=2", "--overcommit",
            "--kill-on-bad-exit=1", "--export=ALL", sys.executable, "-m", "pipeline"]  # fmt: skip


def run_timed(cmd: list[str], env: dict, timeout: float = 240) -> tuple[int, str, float | None]:
    """(exit code, merged output, seconds from the first error line until the exit)."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines: list[str] = []
    first_error: list[float] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if not first_error and ERROR.search(line):
                first_error.append(time.monotonic())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ended = time.monotonic()
    reader.join(10)
    return proc.returncode, "".join(lines), (ended - first_error[0]) if first_error else None


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
@pytest.mark.parametrize("kind", sorted(CASES))
def test_a_failure_on_one_rank_ends_every_rank_with_one_line_each(kind, launcher, shards, tmp_path):
    if launcher == "srun" and shutil.which("srun") is None:
        pytest.skip(
            "SLURM is not installed (srun not found); run `bash scripts/slurm_cluster.sh up`"
        )
    which, extra, code, says = CASES[kind]
    good, broken = shards
    train = broken if which == "broken" else good
    val = broken if which == "broken_val" else good
    args = train_args(good, tmp_path / "run", "train.batch_size=8", "train.max_steps=40",
                      "train.eval_every=0", "train.log_every=4", "dist.timeout_s=120", *extra)  # fmt: skip
    args = [
        a.replace(f"{good}/train", f"{train}/train").replace(f"{good}/val", f"{val}/val")
        for a in args
    ]
    env = cli_env(tmp_path, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    rc, log, seconds = run_timed([*_launcher(launcher), *args], env)

    errors = [m.groups() for m in map(ERROR.search, log.splitlines()) if m]
    own = [(rank, msg) for rank, msg in errors if not msg.startswith("stopping: rank")]
    echoes = [(rank, msg) for rank, msg in errors if msg.startswith("stopping: rank")]
    assert len(own) == 1, log[-4000:]  # the failing rank's line, printed once
    failed, message = own[0]
    assert says in message, log[-4000:]
    assert [rank for rank, _ in echoes] == [str(1 - int(failed))], log[-4000:]
    assert echoes[0][1].startswith(f"stopping: rank {failed} failed: {message[:40]}")
    assert "Connection closed by peer" not in log and "Broken pipe" not in log, log[-4000:]
    assert f"exitcode: {code}" in log if launcher == "torchrun" else rc == code, log[-4000:]
    assert rc != 0
    assert seconds is not None and seconds < BOUND_S, f"{seconds} s\n{log[-3000:]}"
    record(f"rank failure: {kind.replace('_', ' ')}", exit_code=code, seconds=seconds,
           lines=len(errors), checkpoint_ok=None, launcher=launcher)  # fmt: skip


def _alive_with(marker: str) -> list[int]:
    """Pids of processes whose command line names `marker` (ranks and their workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_text():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_a_killed_torchrun_leaves_no_rank_behind(shards, tmp_path):
    # SIGKILL to torchrun's agent (an OOM-killed launcher, a lost node) orphans the ranks,
    # and its rendezvous store goes with it. Every rank, rank 0 too, must see that and end.
    run = tmp_path / "run"
    args = train_args(shards[0], run, "train.max_steps=100000", "train.eval_every=0",
                      "train.log_every=1", "dist.timeout_s=120")  # fmt: skip
    with open(tmp_path / "stderr.txt", "w") as err:
        agent = subprocess.Popen([*_launcher("torchrun"), *args], env=cli_env(tmp_path),
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while '"train"' not in ((run / "metrics.jsonl").read_text()
                                    if (run / "metrics.jsonl").exists() else ""):  # fmt: skip
                assert time.monotonic() < deadline and agent.poll() is None, "never trained"
                time.sleep(0.2)
            agent.kill()
            agent.wait()
            killed = time.monotonic()
            while _alive_with(str(run)) and time.monotonic() - killed < 90:
                time.sleep(0.2)
            seconds = time.monotonic() - killed
            left = _alive_with(str(run))
        finally:
            for pid in _alive_with(str(run)):
                os.kill(pid, 9)
    lines = [line for line in (tmp_path / "stderr.txt").read_text().splitlines()
             if "rendezvous store) is gone" in line]  # fmt: skip
    assert not left and seconds < BOUND_S, (left, seconds)
    assert {line.split("]")[0] for line in lines} == {"[rank 0", "[rank 1"}, lines
