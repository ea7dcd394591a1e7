"""What a training step changes and a resume restores, in one object.

`TrainState` holds the step counter, the plain model (never its DDP or compiled wrapper),
optimizer, LR scheduler, GradScaler, the EMA of the weights (when on), this rank's
augmentation generator and the data position. `state_dict()` / `load_state_dict()` are
the only way in and out; the checkpoint manager stores the dict and knows nothing of what
is inside.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.checkpoint import restore_rng, rng_state
from pipeline.config import Config
from pipeline.data.position import Plan
from pipeline.ema import Ema
from pipeline.errors import CheckpointError
from pipeline.logit_check import guard_static
from pipeline.model import build_model
from pipeline.optim import build_optimizer, build_scheduler, load_optimizer_state

log = logging.getLogger("pipeline")


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    augment_rng: torch.Generator
    grad_accum: int = 1
    seed: int = 0
    step: int = 0
    """Optimizer steps taken: the one step counter of the run."""
    range_warning: str | None = None
    """The logit guard's range probe finding at build time (reported once training starts)."""
    ema: Ema | None = None
    """The weights' moving average (`model.ema_decay` > 0), else None."""
    data_problems: bool = False
    """Once any rank skipped a record, manifest counts overstate what the stream emits, so a
    resume must replay positions by real samples (see `Trainer.batches`)."""
    segments: list[dict[str, int]] = field(default_factory=list)
    """The data stream's topologies, oldest first, with the step each began at
    (`resume_stream.py`); empty: one, this run's, from step 0."""
    data_plan: Plan | None = None
    """The current segment's continuation of an interrupted epoch (derived on resume, not saved)."""

    @property
    def consumed_batches(self) -> int:
        """Batches each rank has taken from its stream: the data position."""
        return self.step * self.grad_accum

    @property
    def stream_batches(self) -> int:
        """Batches each rank has taken from the current segment's stream."""
        start = self.segments[-1]["step"] if self.segments else 0
        return (self.step - start) * self.grad_accum

    def seed_fresh(self, rank: int, offset: int = 0) -> None:
        """A fresh run: each rank its own stream for dropout and friends.

        Python's and numpy's global RNGs too: user models may draw from them, and they
        must repeat for a resumed run to equal an uninterrupted one.
        """
        seed = self.seed + 7919 * (rank + 1) + offset
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)

    def local_rng(self) -> dict[str, Any]:
        """This rank's random states; `state_dict` takes every rank's, in rank order."""
        return rng_state(self.augment_rng)

    @property
    def eval_model(self) -> nn.Module:
        """What validation scores and `best.pt` is chosen by: the EMA weights when on."""
        return self.ema.module if self.ema is not None else self.model

    def state_dict(self, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            **(self.ema.state_dict() if self.ema is not None else {}),
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rngs,
            "loader": {
                "consumed_batches": self.consumed_batches,
                "data_problems": self.data_problems,
                "segments": self.segments,
            },
        }

    def load_state_dict(
        self, state: dict[str, Any], rank: int, world_size: int, source: Path | None = None
    ) -> bool:
        """Restore everything; returns False when the RNG states were saved by another
        world size (then this rank's streams restart from seeds, shifted by the step).
        `source` names the file in the error when the weights do not fit the model."""
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            # "Error(s) in loading state_dict for X:" then one line per mismatch: show one.
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            first = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
            raise CheckpointError(f"checkpoint {source}: model does not fit ({first})") from None
        if self.ema is not None:
            self.ema.load_state_dict(state, self.model)
        elif "ema" in state:
            log.info("model.ema_decay=0: the checkpoint's EMA weights are not carried on")
        load_optimizer_state(self.optimizer, state["optimizer"])  # fresh if optim.name changed
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.data_problems = bool(state.get("loader", {}).get("data_problems", False))
        self.segments = [dict(s) for s in state.get("loader", {}).get("segments", [])]
        rngs = state.get("rng", [])
        if len(rngs) == world_size:
            restore_rng(rngs[rank], self.augment_rng)
            return True
        self.seed_fresh(rank, offset=self.step)
        return False

    def digest(self) -> str:
        """Step and every parameter and buffer, hashed: equal on ranks that hold one state."""
        h = hashlib.sha256(str(self.step).encode())
        for name, tensor in self.model.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        return h.hexdigest()[:16]


def build_train_state(cfg: Config, device: torch.device, precision: str, rank: int) -> TrainState:
    """The model (checked by the static guard, on `device`), optimizer, schedule, scaler."""
    # Same init on every rank (DDP would broadcast rank 0's weights anyway).
    torch.manual_seed(cfg.train.seed)
    model = build_model(
        dims=cfg.data.dims,
        in_channels=cfg.data.channels,
        scales=cfg.data.scales,
        **{k: getattr(cfg.model, k) for k in ("name", "target", "kwargs", "width", "depth")},
        **{k: getattr(cfg.model, k) for k in ("features", "hidden", "dropout")},
    )
    range_warning = guard_static(model, cfg)
    fmt = torch.channels_last if cfg.data.dims == 2 else torch.channels_last_3d
    model = model.to(device, memory_format=fmt if cfg.model.channels_last else None)
    optimizer = build_optimizer(model, cfg.optim, device)
    # After the move to the device: the EMA copy lives beside the weights it follows.
    ema = Ema(model, cfg.model.ema_decay) if cfg.model.ema_decay > 0 else None
    return TrainState(
        model,
        optimizer,
        build_scheduler(optimizer, cfg.optim, cfg.train.max_steps),
        torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        torch.Generator(device).manual_seed(cfg.train.seed * 1_000_003 + rank),
        grad_accum=cfg.train.grad_accum,
        seed=cfg.train.seed,
        ema=ema,
        range_warning=range_warning,
    )
