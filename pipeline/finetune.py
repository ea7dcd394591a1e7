"""Fine-tuning: start from another run's weights (`model.init_from`), optionally with the
branches frozen for the first steps (`model.freeze_steps`).

`init_from` takes the weights only: a fresh run keeps its own step 0, optimizer, schedule
and seeds. When the source checkpoint holds EMA weights those are taken (they are what
its validation, `best.pt` and export used: the source's best guess of a good model).
A resumed run never applies it: its own checkpoint already holds the fine-tuned weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline import checkpoint, distributed
from pipeline.errors import CheckpointError, ConfigError, PipelineError
from pipeline.failures import agreed

if TYPE_CHECKING:
    from pipeline.config import ModelConfig
    from pipeline.train_state import TrainState

log = logging.getLogger("pipeline")


def weights_of(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """A checkpoint's deliverable weights and their name: the EMA ones when it has them."""
    if state.get("ema") is not None:
        return state["ema"], "EMA"
    return state["model"], "raw"


def key_mismatch(
    own: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]
) -> dict[str, list[str]]:
    """What does not fit: {label: keys}, labels in report order, only non-empty ones."""
    problems = {
        "shape differs, checkpoint vs model": [
            f"{k} {list(weights[k].shape)} vs {list(own[k].shape)}"
            for k in own
            if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)
        ],
        "missing from the checkpoint": [k for k in own if k not in weights],
        "not in the model": [k for k in weights if k not in own],
    }
    return {label: keys for label, keys in problems.items() if keys}


def first_few(keys: list[str], n: int = 3) -> str:
    return f"({len(keys)}): {', '.join(keys[:n])}{', ...' if len(keys) > n else ''}"


def resolve_source(path: str) -> Path:
    """A checkpoint file; a run dir or its `checkpoints/` dir gives best.pt, else last.pt."""
    from pipeline.inference import resolve_checkpoint  # wandb: references, downloaded

    source = resolve_checkpoint(path)
    if source.is_dir():
        folder = source / "checkpoints" if (source / "checkpoints").is_dir() else source
        for name in ("best.pt", "last.pt"):
            if (folder / name).is_file():
                return folder / name
        raise CheckpointError(f"model.init_from={path}: no best.pt or last.pt in {folder}")
    if not source.is_file():
        raise CheckpointError(f"model.init_from={path}: checkpoint not found")
    return source


@torch.no_grad()
def init_weights(model: nn.Module, path: str, strict: bool) -> str:
    """Load `path`'s weights into `model` (in place); returns what was loaded, for the log.

    Strict: any missing, unexpected or reshaped key is one CheckpointError line naming the
    first few. Partial: the keys that fit load, and each kind of misfit is one log line.
    """
    source = resolve_source(path)
    weights, which = weights_of(checkpoint.load(source))  # weights_only=True
    own = model.state_dict()
    problems = key_mismatch(own, weights)
    if problems and strict:
        parts = "; ".join(f"{label} {first_few(keys)}" for label, keys in problems.items())
        raise CheckpointError(
            f"model.init_from={path}: does not fit the model: {parts} "
            "(model.init_strict=false loads the keys that fit)"
        )
    for label, keys in problems.items():
        log.warning("model.init_from: %s %s", label, first_few(keys))
    fits = {k: v for k, v in weights.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(fits, strict=False)
    return f"{len(fits)} of {len(own)} tensors, {which} weights, from {source}"


def branch_parameters(model: nn.Module, target: str | None) -> list[nn.Parameter]:
    """The parameters of `model.branches` (ours: one CNN per scale); ConfigError without."""
    branches = getattr(model, "branches", None)
    if not isinstance(branches, nn.Module):
        name = f"model.target {target}" if target else type(model).__name__
        raise ConfigError(
            f"config: model.freeze_steps: {name} has no `branches` module to freeze "
            "(give it a `self.branches` holding the per-scale networks, or use freeze_steps=0)"
        )
    return list(branches.parameters())


class BranchFreeze:
    """The branches learn nothing for steps < `steps`, then train with the rest.

    How: a pre-hook on the optimizer drops the branch gradients (`grad = None`) for those
    steps, so AdamW skips the branch parameters entirely: no update, no weight decay, no
    moment state until they unfreeze. `requires_grad=False` is what one would write
    without DDP, but DDP (find_unused_parameters=False) registers every parameter at
    wrapping time and fails when a registered one gets no gradient; changing the set later
    would need a new wrapper. So gradients are still computed and all-reduced (the ranks
    stay in lockstep), and the clipping norm still counts them. The decision depends on the
    step alone, so a resume inside or after the frozen phase continues exactly. BatchNorm
    running statistics of the branches keep adapting (they are buffers, not trained).
    """

    def __init__(self, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                 steps: int, step_of: Any) -> None:  # fmt: skip
        self.params, self.steps, self.step_of = params, steps, step_of
        self.announced = False
        optimizer.register_step_pre_hook(self._before_step)

    def _before_step(self, _optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        step = self.step_of()  # the step being taken (0-based)
        if step < self.steps:
            for param in self.params:
                param.grad = None
        elif not self.announced:
            self.announced = True
            if step == self.steps:
                log.info("model.freeze_steps: the branches train from step %d on", step + 1)


def freeze_branches(state: TrainState, cfg: ModelConfig) -> BranchFreeze | None:
    """`model.freeze_steps` on the state's model and optimizer (None when off)."""
    if not cfg.freeze_steps:
        return None
    params = branch_parameters(state.model, cfg.target)
    return BranchFreeze(params, state.optimizer, cfg.freeze_steps, lambda: state.step)


def apply_init_from(state: TrainState, cfg: ModelConfig) -> None:
    """A fresh run: every rank loads `cfg.init_from` (before DDP wraps the model, so the
    ranks start equal), or every rank stops with the first rank's one-line reason."""
    problem, loaded = None, ""
    try:
        loaded = init_weights(state.model, cfg.init_from, cfg.init_strict)
    except PipelineError as exc:
        problem = str(exc)
    problems = [p for p in distributed.gather_objects(problem) if p]
    if problems:
        raise agreed(CheckpointError(problems[0]))
    if state.ema is not None:
        state.ema.reset(state.model)  # the average starts at the loaded weights
    # The static guard judged the architecture at build time (loaded weights do not change
    # it); the dynamic logit check watches these weights from the first step.
    log.info("model.init_from: %s; step, optimizer and schedule start fresh", loaded)
