"""Host syncs in one training step, counted on the CPU: adding one must fail this test.

A device-to-host read (`.item()`, `bool(t)`, `float(t)`) reaches the dispatcher as
`aten._local_scalar_dense`; on a GPU each one stalls the CPU until the device catches up.
A TorchDispatchMode counts them while the real `train_step` runs on the real model with
the optimizer `build_optimizer` makes (fused AdamW, on CPU as on CUDA), so reads inside
torch's optimizer count too.
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
from pipeline.step import NonFiniteSteps, StepParts, train_step

# None: the non-finite skip is decided on the device (fused AdamW's found_inf), losses and
# grad norms stay on the device until the log line, and stop requests and skipped steps
# are agreed every train.log_every steps, outside the step.
EXPECTED_SYNCS_PER_STEP = 0


class CountHostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.where: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
            self.where.append(traceback.format_stack(limit=6)[0])
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


def test_a_steady_state_step_never_reads_the_device():
    for accum in (1, 2):
        parts = _parts(accum)
        batches = _batches(4 * accum)
        train_step(parts, batches)  # warm-up: first-call work is not the steady state
        with CountHostReads() as counter:
            for _ in range(3):
                out = train_step(parts, batches)
        assert out.finite
        assert counter.count == 3 * EXPECTED_SYNCS_PER_STEP, (accum, counter.where)


def test_a_non_finite_step_is_skipped_on_the_device_and_counted_at_log_time():
    parts = _parts(1)
    batches = _batches(4)
    train_step(parts, batches)
    params = [p.detach().clone() for p in parts.model.parameters()]
    buffers = [b.detach().clone() for b in parts.model.buffers()]
    moments = {k: v.clone() for s in parts.optimizer.state.values() for k, v in s.items()}
    finite_loss = parts.criterion
    parts.criterion = lambda logits, label: finite_loss(logits, label) * float("nan")
    with CountHostReads() as counter:
        out = train_step(parts, batches)
    assert counter.count == 0, counter.where
    assert all(torch.equal(a, b) for a, b in zip(params, parts.model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(buffers, parts.model.buffers(), strict=True))
    after = {k: v for s in parts.optimizer.state.values() for k, v in s.items()}
    assert all(torch.equal(moments[k], after[k]) for k in moments)  # step counters included

    skips = NonFiniteSteps()
    skips.add(2, out.finite)
    parts.criterion = finite_loss
    skips.add(3, train_step(parts, batches).finite)
    assert skips.read(stop=False) == (False, [(2, 1)])
    assert not any(torch.equal(a, b) for a, b in zip(params, parts.model.parameters(), strict=True))
