"""`pipeline report`: PNGs and a summary from metrics.jsonl, one continuous curve across resumes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import report
from pipeline.errors import DataError


def old_loss(step: int) -> float:
    return 1.0 / (1 + step)


def new_loss(step: int) -> float:
    return 0.5 / (1 + step)  # the resumed timeline: distinguishable values


def write_preempted_run(run_dir: Path) -> None:
    """Logged every 10 steps to 110, preempted; resumed from the step-50 checkpoint and logged
    every 20 steps to 160. Steps 60..110 were logged twice, 70/90/110 only by the dead run."""
    events = [{"event": "config", "step": 0, "time": 0.0, "config": {"optim": {"lr": 0.1}}}]
    for step in range(0, 111, 10):
        events.append(
            {"event": "train", "step": step, "train/loss": old_loss(step), "train/lr": 0.1}
        )
        if step and step % 50 == 0:
            events.append(
                {"event": "eval", "step": step, "val/auroc": 0.6 + step / 1000, "val/n_pos": 40}
            )
    events.append({"event": "resume", "step": 50})
    events.append({"event": "warning", "step": 50, "message": "guard: logits all >= 0"})
    for step in range(60, 161, 20):
        events.append(
            {"event": "train", "step": step, "train/loss": new_loss(step), "train/lr": 0.05}
        )
        if step % 50 == 0 or step == 160:
            auroc = {100: 0.93, 160: 0.91}[step]
            events.append({"event": "eval", "step": step, "val/auroc": auroc, "val/n_pos": 40})
    lines = [json.dumps({"time": 1.0, **e}) for e in events]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"event": "tra')  # torn write
    rng = np.random.default_rng(0)
    (run_dir / "eval").mkdir()
    for step in (100, 160):
        labels = (rng.random(5000) < 0.02).astype(np.int64)
        logits = rng.normal(0, 1.5, labels.size) + 3.0 * labels - 2
        np.savez(
            run_dir / "eval" / f"predictions-step-{step:08d}.npz",
            labels=labels,
            probs=1 / (1 + np.exp(-logits)),
            logits=logits,
            groups=np.array([f"scan{i % 50}" for i in range(labels.size)]),  # for froc.png
        )


def test_resumed_run_gives_one_continuous_curve_from_the_new_timeline(tmp_path):
    write_preempted_run(tmp_path)
    timeline = report.continuous(report.read_metrics(tmp_path / "metrics.jsonl"))
    steps, losses = report.series(timeline, "train", "train/loss")
    assert steps.tolist() == [0, 10, 20, 30, 40, 50, 60, 80, 100, 120, 140, 160]
    expected = [old_loss(s) if s <= 50 else new_loss(s) for s in steps]
    assert losses.tolist() == pytest.approx(expected)
    eval_steps, auroc = report.series(timeline, "eval", "val/auroc")
    assert eval_steps.tolist() == [50, 100, 160] and auroc[1] == pytest.approx(0.93)


def test_repeated_steps_without_a_resume_event_keep_the_last_record():
    records = [
        {"event": "train", "step": s, "train/loss": v}
        for s, v in [(1, 9.0), (2, 8.0), (3, 7.0), (2, 2.0), (3, 1.0), (4, 0.5)]
    ]
    steps, values = report.series(report.continuous(records), "train", "train/loss")
    assert steps.tolist() == [1, 2, 3, 4] and values.tolist() == [9.0, 2.0, 1.0, 0.5]


def test_report_command_writes_valid_pngs_and_prints_the_summary(tmp_path, capsys):
    write_preempted_run(tmp_path)
    parser = argparse.ArgumentParser(prog="pipeline")
    report.add_parser(parser.add_subparsers())
    args = parser.parse_args(["report", str(tmp_path)])
    assert args.func(args) == 0

    for name in report.PLOTS:
        path = tmp_path / "plots" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        with Image.open(path) as image:
            image.verify()
            assert image.size[0] > 300 and image.size[1] > 300
    out = capsys.readouterr().out
    assert "steps: 0..160 (1 resume(s), from step 50)" in out
    assert "best val/auroc: 0.9300 at step 100" in out
    assert f"final train/loss: {new_loss(160):.4g} (step 160)" in out
    assert "predictions-step-00000160.npz (5000 samples)" in out  # the latest eval
    assert "warnings: 1" in out
    assert "not drawn" not in out


def test_run_without_predictions_still_plots_the_curves_and_says_what_is_missing(tmp_path):
    write_preempted_run(tmp_path)
    for path in (tmp_path / "eval").iterdir():
        path.unlink()
    summary = report.render_report(tmp_path)
    assert set(summary["plots"]) == {"loss", "lr", "val_metrics"}
    assert set(summary["skipped"]) == {"roc", "pr", "prob_hist", "froc"}
    assert "not drawn: roc.png" in report.format_summary(summary)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "metrics.jsonl: not found"),
        (lambda d: (d / "metrics.jsonl").write_text(""), "nothing to report"),
        (
            lambda d: (d / "metrics.jsonl").write_text(
                '{"event": "train", "step": 1}\nnot json\n{}'
            ),
            "metrics.jsonl:2: not a JSON object",
        ),
    ],
)
def test_unusable_run_directories_are_one_line_data_errors(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(DataError, match=message) as error:
        report.render_report(tmp_path)
    assert "\n" not in str(error.value)


def test_missing_run_directory_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="run directory not found"):
        report.render_report(tmp_path / "nope")
