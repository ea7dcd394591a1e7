"""Device-side, batch-wise: augment in the stored dtype, cast, normalise, centre-crop scales.

Everything here works on whole batches with tensor ops, so no per-sample Python runs in
the hot loop, and the loader ships compact uint8/int16 tensors instead of floats.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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


class DeviceTransform:
    """Stored-dtype patches [B, C, S...] on the device -> normalised float crops, small first."""

    def __init__(
        self,
        scales: Sequence[int],
        window: Sequence[float] | None,
        mean: float,
        std: float,
        augment: bool,
        channels_last: bool = False,
    ) -> None:
        self.scales = list(scales)
        self.window = None if window is None else (float(window[0]), float(window[1]))
        self.mean, self.std = float(mean), float(std)
        self.augment = augment
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

    def __call__(
        self, patch: torch.Tensor, train: bool, generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        if train and self.augment:
            if generator is None:
                raise ValueError("augmentation needs a generator (for resumable randomness)")
            patch = random_dihedral(patch, generator)
        return self.crops(self.normalise(patch))
