"""The real `pipeline train`/`evaluate` on 2 gloo processes: torchrun, srun-style, uneven data.

Every test starts real processes on real shards and asserts what a user would see:
exit codes, the run directory's files, and the lines printed.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, cli_env, run_cli, run_torchrun

from pipeline.data.format import update_manifest, write_shard
from pipeline.distributed import detect_env, first_host

BATCH = 32  # configs/tiny.yaml's train.batch_size (per process)
# A hung collective must fail the test in a minute, not after gloo's default 30.
FAST_FAIL = "dist.timeout_s=60"


def write_shards(out: Path, split: str, sizes: list[int], seed: int = 0) -> str:
    """Learnable 1x48x48 uint8 shards of the given sizes (+ manifest); returns the pattern."""
    rng = np.random.default_rng(seed)
    infos = []
    for index, n in enumerate(sizes):
        label = (rng.random(n) < 0.3).astype(np.uint8)
        patch = rng.integers(0, 160, (n, 1, 48, 48), dtype=np.uint8)
        patch[label == 1, :, 20:28, 20:28] = 255  # a bright spot marks a positive
        ids = [f"{split}{index}-{i}" for i in range(n)]
        infos.append(
            write_shard(out / f"{split}-{index:06d}.tar", patch, label, ids, block_size=32)
        )
    update_manifest(out, split, infos, (1, 48, 48), "uint8")
    return str(out / f"{split}-*.tar")


def events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == kind]


def free_slurm_port() -> int:
    """A free port that `detect_env` derives from a job id (20000 + id % 20000)."""
    # Below the ephemeral range (32768+), where outgoing connections take their ports.
    for port in random.sample(range(20000, 32768), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767")


def run_srun_style(args: list[str], tmp: Path, world: int = 2, timeout: float = 240):
    """`world` plain `python -m pipeline` processes with the variables srun sets per task."""
    job_id = free_slurm_port() - 20000
    procs = []
    for rank in range(world):
        env = cli_env(
            tmp,
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
            SLURM_NTASKS=str(world),
            SLURM_STEP_ID="0",
            SLURM_JOB_ID=str(job_id),
            SLURM_JOB_NODELIST="localhost",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "pipeline", *args],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        return [(p, *p.communicate(timeout=timeout)) for p in procs]
    finally:
        for p in procs:  # a hung rank must not outlive the test
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def torchrun_run(tiny_shards, tmp_path_factory):
    """One 6-step torchrun run with 2 ranks, a train line every step."""
    tmp = tmp_path_factory.mktemp("torchrun")
    run_dir = tmp / "run"
    args = [
        "train", "--config", str(TINY), f"run.dir={run_dir}",
        f"data.train={tiny_shards}/train-*.tar", f"data.val={tiny_shards}/val-*.tar",
        "train.max_steps=6", "train.log_every=1", FAST_FAIL,
    ]  # fmt: skip
    result = run_torchrun(2, args, cli_env(tmp), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result, tmp


@pytest.mark.slow
def test_torchrun_two_ranks_train_to_completion_and_only_rank0_writes(torchrun_run):
    run_dir, result, _ = torchrun_run
    (start,) = events(run_dir, "start")
    system = start["system"]
    assert system["world_size"] == 2
    assert system["global_batch"] == 2 * BATCH
    assert [r["rank"] for r in system["ranks"]] == [0, 1]
    assert {r["launcher"] for r in system["ranks"]} == {"torchrun"}
    # One train record per step: rank 1 wrote none of its own.
    assert [r["step"] for r in events(run_dir, "train")] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in events(run_dir, "eval")] == [6]
    assert events(run_dir, "end")[0]["steps_per_rank"] == [6, 6]
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 6
    assert result.stdout.count("done at step 6") == 1
    assert "global batch 64" in result.stderr
    assert "[rank 0] INFO" in result.stderr and "[rank 1] INFO" not in result.stderr


@pytest.mark.slow
def test_srun_style_tasks_without_torchrun_form_a_group_and_finish(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "train", "--config", str(TINY), f"run.dir={run_dir}",
        f"data.train={tiny_shards}/train-*.tar", "train.max_steps=4", FAST_FAIL,
    ]  # fmt: skip
    results = run_srun_style(args, tmp_path)
    for proc, _, stderr in results:
        assert proc.returncode == 0, stderr[-3000:]
    assert "rank 0/2 via slurm" in results[0][2]
    system = events(run_dir, "start")[0]["system"]
    assert system["world_size"] == 2
    assert [(r["rank"], r["launcher"]) for r in system["ranks"]] == [(0, "slurm"), (1, "slurm")]
    assert events(run_dir, "end")[0]["steps_per_rank"] == [4, 4]
    assert results[0][1].count("done at step 4") == 1 and "done" not in results[1][1]


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory) -> str:
    """5 shards from 64 to 2560 samples: readers of small shards run out 40x sooner."""
    return write_shards(tmp_path_factory.mktemp("uneven"), "train", [64, 128, 640, 1280, 2560])


@pytest.mark.slow
def test_uneven_shards_give_equal_steps_per_rank(uneven_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "train", "--config", str(TINY), f"run.dir={run_dir}", f"data.train={uneven_shards}",
        "data.num_workers=2", "train.max_steps=20", "train.log_every=10", FAST_FAIL,
    ]  # fmt: skip
    # 20 steps x 32 samples per rank: a reader of the 64-sample shard wraps many epochs.
    result = run_torchrun(2, args, cli_env(tmp_path), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert events(run_dir, "end")[0]["steps_per_rank"] == [20, 20]
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 20


@pytest.mark.slow
def test_fewer_shards_than_readers_is_one_clear_error(uneven_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "train", "--config", str(TINY), f"run.dir={run_dir}", f"data.train={uneven_shards}",
        "data.num_workers=3", FAST_FAIL,
    ]  # fmt: skip
    for rank, (proc, _, stderr) in enumerate(run_srun_style(args, tmp_path)):
        assert proc.returncode == 2, stderr[-3000:]
        lines = stderr.strip().splitlines()
        assert lines[-1] == (
            f"[rank {rank}] pipeline train: error: data.train: 5 shards cannot feed 2 ranks x "
            "3 workers (6 readers); write more shards or lower data.num_workers"
        )
        assert "Traceback" not in stderr
    assert not run_dir.exists()  # refused before anything was written


@pytest.mark.slow
def test_distributed_evaluation_equals_single_process(torchrun_run):
    run_dir, _, tmp = torchrun_run
    # 3 shards, 388 samples: rank 0 reads shards 0 and 2 (351), rank 1 shard 1 (37).
    val = write_shards(tmp / "val3", "val", [101, 37, 250], seed=1)
    args = ["evaluate", "--checkpoint", str(run_dir / "checkpoints" / "last.pt"), f"data.val={val}"]
    single = run_cli(args, cli_env(tmp), timeout=120)
    assert single.returncode == 0, single.stderr[-3000:]
    double = run_torchrun(2, args, cli_env(tmp), timeout=180)
    assert double.returncode == 0, double.stderr[-3000:]
    metrics = json.loads(single.stdout)
    assert metrics["count"] == 388 and metrics["positives"] > 0
    assert 0.0 < metrics["auroc"] < 1.0
    assert double.stdout == single.stdout  # every metric, to the last bit
    # Only rank 0 shows progress, over its own share (rank 1 reads 37).
    assert "evaluate: 351/351 samples (100%)" in double.stderr
    assert "evaluate: 37/37" not in double.stderr


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [("node7", "node7"), ("gpu[03-05,09],login1", "gpu03"), ("a-b[1-2]", "a-b1"), ("x,y", "x")],
)
def test_first_host_of_a_slurm_nodelist(nodelist, first):
    assert first_host(nodelist) == first


def test_detect_env_prefers_torchrun_then_srun_tasks_then_single():
    srun = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0",
            "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-08]"}  # fmt: skip
    env = detect_env(srun)
    assert (env.rank, env.local_rank, env.world_size, env.launcher) == (3, 1, 4, "slurm")
    assert (env.master_addr, env.master_port) == ("gpu07", 20000 + 123456 % 20000)
    torchrun = {**srun, "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29511"}
    env = detect_env(torchrun)
    assert (env.rank, env.world_size, env.master_port, env.launcher) == (1, 2, 29511, "torchrun")
    # The batch script itself (no job step) is one process, whatever --ntasks says.
    batch = {k: v for k, v in srun.items() if k != "SLURM_STEP_ID"}
    assert detect_env(batch).launcher == "single" and not detect_env(batch).distributed


@pytest.mark.slow
def test_sync_batchnorm_on_cpu_ranks_is_a_config_error_not_a_crash(tiny_args, tmp_path):
    result = run_torchrun(
        2, ["train", *tiny_args, "model.sync_batchnorm=true", FAST_FAIL], cli_env(tmp_path)
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "pipeline train: error:" in line]
    assert errors and all(
        "model.sync_batchnorm: SyncBatchNorm runs on GPUs only" in e for e in errors
    )
    # Refused at start-up (each rank exits 2), not torch's ValueError at the first forward.
    assert "SyncBatchNorm expected input tensor" not in result.stderr
    assert "exitcode: 2" in result.stderr, result.stderr[-2000:]
