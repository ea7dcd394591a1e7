"""Validation during training: predictions and metrics, the best-metric tracker, eval files.

`validate` only computes (every rank predicts its share, rank 0 scores); `BestMetric`
only compares; `record_eval` only writes what a user reads afterwards. The loop decides
when each runs.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import distributed, guard
from pipeline.config import Config, metric_mode
from pipeline.data.transforms import DeviceTransform
from pipeline.evaluate import Predictions, eval_spec, metrics_of, predict_all, save_predictions
from pipeline.metrics import operating_points, probability_histogram
from pipeline.runtime import autocast
from pipeline.tracking import Tracker

log = logging.getLogger("pipeline")


@dataclass
class Validation:
    predictions: Predictions
    metrics: dict[str, float]
    """`val/<name>` for every metric, validation loss (`val/loss`) included."""


def validation_loss(preds: Predictions, pos_weight: float) -> float:
    """BCEWithLogits with pos_weight on the raw labels over all validation samples.

    Whatever the training loss (`loss.name`, `loss.label_smoothing`): one number that
    compares across losses, and the one `checkpoint.metric=loss` selects by."""
    if len(preds.labels) == 0:
        return math.nan
    logits = torch.from_numpy(preds.logits).double()
    labels = torch.from_numpy(preds.labels.astype(np.float64))
    weight = torch.tensor(pos_weight, dtype=torch.float64)
    return float(nn.functional.binary_cross_entropy_with_logits(logits, labels, pos_weight=weight))


def validate(
    model: nn.Module,
    shards: list[str],
    cfg: Config,
    transform: DeviceTransform,
    device: torch.device,
    precision: str,
    pos_weight: float,
) -> Validation | None:
    """Every validation sample once across ranks; rank 0 gets the result, others None."""
    spec = eval_spec(cfg, shards)
    # Rank 0's BatchNorm statistics (the checkpointed ones) everywhere, so distributed
    # validation equals evaluating the saved checkpoint.
    distributed.broadcast_buffers(model)
    preds = predict_all(
        model, spec, transform, device, autocast(precision, device), cfg.data.num_workers
    )
    if preds is None:
        return None
    metrics = {f"val/{k}": v for k, v in metrics_of(preds).items()}
    metrics["val/loss"] = validation_loss(preds, pos_weight)
    metrics["val/bad_records"] = preds.bad_records
    return Validation(preds, metrics)


class BestMetric:
    """The best value of one validation metric so far, higher or lower being better."""

    def __init__(self, metric: str, mode: str | None = None) -> None:
        self.metric = metric
        self.mode = metric_mode(metric) if mode in (None, "auto") else mode
        self.value: float | None = None
        self.step: int | None = None
        self.since = 0
        """Validations since the best one (or since the start): early stopping's count."""

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """True when `metrics` holds a new best (NaN never is)."""
        value = metrics.get(f"val/{self.metric}")
        if value is None:
            return False  # not measured (cpm_candidate without scan ids): nothing to count
        better = (
            bool(np.isfinite(value))  # a NaN evaluation counts as one without improvement
            and (
                self.value is None
                or (value > self.value if self.mode == "max" else value < self.value)
            )
        )
        if better:
            self.value, self.step = float(value), step
        self.since = 0 if better else self.since + 1
        return better

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "value": self.value, "step": self.step,
                "since": self.since}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the record, unless it was kept for another metric or direction."""
        if state.get("metric") != self.metric or state.get("mode", "max") != self.mode:
            log.warning(
                "checkpoint.metric/mode changed (%s %s -> %s %s): best starts afresh",
                state.get("metric"),
                state.get("mode", "max"),
                self.metric,
                self.mode,
            )
            return
        self.value, self.step = state.get("value"), state.get("step")
        self.since = int(state.get("since", 0))

    def reset(self, why: str) -> None:
        log.warning("best %s starts afresh: %s", self.metric, why)
        self.value = self.step = None
        self.since = 0


def record_eval(run_dir: Path, step: int, result: Validation, tracker: Tracker) -> dict[str, float]:
    """Rank 0: the eval files (predictions, histogram, thresholds) and the tracker's record.

    Returns the operating-point thresholds (they go into the checkpoint).
    """
    preds, probs = result.predictions, result.predictions.probs
    thresholds = operating_points(preds.labels, probs)
    eval_dir = run_dir / "eval"
    eval_dir.mkdir(exist_ok=True)
    save_predictions(eval_dir / f"predictions-step-{step:08d}.npz", preds)
    histogram = probability_histogram(preds.labels, probs)
    (eval_dir / f"histogram-step-{step:08d}.json").write_text(json.dumps(histogram))
    (run_dir / "thresholds.json").write_text(json.dumps(thresholds, indent=2))
    warning = guard.check_validation_probs(probs)
    if warning:
        tracker.warn(step, warning)
    tracker.log_eval(step, result.metrics, preds.labels, probs, preds.groups)
    return thresholds
