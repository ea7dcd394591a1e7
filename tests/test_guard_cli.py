"""End to end: `pipeline train` refuses a bounded head in one line, or trains it when allowed."""

from __future__ import annotations

import json

from tests.conftest import cli_env, run_cli


def test_train_with_the_seed_relu_head_exits_2_with_one_line_naming_the_op(tiny_args, tmp_path):
    done = run_cli(
        ["train", *tiny_args, "model.target=tests.zoo_heads:ReluHead"], cli_env(tmp_path)
    )
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("pipeline train: error: model output comes from ")
    assert "torch.nn.functional.relu" in lines[0] and "ReluHead.forward" in lines[0]
    assert "guard.allow_bounded_head=true" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training


def test_allow_bounded_head_trains_and_warns(tiny_args, tmp_path):
    overrides = [
        "model.target=tests.zoo_heads:SigmoidModuleHead",
        "guard.allow_bounded_head=true",
        "train.max_steps=12",
        "train.eval_every=12",
    ]
    done = run_cli(["train", *tiny_args, *overrides], cli_env(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "guard.allow_bounded_head=true: training a bounded head (nn.Sigmoid" in done.stderr
    # The range probe at train start pushes the last Linear's output both ways: stuck in [0, 1].
    probe = "the model's output is bounded"
    assert probe in done.stderr and "never goes below 0 and above 1" in done.stderr
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["event"] == "warning" and probe in r["message"] for r in rows)
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_relu_head_allowed_trips_the_batch_and_validation_checks(tiny_args, tmp_path):
    overrides = [
        "model.target=tests.zoo_heads:ReluHead",
        "guard.allow_bounded_head=true",
        "train.max_steps=12",
        "train.eval_every=12",
    ]
    done = run_cli(["train", *tiny_args, *overrides], cli_env(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    # Every logit exactly 0: the seed's signature, in the training batches and in validation.
    assert "logits of this batch are exactly at one value" in done.stderr
    assert "GUARD: 512 of 512 validation probabilities are exactly at one value" in done.stderr


def test_dynamic_guard_in_error_mode_stops_a_sigmoid_head_in_one_line(tiny_args, tmp_path):
    overrides = [
        "model.target=tests.zoo_heads:SigmoidModuleHead",
        "guard.allow_bounded_head=true",
        "guard.dynamic=error",
        "train.max_steps=30",
        "train.eval_every=0",
    ]
    done = run_cli(["train", *tiny_args, *overrides], cli_env(tmp_path))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("pipeline train: error: guard: the model's output is bounded")
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before step 1


def test_our_own_model_never_trips_the_dynamic_guard(tiny_args, tmp_path):
    overrides = ["guard.dynamic=error", "guard.check_every=1", "train.max_steps=12"]
    done = run_cli(["train", *tiny_args, *overrides], cli_env(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    # No alarm of any kind: the range probe, every batch and the validation stay silent.
    assert "guard" not in done.stderr.lower(), done.stderr[-2000:]
