"""One place for everything a run reports: console/tqdm, `metrics.jsonl` and W&B.

Only rank 0 builds a live Tracker; other ranks get one whose methods do nothing, so the
training loop never asks which rank it is before logging.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.tracking import artifacts
from pipeline.tracking.progress import Progress

log = logging.getLogger("pipeline")


class Tracker:
    """Fans each event out to metrics.jsonl, the progress display and (optionally) W&B."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        start_step: int,
        max_steps: int,
        wandb_sink: Any = None,
    ) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.wandb = wandb_sink
        self.progress = Progress(start_step, max_steps, enabled)
        self._jsonl = open(run_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115

    def _write(self, event: str, step: int, values: dict[str, Any]) -> None:
        if self._jsonl is None:
            return
        record = {"event": event, "step": step, "time": time.time()}
        record.update({k: _json_safe(v) for k, v in values.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def event(self, event: str, step: int, values: dict[str, Any]) -> None:
        """A non-metric event (config, system, resume) for the local record."""
        self._write(event, step, values)

    def log_train(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._write("train", step, values)
        self.progress.update(step, values)
        if self.wandb is not None:
            self.wandb.log(step, values)

    def log_eval(
        self,
        step: int,
        values: dict[str, float],
        labels: np.ndarray,
        probs: np.ndarray,
        groups: list[str] | None = None,
    ) -> None:
        if not self.enabled:
            return
        self._write("eval", step, values)
        shown = " ".join(
            f"{k.split('/', 1)[-1]} {v:.4f}"
            for k, v in values.items()
            if k
            in (
                "val/auroc",
                "val/ap",
                "val/sensitivity",
                "val/specificity",
                "val/cpm",
                "val/cpm_candidate",
            )
        )
        self.progress.write(f"eval @ step {step}: {shown}")
        if self.wandb is not None:
            self.wandb.log(step, values)
            self.wandb.log_curves(step, labels, probs, groups)

    def declare_data(
        self,
        splits: dict[str, list[str]],
        config: dict[str, Any],
        git_commit: str | None,
        log_checkpoints: str,
    ) -> None:
        """Record which shards this run reads (W&B dataset artifacts by reference) and
        remember what model artifacts need: config, data digests, commit, the policy."""
        if not self.enabled:
            return
        self._lineage = {
            "config": config,
            "data": {s: artifacts.data_digest(shards) for s, shards in splits.items() if shards},
            "git_commit": git_commit,
            "policy": log_checkpoints,
        }
        self._write("data", 0, {"data_digest": self._lineage["data"]})
        if self.wandb is not None:
            self.wandb.declare_data(splits)

    def checkpoint_saved(
        self, step: int, folder: Path, improved: bool, final: bool, metrics: dict[str, float]
    ) -> None:
        """Log checkpoints as W&B model artifacts per `wandb.log_checkpoints` (rank 0).

        best.pt (aliases `best`, `step-N`) whenever it improved; last.pt (`latest`,
        `step-N`) at every save with `all`, and at the end of the run with `best`.
        """
        lineage = getattr(self, "_lineage", None)
        if self.wandb is None or lineage is None or lineage["policy"] == "none":
            return
        meta = artifacts.model_metadata(
            step, metrics, lineage["config"], lineage["data"], lineage["git_commit"]
        )
        if improved and (folder / "best.pt").is_file():
            self.wandb.log_model(folder / "best.pt", ["best", f"step-{step}"], meta)
        if (final or lineage["policy"] == "all") and (folder / "last.pt").is_file():
            self.wandb.log_model(folder / "last.pt", ["latest", f"step-{step}"], meta)

    def warn(self, step: int, message: str, local: bool = False) -> None:
        """A loud warning: console, the local record and W&B.

        Warnings about a decision all ranks share print once (rank 0), not once per rank;
        `local=True` is for what only this rank saw (its own batch), printed with its rank.
        """
        if self.enabled or local:
            log.warning(message)
        if not self.enabled:
            return
        self._write("warning", step, {"message": message})
        if self.wandb is not None:
            self.wandb.alert(message)

    def close(self) -> None:
        self.progress.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def _json_safe(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value
