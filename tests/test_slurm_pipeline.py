"""The real `pipeline train` through the unchanged sbatch scripts on the local 2-node cluster.

Jobs train the tiny config on CPU (gloo); the fake GPUs only decide how many processes a
node runs. Start the cluster first: `bash scripts/slurm_cluster.sh up`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY, cli_env
from slurm_helpers import (
    PARTITION,
    cancel,
    log_text,
    requires_slurm,
    start_requeued_now,
    submit,
    wait_for_state,
    wait_until,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow, requires_slurm]

PREEMPT_STEPS = 30
SIGNAL_AT = 5  # USR1 once metrics.jsonl shows this step: well before PREEMPT_STEPS


@pytest.fixture(scope="module", autouse=True)
def cluster_up() -> None:
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or not {"idle", "mix", "alloc"} & set(out.stdout.split()):
        pytest.fail("the SLURM cluster is not up; run `bash scripts/slurm_cluster.sh up`")


@pytest.fixture(scope="module")
def jobs() -> Iterator[list[str]]:
    """Job ids to cancel at the end, so a failed test does not leave the cluster busy."""
    ids: list[str] = []
    yield ids
    for job_id in ids:
        cancel(job_id)


def job_env(tmp: Path, **extra: str) -> dict[str, str]:
    """What a user's shell exports: the venv first on PATH, one thread per process."""
    path = f"{Path(sys.executable).parent}:{cli_env(tmp)['PATH']}"
    return cli_env(tmp, PATH=path, SBATCH_PARTITION=PARTITION, **extra)


def records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if record["event"] == kind:
            out.append(record)
    return out


def last_step(run_dir: Path) -> int:
    return max((r["step"] for r in records(run_dir, "train")), default=0)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a: Any, b: Any, where: str) -> None:
    """Bitwise equality of nested state dicts (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where} differs (max {float((a - b).abs().max()):.3g})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def tiny(tiny_shards: Path) -> list[str]:
    return ["--config", str(TINY), f"data.train={tiny_shards}/train-*.tar"]


@pytest.fixture(scope="module")
def preempt_overrides(tiny: list[str]) -> list[str]:
    # No validation and a train line per step: short, and the test can see the step.
    return [*tiny, f"train.max_steps={PREEMPT_STEPS}", "train.log_every=1", "data.num_workers=1"]


def test_train_sbatch_trains_two_ranks_on_one_node(tiny, tiny_shards, tmp_path, jobs):
    run = tmp_path / "run"
    job = submit(
        "train.sbatch",
        *tiny,
        f"data.val={tiny_shards}/val-*.tar",
        "train.max_steps=6",
        sbatch_args=["--cpus-per-task=2", "--time=00:05:00", "--gpus-per-node=2"],
        env=job_env(tmp_path, RUN_DIR=str(run)),
        log_dir=tmp_path,
    )
    jobs.append(job)
    info = wait_for_state(job, "COMPLETED", timeout=240)

    system = records(run, "start")[0]["system"]
    assert system["world_size"] == 2 and system["global_batch"] == 64
    assert system["slurm_job_id"] == job
    assert [(r["rank"], r["node"]) for r in system["ranks"]] == [
        (0, info["NodeList"]),
        (1, info["NodeList"]),
    ]
    assert records(run, "end")[0]["steps_per_rank"] == [6, 6]
    assert [r["step"] for r in records(run, "eval")] == [6]
    assert load(run / "checkpoints" / "last.pt")["step"] == 6
    log = log_text(job)
    assert "rank 0/2 via torchrun" in log and "done at step 6" in log


@pytest.fixture(scope="module")
def multinode_job(preempt_overrides, tmp_path_factory, jobs) -> tuple[str, Path]:
    """A 2-node job, uninterrupted: also the reference for the preempted job below."""
    tmp = tmp_path_factory.mktemp("multinode")
    run = tmp / "run"
    job = submit(
        "multinode.sbatch",
        *preempt_overrides,
        sbatch_args=["--cpus-per-task=1", "--time=00:10:00", "--nodes=2", "--gpus-per-node=1"],
        env=job_env(tmp, RUN_DIR=str(run)),
        log_dir=tmp,
    )
    jobs.append(job)
    return job, run


def test_preempted_job_requeues_resumes_and_matches_an_uninterrupted_job(
    preempt_overrides, multinode_job, tmp_path, jobs
):
    reference_job, reference_run = multinode_job  # runs alongside: one CPU per node each
    job = submit(
        "preemptible.sbatch",
        *preempt_overrides,
        sbatch_args=["--cpus-per-task=1", "--time=00:10:00", "--nodes=2", "--gpus-per-node=1"],
        env=job_env(tmp_path),  # no RUN_DIR: runs/slurm-<job id>, found again after requeue
        log_dir=tmp_path,
    )
    jobs.append(job)
    run = tmp_path / "runs" / f"slurm-{job}"
    wait_until(lambda: last_step(run) >= SIGNAL_AT, 240, f"step {SIGNAL_AT}", job)

    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    info = wait_for_state(job, "PENDING", timeout=120)
    assert info["Restarts"] == "1"
    stopped = records(run, "end")
    assert len(stopped) == 1 and stopped[0]["stopped"] is True
    stop_step = stopped[0]["step"]
    assert SIGNAL_AT <= stop_step < PREEMPT_STEPS  # really mid-run
    assert load(run / "checkpoints" / "last.pt")["step"] == stop_step
    start_requeued_now(job)
    wait_for_state(job, "COMPLETED", timeout=240)

    assert [r["step"] for r in records(run, "resume")] == [stop_step]
    ends = records(run, "end")
    assert [(e["step"], e["stopped"], e["steps_per_rank"]) for e in ends] == [
        (stop_step, True, [stop_step, stop_step]),
        (PREEMPT_STEPS, False, [PREEMPT_STEPS, PREEMPT_STEPS]),
    ]
    log = log_text(job)
    assert "got SIGUSR1" in log and f"resumed from step {stop_step}" in log

    wait_for_state(reference_job, "COMPLETED", timeout=240)
    final, reference = (load(r / "checkpoints" / "last.pt") for r in (run, reference_run))
    assert final["step"] == reference["step"] == PREEMPT_STEPS
    for key in ("model", "optimizer", "scheduler", "scaler"):
        assert_same(final[key], reference[key], key)


def test_multinode_sbatch_trains_one_rank_on_each_node(multinode_job):
    job, run = multinode_job
    wait_for_state(job, "COMPLETED", timeout=240)
    system = records(run, "start")[0]["system"]
    assert system["world_size"] == 2
    assert system["slurm_nodelist"] == "node[1-2]"
    assert sorted(r["node"] for r in system["ranks"]) == ["node1", "node2"]
    assert records(run, "end")[0]["steps_per_rank"] == [PREEMPT_STEPS, PREEMPT_STEPS]
    assert load(run / "checkpoints" / "last.pt")["step"] == PREEMPT_STEPS
    assert len(records(run, "train")) == PREEMPT_STEPS  # rank 0 alone wrote metrics


def test_plain_srun_one_task_per_process_trains_across_both_nodes(tiny, tiny_shards, tmp_path):
    # No torchrun: ranks come from SLURM_PROCID/SLURM_NTASKS, the master from the nodelist.
    run = tmp_path / "run"
    cmd = [
        "srun",
        f"--partition={PARTITION}",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=1",
        "--time=00:05:00",
        f"--chdir={tmp_path}",
        sys.executable,
        "-m",
        "pipeline",
        "train",
        *tiny,
        f"data.val={tiny_shards}/val-*.tar",
        f"run.dir={run}",
        "train.max_steps=6",
    ]
    done = subprocess.run(
        cmd, env=job_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "rank 0/2 via slurm" in log, log[-3000:]
    system = records(run, "start")[0]["system"]
    assert system["world_size"] == 2 and system["slurm_nodelist"] == "node[1-2]"
    assert sorted(r["node"] for r in system["ranks"]) == ["node1", "node2"]
    assert records(run, "end")[0]["steps_per_rank"] == [6, 6]
    assert [r["step"] for r in records(run, "eval")] == [6]
    assert load(run / "checkpoints" / "last.pt")["step"] == 6
