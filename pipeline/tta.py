"""Test-time augmentation: the mean logit over symmetric views of each stored patch.

`predict.tta` (used by `pipeline evaluate` and `pipeline predict`, never by validation
during training, which stays cheap and comparable across runs):
- `none`: the patch as stored (one forward pass, the same logits as without TTA);
- `flips`: every combination of flips along the spatial axes: 4 views in 2D, 8 in 3D;
- `dihedral`: flips and 90-degree rotations in the crop plane: the 8 symmetries of the
  square in 2D; in 3D those 8 in the in-plane (y, x) axes, each with and without a flip
  along depth: 16 views. Rotations that mix depth into the plane (48 views in all) are
  left out: they cost 3x more and CT voxels are often anisotropic along z.

Views transform the whole stored patch before the concentric centre crops, so every
scale sees the same view (a flip or rotation about the patch centre commutes with a
centre crop when the stored size and the scale differ by an even number). The logits are
averaged in fp32; each view is one forward pass of the whole batch.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable

import torch
from torch import nn

from pipeline.model import as_logits

View = tuple[tuple[int, ...], int]
"""(spatial axes to flip, counted from the last: -1 = x; quarter turns in the (y, x) plane)."""


def views(name: str, dims: int) -> list[View]:
    """The views of `predict.tta=name` for `dims`-D patches, the identity first."""
    axes = tuple(range(-dims, 0))  # 2D: (-2, -1) = (y, x); 3D: (-3, -2, -1) = (z, y, x)
    if name == "none":
        return [((), 0)]
    if name == "flips":
        subsets = itertools.chain.from_iterable(
            itertools.combinations(axes, n) for n in range(dims + 1)
        )
        return [(flip, 0) for flip in subsets]
    if name == "dihedral":
        depth = [(), (-3,)] if dims == 3 else [()]
        return [(d + x, k) for d in depth for x in [(), (-1,)] for k in range(4)]
    raise ValueError(f"unknown tta {name!r}")


def apply_view(patch: torch.Tensor, view: View) -> torch.Tensor:
    """`patch` [B, C, ...spatial] flipped, then rotated by quarter turns in the (y, x) plane."""
    flip, turns = view
    if flip:
        patch = patch.flip(flip)
    if turns:
        patch = torch.rot90(patch, turns, dims=(-2, -1))
    return patch


def tta_logits(
    model: nn.Module,
    patch: torch.Tensor,
    transform: Callable[..., list[torch.Tensor]],
    autocast: contextlib.AbstractContextManager,
    name: str = "none",
) -> torch.Tensor:
    """Mean fp32 logit [B] of `model` over the views of `name` of stored-dtype `patch`."""
    chosen = views(name, patch.ndim - 2)
    total = None
    for view in chosen:
        crops = transform(apply_view(patch, view), train=False)
        with autocast:
            out = as_logits(model(*crops)).float()
        total = out if total is None else total + out
    assert total is not None
    return total if len(chosen) == 1 else total / len(chosen)
