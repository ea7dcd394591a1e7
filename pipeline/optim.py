"""AdamW with decay only on weights, and linear warm-up then cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
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
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def apply_optim_config(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    cfg: OptimConfig,
) -> None:
    """After loading a checkpoint: this config's hyperparameters from the resume step on.

    A loaded optimizer and scheduler carry the old run's lr, weight decay and betas. The
    schedule keeps its shape (warm-up, then cosine to `max_steps`, as this config says);
    its peak becomes `optim.lr`, so the lr at step s is `optim.lr * factor(s)`. With an
    unchanged config this recomputes the very values that were loaded.
    """
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    factors = [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
    for index, (group, factor) in enumerate(zip(optimizer.param_groups, factors, strict=True)):
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * factor
        group["weight_decay"] = cfg.weight_decay if index == 0 else 0.0
        group["betas"] = tuple(cfg.betas)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
