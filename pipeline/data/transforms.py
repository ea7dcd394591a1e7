"""Device-side, batch-wise: augment in the stored dtype, cast, normalise, centre-crop scales.

Everything here works on whole batches with tensor ops, so no per-sample Python runs in
the hot loop, and the loader ships compact uint8/int16 tensors instead of floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from pipeline.config import AugmentConfig
from pipeline.errors import DataError


def random_dihedral(patch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips along every spatial axis plus random transposes (90-degree rotations).

    Flips on all axes combined with a transpose of the last two give all 8 symmetries of a
    square; in 3D a second transpose mixes the depth axis in as well.
    """
    batch, spatial = patch.shape[0], patch.ndim - 2
    draws = torch.rand((spatial + spatial - 1, batch), generator=generator, device=generator.device)
    draws = draws.to(patch.device) < 0.5
    shape = (batch,) + (1,) * (patch.ndim - 1)
    for index, axis in enumerate(range(2, patch.ndim)):
        patch = torch.where(draws[index].view(shape), patch.flip(axis), patch)
    for offset, axis in enumerate(range(2, patch.ndim - 1)):
        swapped = patch.transpose(axis, axis + 1)
        patch = torch.where(draws[spatial + offset].view(shape), swapped, patch)
    return patch


def _uniform(generator: torch.Generator, device: torch.device):
    """U(0, 1) draws of a given shape from `generator`, moved to `device`."""

    def draw(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=generator.device).to(device)

    return draw


def _rotation_matrices(
    angles: torch.Tensor, spatial: int, generator: torch.Generator
) -> torch.Tensor:
    """[B, d, d] rotations: in-plane by `angles` (2D), or about uniformly random axes (3D)."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    if spatial == 2:
        return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    axis = torch.randn((angles.shape[0], 3), generator=generator, device=generator.device)
    axis = axis.to(angles.device)
    axis = axis / axis.norm(dim=1, keepdim=True).clamp_min(1e-12)
    x, y, z = axis.unbind(1)
    zero = torch.zeros_like(x)
    # Rodrigues: R = I + sin K + (1 - cos) K^2, K the cross-product matrix of the axis.
    k = torch.stack(
        [
            torch.stack([zero, -z, y], -1),
            torch.stack([z, zero, -x], -1),
            torch.stack([-y, x, zero], -1),
        ],
        -2,
    )
    eye = torch.eye(3, device=angles.device).expand_as(k)
    return eye + sin.view(-1, 1, 1) * k + (1 - cos).view(-1, 1, 1) * (k @ k)


def affine_crop(
    x: torch.Tensor, size: int, rotation: torch.Tensor, zoom: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """One `grid_sample` for the batch: a `size`-sided crop of float patches `x` [B, C, S...],
    rotated by `rotation` [B, d, d], zoomed by `zoom` [B] (> 1 zooms in) and centred `shift`
    [B, d] pixels away from the patch centre (in grid_sample's axis order: x, y[, z]).

    With identity rotation, zoom 1 and integer shifts every output pixel lands on an input
    pixel centre, so the crop is exact (no interpolation blur).
    """
    batch, spatial, stored = x.shape[0], x.ndim - 2, x.shape[-1]
    theta = torch.zeros((batch, spatial, spatial + 1), device=x.device, dtype=x.dtype)
    theta[:, :, :spatial] = rotation.to(x.dtype) * (size / stored) / zoom.to(x.dtype).view(-1, 1, 1)
    theta[:, :, spatial] = shift.to(x.dtype) * 2 / stored
    grid = torch.nn.functional.affine_grid(
        theta, [batch, x.shape[1]] + [size] * spatial, align_corners=False
    )
    return torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def shifted_crop(x: torch.Tensor, size: int, shift: torch.Tensor) -> torch.Tensor:
    """`size`-sided crops of `x` [B, C, S...], each centred `shift` [B, d] whole pixels from
    the patch centre (axis order x, y[, z] as in `affine_crop`): one gather, exact values."""
    batch, spatial, stored = x.shape[0], x.ndim - 2, x.shape[-1]
    offsets = torch.arange(size, device=x.device)
    start = (stored - size) // 2
    # Tensor axis 2 + k is grid axis spatial - 1 - k (grid_sample's x is the last axis).
    index = [start + shift[:, spatial - 1 - k].view(-1, 1) + offsets for k in range(spatial)]
    views = [
        idx.view((batch,) + tuple(size if j == k else 1 for j in range(spatial)))
        for k, idx in enumerate(index)
    ]
    rows = torch.arange(batch, device=x.device).view((batch,) + (1,) * spatial)
    out = x[(rows, slice(None), *views)]  # advanced indices first: [B, size..., C]
    return out.movedim(-1, 1)


class DeviceTransform:
    """Stored-dtype patches [B, C, S...] on the device -> normalised float crops, small first."""

    def __init__(
        self,
        scales: Sequence[int],
        window: Sequence[float] | None,
        mean: float,
        std: float,
        augment: AugmentConfig | bool,
        channels_last: bool = False,
    ) -> None:
        self.scales = list(scales)
        self.window = None if window is None else (float(window[0]), float(window[1]))
        self.mean, self.std = float(mean), float(std)
        # A bool is the old switch: flips and 90-degree rotations only, or nothing.
        self.augment = (
            augment if isinstance(augment, AugmentConfig) else AugmentConfig(enabled=augment)
        )
        self.channels_last = channels_last

    def normalise(self, patch: torch.Tensor) -> torch.Tensor:
        x = patch.float()
        if self.window is not None:
            low, high = self.window
            x = (x.clamp(low, high) - low) / (high - low)
        return (x - self.mean) / self.std

    def crops(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Concentric centre crops as views of one tensor (no copies)."""
        size = x.shape[-1]
        if size < self.scales[-1]:
            raise DataError(
                f"data.scales: largest scale {self.scales[-1]} exceeds the stored patch size {size}"
            )
        out = []
        for scale in self.scales:
            start = (size - scale) // 2
            view = x[(...,) + (slice(start, start + scale),) * (x.ndim - 2)]
            if self.channels_last:
                fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
                view = view.contiguous(memory_format=fmt)
            out.append(view)
        return out

    def random_affine(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Jittered centre, rotation and zoom for a random `affine_p` share of the batch."""
        aug, batch, spatial = self.augment, x.shape[0], x.ndim - 2
        draw = _uniform(generator, x.device)
        chosen = draw(batch) < aug.affine_p
        shift = torch.randint(
            -aug.translate,
            aug.translate + 1,
            (batch, spatial),
            generator=generator,
            device=generator.device,
        ).to(x.device)
        angles = (draw(batch) * 2 - 1) * math.radians(aug.rotate)
        lo, hi = aug.scale
        zoom = torch.exp(math.log(lo) + draw(batch) * (math.log(hi) - math.log(lo)))
        rotation = _rotation_matrices(angles, spatial, generator)
        shift = torch.where(chosen.view(-1, 1), shift, torch.zeros_like(shift))
        if not aug.rotate and list(aug.scale) == [1.0, 1.0]:
            return shifted_crop(x, self.scales[-1], shift)  # translation only: exact, cheaper
        eye = torch.eye(spatial, device=x.device).expand_as(rotation)
        rotation = torch.where(chosen.view(-1, 1, 1), rotation, eye)
        zoom = torch.where(chosen, zoom, torch.ones_like(zoom))
        return affine_crop(x, self.scales[-1], rotation, zoom, shift)

    def random_intensity(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x * (1 + U(-a, a)) + U(-b, b) and Gaussian noise, each for a random share."""
        aug, batch = self.augment, x.shape[0]
        shape = (batch,) + (1,) * (x.ndim - 1)
        uniform = _uniform(generator, x.device)
        if aug.intensity_scale or aug.intensity_shift:
            chosen = (uniform(batch) < aug.intensity_p).to(x.dtype)
            gain = 1 + chosen * (uniform(batch) * 2 - 1) * aug.intensity_scale
            offset = chosen * (uniform(batch) * 2 - 1) * aug.intensity_shift
            x = x * gain.view(shape) + offset.view(shape)
        if aug.noise_std:
            chosen = (uniform(batch) < aug.noise_p).to(x.dtype)
            noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
            x = x + noise * (chosen * aug.noise_std).view(shape)
        return x

    def __call__(
        self, patch: torch.Tensor, train: bool, generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        aug = self.augment
        if not (train and aug.enabled):
            return self.crops(self.normalise(patch))
        if generator is None:
            raise ValueError("augmentation needs a generator (for resumable randomness)")
        # Flips in the stored dtype (cheap, exact); geometry and intensity on floats. Every
        # draw has a fixed shape per batch, so the generator state after a step does not
        # depend on what was drawn: resumes stay bit-exact.
        if aug.flips:
            patch = random_dihedral(patch, generator)
        x = self.normalise(patch)
        if aug.affine:
            x = self.random_affine(x, generator)
        return self.crops(self.random_intensity(x, generator))
