"""Bit-exact resume: interrupted at step k and resumed == never interrupted, bit for bit.

Each case trains the same config twice: straight through to N steps, and stopped at step k
(`train.stop_at_step`, the STOP-file path: checkpoint, exit 0) then rerun in the same run
dir. The final checkpoints must agree in every tensor: model, optimizer, scheduler,
scaler, every RNG state. The data is tiny so that k lies past an epoch boundary of every
reader, where the loader replays from a later epoch and rotates DataLoader workers;
dropout makes the torch RNG matter.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline import checkpoint
from tests.conftest import cli_env, run_cli, run_torchrun, train_args
from tests.faults import small_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    # ~17 samples per shard: each reader's epoch is ~4 batches of 8 and ends mid-batch.
    return small_shards(tmp_path_factory.mktemp("resume_shards"), n_train=70, n_val=32)


def _args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return train_args(
        shards,
        run_dir,
        "train.batch_size=8",
        "train.eval_every=5",
        "train.log_every=4",
        "model.dropout=0.2",
        "checkpoint.every_steps=1000",
        *extra,
    )


def assert_identical(a: Any, b: Any, where: str = "state") -> None:
    """Recursive equality; tensors must be bitwise equal (torch.equal), dtypes included."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{where}: nan != {b!r}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _final(run_dir: Path) -> dict[str, Any]:
    return checkpoint.load(run_dir / "checkpoints" / "last.pt")


def _compare(straight: Path, resumed: Path, steps: int) -> None:
    a, b = _final(straight), _final(resumed)
    assert a["step"] == b["step"] == steps
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "best", "thresholds"):
        assert_identical(a[key], b[key], key)
    assert ("ema" in a) == ("ema" in b)
    if "ema" in a:  # model.ema_decay on: the average resumes bit-exactly too
        assert_identical(a["ema"], b["ema"], "ema")
        assert a["ema_updates"] == b["ema_updates"] == steps + 1
    # The check has teeth: training moved the weights away from any resumed copy's init.
    assert a["optimizer"]["state"], "optimizer state is empty: nothing was trained"


def test_single_process_with_workers_resumes_bit_exactly(shards, tmp_path):
    env = cli_env(tmp_path)
    common = ("train.max_steps=24", "data.num_workers=2", "model.ema_decay=0.9")
    straight = run_cli(_args(shards, tmp_path / "straight", *common), env)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run_dir = tmp_path / "interrupted"
    first = run_cli(_args(shards, run_dir, *common, "train.stop_at_step=19"), env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped at step 19" in first.stdout
    assert _final(run_dir)["step"] == 19
    second = run_cli(_args(shards, run_dir, *common), env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 19" in second.stderr

    _compare(tmp_path / "straight", run_dir, 24)


@pytest.mark.slow
def test_two_processes_resume_bit_exactly(shards, tmp_path):
    env = cli_env(tmp_path)
    # Balanced batches too (data.balance): 3 of each 8 samples are reservoir draws, so a
    # reader's ~35-sample epoch is 7 batches and step 19 replays from epoch 1, rebuilding
    # the reservoir from the stream it skips.
    common = ("train.max_steps=24", "data.num_workers=1", "data.balance=0.5")
    straight = run_torchrun(2, _args(shards, tmp_path / "straight", *common), env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "balanced batches: 3 of 8 samples" in straight.stderr
    # pos_weight=auto is the batches' (1 - 0.5) / 0.5, not the data's 52 / 18; an epoch is
    # 70 fresh samples: 24 steps x 2 ranks x (8 - 3) = 240 of them.
    assert _final(tmp_path / "straight")["pos_weight"] == 1.0
    rows = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    epochs = [r["train/epoch"] for r in map(json.loads, rows) if r["event"] == "train"]
    assert epochs[-1] == pytest.approx(240 / 70)

    run_dir = tmp_path / "interrupted"
    first = run_torchrun(2, _args(shards, run_dir, *common, "train.stop_at_step=19"), env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert _final(run_dir)["step"] == 19
    second = run_torchrun(2, _args(shards, run_dir, *common), env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 19" in second.stderr

    _compare(tmp_path / "straight", run_dir, 24)
