"""A run's bookkeeping around the loop: run dir, resume, checkpoints, metrics, evaluation.

The loop in `train.py` owns the math; this module owns everything that is written down
(config.yaml, metrics.jsonl, W&B, eval files, checkpoints) and everything read back on
resume, so the two stay in sync in one place.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline import distributed, guard
from pipeline.checkpoint import CheckpointManager, restore_rng, rng_state
from pipeline.config import to_dict, to_yaml
from pipeline.data.loader import StreamSpec
from pipeline.errors import CheckpointError
from pipeline.evaluate import metrics_of, predict_all, save_predictions
from pipeline.metrics import operating_points, probability_histogram
from pipeline.runtime import autocast, resolve_run_dir, system_info
from pipeline.tracking import Tracker

if TYPE_CHECKING:
    from pipeline.train import Trainer

log = logging.getLogger("pipeline")
# Sections that change the meaning of saved weights; resuming across them is refused.
MODEL_KEYS = ("dims", "scales", "channels")


@dataclass
class Window:
    """Running totals between two log lines (kept on the device: no sync per step)."""

    started: float = field(default_factory=time.perf_counter)
    wait: float = 0.0
    busy: float = 0.0
    steps: int = 0
    samples: int = 0
    loss_sum: torch.Tensor | None = None
    losses: int = 0
    grad_norm: torch.Tensor | None = None

    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.losses += 1

    def end_step(self, seconds: float, grad_norm: torch.Tensor, samples: int) -> None:
        self.busy += seconds
        self.steps += 1
        self.samples += samples
        self.grad_norm = grad_norm.detach()


class RunState:
    def __init__(self, trainer: Trainer, env: distributed.DistEnv) -> None:
        self.trainer, self.cfg, self.env = trainer, trainer.cfg, env
        self.run_dir: Path = resolve_run_dir(self.cfg.run.dir)
        self.cfg.run.dir = str(self.run_dir)
        self.checkpoints = CheckpointManager(self.run_dir, self.cfg.checkpoint.keep_last)
        self.best: dict[str, Any] = {
            "metric": self.cfg.checkpoint.metric,
            "value": None,
            "step": None,
        }
        self.thresholds: dict[str, float] = {}
        self.last_metrics: dict[str, float] = {}
        self.improved = False
        self.bad_records: dict[int, int] = {}
        # Once any rank skipped a record, manifest counts overstate what the stream emits,
        # so a resume must replay positions by real samples (see Trainer.batches).
        self.data_problems = False
        self.step = 0
        resumed = self.checkpoints.resume_state(self.cfg.checkpoint.resume)
        if resumed is not None:
            self.restore(resumed)
        else:
            # Each rank its own stream for dropout and friends; model init already happened.
            # Python's and numpy's global RNGs too: user models may draw from them, and they
            # must repeat for a resumed run to equal an uninterrupted one.
            seed = self.cfg.train.seed + 7919 * (env.rank + 1)
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
        self.start_step = self.step
        self.tracker = self.build_tracker(resumed is not None)

    # -- start -------------------------------------------------------------------------
    def restore(self, state: dict[str, Any]) -> None:
        saved = state.get("config", {}).get("data", {})
        source = self.checkpoints.resumed_from or self.checkpoints.last
        for key in MODEL_KEYS:
            if key in saved and saved[key] != getattr(self.cfg.data, key):
                raise CheckpointError(
                    f"checkpoint {source}: data.{key}={saved[key]} does not match "
                    f"this config's {getattr(self.cfg.data, key)}; use a new run.dir"
                )
        trainer = self.trainer
        try:
            distributed.unwrap(trainer.model).load_state_dict(state["model"])
        except RuntimeError as exc:
            # "Error(s) in loading state_dict for X:" then one line per mismatch: show one.
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            first = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
            raise CheckpointError(f"checkpoint {source}: model does not fit ({first})") from None
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.scaler.load_state_dict(state["scaler"])
        rngs = state.get("rng", [])
        if len(rngs) == self.env.world_size:
            restore_rng(rngs[self.env.rank], trainer.augment_rng)
        else:
            log.warning(
                "world size changed (%d -> %d): data order and RNG restart from seeds",
                len(rngs),
                self.env.world_size,
            )
            torch.manual_seed(self.cfg.train.seed + 7919 * (self.env.rank + 1) + state["step"])
        self.step = int(state["step"])
        self.best = state.get("best", self.best)
        self.thresholds = state.get("thresholds", {})
        self.data_problems = bool(state.get("loader", {}).get("data_problems", False))
        log.info("resumed from step %d (%s)", self.step, source)

    def build_tracker(self, resumed: bool) -> Tracker:
        main = distributed.is_main()
        sink = None
        ranks = distributed.gather_objects(distributed.placement())
        if main:
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
            system = system_info(self.trainer.device, self.env.world_size)
            system.update(
                ranks=ranks,
                precision=self.trainer.precision,
                pos_weight=self.trainer.pos_weight,
                global_batch=self.cfg.train.batch_size
                * self.cfg.train.grad_accum
                * self.env.world_size,
            )
            self.system = system
            from pipeline.tracking.wandb_sink import wandb_sink_or_none

            sink = wandb_sink_or_none(
                self.cfg.wandb,
                self.run_dir,
                to_dict(self.cfg),
                system,
                self.step if resumed else None,
            )
        tracker = Tracker(self.run_dir, main, self.step, self.cfg.train.max_steps, sink)
        if main:
            tracker.event("resume" if resumed else "start", self.step, {"system": self.system})
            sources = self.trainer.sources
            tracker.declare_data(
                {"train": sources.train, "val": sources.val},
                to_dict(self.cfg),
                self.system.get("git_commit"),
                self.cfg.wandb.log_checkpoints,
            )
            log.info(
                "run dir %s | %s | global batch %d | pos_weight %.3g",
                self.run_dir,
                self.trainer.precision,
                self.system["global_batch"],
                self.trainer.pos_weight,
            )
        return tracker

    # -- during -------------------------------------------------------------------------
    def new_window(self) -> Window:
        return Window()

    def note_bad_records(self, pair: torch.Tensor) -> None:
        worker, count = pair.tolist()
        self.bad_records[worker] = count

    def log_window(self, window: Window) -> Window:
        loss = (
            window.loss_sum / max(window.losses, 1)
            if window.loss_sum is not None
            else torch.tensor(float("nan"))
        )
        loss, skipped = distributed.sum_across([float(loss), float(sum(self.bad_records.values()))])
        elapsed = time.perf_counter() - window.started
        trainer = self.trainer
        values = {
            "train/loss": loss / self.env.world_size,
            "train/lr": trainer.scheduler.get_last_lr()[0],
            "train/grad_norm": float(window.grad_norm)
            if window.grad_norm is not None
            else float("nan"),
            "train/samples_per_s": window.samples * self.env.world_size / max(elapsed, 1e-9),
            "train/data_wait": window.wait / max(window.busy, 1e-9),
            "train/epoch": self.epoch_of(trainer.step),
            "train/bad_records": skipped,
        }
        if trainer.device.type == "cuda":
            values["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated(trainer.device) / 2**30
        if trainer.precision == "fp16":
            values["train/loss_scale"] = trainer.scaler.get_scale()
        self.tracker.log_train(trainer.step, values)
        return Window()

    def epoch_of(self, step: int) -> float:
        counts = self.trainer.sources.train_counts
        if not counts:
            return float("nan")
        seen = step * self.cfg.train.batch_size * self.cfg.train.grad_accum * self.env.world_size
        return seen / sum(counts)

    def evaluate(self) -> dict[str, float]:
        """Every validation sample once across ranks; rank 0 scores, records and tracks best."""
        trainer, cfg = self.trainer, self.cfg
        self.improved = False
        if not trainer.sources.val:
            return {}
        spec = StreamSpec(
            trainer.sources.val,
            cfg.train.batch_size,
            rank=self.env.rank,
            world_size=self.env.world_size,
            on_error=cfg.data.on_error,
            sample_shape=cfg.data.sample_shape,
            reader=cfg.data.reader,
        )
        model = distributed.unwrap(trainer.model)
        distributed.broadcast_buffers(model)
        preds = predict_all(
            model,
            spec,
            trainer.transform,
            trainer.device,
            autocast(trainer.precision, trainer.device),
            cfg.data.num_workers,
        )
        if distributed.is_main():
            self.score(preds)
        # Every rank must agree on whether best.pt is due: it decides a collective save.
        self.improved = distributed.broadcast_object(self.improved)
        return self.last_metrics

    def score(self, preds) -> None:
        trainer, cfg = self.trainer, self.cfg
        probs = preds.probs
        self.thresholds = operating_points(preds.labels, probs)
        metrics = {f"val/{k}": v for k, v in metrics_of(preds).items()}
        metrics["val/bad_records"] = preds.bad_records
        eval_dir = self.run_dir / "eval"
        eval_dir.mkdir(exist_ok=True)
        save_predictions(eval_dir / f"predictions-step-{trainer.step:08d}.npz", preds)
        histogram = probability_histogram(preds.labels, probs)
        (eval_dir / f"histogram-step-{trainer.step:08d}.json").write_text(json.dumps(histogram))
        (self.run_dir / "thresholds.json").write_text(json.dumps(self.thresholds, indent=2))
        warning = guard.check_validation_probs(probs)
        if warning:
            self.tracker.warn(trainer.step, warning)
        self.tracker.log_eval(trainer.step, metrics, preds.labels, probs, preds.groups)
        value = metrics.get(f"val/{cfg.checkpoint.metric}")
        if (
            value is not None
            and np.isfinite(value)
            and (self.best["value"] is None or value > self.best["value"])
        ):
            self.best = {
                "metric": cfg.checkpoint.metric,
                "value": float(value),
                "step": trainer.step,
            }
            self.improved = True
        self.last_metrics = metrics

    def save_checkpoint(self) -> None:
        """All ranks call this: each contributes its RNG state, rank 0 writes."""
        trainer = self.trainer
        gathered = distributed.gather_objects(
            (rng_state(trainer.augment_rng), sum(self.bad_records.values()))
        )
        rngs = [rng for rng, _ in gathered]
        self.data_problems = self.data_problems or any(bad for _, bad in gathered)
        improved = self.improved
        if distributed.is_main():
            self.checkpoints.save(
                {
                    "step": trainer.step,
                    "model": distributed.unwrap(trainer.model).state_dict(),
                    "optimizer": trainer.optimizer.state_dict(),
                    "scheduler": trainer.scheduler.state_dict(),
                    "scaler": trainer.scaler.state_dict(),
                    "rng": rngs,
                    "loader": {
                        "consumed_batches": trainer.step * self.cfg.train.grad_accum,
                        "data_problems": self.data_problems,
                    },
                    "config": to_dict(self.cfg),
                    "best": self.best,
                    "thresholds": self.thresholds,
                    "pos_weight": trainer.pos_weight,
                },
                best=improved,
            )
            self.tracker.checkpoint_saved(
                trainer.step,
                self.checkpoints.dir,
                improved,
                final=trainer.step >= self.cfg.train.max_steps,
                metrics=self.last_metrics,
            )
        self.improved = False
        distributed.barrier()

    # -- end -----------------------------------------------------------------------------
    def finish(self, stopped: bool) -> dict[str, Any]:
        # Proof that no rank ran ahead or fell behind (uneven shards must not matter).
        steps = distributed.gather_objects(self.trainer.step)
        self.tracker.event("end", self.trainer.step, {"stopped": stopped, "steps_per_rank": steps})
        self.tracker.close()
        result = {
            "step": self.trainer.step,
            "steps_per_rank": steps,
            "stopped": stopped,
            "run_dir": str(self.run_dir),
            "best": self.best,
            "metrics": self.last_metrics,
        }
        if distributed.is_main():
            best = self.best
            value = "n/a" if best["value"] is None else f"{best['value']:.4f}"
            print(
                f"{'stopped' if stopped else 'done'} at step {self.trainer.step}: best val {best['metric']} "
                f"{value} (step {best['step']}) | outputs in {self.run_dir} "
                f"(config.yaml, metrics.jsonl, checkpoints/, eval/)",
                flush=True,
            )
        return result
