"""End to end: `pipeline train` refuses a bounded head in one line, or trains it when allowed."""

from __future__ import annotations

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
        "train.max_steps=4",
        "train.eval_every=4",
    ]
    done = run_cli(["train", *tiny_args, *overrides], cli_env(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "guard.allow_bounded_head=true: training a bounded head (nn.Sigmoid" in done.stderr
    # The dynamic check still shouts: after a sigmoid, every p >= 0.5.
    assert "no validation probability is below 0.5" in done.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
