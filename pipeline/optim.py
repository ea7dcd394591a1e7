"""AdamW or SGD with decay only on weights; linear warm-up, then cosine, step or constant.

The schedule is one `LambdaLR` factor of the peak `optim.lr`: the lr of step s (0-based)
is `optim.lr * factor(s)`. During the warm-up factor(s) = (s + 1) / (warmup + 1), then
- cosine: from 1 down to `min_lr_ratio` at `train.max_steps`;
- step: `step_gamma ** k`, k = milestones (fractions of `train.max_steps`) reached, so
  with [0.6, 0.85] and 100 steps the lr drops at steps 60 and 85;
- constant: 1.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline.config import OptimConfig

log = logging.getLogger("pipeline")


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, device: torch.device
) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            # Norm scales and biases are 1-D; decaying them only hurts.
            (decay if param.ndim > 1 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # Fused on CPU and CUDA: its found_inf input lets train_step skip a non-finite step on
    # the device, without reading the gradient norm on the host.
    fused = True
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=fused
        )
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused)


def lr_factor(cfg: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """factor(step): the multiple of `optim.lr` used at `step` (see the module docstring)."""
    milestones = [round(m * max_steps) for m in cfg.step_milestones]

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "step":
            return cfg.step_gamma ** sum(step >= m for m in milestones)
        progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, max_steps))


def optimizer_name(optimizer_state: dict[str, Any]) -> str:
    """adamw | sgd: which optimizer wrote `optimizer_state` (a state_dict), by its groups."""
    group = optimizer_state["param_groups"][0]
    return "sgd" if "momentum" in group and "betas" not in group else "adamw"


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> bool:
    """Load `saved` into `optimizer`; False (state left fresh) when another optimizer wrote
    it, i.e. an accepted change of `optim.name` on resume: AdamW moments mean nothing to
    SGD, and SGD's groups lack AdamW's keys."""
    ours = "sgd" if isinstance(optimizer, torch.optim.SGD) else "adamw"
    theirs = optimizer_name(saved)
    if ours != theirs:
        log.warning("resume: optim.name %s -> %s: the optimizer state starts fresh", theirs, ours)
        return False
    optimizer.load_state_dict(saved)
    return True


def apply_optim_config(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    cfg: OptimConfig,
) -> None:
    """After loading a checkpoint: this config's hyperparameters from the resume step on.

    A loaded optimizer and scheduler carry the old run's lr, weight decay, betas or
    momentum. The schedule is this config's (its kind, warm-up and `max_steps`: the
    scheduler was built from it, only its step counter was loaded); its peak becomes
    `optim.lr`, so the lr at step s is `optim.lr * factor(s)`. With an unchanged config
    this recomputes the very values that were loaded.
    """
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    factors = [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
    sgd = isinstance(optimizer, torch.optim.SGD)
    for index, (group, factor) in enumerate(zip(optimizer.param_groups, factors, strict=True)):
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * factor
        group["weight_decay"] = cfg.weight_decay if index == 0 else 0.0
        if sgd:
            group["momentum"], group["nesterov"] = cfg.momentum, cfg.nesterov
        else:
            group["betas"] = tuple(cfg.betas)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
