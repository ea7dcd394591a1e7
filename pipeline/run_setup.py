"""What `train()` sets up before the first step: the data, the tracker, the log window.

Each is built once and handed to the `Trainer`; nothing here holds on to the loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline import distributed
from pipeline.config import Config, to_dict, to_yaml
from pipeline.data import balance
from pipeline.data import sources as data_sources
from pipeline.data.compat import check_fit
from pipeline.data.loader import StreamSpec, TrainStream, build_loader, check_readers
from pipeline.runtime import system_info
from pipeline.tracking import Tracker
from pipeline.train_state import TrainState


def prepare_data(cfg: Config) -> tuple[data_sources.Sources, float]:
    """Rank 0's resolved shard lists on every rank, and the loss's pos_weight.

    Data first: bad patterns fail here, before the model costs anything. Every rank checks
    the patterns (errors surface everywhere), then takes rank 0's list: a lagging shared
    filesystem must not give ranks different shard lists.
    """
    if cfg.data.train is None:
        data_sources.ensure_synthetic(cfg.data, distributed.is_main())
        distributed.barrier()
    sources = distributed.broadcast_object(data_sources.resolve(cfg.data))
    check_fit(sources, cfg.data)  # shards vs data.dims/channels/scales/patch size: one line
    check_readers(len(sources.train), distributed.env().world_size, cfg.data.num_workers)
    draws = balance.draws_for(cfg, sources)  # bad data.balance fails here, before the model
    if distributed.is_main():
        balance.describe(cfg, sources, draws)
    pos_weight = cfg.loss.pos_weight
    if pos_weight == "auto" and draws:
        # The loss sees the balanced batches, not the data set's ratio.
        pos_weight = balance.balanced_pos_weight(cfg.data.balance, cfg.loss.max_pos_weight)
    elif pos_weight == "auto":
        pos_weight = data_sources.auto_pos_weight(sources, cfg.loss.max_pos_weight)
    return sources, float(pos_weight)


def open_tracker(
    cfg: Config,
    run_dir: Path,
    device: torch.device,
    precision: str,
    pos_weight: float,
    resumed_step: int | None,
    sources: data_sources.Sources,
) -> Tracker:
    """config.yaml, W&B and metrics.jsonl (rank 0 writes; other ranks get a silent one)."""
    env = distributed.env()
    ranks = distributed.gather_objects(distributed.placement())
    main = distributed.is_main()
    sink, system = None, {}
    if main:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        system = system_info(device, env.world_size)
        system.update(
            ranks=ranks,
            precision=precision,
            pos_weight=pos_weight,
            global_batch=cfg.train.batch_size * cfg.train.grad_accum * env.world_size,
        )
        from pipeline.tracking.wandb_sink import wandb_sink_or_none

        sink = wandb_sink_or_none(cfg.wandb, run_dir, to_dict(cfg), system, resumed_step)
    start = resumed_step or 0
    tracker = Tracker(run_dir, main, start, cfg.train.max_steps, sink)
    if main:
        tracker.event("start" if resumed_step is None else "resume", start, {"system": system})
        tracker.declare_data(
            {"train": sources.train, "val": sources.val},
            to_dict(cfg),
            system.get("git_commit"),
            cfg.wandb.log_checkpoints,
        )
    return tracker


def train_batches(
    cfg: Config, sources: data_sources.Sources, state: TrainState, device: torch.device
) -> Iterator[dict[str, Any]]:
    """This rank's training stream from the state's data position (exact resume)."""
    env = distributed.env()
    spec = StreamSpec(
        sources.train,
        cfg.train.batch_size,
        cfg.train.seed,
        env.rank,
        env.world_size,
        cfg.data.num_workers,
        cfg.data.shuffle_blocks,
        cfg.data.on_error,
        # Manifest counts let a resume skip whole epochs unread; after skipped records they
        # overstate the stream, so the resume then counts real samples from epoch 0.
        None if state.data_problems else sources.train_counts,
        consumed=state.stream_batches,
        plan=state.data_plan,  # after a world size / num_workers change (resume_stream.py)
        sample_shape=cfg.data.sample_shape,
        reader=cfg.data.reader,
        balance_draws=balance.draws_for(cfg, sources),
        balance_reservoir=cfg.data.balance_reservoir,
    )
    loader = build_loader(
        TrainStream(spec), cfg.data.num_workers, device.type == "cuda", cfg.data.prefetch_factor
    )
    return iter(loader)


@dataclass
class Window:
    """Running totals between two log lines (losses stay on the device: no sync per step)."""

    started: float = field(default_factory=time.perf_counter)
    wait: float = 0.0
    busy: float = 0.0
    steps: int = 0
    samples: int = 0
    loss_sum: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None

    def add(
        self, loss: torch.Tensor, grad_norm: torch.Tensor, wait: float, seconds: float, samples: int
    ) -> None:
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.grad_norm, self.wait = grad_norm, self.wait + wait
        self.busy, self.steps, self.samples = (
            self.busy + seconds,
            self.steps + 1,
            self.samples + samples,
        )

    def values(self, skipped_records: float) -> dict[str, Any]:
        """The window's train/* metrics, averaged over ranks (one small all-reduce)."""
        env = distributed.env()
        loss = (self.loss_sum / max(self.steps, 1)) if self.loss_sum is not None else torch.nan
        loss, skipped = distributed.sum_across([float(loss), float(skipped_records)])
        elapsed = time.perf_counter() - self.started
        norm = float(self.grad_norm) if self.grad_norm is not None else float("nan")
        return {
            "train/loss": loss / env.world_size,
            "train/grad_norm": norm,
            "train/samples_per_s": self.samples * env.world_size / max(elapsed, 1e-9),
            "train/data_wait": self.wait / max(self.busy, 1e-9),
            "train/bad_records": skipped,
        }
