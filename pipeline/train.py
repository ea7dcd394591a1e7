"""The training loop: shards -> device crops -> logits -> BCEWithLogits -> step -> metrics.

Read it top to bottom: `train()` sets up the process, `Trainer` builds the pieces in data
flow order, and `Trainer.fit()` is one `while` loop over optimizer steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

import torch
from torch import nn

from pipeline import distributed, guard
from pipeline.config import Config
from pipeline.data import sources as data_sources
from pipeline.data.loader import StreamSpec, TrainStream, build_loader, check_readers
from pipeline.data.transforms import DeviceTransform
from pipeline.errors import PipelineError
from pipeline.host_memory import keep_freed_memory
from pipeline.model import as_logits, build_model
from pipeline.optim import build_optimizer, build_scheduler
from pipeline.run_state import RunState
from pipeline.runtime import autocast, resolve_precision, setup_logging
from pipeline.stopping import StopRequest

log = logging.getLogger("pipeline")


class TrainingDiverged(PipelineError):
    """Too many consecutive non-finite steps."""

    exit_code = 1


def train(cfg: Config) -> dict[str, Any]:
    """Run (or resume) one training run; returns the final and best validation metrics."""
    env = distributed.detect_env()
    setup_logging(env.rank)
    device = distributed.select_device(cfg.train.device, env.local_rank)
    if device.type == "cpu" and cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.keep_freed_memory:
        keep_freed_memory()  # before the loader starts workers: forked ones inherit it
    distributed.init(cfg.dist.backend, cfg.dist.timeout_s, device, env)
    try:
        result = Trainer(cfg, device).fit()
        # Only on success (a failed rank must not wait here): no rank tears down its
        # connections while another still finishes its last collective.
        distributed.barrier()
        return result
    finally:
        distributed.shutdown()


class Trainer:
    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        env = distributed.env()
        self.precision = resolve_precision(cfg.train.precision, device)
        # Data first: bad patterns fail here, before the model costs anything.
        if cfg.data.train is None:
            data_sources.ensure_synthetic(cfg.data, distributed.is_main())
            distributed.barrier()
        # Every rank checks the patterns (errors surface everywhere), then takes rank 0's
        # list: a lagging shared filesystem must not give ranks different shard lists.
        self.sources = distributed.broadcast_object(data_sources.resolve(cfg.data))
        check_readers(len(self.sources.train), env.world_size, cfg.data.num_workers)
        pos_weight = cfg.loss.pos_weight
        if pos_weight == "auto":
            pos_weight = data_sources.auto_pos_weight(self.sources, cfg.loss.max_pos_weight)
        self.pos_weight = float(pos_weight)

        # Same init on every rank (DDP would broadcast rank 0's weights anyway).
        torch.manual_seed(cfg.train.seed)
        model = build_model(
            dims=cfg.data.dims,
            in_channels=cfg.data.channels,
            scales=cfg.data.scales,
            **{k: getattr(cfg.model, k) for k in ("name", "target", "kwargs", "width", "depth")},
            **{k: getattr(cfg.model, k) for k in ("features", "hidden", "dropout")},
        )
        self.guard_static(model)
        fmt = torch.channels_last if cfg.data.dims == 2 else torch.channels_last_3d
        model = model.to(device, memory_format=fmt if cfg.model.channels_last else None)
        self.model = distributed.wrap_ddp(model, device, cfg.model.sync_batchnorm)
        # Kept apart from a compiled wrapper, which hides DDP's no_sync().
        self.ddp = (
            self.model if isinstance(self.model, nn.parallel.DistributedDataParallel) else None
        )
        if cfg.model.compile:
            self.model = torch.compile(self.model)
        self.optimizer = build_optimizer(model, cfg.optim, device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.max_steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.criterion = nn.BCEWithLogitsLoss(
            pos_weight=torch.tensor(self.pos_weight, device=device)
        )
        self.transform = DeviceTransform(
            cfg.data.scales,
            cfg.data.window,
            cfg.data.mean,
            cfg.data.std,
            cfg.data.augment,
            cfg.model.channels_last,
        )
        self.augment_rng = torch.Generator(device).manual_seed(
            cfg.train.seed * 1_000_003 + env.rank
        )
        self.state = RunState(self, env)  # run dir, resume, checkpoints, tracking
        if self.range_warning:
            self.state.tracker.warn(self.state.step, self.range_warning)
        self.step = self.state.step
        self.logit_suspect = False

    def guard_static(self, model: nn.Module) -> None:
        crops = [
            torch.randn((2, self.cfg.data.channels) + (s,) * self.cfg.data.dims)
            for s in self.cfg.data.scales
        ]
        finding = guard.check_static(model, crops, self.cfg.guard.allow_bounded_head)
        if finding is not None:
            log.warning(
                "guard.allow_bounded_head=true: training a bounded head (%s at %s)",
                finding.op,
                finding.where,
            )
        # The dynamic range probe, from step 0: also catches what the static walk cannot name.
        message = guard.check_range(model, crops)
        if message and self.cfg.guard.dynamic == "error":
            raise guard.BoundedHeadError(message)
        self.range_warning = message  # warned once the tracker exists

    def batches(self):
        cfg, env = self.cfg, distributed.env()
        spec = StreamSpec(
            self.sources.train,
            cfg.train.batch_size,
            cfg.train.seed,
            env.rank,
            env.world_size,
            cfg.data.num_workers,
            cfg.data.shuffle_blocks,
            cfg.data.on_error,
            # Manifest counts let a resume skip whole epochs unread; after skipped records
            # they overstate the stream, so the resume then counts real samples from epoch 0.
            None if self.state.data_problems else self.sources.train_counts,
            consumed=self.step * cfg.train.grad_accum,
            sample_shape=cfg.data.sample_shape,
            reader=cfg.data.reader,
        )
        loader = build_loader(
            TrainStream(spec),
            cfg.data.num_workers,
            self.device.type == "cuda",
            cfg.data.prefetch_factor,
        )
        return iter(loader)

    def check_logits(self, logits: torch.Tensor) -> None:
        """Dynamic guard: suspicious logits on two checks in a row are reported.

        A freshly initialised healthy model often gives one batch of same-signed logits,
        so the first suspicious batch only arms the check; the next check decides.
        """
        message = guard.check_logits(logits.detach())
        armed, self.logit_suspect = self.logit_suspect, message is not None
        if message is None:
            return
        if not armed:
            log.info("guard: first suspicious batch at step %d; re-checking later", self.step)
            return
        if self.cfg.guard.dynamic == "error":
            raise guard.BoundedHeadError(message)
        self.state.tracker.warn(self.step, message, local=True)

    def fit(self) -> dict[str, Any]:
        cfg, state = self.cfg, self.state
        accum, ddp = cfg.train.grad_accum, self.ddp
        amp = autocast(self.precision, self.device)
        batches = self.batches() if self.step < cfg.train.max_steps else None
        stop = StopRequest(state.run_dir)
        window = state.new_window()
        bad_steps = 0
        # A skipped step must also undo its forward's BatchNorm statistics: one overflowing
        # forward would otherwise leave NaN running stats in every later eval and checkpoint.
        buffers = list(self.model.buffers())
        buffers_before = [b.detach().clone() for b in buffers]
        self.model.train()
        while self.step < cfg.train.max_steps:
            started = time.perf_counter()
            if buffers:
                torch._foreach_copy_(buffers_before, buffers)
            loss_bad = torch.zeros((), dtype=torch.bool, device=self.device)
            for micro in range(accum):
                waited = time.perf_counter()
                batch = next(batches)
                window.wait += time.perf_counter() - waited
                patch = batch["patch"].to(self.device, non_blocking=True)
                label = batch["label"].to(self.device, non_blocking=True).float()
                crops = self.transform(patch, train=True, generator=self.augment_rng)
                # Only the last micro-step all-reduces gradients.
                sync = ddp.no_sync() if ddp and micro < accum - 1 else contextlib.nullcontext()
                with sync:
                    with amp:
                        logits = as_logits(self.model(*crops))
                    loss = self.criterion(logits.float(), label) / accum
                    self.scaler.scale(loss).backward()
                window.add_loss(loss.detach() * accum)
                loss_bad |= ~torch.isfinite(loss.detach())
                state.note_bad_records(batch["bad_records"])
                due = self.step == state.start_step or self.step == state.start_step + 10
                if micro == 0 and (
                    due or (cfg.guard.check_every and self.step % cfg.guard.check_every == 0)
                ):
                    self.check_logits(logits)

            # scale -> backward (above) -> unscale -> clip -> step -> update -> zero
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), cfg.optim.grad_clip or math.inf
            )
            if self.precision == "fp16":
                # GradScaler skips overflowing gradients and lowers its scale: routine. A
                # non-finite loss is not, and it must count towards max_bad_steps too.
                bad_here = bool(loss_bad)
            else:
                bad_here = not bool(torch.isfinite(grad_norm))
            stop_here = stop.local() or self.step + 1 == cfg.train.stop_at_step
            stop_now, nonfinite = distributed.any_rank(stop_here, bad_here)
            if nonfinite:
                bad_steps += 1
                with torch.no_grad():  # NaN BatchNorm statistics would poison every eval
                    torch._foreach_copy_(buffers, buffers_before)
                state.tracker.warn(
                    self.step,
                    f"non-finite loss/gradient at step {self.step + 1}; step skipped ({bad_steps} in a row)",
                )
            else:
                bad_steps = 0
            if not nonfinite or self.precision == "fp16":
                # Skip for fp32/bf16: AdamW's moments must not see inf/nan. fp16: GradScaler
                # sees the inf/nan gradients and skips the step itself.
                self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step += 1
            window.end_step(time.perf_counter() - started, grad_norm, cfg.train.batch_size * accum)

            if bad_steps >= cfg.train.max_bad_steps:
                state.save_checkpoint()
                raise TrainingDiverged(
                    f"{bad_steps} consecutive non-finite steps; last good step {self.step - bad_steps}, "
                    f"lr {self.scheduler.get_last_lr()[0]:.3g}, loss scale {self.scaler.get_scale():.3g}; "
                    f"lower optim.lr or use train.precision=fp32"
                )
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                window = state.log_window(window)
            evaluated = False
            paused = time.perf_counter()
            if (
                cfg.train.eval_every and self.step % cfg.train.eval_every == 0
            ) or self.step == cfg.train.max_steps:
                state.evaluate()
                evaluated = True
            if stop_now:
                state.save_checkpoint()
                stop.consume()
                return state.finish(stopped=True)
            if (
                self.step % cfg.checkpoint.every_steps == 0
                or self.step == cfg.train.max_steps
                or evaluated
                and state.improved
            ):
                state.save_checkpoint()
            # Validation and checkpoints are not training: keep them out of samples/s.
            window.started += time.perf_counter() - paused
        stop.consume_stale()
        return state.finish(stopped=False)
