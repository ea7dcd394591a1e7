"""The sbatch scripts in slurm/, submitted unchanged to the real local SLURM cluster.

`pipeline train` is replaced by a stand-in module (PIPELINE_MODULE, see slurm_helpers) that
joins the gloo group, records where each rank ran, and follows the stop-file contract.
Start the cluster first: `bash scripts/slurm_cluster.sh up`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_helpers import (
    cancel,
    job_env,
    rank_records,
    requires_slurm,
    start_requeued_now,
    submit,
    wait_for_state,
    wait_until,
    write_dummy_trainer,
)

pytestmark = [pytest.mark.slurm, requires_slurm]

# Our fake nodes have 4 CPUs and 2 GPUs each; the scripts ask for more by default, so the
# tests shrink the request on the command line, as a user would.
SMALL = ["--cpus-per-task=1", "--time=00:05:00"]


@pytest.fixture(scope="module", autouse=True)
def cluster_up() -> None:
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or not {"idle", "mix", "alloc"} & set(out.stdout.split()):
        pytest.fail(
            f"SLURM is installed but the cluster is not up ({out.stderr.strip() or out.stdout!r}); "
            "run `bash scripts/slurm_cluster.sh up`"
        )


@pytest.fixture
def jobs() -> Iterator[list[str]]:
    """Job ids to cancel afterwards, so a failed test does not leave the cluster busy."""
    ids: list[str] = []
    yield ids
    for job_id in ids:
        cancel(job_id)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return job_env({**write_dummy_trainer(tmp_path), "RUN_DIR": str(tmp_path / "run")})


def test_train_sbatch_runs_one_process_per_gpu_on_one_node(tmp_path, env, jobs):
    job = submit(
        "train.sbatch",
        "optim.lr=1e-3",
        "train.max_steps=7",
        sbatch_args=[*SMALL, "--gpus-per-node=2"],
        env=env,
        log_dir=tmp_path,
    )
    jobs.append(job)
    info = wait_for_state(job, "COMPLETED", timeout=120)

    ranks = rank_records(tmp_path / "run")
    assert sorted(r["rank"] for r in ranks) == ["0", "1"]
    assert {r["world"] for r in ranks} == {"2"}  # NPROC came from the 2 GPUs allocated
    assert {r["total"] for r in ranks} == {"2"}  # the all-reduce really ran
    assert {r["node"] for r in ranks} == {info["NodeList"]}
    argv = (tmp_path / "run" / "argv.txt").read_text()
    assert argv == f"train optim.lr=1e-3 train.max_steps=7 run.dir={tmp_path / 'run'}"
    assert (tmp_path / f"pipeline-{job}.out").exists()  # log named by job id


def test_multinode_sbatch_puts_one_rank_on_each_node(tmp_path, env, jobs):
    job = submit(
        "multinode.sbatch",
        sbatch_args=[*SMALL, "--nodes=2", "--gpus-per-node=1"],
        env=env,
        log_dir=tmp_path,
    )
    jobs.append(job)
    wait_for_state(job, "COMPLETED", timeout=120)

    ranks = rank_records(tmp_path / "run")
    assert sorted(r["rank"] for r in ranks) == ["0", "1"]
    assert {r["world"] for r in ranks} == {"2"}
    assert {r["total"] for r in ranks} == {"2"}
    assert sorted(r["node"] for r in ranks) == ["node1", "node2"]


def _submit_waiting_preemptible(tmp_path: Path, env: dict[str, str], jobs: list[str]) -> str:
    """A 2-node preemptible job whose ranks are up and polling for the stop file."""
    job = submit(
        "preemptible.sbatch",
        "wait_for_stop=1",
        sbatch_args=[*SMALL, "--nodes=2", "--gpus-per-node=1"],
        env=env,
        log_dir=tmp_path,
    )
    jobs.append(job)
    wait_until(lambda: len(rank_records(tmp_path / "run")) == 2, 120, "both ranks to start", job)
    return job


def test_preemptible_job_checkpoints_requeues_and_resumes_after_usr1(tmp_path, env, jobs):
    run = tmp_path / "run"
    job = _submit_waiting_preemptible(tmp_path, env, jobs)

    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    # The job requeued itself; SLURM holds it ~120 s (BeginTime) unless made eligible now.
    info = wait_for_state(job, "PENDING", timeout=60)
    assert info["Restarts"] == "1"
    assert (run / "checkpoints" / "last.pt").read_text() == "stopped at start 0, world 2"
    assert not (run / "STOP").exists()  # the trainer consumed the stop request
    start_requeued_now(job)
    info = wait_for_state(job, "COMPLETED", timeout=120)

    assert info["Restarts"] == "1"
    second = rank_records(run, start=1)
    assert sorted(r["node"] for r in second) == ["node1", "node2"]  # same run dir, both nodes
    for rank in (0, 1):  # every rank of the second start found the checkpoint
        assert (run / f"resumed-rank{rank}").read_text() == "stopped at start 0, world 2"
    log = (tmp_path / f"pipeline-pre-{job}.out").read_text()
    assert "got SIGUSR1" in log and "start 1:" in log and "start 2:" in log  # appended


def test_preemptible_job_stops_without_requeue_on_term(tmp_path, env, jobs):
    run = tmp_path / "run"
    job = _submit_waiting_preemptible(tmp_path, env, jobs)

    subprocess.run(["scancel", "--signal=TERM", "--batch", job], check=True, timeout=30)
    info = wait_for_state(job, "COMPLETED", timeout=60)

    assert info["Restarts"] == "0"  # TERM means the job is ending for good: no requeue
    assert (run / "checkpoints" / "last.pt").read_text() == "stopped at start 0, world 2"
    assert not (run / "STOP").exists()
