"""Three-branch multi-scale classifier that returns one raw logit per candidate.

The model never applies a sigmoid: BCEWithLogitsLoss takes the logit, and probabilities
exist only where they are reported (`probabilities`). It knows nothing of DDP, AMP or the
config object; `build_model` translates config into plain arguments.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pipeline.errors import ModelContractError


def _layers(dims: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    if dims == 2:
        return nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d
    if dims == 3:
        return nn.Conv3d, nn.BatchNorm3d, nn.AdaptiveAvgPool3d
    raise ValueError(f"dims must be 2 or 3, got {dims}")


class SeparableConv(nn.Module):
    """Depthwise then pointwise convolution: Xception's cheap replacement for a full conv."""

    def __init__(self, dims: int, in_ch: int, out_ch: int) -> None:
        super().__init__()
        conv, _, _ = _layers(dims)
        self.depthwise = conv(in_ch, in_ch, 3, padding=1, groups=in_ch, bias=False)
        self.pointwise = conv(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class Subsample(nn.Module):
    """Every second voxel along each spatial axis.

    Followed by a 1x1 conv this equals Xception's strided 1x1 shortcut; we avoid the fused
    strided form because torch 2.13's CPU channels_last backward corrupts memory for it
    when in_channels < 8.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[(slice(None), slice(None)) + (slice(None, None, 2),) * (x.ndim - 2)]


class XceptionBlock(nn.Module):
    """Two separable convs + max-pool, with a strided 1x1 residual path."""

    def __init__(self, dims: int, in_ch: int, out_ch: int) -> None:
        super().__init__()
        conv, norm, _ = _layers(dims)
        pool = nn.MaxPool2d if dims == 2 else nn.MaxPool3d
        self.body = nn.Sequential(
            nn.ReLU(),
            SeparableConv(dims, in_ch, out_ch),
            norm(out_ch),
            nn.ReLU(),
            SeparableConv(dims, out_ch, out_ch),
            norm(out_ch),
            pool(3, stride=2, padding=1),
        )
        self.skip = nn.Sequential(Subsample(), conv(in_ch, out_ch, 1, bias=False), norm(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


class Branch(nn.Module):
    """One scale: stem conv, `depth` Xception blocks, global average pool to `features`."""

    def __init__(self, dims: int, in_ch: int, width: int, depth: int, features: int) -> None:
        super().__init__()
        conv, norm, avgpool = _layers(dims)
        layers: list[nn.Module] = [conv(in_ch, width, 3, padding=1, bias=False), norm(width)]
        channels = width
        for index in range(depth):
            out = features if index == depth - 1 else min(width * 2 ** (index + 1), features)
            layers.append(XceptionBlock(dims, channels, out))
            channels = out
        layers += [nn.ReLU(), avgpool(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class XceptionLike(nn.Module):
    """One Xception-style branch per scale -> concat -> Linear, ReLU, Linear -> raw logit [B]."""

    def __init__(
        self,
        dims: int = 2,
        in_channels: int = 1,
        num_scales: int = 3,
        width: int = 16,
        depth: int = 3,
        features: int = 128,
        hidden: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            Branch(dims, in_channels, width, depth, features) for _ in range(num_scales)
        )
        self.head = nn.Sequential(
            nn.Linear(features * num_scales, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            # No activation after this layer: the output is a logit, negative or positive.
            nn.Linear(hidden, 1),
        )

    def forward(self, *crops: torch.Tensor) -> torch.Tensor:
        if len(crops) != len(self.branches):
            raise ValueError(f"expected {len(self.branches)} crops, got {len(crops)}")
        pooled = [branch(crop) for branch, crop in zip(self.branches, crops, strict=True)]
        return self.head(torch.cat(pooled, dim=1)).squeeze(-1)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Logits -> probabilities, for reporting only (never feed these to the loss)."""
    return torch.sigmoid(logits.float())


def load_target(target: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate a user model from `package.module:ClassOrFactory` with keyword arguments."""
    module_name, _, attr = target.partition(":")
    # Like `python -m`, let users name modules of the project they run from.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the user's module raises on import
        problem = f"{type(exc).__name__}: {exc}"
        raise ModelContractError(
            f"model.target: cannot import '{module_name}' ({problem})"
        ) from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelContractError(f"model.target: '{module_name}' has no callable '{attr}'")
    try:
        model = factory(**(kwargs or {}))
    except Exception as exc:  # the user's constructor: any failure is a contract problem
        raise ModelContractError(f"model.target: {target}(**model.kwargs) failed: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelContractError(
            f"model.target: {target} returned {type(model).__name__}, not nn.Module"
        )
    return model


def check_contract(model: nn.Module, crops: Sequence[torch.Tensor], name: str) -> None:
    """Run one forward on `crops`; raise ModelContractError unless it returns logits [B] or [B,1]."""
    batch = crops[0].shape[0]
    forward = inspect.signature(model.forward)
    try:
        forward.bind(*crops)
    except TypeError:
        raise ModelContractError(
            f"{name}: forward must take the {len(crops)} crops (x{', x'.join(str(c.shape[-1]) for c in crops)})"
        ) from None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*crops)
    except Exception as exc:
        raise ModelContractError(f"{name}: forward on the crops failed: {exc}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise ModelContractError(f"{name}: forward returned {type(out).__name__}, not a tensor")
    if tuple(out.shape) not in ((batch,), (batch, 1)):
        raise ModelContractError(
            f"{name}: forward must return logits of shape [B] or [B, 1], got {tuple(out.shape)}"
        )


def as_logits(output: torch.Tensor) -> torch.Tensor:
    """Accept [B] or [B, 1] from user models; the loop always works with [B]."""
    return output.squeeze(-1) if output.ndim == 2 else output


def build_model(
    *,
    dims: int,
    in_channels: int,
    scales: Sequence[int],
    name: str = "xception_like",
    target: str | None = None,
    kwargs: dict[str, Any] | None = None,
    width: int = 16,
    depth: int = 3,
    features: int = 128,
    hidden: int = 64,
    dropout: float = 0.0,
) -> nn.Module:
    """Our XceptionLike, or a user model by import path, checked against the contract."""
    if target is not None:
        model = load_target(target, kwargs)
        label = f"model.target {target}"
    else:
        model = XceptionLike(
            dims, in_channels, len(scales), width, depth, features, hidden, dropout
        )
        label = f"model {name}"
    crops = [torch.zeros((2, in_channels) + (s,) * dims) for s in scales]
    check_contract(model, crops, label)
    return model
