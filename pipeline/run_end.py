"""The end of a run: the proof that every rank took the same steps, the last event and
the one console line a user reads, and the result `train()` returns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import distributed
from pipeline.tracking import Tracker


def finish(
    tracker: Tracker,
    step: int,
    best: dict[str, Any],
    metrics: dict[str, float],
    run_dir: Path,
    stopped: bool,
    early_stopped: bool = False,
) -> dict[str, Any]:
    """Every rank: gather the step counts, close the tracker; rank 0 prints the summary."""
    # Proof that no rank ran ahead or fell behind (uneven shards must not matter).
    steps = distributed.gather_objects(step)
    tracker.event(
        "end", step, {"stopped": stopped, "early_stopped": early_stopped, "steps_per_rank": steps}
    )
    tracker.close()
    if distributed.is_main():
        value = "n/a" if best["value"] is None else f"{best['value']:.4f}"
        print(
            f"{'stopped' if stopped else 'done'} at step {step}: best val {best['metric']} "
            f"{value} (step {best['step']}) | outputs in {run_dir} "
            f"(config.yaml, metrics.jsonl, checkpoints/, eval/)",
            flush=True,
        )
    return {
        "step": step,
        "steps_per_rank": steps,
        "stopped": stopped,
        "early_stopped": early_stopped,
        "run_dir": str(run_dir),
        "best": best,
        "metrics": metrics,
    }
