"""The one function that performs an optimizer step.

`Trainer.fit`, the DDP-equivalence test (`tests/ddp_worker.py`) and the training benchmark
(`scripts/bench_train.py`) all call `train_step`; there is no other copy of the step.

    for each of grad_accum micro-batches:          (no_sync on all but the last)
        forward under autocast -> loss / accum -> scaler.scale(loss).backward()
    unscale -> clip -> step (skipped on the device if non-finite) -> update -> zero -> schedule

A steady-state step never waits for the device: the loss and the gradient norm stay
device tensors until the log line, and the non-finite decision is taken on the device
(the fused optimizers' `found_inf`, as GradScaler uses it). `NonFiniteSteps` reads the
decisions at log time, so `train.max_bad_steps` is enforced up to `train.log_every` steps late.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline import distributed
from pipeline.data.transforms import DeviceTransform
from pipeline.losses import build_loss
from pipeline.model import as_logits
from pipeline.runtime import autocast

if TYPE_CHECKING:  # import cycles at runtime: train_state builds models and optimizers
    from pipeline.config import Config
    from pipeline.train_state import TrainState


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
    finite: torch.Tensor
    """A device bool, False when the step was skipped (non-finite loss or gradient); read
    it through `NonFiniteSteps`, not here (reading it is a host sync)."""
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
        # GradScaler skips overflowing gradients (found on the device) and lowers its scale:
        # routine. A non-finite loss is not: it counts towards max_bad_steps. Losses are per
        # rank; `NonFiniteSteps` agrees on them across ranks at log time.
        finite = torch.isfinite(loss_sum)
        parts.scaler.step(parts.optimizer)
    else:
        # Gradients are all-reduced: every rank sees the same norm and takes the same
        # decision without talking to the others. AdamW's moments must not see inf/nan.
        finite = torch.isfinite(grad_norm)
        _step_unless(parts.optimizer, finite)
    if parts.buffers:
        with torch.no_grad():  # NaN BatchNorm statistics would poison every eval
            pairs = zip(parts.buffers, parts.saved_buffers, strict=True)
            torch._foreach_copy_(parts.buffers, [torch.where(finite, b, s) for b, s in pairs])
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scheduler.step()
    assert first_logits is not None  # accum >= 1
    return StepOutcome(loss_sum, grad_norm.detach(), finite, wait, first_logits, bad_records)


def _step_unless(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """`optimizer.step()`, skipped when `finite` is False, without reading it on the host.

    Fused optimizers take GradScaler's protocol: a `found_inf` device tensor makes the
    kernel leave parameters, moments and step counters untouched. Others (a user's or a
    non-fused one) need the host read; `build_optimizer` builds fused ones on CPU and CUDA.
    """
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale, optimizer.found_inf = None, (~finite).float()
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif bool(finite):
        optimizer.step()


def step_parts(
    cfg: Config,
    state: TrainState,
    model: nn.Module,
    ddp: nn.parallel.DistributedDataParallel | None,
    pos_weight: float,
    precision: str,
    device: torch.device,
) -> StepParts:
    """The training run's step: `model` (wrapped) and `state`'s optimizer, schedule and
    scaler, the configured loss, and the augmenting device transform."""
    data = cfg.data
    transform = DeviceTransform(
        data.scales, data.window, data.mean, data.std, data.augment, cfg.model.channels_last
    )
    return StepParts(
        model,
        ddp,
        state.optimizer,
        state.scheduler,
        state.scaler,
        build_loss(cfg.loss, torch.tensor(pos_weight, device=device)),
        transform,
        lambda: autocast(precision, device),
        state.augment_rng,
        device,
        cfg.train.grad_accum,
        cfg.optim.grad_clip,
        precision,
    )


class NonFiniteSteps:
    """Counts skipped steps from the device flags, read once per log line.

    `add` keeps each step's flag on the device; `read` (at log time, on every rank) moves
    the window's flags to the host in one copy, ORs them across ranks together with the
    stop request (one small all-reduce), and returns the steps skipped and the longest run
    of consecutive skipped steps so far.
    """

    def __init__(self) -> None:
        self.flags: list[torch.Tensor] = []
        self.first_step = 0
        self.in_a_row = 0

    def add(self, step: int, finite: torch.Tensor) -> None:
        if not self.flags:
            self.first_step = step
        self.flags.append(~finite)

    def read(self, stop: bool) -> tuple[bool, list[tuple[int, int]]]:
        """(stop agreed by any rank, [(skipped step, consecutive count)] in this window)."""
        local = torch.stack(self.flags).tolist() if self.flags else []
        stop, *skipped = distributed.any_rank(stop, *local)
        events = []
        for offset, bad in enumerate(skipped):
            self.in_a_row = self.in_a_row + 1 if bad else 0
            if bad:
                events.append((self.first_step + offset, self.in_a_row))
        self.flags = []
        return stop, events
