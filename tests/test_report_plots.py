"""The report's plots and the W&B FROC chart, drawn from real run files and read back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import report_plots
from pipeline.evaluate import Predictions, save_predictions
from pipeline.report import render_report
from tests.test_wandb_sink import clean_wandb_env, predictions, start  # noqa: F401 (autouse)
from tests.wandb_offline import read_history, run_files


def write_run(run_dir: Path, with_val_loss: bool) -> None:
    """metrics.jsonl of a short run (train + eval records) and one predictions file."""
    rng = np.random.default_rng(0)
    lines = []
    for step in range(5, 65, 5):
        lines.append({"event": "train", "step": step, "train/loss": 1 / step, "train/lr": 1e-3})
        if step % 20 == 0:
            ev = {"event": "eval", "step": step, "val/auroc": 0.8, "val/ap": 0.4,
                  "val/sensitivity": 0.5, "val/threshold": 0.5, "val/positives": 12,
                  "val/bad_records": 0, "val/cpm_candidate": 0.6, "val/froc_candidate_1": 0.7}  # fmt: skip
            if with_val_loss:
                ev["val/loss"] = 2 / step
            lines.append(ev)
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    labels = (rng.random(400) < 0.1).astype(np.uint8)
    logits = rng.normal(0, 1, 400) + 2 * labels
    groups = [f"scan{i % 20}" for i in range(400)]
    preds = Predictions(labels, logits.astype(np.float32), [str(i) for i in range(400)], groups)
    save_predictions(run_dir / "eval" / "predictions-step-00000060.npz", preds)


def test_report_draws_val_loss_panels_log_roc_and_a_candidate_froc(tmp_path, monkeypatch):
    drawn: dict[str, dict] = {}
    real = report_plots.loss_plot

    def spy(out, train, val, resumes):
        drawn["loss"] = {"train": sorted(train), "val": sorted(val)}
        return real(out, train, val, resumes)

    monkeypatch.setattr(report_plots, "loss_plot", spy)
    write_run(tmp_path / "run", with_val_loss=True)
    summary = render_report(tmp_path / "run")
    assert set(summary["plots"]) == {"loss", "lr", "val_metrics", "roc", "pr", "prob_hist", "froc"}
    assert drawn["loss"] == {"train": ["train/loss"], "val": ["val/loss"]}
    for path in summary["plots"].values():
        assert Path(path).stat().st_size < 200_000  # small enough to commit under docs/


def test_val_metrics_panels_hold_only_metrics(tmp_path):
    from matplotlib.figure import Figure

    seen: list[list[str]] = []
    real_savefig = Figure.savefig

    def capture(fig, *args, **kwargs):
        seen.extend([[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes])
        return real_savefig(fig, *args, **kwargs)

    steps = np.array([10, 20])
    series = {k: (steps, np.array([0.5, 0.6])) for k in
              ("val/auroc", "val/ap", "val/sensitivity", "val/cpm_candidate",
               "val/froc_candidate_0.125", "val/froc_candidate_8",
               "val/threshold", "val/bad_records", "val/positives")}  # fmt: skip
    Figure.savefig = capture
    try:
        report_plots.val_metrics_plot(tmp_path / "v.png", series, [])
    finally:
        Figure.savefig = real_savefig
    assert seen == [
        ["auroc", "ap"],
        ["sensitivity"],
        ["cpm_candidate", "froc_candidate_0.125", "froc_candidate_8"],
    ]


def test_wandb_gets_a_froc_chart_with_its_band_when_samples_carry_scan_ids(tmp_path):
    labels, probs = predictions(5000)
    groups = [f"scan{i % 50}" for i in range(labels.size)]
    sink = start(tmp_path)
    sink.log_curves(10, labels, probs, groups)
    sink.log_curves(20, labels, probs)  # no scan ids: no FROC chart
    sink.finish()
    rows = {r["_step"]: r for r in read_history(tmp_path)}
    assert rows[10]["val/froc_curve_table._type"] == "table-file"
    assert "val/froc_curve_table._type" not in rows[20]
    table = run_files(tmp_path)[0].parent / "files" / rows[10]["val/froc_curve_table.path"]
    data = json.loads(table.read_text())
    by_key: dict[str, list] = {}
    for row in data["data"]:
        record = dict(zip(data["columns"], row, strict=True))
        by_key.setdefault(record["lineKey"], []).append((record["step"], record["lineVal"]))
    assert set(by_key) == {"sensitivity", "95% CI low", "95% CI high"}
    sens = np.array([v for _, v in by_key["sensitivity"]])
    low = np.array([v for _, v in by_key["95% CI low"]])
    high = np.array([v for _, v in by_key["95% CI high"]])
    assert (
        (low <= sens + 1e-12).all() and (sens <= high + 1e-12).all() and (np.diff(sens) >= 0).all()
    )
    assert [s for s, _ in by_key["sensitivity"]][0] == pytest.approx(0.125)
