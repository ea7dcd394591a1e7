"""Tiny training runs inside the test process: `train()` on configs/tiny.yaml, on the CPU,
with results and checkpoints to assert on (cheaper than a subprocess per run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import checkpoint, config
from tests.conftest import TINY


def tiny_config(shards: Path, run_dir: Path, *extra: str) -> config.Config:
    return config.load(
        TINY,
        [
            f"data.train={shards}/train-*.tar",
            f"data.val={shards}/val-*.tar",
            f"run.dir={run_dir}",
            "train.device=cpu",
            "train.threads=1",
            "train.batch_size=8",
            *extra,
        ],
    )


def train_tiny(shards: Path, run_dir: Path, *extra: str) -> dict[str, Any]:
    """`train()` in this process; returns its result."""
    from pipeline.train import train

    return train(tiny_config(shards, run_dir, *extra))


def saved(run_dir: Path, name: str = "last.pt") -> dict[str, Any]:
    return checkpoint.load(run_dir / "checkpoints" / name)
