"""`pipeline report RUN_DIR`: PNG plots and a short text summary from a run's local record.

Reads `RUN_DIR/metrics.jsonl` (one JSON event per line, appended by rank 0 whatever the W&B
mode) and the latest `RUN_DIR/eval/predictions-step-XXXXXXXX.npz`, and writes
`RUN_DIR/plots/{loss,lr,val_metrics,roc,pr,prob_hist,froc}.png`. The FROC plot is the
challenge's (per nodule) from the newest `eval/froc-*.json` that `pipeline evaluate
--annotations` wrote, else the candidate-level one from the latest predictions.

A preempted run that resumed from an earlier checkpoint logs some steps twice. The curves
stay one continuous line: a `resume` event at step S drops the abandoned records after S,
and otherwise the last record logged for a step wins.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import report_plots as plots_module
from pipeline.errors import DataError
from pipeline.tracking import curves

PLOTS = ("loss", "lr", "val_metrics", "roc", "pr", "prob_hist", "froc")
SERIES_EVENTS = ("train", "eval")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All events of a metrics.jsonl; a torn last line (killed mid-write) is skipped."""
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise DataError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(record, dict) or "event" not in record:
            raise DataError(f"{path}:{number}: expected an object with an 'event' field")
        records.append(record)
    return records


def continuous(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Train/eval records as one timeline: resumes cut the abandoned tail, last per step wins."""
    kept: dict[tuple[str, int], dict[str, Any]] = {}
    for record in records:
        event, step = record["event"], record.get("step")
        if step is None:
            continue
        if event == "resume":
            # Steps after the checkpoint we resumed from belong to the dead timeline.
            kept = {k: v for k, v in kept.items() if k[1] <= int(step)}
        elif event in SERIES_EVENTS:
            kept[(event, int(step))] = record  # a repeated step: the later record wins
    return sorted(kept.values(), key=lambda r: (int(r["step"]), r["event"]))


def series(records: list[dict[str, Any]], event: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one key, in step order, skipping records without it."""
    pairs = [(r["step"], r[key]) for r in records if r["event"] == event and _number(r.get(key))]
    steps = np.array([p[0] for p in pairs], dtype=np.int64)
    return steps, np.array([p[1] for p in pairs], dtype=np.float64)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_rate(values: np.ndarray) -> bool:
    finite = values[np.isfinite(values)]
    return finite.size > 0 and bool(((finite >= 0) & (finite <= 1)).all())


def latest_predictions(run_dir: Path) -> Path | None:
    files = sorted((run_dir / "eval").glob("predictions-step-*.npz"))
    return files[-1] if files else None


def load_predictions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probs) of a predictions file; probs from logits when only logits are stored."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "labels" not in data or ("probs" not in data and "logits" not in data):
                raise DataError(f"{path}: needs arrays 'labels' and 'probs' (or 'logits')")
            labels = data["labels"].reshape(-1)
            if "probs" in data:
                probs = data["probs"].reshape(-1).astype(np.float64)
            else:
                probs = 1.0 / (1.0 + np.exp(-data["logits"].reshape(-1).astype(np.float64)))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable predictions file ({exc})") from None
    if labels.shape != probs.shape:
        raise DataError(f"{path}: labels {labels.shape} and probs {probs.shape} differ in length")
    return labels, probs


def _curve_plots(plots: Path, labels: np.ndarray, probs: np.ndarray, when: str) -> dict[str, Path]:
    from matplotlib.figure import Figure

    try:
        points = curves.curve_points(labels, probs)
    except ValueError as exc:
        raise DataError(f"predictions ({when}): {exc}") from None
    specs = {
        "roc": ("ROC", "false positive rate", "true positive rate"),
        "pr": ("Precision-recall", "recall", "precision"),
        "prob_hist": ("Predicted probability per class", "P(positive)", "fraction of class"),
    }
    out = {}
    for name, (title, xlabel, ylabel) in specs.items():
        fig = Figure(figsize=(5.5, 4.5), layout="constrained")
        ax = fig.add_subplot()
        if name == "roc":
            out[name] = plots_module.roc_plot(
                plots / "roc.png", points.fpr, points.tpr, points.auroc,
                points.counts["negative"], when,
            )  # fmt: skip
            continue
        if name == "pr":
            ax.plot(points.recall, points.precision, label=f"AP {points.ap:.4f}")
            prevalence = points.counts["positive"] / max(sum(points.counts.values()), 1)
            ax.axhline(prevalence, color="grey", linestyle=":", linewidth=1, label="prevalence")
        else:
            for cls, frac in points.fractions.items():
                ax.stairs(frac, points.bin_edges, label=f"{cls} (n={points.counts[cls]})")
        ax.set(title=f"{title}, {when}", xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        out[name] = plots / f"{name}.png"
        fig.savefig(out[name], dpi=110)
    return out


def froc_source(run_dir: Path, predictions: Path | None) -> tuple[dict | None, str, str]:
    """(record, title, metric name) for froc.png, or (None, why not, ""): challenge JSON
    first, else per candidate from the latest predictions."""
    files = sorted((run_dir / "eval").glob("froc-*.json"), key=lambda p: p.stat().st_mtime)
    if files:
        try:
            record = json.loads(files[-1].read_text())
        except ValueError:
            raise DataError(f"{files[-1]}: not a FROC record (rerun pipeline evaluate)") from None
        return record, f"LUNA16 FROC per nodule ({files[-1].name})", "CPM"
    if predictions is None:
        return None, "no predictions and no eval/froc-*.json", ""
    with np.load(predictions, allow_pickle=False) as data:
        if "groups" not in data:
            return None, f"{predictions.name} has no scan ids (groups)", ""
        labels, groups = data["labels"].reshape(-1), [str(g) for g in data["groups"]]
    _, probs = load_predictions(predictions)
    from pipeline import froc
    from pipeline.luna16 import curve_record

    # 200 resamples draw the band well enough and keep a 100k-candidate report quick.
    result = froc.froc_score(froc.candidate_matched(labels, probs, groups), bootstrap=200)
    number = predictions.stem.rsplit("-", 1)[-1]
    when = f"step {int(number)}" if number.isdigit() else predictions.stem
    title = f"FROC per candidate (no annotations), {when}"
    # Interpolated, as the challenge reads its curve; val/cpm_candidate is the step version.
    return curve_record(result), title, "per-candidate CPM (interpolated)"


def render_report(run_dir: Path) -> dict[str, Any]:
    """Write the PNGs into RUN_DIR/plots/ and return the summary (what `report` prints)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise DataError(f"run directory not found: {run_dir}")
    if not metrics.is_file():
        raise DataError(f"{metrics}: not found (is {run_dir} a run directory?)")
    events = read_metrics(metrics)
    timeline = continuous(events)
    if not timeline:
        raise DataError(f"{metrics}: no train or eval records yet, nothing to report")
    resumes = sorted({int(r["step"]) for r in events if r["event"] == "resume" and "step" in r})
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    drawn: dict[str, Path] = {}
    skipped: dict[str, str] = {}

    train_loss = {"train/loss": series(timeline, "train", "train/loss")}
    val_loss = {"val/loss": series(timeline, "eval", "val/loss")}
    train_loss = {k: v for k, v in train_loss.items() if len(v[0])}
    val_loss = {k: v for k, v in val_loss.items() if len(v[0])}
    lr = series(timeline, "train", "train/lr")
    val_keys = sorted(
        {k for r in timeline if r["event"] == "eval" for k in r if k.startswith("val/")}
    )
    rates = {k: series(timeline, "eval", k) for k in val_keys if k != "val/loss"}
    # Only rates share one [0, 1] axis; counts (val/n_pos...) would flatten them.
    rates = {k: v for k, v in rates.items() if len(v[0]) and _is_rate(v[1])}
    if train_loss or val_loss:
        drawn["loss"] = plots_module.loss_plot(plots / "loss.png", train_loss, val_loss, resumes)
    else:
        skipped["loss"] = "no values logged"
    if len(lr[0]):
        drawn["lr"] = plots_module.lr_plot(plots / "lr.png", lr, resumes)
    else:
        skipped["lr"] = "no values logged"
    metrics_drawn = plots_module.val_metrics_plot(plots / "val_metrics.png", rates, resumes)
    if rates and metrics_drawn is not None:
        drawn["val_metrics"] = metrics_drawn
    else:
        skipped["val_metrics"] = "no values logged"

    predictions = latest_predictions(run_dir)
    if predictions is None:
        for name in ("roc", "pr", "prob_hist"):
            skipped[name] = f"no {run_dir / 'eval'}/predictions-step-*.npz"
        labels = np.zeros(0)
    else:
        labels, probs = load_predictions(predictions)
        number = predictions.stem.rsplit("-", 1)[-1]
        when = f"step {int(number)}" if number.isdigit() else predictions.stem
        drawn.update(_curve_plots(plots, labels, probs, when))
    froc_record, froc_title, metric = froc_source(run_dir, predictions)
    if froc_record is None:
        skipped["froc"] = froc_title
    else:
        drawn["froc"] = plots_module.froc_plot(plots / "froc.png", froc_record, froc_title, metric)

    train_loss = series(timeline, "train", "train/loss")
    auroc = series(timeline, "eval", "val/auroc")
    best = int(np.nanargmax(auroc[1])) if np.isfinite(auroc[1]).any() else None
    return {
        "run_dir": str(run_dir),
        "first_step": int(timeline[0]["step"]),
        "last_step": int(timeline[-1]["step"]),
        "resumes": resumes,
        "final_loss": float(train_loss[1][-1]) if len(train_loss[0]) else None,
        "final_loss_step": int(train_loss[0][-1]) if len(train_loss[0]) else None,
        "best_val_auroc": float(auroc[1][best]) if best is not None else None,
        "best_step": int(auroc[0][best]) if best is not None else None,
        "warnings": sum(r["event"] == "warning" for r in events),
        "predictions": str(predictions) if predictions else None,
        "predictions_count": int(labels.size),
        "plots": {name: str(path) for name, path in drawn.items()},
        "skipped": skipped,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The few lines `pipeline report` prints."""
    lines = [f"run: {summary['run_dir']}"]
    resumes = summary["resumes"]
    resumed = (
        f" ({len(resumes)} resume(s), from step {', '.join(map(str, resumes))})" if resumes else ""
    )
    lines.append(f"steps: {summary['first_step']}..{summary['last_step']}{resumed}")
    if summary["final_loss"] is not None:
        lines.append(
            f"final train/loss: {summary['final_loss']:.4g} (step {summary['final_loss_step']})"
        )
    if summary["best_val_auroc"] is not None:
        lines.append(
            f"best val/auroc: {summary['best_val_auroc']:.4f} at step {summary['best_step']}"
        )
    if summary["predictions"]:
        lines.append(
            f"predictions: {summary['predictions']} ({summary['predictions_count']} samples)"
        )
    if summary["warnings"]:
        lines.append(f"warnings: {summary['warnings']} (see metrics.jsonl)")
    lines += [f"plot: {path}" for path in summary["plots"].values()]
    lines += [f"not drawn: {name}.png ({why})" for name, why in summary["skipped"].items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    print(format_summary(render_report(Path(args.run_dir))))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="plot a run's curves into RUN_DIR/plots/ and print a summary",
        description="Render loss/LR/validation curves, ROC, PR and the probability histogram "
        "of a run directory into RUN_DIR/plots/*.png (works offline, across resumes).",
    )
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="the run directory (holds metrics.jsonl)"
    )
    parser.set_defaults(func=run)
