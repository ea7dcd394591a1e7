"""A few optimizer steps of our real model, optimizer and DDP wrapper on fixed batches.

`tests/test_ddp_equivalence.py` runs this file under torchrun (2 gloo ranks, each taking
rows [r*B:(r+1)*B] of every fixed 2B batch) and imports it to run the same steps in one
process on whole 2B batches. Each step is the real `pipeline.step.train_step` (the one
`Trainer.fit` calls): BCEWithLogits(pos_weight), loss / accum, `no_sync` on all but the
last micro-step, unscale -> clip -> step -> update.

    torchrun --nproc_per_node=2 tests/ddp_worker.py OUT_DIR
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline import distributed
from pipeline.config import OptimConfig
from pipeline.data.transforms import DeviceTransform
from pipeline.model import build_model
from pipeline.optim import build_optimizer, build_scheduler
from pipeline.step import StepParts, train_step

B = 8  # per-rank batch; the single process takes 2B
STEPS = 4
SCALES = (16, 32, 48)
POS_WEIGHT = 3.0
OPTIM = OptimConfig(lr=1e-2, warmup_steps=2, grad_clip=0.5)


def fixed_batches(steps: int = STEPS, size: int = 2 * B) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same uint8 patches and labels in every process (numpy seed, not torch's)."""
    rng = np.random.default_rng(1234)
    out = []
    for _ in range(steps):
        label = (rng.random(size) < 0.3).astype(np.uint8)
        label[:2] = (1, 0)  # both classes in every half-batch
        label[B : B + 2] = (1, 0)
        patch = rng.integers(0, 256, (size, 1, 48, 48), dtype=np.uint8)
        patch[label == 1, :, 20:28, 20:28] = 255
        out.append((torch.from_numpy(patch), torch.from_numpy(label)))
    return out


def build() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)  # same init on every rank, as in Trainer
    model = build_model(
        dims=2, in_channels=1, scales=SCALES, width=4, depth=2, features=16, hidden=16
    ).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, OPTIM, torch.device("cpu"))
    return model, optimizer, build_scheduler(optimizer, OPTIM, STEPS)


def train(rows: slice, accum: int) -> dict[str, dict]:
    """STEPS steps on rows `rows` of each fixed batch, split into `accum` micro-batches."""
    model, optimizer, scheduler = build()
    raw = model
    model = distributed.wrap_ddp(model, torch.device("cpu"), sync_batchnorm=False)
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    # BatchNorm statistics would differ per rank (SyncBN is CUDA-only): freeze them.
    model.eval()
    parts = StepParts(
        model,
        model if ddp else None,
        optimizer,
        scheduler,
        torch.amp.GradScaler("cpu", enabled=False),
        nn.BCEWithLogitsLoss(pos_weight=torch.tensor(POS_WEIGHT)),
        DeviceTransform(list(SCALES), [0.0, 255.0], 0.0, 1.0, False, True),
        contextlib.nullcontext,
        None,
        torch.device("cpu"),
        grad_accum=accum,
        grad_clip=OPTIM.grad_clip,
    )
    norms = []
    for patch, label in fixed_batches():
        micro = zip(patch[rows].chunk(accum), label[rows].chunk(accum), strict=True)
        out = train_step(parts, iter([{"patch": p, "label": y} for p, y in micro]))
        norms.append(float(out.grad_norm))
    return {
        "model": {k: v.detach().clone() for k, v in raw.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "grad_norms": norms,
    }


def main(out_dir: Path) -> None:
    env = distributed.detect_env()
    distributed.init("gloo", 60.0, torch.device("cpu"), env)
    try:
        rows = slice(env.rank * B, (env.rank + 1) * B)
        for accum in (1, 2):
            result = train(rows, accum)
            if distributed.is_main():
                torch.save(result, out_dir / f"ddp-accum{accum}.pt")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
