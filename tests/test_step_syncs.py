"""Host syncs in one training step, counted on the CPU: adding one must fail this test.

A device-to-host read (`.item()`, `bool(t)`, `float(t)`) reaches the dispatcher as
`aten._local_scalar_dense`; on a GPU each one stalls the CPU until the device catches up.
A TorchDispatchMode counts them while the real `train_step` runs on the real model.
Reads made inside torch's optimizer implementation are not ours and are left out: on the
CPU, AdamW's single-tensor path reads each parameter's step counter (about 80 per step
here), while on CUDA `build_optimizer` picks the fused AdamW, which reads none.
"""

from __future__ import annotations

import contextlib
import traceback

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.config import OptimConfig
from pipeline.data.transforms import DeviceTransform
from pipeline.model import build_model
from pipeline.optim import build_optimizer, build_scheduler
from pipeline.step import StepParts, train_step

# The one sync left in a step: `bool(isfinite(grad_norm))`, which decides whether AdamW
# may see the gradients (fp32/bf16). Losses and grad norms stay on the device until the
# log line; stop requests are agreed every train.log_every steps, outside the step.
EXPECTED_SYNCS_PER_STEP = 1


class CountHostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frames = traceback.extract_stack()
            if not any("torch/optim/" in frame.filename for frame in frames):
                self.count += 1
        return func(*args, **(kwargs or {}))


def _parts(accum: int) -> StepParts:
    torch.manual_seed(0)
    model = build_model(dims=2, in_channels=1, scales=(16, 32, 48), width=4, depth=2,
                        features=16, hidden=16)  # fmt: skip
    optim = OptimConfig(lr=1e-3, warmup_steps=2, grad_clip=1.0)
    optimizer = build_optimizer(model, optim, torch.device("cpu"))
    return StepParts(
        model,
        None,
        optimizer,
        build_scheduler(optimizer, optim, 100),
        torch.amp.GradScaler("cpu", enabled=False),
        nn.BCEWithLogitsLoss(pos_weight=torch.tensor(3.0)),
        DeviceTransform([16, 32, 48], [0.0, 255.0], 0.0, 1.0, True, True),
        contextlib.nullcontext,
        torch.Generator().manual_seed(0),
        torch.device("cpu"),
        grad_accum=accum,
        grad_clip=1.0,
    )


def _batches(n: int):
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        yield {
            "patch": torch.randint(0, 256, (8, 1, 48, 48), dtype=torch.uint8, generator=gen),
            "label": torch.tensor([0, 1] * 4, dtype=torch.uint8),
        }


def test_a_steady_state_step_reads_the_device_exactly_once():
    for accum in (1, 2):
        parts = _parts(accum)
        batches = _batches(4 * accum)
        train_step(parts, batches)  # warm-up: first-call work is not the steady state
        with CountHostReads() as counter:
            for _ in range(3):
                out = train_step(parts, batches)
        assert out.finite
        assert counter.count == 3 * EXPECTED_SYNCS_PER_STEP, (accum, counter.count)
