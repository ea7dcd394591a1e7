"""Non-finite steps are skipped (model, BatchNorm statistics and optimizer untouched), and
`train.max_bad_steps` in a row stop the run with a diagnostic and a finite checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint
from tests.conftest import cli_env, run_cli, train_args
from tests.faults import small_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return small_shards(tmp_path_factory.mktemp("numerics_shards"), n_train=128, n_val=32)


def _args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return train_args(
        shards,
        run_dir,
        "train.batch_size=8",
        "train.max_steps=20",
        "train.eval_every=0",
        "train.log_every=1",
        "train.max_bad_steps=3",
        "checkpoint.every_steps=5",
        *extra,
    )


def _diverged_line(result) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pipeline train: error: 3 consecutive non-finite steps; ")
    return last


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nan_steps_are_skipped_then_the_run_stops_keeping_the_last_good_state(
    shards, tmp_path, precision
):
    run_dir = tmp_path / "run"
    args = _args(
        shards,
        run_dir,
        f"train.precision={precision}",
        "model.target=tests.faults:FaultyNet",
        "model.kwargs={fault: nan, at: 6}",  # training steps 6, 7, 8 give NaN logits
    )
    line = _diverged_line(run_cli(args, cli_env(tmp_path)))
    assert "last good step 5, lr " in line and "loss scale 1" in line

    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    warnings = [r["message"] for r in rows if r["event"] == "warning" and "skipped" in r["message"]]
    assert [w.split("(")[-1] for w in warnings] == ["1 in a row)", "2 in a row)", "3 in a row)"]

    # Skipped steps changed nothing: weights, BatchNorm statistics, AdamW moments.
    kept = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    good = checkpoint.load(run_dir / "checkpoints" / "step-00000005.pt")
    assert kept["step"] == 8
    for name, tensor in good["model"].items():
        assert torch.equal(kept["model"][name], tensor), name
    for index, moments in good["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(kept["optimizer"]["state"][index][key], value), (index, key)


def test_a_diverging_learning_rate_stops_with_a_finite_checkpoint(shards, tmp_path):
    run_dir = tmp_path / "run"
    args = _args(shards, run_dir, "optim.lr=1e30", "optim.warmup_steps=0")
    line = _diverged_line(run_cli(args, cli_env(tmp_path)))
    # Step 1 takes a 1e30-sized step (finite); from step 2 on every forward overflows.
    assert "last good step 1, lr " in line and "e+29" in line
    kept = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    for name, tensor in kept["model"].items():
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), f"{name} is not finite in last.pt"


def test_skipped_steps_are_read_at_the_log_line_and_still_stop_the_run(shards, tmp_path):
    # The skip is decided on the device each step; the host learns of it at the next log
    # line (here every 5 steps), so the run stops at step 10, not 8, with the same verdict.
    run_dir = tmp_path / "run"
    args = _args(
        shards,
        run_dir,
        "train.log_every=5",
        "model.target=tests.faults:FaultyNet",
        "model.kwargs={fault: nan, at: 6}",  # every training step from 6 on gives NaN
    )
    line = _diverged_line(run_cli(args, cli_env(tmp_path)))
    assert "last good step 5, lr " in line
    kept = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    good = checkpoint.load(run_dir / "checkpoints" / "step-00000005.pt")
    assert kept["step"] == 10
    for name, tensor in good["model"].items():
        assert torch.equal(kept["model"][name], tensor), name
