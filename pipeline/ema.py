"""Exponential moving average of the weights (`model.ema_decay`).

    ema = d * ema + (1 - d) * weights      after every optimizer step not skipped,
    d = min(decay, (1 + t) / (10 + t)) after t updates (a warm-up, as timm's EMA has)

The average lives in torch's `AveragedModel` (a deep copy of the plain model on its
device), over parameters *and* buffers (`use_buffers=True`), so BatchNorm
running statistics are averaged too and the EMA model evaluates on its own. It starts at
the model's weights (not at the first step's), so after one step it is already a blend.

Why `update` does not call `AveragedModel.update_parameters`: that method moves its CPU
step counter to the device on every call (a blocking copy: a host sync per step on CUDA)
and regroups the tensors each time, and its EMA function has no warm-up. We lerp the same
tensors, grouped once. Integer buffers (BatchNorm's `num_batches_tracked`) are copied, not
averaged: a blended counter would truncate to a meaningless integer.

"Not skipped" is the step's own `finite` verdict, a device bool that gates the blend
arithmetically (no host sync). Under fp16 a step that GradScaler skips on an overflow
still counts (the weights did not move, and the average takes one step towards them):
GradScaler's own verdict is not exposed without a host read.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

log = logging.getLogger("pipeline")


class Ema:
    """The EMA copy of a model; `module` is what validation and checkpoints use."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        # Only the container (its deep copy of `model`): `update` does the blending.
        self.averaged = AveragedModel(model, use_buffers=True)
        self.averaged.requires_grad_(False)  # never trained, only blended
        self._groups: tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]] | None = None
        self.reset(model)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def _pairs(self, model: nn.Module) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
        """([ema floats, model floats], [ema others, model others]), in matching order."""
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if len(mine) != len(theirs):
            raise ValueError("EMA: the model's tensors changed since the EMA copy was made")
        floats: list[list[torch.Tensor]] = [[], []]
        others: list[list[torch.Tensor]] = [[], []]
        for a, b in zip(mine, theirs, strict=True):
            group = floats if a.is_floating_point() else others
            group[0].append(a)
            group[1].append(b)
        return floats, others

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """The average restarts at `model`'s weights (a fresh run, or `init_from`)."""
        floats, others = self._pairs(model)
        for ema, current in (floats, others):
            if ema:
                torch._foreach_copy_(ema, current)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module, applied: torch.Tensor | None = None) -> None:
        """One EMA step towards `model`, or none where `applied` (a device bool: the step's
        `finite`) is False. The gate is arithmetic on the device, never read on the host."""
        if self._groups is None:  # the same tensors every step (loading copies in place)
            self._groups = self._pairs(model)
        floats, others = self._groups
        blend = 1.0 - self.current_decay()
        if floats[0]:
            if applied is None:
                torch._foreach_lerp_(floats[0], floats[1], blend)
            else:
                # ema += w * (weights - ema), w = blend when applied, else 0: the lerp,
                # gated on the device without a host sync.
                weight = applied.to(floats[0][0].dtype) * blend
                delta = torch._foreach_sub(floats[1], floats[0])
                torch._foreach_mul_(delta, weight)
                torch._foreach_add_(floats[0], delta)
        if others[0]:
            if applied is None:
                torch._foreach_copy_(others[0], others[1])
            else:
                torch._foreach_copy_(
                    others[0], [torch.where(applied, b, a) for a, b in zip(*others, strict=True)]
                )
        self.updates += 1  # a host int: counts every step, skipped ones too

    def current_decay(self) -> float:
        """The decay of the next update: `min(decay, (1 + t) / (10 + t))` after t updates.

        A warm-up, as timm's and TensorFlow's EMAs have: with a fixed 0.999 the average
        would still be 82 % random initialisation after 200 steps (0.999^200); with the
        warm-up the early average follows the weights and the full decay applies later.
        `t` is a plain int, never read from a tensor.
        """
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    def state_dict(self) -> dict[str, Any]:
        """`ema`: weights with the model's own keys (what inference loads); `ema_updates`."""
        # ema_updates counts the initial copy too (as AveragedModel's n_averaged would).
        return {"ema": self.module.state_dict(), "ema_updates": self.updates + 1}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        """Restore the average; a checkpoint without one (EMA just turned on) starts it at
        `model`'s (already restored) weights."""
        if "ema" not in state:
            log.warning("model.ema_decay is on but the checkpoint has no EMA: it starts here")
            self.reset(model)
            return
        self.module.load_state_dict(state["ema"])
        self.updates = int(state.get("ema_updates", 1)) - 1
