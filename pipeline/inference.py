"""A trained model back from a checkpoint, with the config it was trained with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import checkpoint
from pipeline.config import Config, default_cache_dir, from_dict
from pipeline.data.transforms import DeviceTransform
from pipeline.model import build_model


def load_trained(
    path: str, overrides: list[str] | None = None, device: torch.device | None = None
) -> tuple[Config, nn.Module, dict[str, Any]]:
    """(config, eval-mode model on `device`, raw checkpoint state); errors name the file.

    `path` may be a W&B model artifact, `wandb:ENTITY/PROJECT/NAME:ALIAS`.
    """
    state = checkpoint.load(resolve_checkpoint(path))
    cfg = from_dict(state["config"], overrides)
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
    model.load_state_dict(state["model"])
    model.to(device or torch.device("cpu")).eval()
    return cfg, model, state


def resolve_checkpoint(path: str | Path) -> Path:
    """A local checkpoint path; `wandb:` artifact references are downloaded (cached) first."""
    from pipeline.tracking.wandb_checkpoint import fetch, is_reference

    if is_reference(str(path)):
        return fetch(str(path), default_cache_dir())
    return Path(path)


def eval_transform(cfg: Config) -> DeviceTransform:
    """Validation's transform: the checkpoint's normalisation, no augmentation."""
    return DeviceTransform(cfg.data.scales, cfg.data.window, cfg.data.mean, cfg.data.std, False)
