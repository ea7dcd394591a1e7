"""The vertical slice end to end: real shards -> real CLI training -> files a user reads."""

import json
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint
from tests.conftest import cli_env, run_cli


def _events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == kind]


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory):
    """One tiny run shared by the tests below (60 steps on 2048 samples)."""
    tmp = tmp_path_factory.mktemp("trained")
    run_dir = tmp / "run"
    args = [
        "--config",
        "configs/tiny.yaml",
        f"data.train={tiny_shards}/train-*.tar",
        f"data.val={tiny_shards}/val-*.tar",
        f"run.dir={run_dir}",
        "train.max_steps=60",
        "train.eval_every=30",
        "checkpoint.every_steps=30",
    ]
    result = run_cli(["train", *args], cli_env(tmp))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result, tmp


def test_tiny_run_lowers_the_loss_and_beats_chance(trained):
    run_dir, result, _ = trained
    losses = [r["train/loss"] for r in _events(run_dir, "train")]
    assert len(losses) >= 4
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2
    final = _events(run_dir, "eval")[-1]
    assert final["step"] == 60
    assert final["val/auroc"] > 0.6
    assert f"outputs in {run_dir}" in result.stdout


def test_run_dir_holds_config_checkpoints_histogram_and_thresholds(trained):
    run_dir, _, _ = trained
    saved = (run_dir / "config.yaml").read_text()
    assert "max_steps: 60" in saved and f"dir: {run_dir}" in saved
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 60
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "config", "thresholds"):
        assert key in state
    assert (run_dir / "checkpoints" / "best.pt").exists()
    histogram = json.loads((run_dir / "eval" / "histogram-step-00000060.json").read_text())
    assert sum(histogram["positive"]) + sum(histogram["negative"]) == 512
    thresholds = json.loads((run_dir / "thresholds.json").read_text())
    assert set(thresholds) >= {"youden", "f1", "sens90", "sens95", "fpr01"}


def test_evaluate_prints_json_metrics_matching_the_final_eval(trained):
    run_dir, _, tmp = trained
    result = run_cli(
        ["evaluate", "--checkpoint", str(run_dir / "checkpoints" / "last.pt")], cli_env(tmp)
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(result.stdout)
    # The progress of the evaluation goes to stderr (stdout stays pure JSON), in whole lines.
    assert "evaluate: 512/512 samples (100%)" in result.stderr and "\r" not in result.stderr
    for key in (
        "auroc",
        "ap",
        "accuracy",
        "sensitivity",
        "specificity",
        "sens_at_fpr_1pct",
        "sens_at_fpr_5pct",
        "sens_at_fpr_10pct",
        "positives",
        "negatives",
    ):
        assert key in metrics
    assert metrics["positives"] + metrics["negatives"] == 512
    assert metrics["auroc"] == pytest.approx(_events(run_dir, "eval")[-1]["val/auroc"], abs=1e-6)


def test_rerun_with_same_run_dir_resumes_and_continues_to_max_steps(trained, tmp_path):
    run_dir, _, tmp = trained
    # Continue the finished 60-step run to 80 steps: it must start from step 60.
    config_dir = run_dir
    result = run_cli(
        [
            "train",
            "--config",
            "configs/tiny.yaml",
            f"data.train={_pattern(config_dir, 'train')}",
            f"data.val={_pattern(config_dir, 'val')}",
            f"run.dir={run_dir}",
            "train.max_steps=80",
            "train.eval_every=30",
            "checkpoint.every_steps=30",
        ],
        cli_env(tmp),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 60" in result.stderr
    steps = [r["step"] for r in _events(run_dir, "train")]
    assert steps[-1] == 80 and min(s for s in steps if s > 60) == 65
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["step"] == 80


def _pattern(run_dir: Path, split: str) -> str:
    import yaml  # pyyaml comes with omegaconf

    data = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    return data[split]


def test_checkpoints_load_with_weights_only(trained):
    run_dir, _, _ = trained
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["format"] == checkpoint.FORMAT
