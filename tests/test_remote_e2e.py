"""End to end on loopback servers: make-synthetic -> upload to the S3 emulator -> 2-rank
torchrun (gloo) training from s3:// and from http://, each stopped by SIGTERM and resumed
-> evaluate and predict from http:// -> the same weights and metrics as the local run.
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
from tests import reliability
from tests.conftest import ROOT, TINY, cli_env, run_cli, run_torchrun
from tests.faults import small_shards
from tests.remote_servers import make_bucket, s3_emulator, shard_server
from tests.test_resume import assert_identical

pytestmark = pytest.mark.slow

STEPS = 48
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _args(train: str, val: str, run_dir: Path) -> list[str]:
    return [
        "train", "--config", str(TINY), f"data.train={train}", f"data.val={val}",
        f"run.dir={run_dir}", "train.batch_size=8", f"train.max_steps={STEPS}",
        "train.eval_every=24", "train.log_every=2", "checkpoint.every_steps=1000",
        "data.num_workers=1", "model.dropout=0.2",
    ]  # fmt: skip


def _trained(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.exists() and any(
        json.loads(line).get("event") == "train" for line in path.read_text().splitlines()
    )


def _sigterm_then_resume(args: list[str], run_dir: Path, env: dict[str, str]) -> int:
    """Start 2 ranks, SIGTERM the process group after the first logged step, resume; saved step."""
    job = subprocess.Popen(
        [*TORCHRUN, "-m", "pipeline", *args],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not _trained(run_dir):
            assert job.poll() is None, job.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no training step logged in 240 s"
            time.sleep(0.1)
        os.killpg(job.pid, signal.SIGTERM)
        stopped = time.monotonic()
        log, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert "stopped on request (SIGTERM)" in log, log[-3000:]
    saved = checkpoint.load(run_dir / "checkpoints" / "last.pt")["step"]
    assert 0 < saved < STEPS, f"saved at {saved}: the signal came too late to test a resume"
    reliability.record(
        f"SIGTERM to a 2-rank run reading {args[3].split('=', 1)[1].split(':')[0]} shards",
        exit_code=job.returncode,
        seconds=round(time.monotonic() - stopped, 1),
        lines=0,
        checkpoint_ok=True,
        launcher="torchrun",
    )
    resumed = run_torchrun(2, args, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {saved}" in resumed.stderr, resumed.stderr[-3000:]
    return saved


def _same_run(a: Path, b: Path) -> None:
    x, y = (checkpoint.load(d / "checkpoints" / "last.pt") for d in (a, b))
    assert x["step"] == y["step"] == STEPS
    for key in ("model", "optimizer", "scheduler", "rng", "best", "thresholds"):
        assert_identical(x[key], y[key], key)


def test_two_ranks_train_from_s3_and_http_resume_after_sigterm_and_match_local(tmp_path):
    local = small_shards(tmp_path / "local", n_train=256, n_val=64)
    with s3_emulator() as s3, shard_server(local) as http:
        env = cli_env(tmp_path, **s3)
        make_bucket(s3, "data")
        made = run_cli(
            ["make-synthetic", "--out", "s3://data/ds", "--dims", "2", "--train", "256",
             "--val", "64", "--seed", "0", "--block-size", "16", "--shards", "4",
             "--workers", "1", "--no-progress"],
            env,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr[-2000:]

        straight = run_torchrun(2, _args(f"{local}/train-*.tar", f"{local}/val-*.tar", tmp_path / "local-run"), env)  # fmt: skip
        assert straight.returncode == 0, straight.stderr[-3000:]

        s3_run = tmp_path / "s3-run"
        _sigterm_then_resume(_args("s3://data/ds/", "s3://data/ds/", s3_run), s3_run, env)
        _same_run(tmp_path / "local-run", s3_run)

        http_run = tmp_path / "http-run"
        _sigterm_then_resume(
            _args(f"{http.url}/train-{{000000..000003}}.tar", f"{http.url}/val-*.tar", http_run),
            http_run,
            env,
        )
        _same_run(tmp_path / "local-run", http_run)

        ckpt = str(tmp_path / "local-run" / "checkpoints" / "last.pt")
        scores = {}
        for where, val in (("local", f"{local}/val-*.tar"), ("http", f"{http.url}/val-*.tar")):
            done = run_torchrun(2, ["evaluate", "--checkpoint", ckpt, f"data.val={val}"], env)
            assert done.returncode == 0, done.stderr[-3000:]
            scores[where] = json.loads(done.stdout[done.stdout.index("{") :])
            out = tmp_path / f"preds-{where}.csv"
            done = run_cli(["predict", "--checkpoint", ckpt, "--shards", val, "--out", str(out)], env)  # fmt: skip
            assert done.returncode == 0, done.stderr[-3000:]
        assert scores["http"] == scores["local"]
        assert scores["local"]["auroc"] > 0.5
        local_rows = (tmp_path / "preds-local.csv").read_text()
        assert (tmp_path / "preds-http.csv").read_text() == local_rows
        assert len(local_rows.splitlines()) == 65
