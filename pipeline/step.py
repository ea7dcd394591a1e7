"""The one function that performs an optimizer step.

`Trainer.fit`, the DDP-equivalence test (`tests/ddp_worker.py`) and the training benchmark
(`scripts/bench_train.py`) all call `train_step`; there is no other copy of the step.

    for each of grad_accum micro-batches:          (no_sync on all but the last)
        forward under autocast -> loss / accum -> scaler.scale(loss).backward()
    unscale -> clip -> [non-finite? skip] -> step -> update -> zero -> scheduler.step
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline import distributed
from pipeline.data.transforms import DeviceTransform
from pipeline.model import as_logits


@dataclass
class StepParts:
    """Everything a step touches. `model` is what runs forward (DDP and/or compiled);
    `ddp` is the DDP wrapper itself (a compiled wrapper hides its no_sync), or None."""

    model: nn.Module
    ddp: nn.parallel.DistributedDataParallel | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    transform: DeviceTransform
    autocast: Callable[[], contextlib.AbstractContextManager]
    augment_rng: torch.Generator | None
    device: torch.device
    grad_accum: int = 1
    grad_clip: float = 0.0
    precision: str = "fp32"
    buffers: list[torch.Tensor] = field(default_factory=list)
    """The model's buffers (BatchNorm statistics), restored when a step is skipped."""
    saved_buffers: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.buffers = list(self.model.buffers())
        self.saved_buffers = [b.detach().clone() for b in self.buffers]


@dataclass
class StepOutcome:
    loss: torch.Tensor
    """Mean loss over the micro-batches, on the device (read it at log time, not here)."""
    grad_norm: torch.Tensor
    finite: bool
    """False: the step was skipped (non-finite loss or gradient); the same on every rank."""
    wait_s: float
    """Seconds blocked waiting for the loader."""
    logits: torch.Tensor
    """The first micro-batch's logits (for the dynamic guard)."""
    bad_records: list[Any]
    """Each micro-batch's (worker, skipped records so far) pair, when the loader sent one."""


def train_step(parts: StepParts, batches: Iterator[dict[str, Any]]) -> StepOutcome:
    """One optimizer step over `parts.grad_accum` micro-batches drawn from `batches`."""
    accum, ddp, device = parts.grad_accum, parts.ddp, parts.device
    if parts.buffers:
        torch._foreach_copy_(parts.saved_buffers, parts.buffers)
    loss_sum = torch.zeros((), device=device)
    wait, first_logits, bad_records = 0.0, None, []
    for micro in range(accum):
        waited = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - waited
        patch = batch["patch"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True).float()
        crops = parts.transform(patch, train=True, generator=parts.augment_rng)
        # Only the last micro-step all-reduces gradients.
        sync = ddp.no_sync() if ddp is not None and micro < accum - 1 else contextlib.nullcontext()
        with sync:
            with parts.autocast():
                logits = as_logits(parts.model(*crops))
            loss = parts.criterion(logits.float(), label) / accum
            parts.scaler.scale(loss).backward()
        loss_sum += loss.detach()
        first_logits = logits if first_logits is None else first_logits
        if "bad_records" in batch:
            bad_records.append(batch["bad_records"])

    parts.scaler.unscale_(parts.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        parts.model.parameters(), parts.grad_clip or math.inf
    )
    if parts.precision == "fp16":
        # GradScaler skips overflowing gradients and lowers its scale: routine. A
        # non-finite loss is not (it must count towards max_bad_steps), and losses are
        # per rank, so ranks agree on it in one small all-reduce.
        finite = not distributed.any_rank(not bool(torch.isfinite(loss_sum)))[0]
    else:
        # Gradients are all-reduced: every rank sees the same norm and takes the same
        # decision without talking to the others.
        finite = bool(torch.isfinite(grad_norm))
    if not finite and parts.buffers:
        with torch.no_grad():  # NaN BatchNorm statistics would poison every eval
            torch._foreach_copy_(parts.buffers, parts.saved_buffers)
    if finite or parts.precision == "fp16":
        # Skip for fp32/bf16: AdamW's moments must not see inf/nan. fp16: GradScaler
        # sees the inf/nan gradients and skips the step itself.
        parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scheduler.step()
    assert first_logits is not None  # accum >= 1
    return StepOutcome(loss_sum, grad_norm.detach(), finite, wait, first_logits, bad_records)
