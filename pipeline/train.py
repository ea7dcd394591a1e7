"""The training loop: shards -> device crops -> logits -> loss (BCE/focal) -> step -> metrics.

Read it top to bottom: `train()` sets up the process, the run dir, the data, the resume
and the tracker; `Trainer` builds the model and its state in data flow order; and
`Trainer.fit()` is one `while` loop over optimizer steps whose every stage is visible.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import distributed, finetune, resume, run_lock
from pipeline.checkpoint import CheckpointManager
from pipeline.config import Config, to_saved
from pipeline.data import balance
from pipeline.early_stop import EarlyStop
from pipeline.errors import PipelineError
from pipeline.failures import on_failure
from pipeline.host_memory import keep_freed_memory
from pipeline.logit_check import LogitCheck
from pipeline.optim import apply_optim_config
from pipeline.resume_stream import resume_stream
from pipeline.run_end import finish
from pipeline.run_setup import Window, open_tracker, prepare_data, train_batches
from pipeline.runtime import resolve_precision, setup_logging
from pipeline.step import NonFiniteSteps, step_parts, train_step
from pipeline.stopping import StopRequest
from pipeline.tracking import Tracker
from pipeline.train_state import build_train_state
from pipeline.validation import BestMetric, record_eval, validate

log = logging.getLogger("pipeline")


class TrainingDiverged(PipelineError):
    """Too many consecutive non-finite steps."""

    exit_code = 1


def train(cfg: Config) -> dict[str, Any]:
    """Run (or resume) one training run; returns the final and best validation metrics."""
    stop = StopRequest()  # before the slow set-up: an early SIGTERM is a stop request too
    env = distributed.detect_env()
    setup_logging(env.rank)
    device = distributed.select_device(cfg.train.device, env.local_rank)
    if device.type == "cpu" and cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.keep_freed_memory:
        keep_freed_memory()  # before the loader starts workers: forked ones inherit it
    distributed.init(cfg.dist.backend, cfg.dist.timeout_s, device, env)
    distributed.start_failure_watch("train")
    trainer = None
    try:
        # Bad data and a refused model fail before anything is written.
        sources, pos_weight = prepare_data(cfg)
        precision = resolve_precision(cfg.train.precision, device)
        trainer = Trainer(cfg, device, precision, sources, pos_weight)
        run_lock.acquire(cfg.run)  # resolves run.dir; rank 0 holds its lock until the end
        run_dir = Path(cfg.run.dir)
        stop.watch_file(run_dir)
        contract = resume.contract(cfg, env.world_size, sources.train, sources.val)
        checkpoints = CheckpointManager(run_dir, cfg.checkpoint.keep_last)
        resumed = resume.choose(checkpoints, cfg, contract)  # before any work
        start = None if resumed is None else int(resumed.state["step"])
        trainer.restore(resumed, contract, checkpoints)
        tracker = open_tracker(cfg, run_dir, device, precision, pos_weight, start, sources)
        log.info(
            "run dir %s | %s | global batch %d | pos_weight %.3g",
            run_dir,
            precision,
            contract["global_batch"],
            pos_weight,
        )
        result = trainer.fit(tracker, stop)
        # Only on success (a failed rank must not wait here): no rank tears down its
        # connections while another still finishes its last collective.
        distributed.barrier()
        distributed.stop_failure_watch()
        return result
    except BaseException as exc:
        raise on_failure(exc, trainer.state.step if trainer else None, device) from None
    finally:
        run_lock.release()
        distributed.shutdown()
        stop.close()


class Trainer:
    def __init__(
        self,
        cfg: Config,
        device: torch.device,
        precision: str,
        sources: Any,
        pos_weight: float,
    ) -> None:
        self.cfg, self.device, self.precision, self.sources = cfg, device, precision, sources
        self.pos_weight = pos_weight
        env = distributed.env()
        self.state = build_train_state(cfg, device, precision, env.rank)
        self.module = self.state.model
        self.best = BestMetric(cfg.checkpoint.metric, cfg.checkpoint.mode)
        self.early = EarlyStop(cfg.train.early_stop_patience)
        self.freeze = finetune.freeze_branches(self.state, cfg.model)  # None when off
        self.thresholds: dict[str, float] = {}
        self.last_metrics: dict[str, float] = {}
        self.bad_records: dict[int, int] = {}
        self.contract: dict[str, Any] = {}

    def restore(
        self,
        resumed: resume.Resume | None,
        contract: dict[str, Any],
        checkpoints: CheckpointManager,
    ) -> None:
        """The chosen checkpoint (or fresh seeds), agreed by every rank, then DDP."""
        cfg, state, env = self.cfg, self.state, distributed.env()
        precision, device = self.precision, self.device
        self.checkpoints, self.run_dir = checkpoints, checkpoints.dir.parent
        self.contract = contract
        if resumed is None:
            if cfg.model.init_from:
                finetune.apply_init_from(state, cfg.model)  # weights only, on every rank
            state.seed_fresh(env.rank)
        else:
            saved = resumed.state
            same_world = state.load_state_dict(saved, env.rank, env.world_size, resumed.path)
            # The data position carries over a world size / num_workers change too.
            data = resume_stream(saved, cfg, env.world_size, state, self.sources)
            state.segments, state.data_plan = data.segments, data.plan
            if not same_world:
                log.warning(
                    "world size changed (%d -> %d): RNG streams restart from the seeds at this step",
                    len(saved.get("rng", [])),
                    env.world_size,
                )
            apply_optim_config(state.optimizer, state.scheduler, cfg.optim)
            self.best.load_state_dict(saved.get("best", {}))
            if "data.val" in resumed.changed:
                self.best.reset("the validation set (data.val) changed")
            self.thresholds = saved.get("thresholds", {})
            log.info("resumed from step %d (%s)", state.step, resumed.path)
            if cfg.model.init_from:
                log.info("model.init_from ignored: a resume continues from its own checkpoint")
        resume.verify_ranks_agree(state.step, state.digest(), resumed and resumed.path)
        # Restored before wrapping: DDP broadcasts rank 0's weights, which now equal all.
        self.model = distributed.wrap_ddp(self.module, self.device, cfg.model.sync_batchnorm)
        ddp = self.model if isinstance(self.model, nn.parallel.DistributedDataParallel) else None
        if cfg.model.compile:
            self.model = torch.compile(self.model)  # `ddp` stays apart: it holds no_sync()
        self.parts = step_parts(cfg, state, self.model, ddp, self.pos_weight, precision, device)
        self.transform = self.parts.transform

    def fit(self, tracker: Tracker, stop: StopRequest) -> dict[str, Any]:
        """Train to `train.max_steps` (or `stop`); `tracker` records it all."""
        cfg, state, self.tracker = self.cfg, self.state, tracker
        self.logits = LogitCheck(cfg.guard.dynamic, tracker, state.range_warning, state.step)
        start, max_steps, every = state.step, cfg.train.max_steps, cfg.guard.check_every
        if self.early.due(self.best):  # the run being resumed had stopped early
            self.early.announce_resumed(state.step, self.best)
            return self.finish(stopped=False, early_stopped=True)
        batches = (
            train_batches(cfg, self.sources, state, self.device) if state.step < max_steps else None
        )
        window, skips = Window(), NonFiniteSteps()
        self.model.train()
        while state.step < max_steps:
            began = time.perf_counter()
            out = train_step(self.parts, batches)  # forward, backward, clip, optimizer step
            state.step += 1
            if state.ema is not None:  # gated on the device: a skipped step leaves it alone
                state.ema.update(self.module, out.finite)
            samples = cfg.train.batch_size * cfg.train.grad_accum
            window.add(out.loss, out.grad_norm, out.wait_s, time.perf_counter() - began, samples)
            for worker, count in (pair.tolist() for pair in out.bad_records):
                self.bad_records[worker] = count
            if state.step - 1 in (start, start + 10) or (every and (state.step - 1) % every == 0):
                self.logits.check(out.logits, state.step - 1)

            skips.add(state.step, out.finite)

            # Stop requests (signal, STOP file) and skipped steps are agreed with the log,
            # one small all-reduce every log_every steps: all ranks stop at the same step.
            stop_now = state.step == cfg.train.stop_at_step
            if state.step % cfg.train.log_every == 0 or state.step == max_steps:
                requested, skipped = skips.read(stop.local())
                stop_now = requested or stop_now
                self.check_skipped(skipped)
                tracker.log_train(state.step, self.train_metrics(window))
                window = Window()
            paused = time.perf_counter()
            improved = early = False
            if (
                cfg.train.eval_every and state.step % cfg.train.eval_every == 0
            ) or state.step == max_steps:
                improved = self.evaluate()
                early = self.early.due(self.best)  # rank 0's count, broadcast: all agree
            if stop_now or early:
                self.save(improved)
                if early:
                    self.early.announce(state.step, self.best, tracker)
                if stop_now:
                    stop.consume()
                # An early stop is a finished run (sweeps and cv must not resume it).
                return self.finish(stopped=stop_now, early_stopped=early)
            if state.step % cfg.checkpoint.every_steps == 0 or state.step == max_steps or improved:
                self.save(improved)
            # Validation and checkpoints are not training: keep them out of samples/s.
            window.started += time.perf_counter() - paused
        stop.consume_stale()
        return self.finish(stopped=False)

    def check_skipped(self, skipped: list[tuple[int, int]]) -> None:
        """Warn about each skipped step; stop after train.max_bad_steps in a row."""
        for step, in_a_row in skipped:
            message = f"non-finite loss/gradient at step {step}; step skipped ({in_a_row} in a row)"
            self.tracker.warn(step - 1, message)
            if in_a_row >= self.cfg.train.max_bad_steps:
                self.save(improved=False)
                raise TrainingDiverged(
                    f"{in_a_row} consecutive non-finite steps; last good step {step - in_a_row}, "
                    f"lr {self.state.scheduler.get_last_lr()[0]:.3g}, "
                    f"loss scale {self.state.scaler.get_scale():.3g}; "
                    f"lower optim.lr or use train.precision=fp32"
                )

    def train_metrics(self, window: Window) -> dict[str, float]:
        values = window.values(sum(self.bad_records.values()))
        values["train/lr"] = self.state.scheduler.get_last_lr()[0]
        counts = self.sources.train_counts
        # Stream samples only: balance's reservoir draws are repeats, not epoch progress.
        batch = self.cfg.train.batch_size
        fresh = (batch - balance.draws_for(self.cfg, self.sources)) / batch
        seen = self.state.step * self.contract["global_batch"] * fresh
        values["train/epoch"] = seen / sum(counts) if counts else float("nan")
        if self.device.type == "cuda":
            values["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.precision == "fp16":
            values["train/loss_scale"] = self.state.scaler.get_scale()
        return values

    def evaluate(self) -> bool:
        """Validate; rank 0 records it. Returns (on every rank) whether best improved."""
        if not self.sources.val:
            return False
        result = validate(
            self.state.eval_model,  # the EMA weights when on
            self.sources.val,
            self.cfg,
            self.transform,
            self.device,
            self.precision,
            self.pos_weight,
        )
        improved = False
        if result is not None:
            self.thresholds = record_eval(self.run_dir, self.state.step, result, self.tracker)
            self.last_metrics = result.metrics
            improved = self.best.update(result.metrics, self.state.step)
        # Every rank must agree on whether best.pt is due (it decides a collective save) and
        # on an early stop (all end at this step): rank 0's verdict and count, to all.
        improved, self.best.since = distributed.broadcast_object((improved, self.best.since))
        return improved

    def save(self, improved: bool) -> None:
        """All ranks call this: each contributes its RNG state, rank 0 writes."""
        state = self.state
        gathered = distributed.gather_objects((state.local_rng(), sum(self.bad_records.values())))
        state.data_problems = state.data_problems or any(bad for _, bad in gathered)
        if distributed.is_main():
            checkpoint = state.state_dict([rng for rng, _ in gathered])
            checkpoint.update(
                config=to_saved(self.cfg),  # no URL credentials in a file W&B may get
                contract=self.contract,
                best=self.best.state_dict(),
                thresholds=self.thresholds,
                pos_weight=self.pos_weight,
            )
            self.checkpoints.save(checkpoint, best=improved)
            self.tracker.checkpoint_saved(
                state.step,
                self.checkpoints.dir,
                improved,
                final=state.step >= self.cfg.train.max_steps,
                metrics=self.last_metrics,
            )
        distributed.barrier()

    def finish(self, stopped: bool, early_stopped: bool = False) -> dict[str, Any]:
        best = self.best.state_dict()
        step, metrics = self.state.step, self.last_metrics
        return finish(self.tracker, step, best, metrics, self.run_dir, stopped, early_stopped)
