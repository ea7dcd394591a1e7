"""Square/cubic crops around a centre in 2D or 3D, padded where they cross the border.

Convention, shared by both converters: the voxel nearest to `centre` lands at index
`size // 2` of every spatial axis of the patch, so the device's centre crops (16, 32, 48)
stay centred on the candidate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAD_MODES = ("constant", "reflect")


def nearest_index(centre: Sequence[float]) -> tuple[int, ...]:
    """Round half up, so a centre of 23.5 picks 24 for every axis alike (not banker's rounding)."""
    return tuple(int(np.floor(float(c) + 0.5)) for c in centre)


def inside(centre: Sequence[float], shape: Sequence[int]) -> bool:
    """Whether a continuous index lies within the array's voxels (their edges at -0.5, n-0.5)."""
    return all(-0.5 <= float(c) < n - 0.5 for c, n in zip(centre, shape, strict=True))


def _axis_index(start: int, size: int, length: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Source indices along one axis, and which of them fall inside the array."""
    index = np.arange(start, start + size)
    valid = (index >= 0) & (index < length)
    if mode == "reflect":
        # numpy's 'reflect' (no edge repeat), folded so pads wider than the axis still work.
        period = max(2 * (length - 1), 1)
        index = np.abs(index) % period
        index = np.where(index >= length, period - index, index)
        valid = np.ones_like(valid)
    return np.clip(index, 0, length - 1), valid


def crop_patch(
    array: np.ndarray,
    centre: Sequence[float],
    size: int,
    pad: str = "constant",
    value: float = 0,
) -> np.ndarray:
    """A [C, size, ...] crop of `array` ([C, *spatial]) around `centre` (spatial index order).

    Only the patch is gathered (fancy indexing per axis), never a padded copy of the whole
    image or volume, so a 512^3 scan costs no more per candidate than a small one.
    """
    if pad not in PAD_MODES:
        raise ValueError(f"pad must be one of {PAD_MODES}, got {pad!r}")
    spatial = array.shape[1:]
    if len(centre) != len(spatial):
        raise ValueError(f"centre {tuple(centre)} does not match spatial shape {spatial}")
    starts = [c - size // 2 for c in nearest_index(centre)]
    if all(s >= 0 and s + size <= n for s, n in zip(starts, spatial, strict=True)):
        # Most candidates sit well inside: a slice copy is ~10x cheaper than fancy indexing.
        return array[(slice(None), *(slice(s, s + size) for s in starts))].copy()
    axes = [_axis_index(s, size, n, pad) for s, n in zip(starts, spatial, strict=True)]
    patch = array[(slice(None), *np.ix_(*(index for index, _ in axes)))]
    if pad == "constant":
        for axis, (_, valid) in enumerate(axes, start=1):
            if not valid.all():
                where = [slice(None)] * patch.ndim
                where[axis] = ~valid
                patch[tuple(where)] = value
    return patch
