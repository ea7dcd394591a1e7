"""The dynamic logit guard: what a bounded head does, seen in its outputs.

A bounded head's output is bounded by a constant, and its values pile up at that bound:
the seed's ReLU head gives logits >= 0 with a mass of them exactly 0 (p exactly 0.5),
whatever the input and whatever the training. A healthy but untrained or imbalanced model
can have all its logits on one side of 0 too; that alone says nothing, so nothing here
looks at the side of 0.5 the values fall on. Two checks:

- `check_range` (at train start, from step 0) pushes the output of the model's last affine
  layer far down and far up and watches the model's output: a raw logit follows the push,
  a bounded head piles up at its bound (ReLU at 0, sigmoid near 0 and 1, tanh at +-1, abs
  and exp above 0, softmax at 1). It catches what the static walk cannot name
  (`relu(x) - 1`, `torch.where(x > 0, x, 0)`, custom ops), and it cannot fire on a raw
  logit: shifting the last affine output shifts a raw logit by the same amount.
- `check_logits` (training batches) and `check_validation_probs` (every validation) look for
  a mass of exactly equal values at one extreme of the batch with every other value on one
  side of it. Distinct inputs give distinct float logits unless an op clips them, so a
  healthy model never shows it; saturated probabilities (exactly 0 or 1 in float32) are
  left out, and so is a constant batch unless it sits on a known bound (0, or 1 after
  softmax).

Dropout applied to the logit itself zeroes logits in training mode. Those zeros sit at the
minimum when a batch's logits are all positive, so `check_logits` asks for a mass a dropout
rate up to 0.5 does not reach (`_MASS`); the range probe and validation run in eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

# Share of a batch exactly at one extreme that makes a bound: above what dropout p=0.5 on
# the output gives by chance (binomial, 32 samples: P(>= 75 %) < 0.2 %), below what a ReLU
# head trained a few steps on imbalanced data gives (nearly every negative at 0).
_MASS = 0.75
# Validation runs in eval mode (no dropout): a quarter of the candidates at one value is
# already far beyond anything distinct inputs produce.
_VAL_MASS = 0.25
_MIN_VALUES = 16  # fewer values say nothing


def _mass_at_bound(
    values: np.ndarray, share: float, known: tuple[float, ...], skip: tuple[float, ...] = ()
) -> tuple[str, int] | None:
    """('>= v' or '<= v', count) when `share` of `values` equal the min (max), the rest beyond.

    A constant batch counts only when its value is one of `known` (a bound of a common
    op): one value for every input is otherwise a dead model, not a bounded head.
    """
    values = values[np.isfinite(values)].astype(np.float32)
    if values.size < _MIN_VALUES:
        return None
    lo, hi = values.min(), values.max()
    if lo == hi:
        hit = lo in np.float32(known) and lo not in np.float32(skip)
        return (f"== {lo + 0:.4g}", int(values.size)) if hit else None
    at_lo, at_hi = int((values == lo).sum()), int((values == hi).sum())
    if at_lo >= share * values.size and lo not in np.float32(skip):
        return f">= {lo + 0:.4g}", at_lo
    if at_hi >= share * values.size and hi not in np.float32(skip):
        return f"<= {hi + 0:.4g}", at_hi
    return None


def check_logits(logits: Tensor) -> str | None:
    """Warning text when a training batch's logits pile up exactly at a bound, else None."""
    values = logits.detach().float().flatten().cpu().numpy()
    found = _mass_at_bound(values, _MASS, known=(0.0, 1.0))  # relu family; softmax of one
    if found is None:
        return None
    bound, count = found
    return (
        f"guard: {count} of {values.size} logits of this batch are exactly at one value, and "
        f"none lie beyond it (logits {bound}): the output is clipped, as by a ReLU/clamp on "
        "the output. Return the raw logit of the last Linear; the pipeline applies the sigmoid."
    )


def check_validation_probs(probs: np.ndarray | Tensor) -> str | None:
    """Loud warning text when validation probabilities pile up exactly at a bound, else None."""
    if isinstance(probs, Tensor):
        probs = probs.detach().float().cpu().numpy()
    p = np.asarray(probs, dtype=np.float32).ravel()
    # Exactly 0 or 1 is a confident logit saturating float32's sigmoid, not a bound.
    found = _mass_at_bound(p, _VAL_MASS, known=(0.5, 1 / (1 + math.exp(-1))), skip=(0.0, 1.0))
    if found is None:
        return None
    bound, count = found
    return (
        f"GUARD: {count} of {np.isfinite(p).sum()} validation probabilities are exactly at one "
        f"value, and none lie beyond it (p {bound}): a ReLU/clamp/softmax before the loss "
        "does this (p = 0.5 is a logit of exactly 0). Return the raw logit."
    )


class _Shift(TorchFunctionMode):
    """Adds `delta` to the output of the `call`-th torch call of a forward."""

    def __init__(self, call: int, delta: float) -> None:
        super().__init__()
        self.call, self.delta, self.calls = call, delta, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls += 1  # counted exactly as guard._Recorder counts
        if self.calls == self.call and isinstance(out, Tensor):
            out = out + self.delta
        return out


def check_range(model: nn.Module, crops: Sequence[Tensor]) -> str | None:
    """Warning text when the model's output cannot reach both p < 1% and p > 99%, else None.

    One recorded forward finds the affine op (linear/conv/matmul) that feeds the output;
    two more shift its output by -delta and +delta, with delta far beyond any logit. The
    model's output must then go below -4.6 (p 1%) one way and above +4.6 the other way.
    Eval mode and no grad (modes restored, BatchNorm statistics untouched).
    """
    from pipeline import guard  # its recorder; guard re-exports this module's checks

    recorder, out = guard.record(model, crops)
    if not isinstance(out, Tensor):
        return None
    node = recorder.node_of(out)
    for _ in range(10_000):  # follow the value path back to the last affine op
        if node is None or node.name in guard._AFFINE:
            break
        node = next((n for n in node.inputs if n is not None), None)
    if node is None or node.value is None:
        return None  # no affine op on the output's path: nothing to push
    delta = 1000.0 * (1.0 + float(node.value.abs().max()))
    shifted = [_forward(model, crops, node.call, sign * delta) for sign in (-1, 1)]
    values = torch.cat([out.detach().float().flatten(), *shifted])
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return None
    lo, hi = float(values.min()) + 0.0, float(values.max()) + 0.0
    limit = -guard._LOGIT_LIMIT  # 4.6 = logit(0.99)
    if lo < -limit and hi > limit:
        return None
    never = " and ".join(
        text
        for text, bounded in ((f"below {lo:.4g}", lo >= -limit), (f"above {hi:.4g}", hi <= limit))
        if bounded
    )
    p_lo, p_hi = (1 / (1 + math.exp(-max(min(v, 50.0), -50.0))) for v in (lo, hi))
    return (
        f"guard: the model's output is bounded: with the output of its last affine op "
        f"({node.op} in {node.place}) pushed by -{delta:.3g} and +{delta:.3g}, the output "
        f"never goes {never}, so sigmoid(output) stays in [{p_lo:.2f}, {p_hi:.2f}]. An op "
        "after the last layer (ReLU, sigmoid, softplus, abs, exp, tanh, clamp, ...) bounds "
        "it. Return the raw logit of the last Linear; the pipeline applies the sigmoid."
    )


def _forward(model: nn.Module, crops: Sequence[Tensor], call: int, delta: float) -> Tensor:
    training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), _Shift(call, delta):
            out = model(*crops)
    finally:
        for module, was_training in training.items():
            module.training = was_training
    return out.detach().float().flatten()
