"""A trained model back from a checkpoint, with the config it was trained with."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import checkpoint
from pipeline.config import Config, default_cache_dir, from_dict
from pipeline.data.transforms import DeviceTransform
from pipeline.errors import CheckpointError
from pipeline.finetune import first_few, key_mismatch, weights_of
from pipeline.model import build_model

log = logging.getLogger("pipeline")


def load_trained(
    path: str, overrides: list[str] | None = None, device: torch.device | None = None
) -> tuple[Config, nn.Module, dict[str, Any]]:
    """(config, eval-mode model on `device`, raw checkpoint state); errors name the file.

    `path` may be a W&B model artifact, `wandb:ENTITY/PROJECT/NAME:ALIAS`.
    """
    state = checkpoint.load(resolve_checkpoint(path))
    cfg = from_dict(state["config"], overrides)
    _check_architecture(path, state["config"], cfg)
    model = build_model(
        dims=cfg.data.dims,
        in_channels=cfg.data.channels,
        scales=cfg.data.scales,
        name=cfg.model.name,
        target=cfg.model.target,
        kwargs=cfg.model.kwargs,
        width=cfg.model.width,
        depth=cfg.model.depth,
        features=cfg.model.features,
        hidden=cfg.model.hidden,
        dropout=cfg.model.dropout,
    )
    # The EMA weights when the run kept them: they are what its validation and best.pt used.
    weights, which = weights_of(state)
    if which == "EMA":
        log.info("checkpoint %s: using its EMA weights (model.ema_decay)", path)
    _load_weights(path, model, weights)
    model.to(device or torch.device("cpu")).eval()
    return cfg, model, state


# Keys that shape the weights: an override of one of them cannot fit the saved tensors.
ARCHITECTURE_KEYS = (
    "data.dims",
    "data.channels",
    "data.scales",
    "model.name",
    "model.target",
    "model.kwargs",
    "model.width",
    "model.depth",
    "model.features",
    "model.hidden",
)


def _check_architecture(path: str, saved: dict[str, Any], cfg: Config) -> None:
    """CheckpointError naming every architecture key the overrides changed, in one line."""
    changed = []
    for key in ARCHITECTURE_KEYS:
        section, name = key.split(".")
        if name not in saved.get(section, {}):
            continue  # an older checkpoint without this key: the weights decide below
        before, now = saved[section][name], getattr(getattr(cfg, section), name)
        now = list(now) if isinstance(now, (list, tuple)) else now
        now = dict(now) if hasattr(now, "items") else now
        if before != now:
            changed.append(f"{key}={now} (checkpoint: {before})")
    if changed:
        raise CheckpointError(
            f"checkpoint {path}: architecture differs: {'; '.join(changed)}; "
            "drop these overrides (the saved weights fix them)"
        )


def _load_weights(path: str, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """load_state_dict, with its many-line mismatch report cut to one line naming the keys."""
    problems = key_mismatch(model.state_dict(), weights)
    if problems:
        parts = [f"{label} {first_few(keys)}" for label, keys in problems.items()]
        raise CheckpointError(f"checkpoint {path}: model does not fit: {'; '.join(parts)}")
    model.load_state_dict(weights)


def resolve_checkpoint(path: str | Path) -> Path:
    """A local checkpoint path; `wandb:` artifact references are downloaded (cached) first."""
    from pipeline.tracking.wandb_checkpoint import fetch, is_reference

    if is_reference(str(path)):
        return fetch(str(path), default_cache_dir())
    return Path(path)


def eval_transform(cfg: Config) -> DeviceTransform:
    """Validation's transform: the checkpoint's normalisation, no augmentation."""
    return DeviceTransform(cfg.data.scales, cfg.data.window, cfg.data.mean, cfg.data.std, False)
