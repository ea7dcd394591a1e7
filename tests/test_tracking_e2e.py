"""What a real training run leaves behind: W&B offline files read back, metrics.jsonl, plots."""

import json
from pathlib import Path

import pytest

from pipeline.tracking.progress import LineProgress, work_progress
from tests.conftest import cli_env, run_cli, run_torchrun
from tests.wandb_offline import read_config, read_history, run_files


def _train_args(tiny_shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--config",
        "configs/tiny.yaml",
        f"data.train={tiny_shards}/train-*.tar",
        f"data.val={tiny_shards}/val-*.tar",
        f"run.dir={run_dir}",
        *extra,
    ]


def test_offline_run_file_holds_config_step_and_eval_metrics(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(_train_args(tiny_shards, run_dir, "wandb.mode=offline"), cli_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    history = read_history(run_dir)
    train_rows = [r for r in history if "train/loss" in r]
    assert [r["_step"] for r in train_rows] == [5, 10, 15, 20]
    for key in ("train/lr", "train/grad_norm", "train/samples_per_s", "train/data_wait"):
        assert all(key in r for r in train_rows)
    eval_rows = [r for r in history if "val/auroc" in r]
    assert [r["_step"] for r in eval_rows] == [10, 20]
    for key in (
        "val/ap",
        "val/sens_at_fpr_1pct",
        "val/sens_at_fpr_10pct",
        "val/positives",
        "val/cpm_candidate",
    ):
        assert key in eval_rows[-1]
    config = read_config(run_dir)
    assert config["train"]["max_steps"] == 20 and config["data"]["scales"] == [16, 32, 48]
    assert config["system"]["world_size"] == 1
    # The local record is always there too, with the same eval numbers.
    local = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["val/auroc"] for r in local if r["event"] == "eval"] == [
        r["val/auroc"] for r in eval_rows
    ]


def test_disabled_mode_creates_no_wandb_directory(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        _train_args(tiny_shards, run_dir, "wandb.mode=disabled", "train.max_steps=5"),
        cli_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (run_dir / "wandb").exists()
    assert (run_dir / "metrics.jsonl").exists()


def test_wandb_mode_env_overrides_config(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    env = cli_env(tmp_path, WANDB_MODE="disabled")
    result = run_cli(
        _train_args(tiny_shards, run_dir, "wandb.mode=offline", "train.max_steps=5"), env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (run_dir / "wandb").exists()


@pytest.mark.slow
def test_only_rank_zero_writes_wandb_and_metrics_under_torchrun(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    result = run_torchrun(
        2, _train_args(tiny_shards, run_dir, "wandb.mode=offline"), cli_env(tmp_path)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(run_files(run_dir)) == 1
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert not (Path.cwd() / "wandb").exists()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["event"] == "train"]
    assert steps == [5, 10, 15, 20]  # one line per log step: rank 1 wrote nothing
    history = read_history(run_dir)
    assert read_config(run_dir)["system"]["world_size"] == 2
    assert [r["_step"] for r in history if "val/auroc" in r] == [10, 20]


def test_report_draws_one_continuous_curve_across_a_resume(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    env = cli_env(tmp_path)
    first = run_cli(_train_args(tiny_shards, run_dir, "train.max_steps=10"), env)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(_train_args(tiny_shards, run_dir, "train.max_steps=20"), env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 10" in second.stderr
    report = run_cli(["report", str(run_dir)], env)
    assert report.returncode == 0, report.stderr[-3000:]
    for name in ("loss.png", "lr.png", "val_metrics.png", "roc.png", "pr.png", "prob_hist.png"):
        png = run_dir / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "auroc" in report.stdout.lower()


def test_progress_in_log_files_is_plain_lines_without_carriage_returns(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(_train_args(tiny_shards, run_dir, "train.max_steps=10"), cli_env(tmp_path))
    assert result.returncode == 0
    assert "\r" not in result.stdout and "\r" not in result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert lines[0].startswith("step 5/10 loss") and "samples/s" in lines[0] and "eta" in lines[0]


def test_work_progress_in_log_files_prints_whole_lines_with_rate_and_eta(capsys):
    bar = work_progress(1000, "convert volumes")
    assert isinstance(bar, LineProgress)  # pytest's captured stderr is not a terminal
    bar.interval = 0.0  # every update prints, as every LOG_LINE_SECONDS would
    with bar:
        bar.update(250)
        bar.update(750)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("convert volumes: 250/1000 samples (25%)") and "eta" in lines[0]
    assert lines[1].startswith("convert volumes: 1000/1000 samples (100%)") and " in " in lines[1]
    assert len(lines) == 2  # close() adds nothing once the last count is shown
    with LineProgress(None, "predict", "sample") as quiet:
        quiet.update(7)  # within the interval: silent until closed
    assert capsys.readouterr().err.startswith("predict: 7 samples ")
    with LineProgress(5, "evaluate", "sample") as short:
        short.update(3)  # skipped records: fewer samples than the manifest said
    (last,) = capsys.readouterr().err.splitlines()
    assert last.startswith("evaluate: 3/5 samples (60%)") and " in " in last and "eta" not in last
