"""Test-only faults, injected from outside the core so the core carries no test hooks.

- `FaultyNet` (`model.target=tests.faults:FaultyNet`): a small XceptionLike that, at the
  `at`-th training forward of this process on rank `rank`, returns NaN from then on, kills
  its own process with SIGKILL, raises, hangs, raises a (planted) out-of-memory
  RuntimeError, or turns bounded (ReLU on the logit, which the dynamic guard catches). With `first_attempt_only` it behaves
  after a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0), so a restart can finish.
- `python -m tests.faults --slow-save S -- train ...`: the real CLI, but a checkpoint save
  that would replace an existing `last.pt` sleeps S seconds between writing the temp file
  and the rename, which leaves a test time to kill the process mid-save.
- `small_shards(dir)`: seconds-cheap synthetic shards with uneven sizes and a manifest.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

from pipeline.model import XceptionLike

FAULTS = ("none", "nan", "kill", "raise", "hang", "oom", "bounded")


class FaultyNet(nn.Module):
    """2D, one channel, three scales; misbehaves from training forward `at` on rank `rank`."""

    def __init__(
        self,
        fault: str = "none",
        at: int = 0,
        rank: int = 0,
        first_attempt_only: bool = True,
        width: int = 4,
        depth: int = 2,
        features: int = 16,
        hidden: int = 16,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")
        self.net = XceptionLike(2, 1, 3, width, depth, features, hidden, dropout)
        self.fault, self.at, self.rank = fault, at, rank
        self.first_attempt_only = first_attempt_only
        self.calls = 0

    def armed(self) -> bool:
        from pipeline.distributed import detect_env

        if detect_env().rank != self.rank:  # torchrun's RANK or srun's SLURM_PROCID
            return False
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        return not (self.first_attempt_only and restarts > 0)

    def forward(self, x16: torch.Tensor, x32: torch.Tensor, x48: torch.Tensor) -> torch.Tensor:
        out = self.net(x16, x32, x48)
        # Only training steps count: the contract check and validation run without grad.
        if not (self.training and torch.is_grad_enabled()) or self.fault == "none":
            return out
        self.calls += 1
        if not self.armed() or self.calls < self.at:
            return out
        if self.fault == "nan":
            return out * float("nan")
        if self.fault == "bounded":
            return torch.relu(out)
        if self.calls > self.at:
            return out
        if self.fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fault == "oom":
            raise RuntimeError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (planted by tests.faults "
                f"on rank {self.rank} at training step {self.at})"
            )
        if self.fault == "raise":
            raise RuntimeError(f"injected fault on rank {self.rank} at training step {self.at}")
        # "hang": a rank that stops answering its peers. It does die on torchrun's SIGTERM,
        # which saves a test the 30 s torchrun waits before SIGKILLing a rank stuck in C.
        signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
        while True:
            time.sleep(1)


def small_shards(out: Path, n_train: int = 390, n_val: int = 64, shards: int = 4) -> Path:
    """Synthetic 2D shards (blocks of 16, uneven shard sizes) with manifest; returns `out`."""
    from pipeline.data.synthetic import make_synthetic

    make_synthetic(
        out,
        dims=2,
        n_train=n_train,
        n_val=n_val,
        positive_fraction=0.25,
        seed=0,
        block_size=16,
        train_shards=shards,
        val_shards=2,
        workers=1,
        progress=False,
    )
    return out


def noise_shards(root: Path, n: int) -> list[str]:
    """Two train shards of `n` random 48x48 uint8 patches in blocks of 64 (seed 0)."""
    import numpy as np

    from pipeline.data.format import write_split

    rng = np.random.default_rng(0)
    patch = rng.integers(0, 256, (n, 1, 48, 48), dtype=np.uint8)
    label = (rng.random(n) < 0.3).astype(np.uint8)
    ids = [f"s{i}" for i in range(n)]
    write_split(root, "train", patch, label, ids, num_shards=2, block_size=64)
    return sorted(str(p) for p in Path(root).glob("train-*.tar"))


class _SlowReplaceOs:
    """`os` for pipeline.checkpoint, whose replace() sleeps before overwriting last.pt."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __getattr__(self, name: str):
        return getattr(os, name)

    def replace(self, src, dst) -> None:
        if Path(dst).name == "last.pt" and Path(dst).exists():
            time.sleep(self.seconds)
        os.replace(src, dst)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults")
    parser.add_argument("--slow-save", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then `pipeline` arguments")
    opts = parser.parse_args(argv)
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    if opts.slow_save:
        from pipeline import checkpoint

        checkpoint.os = _SlowReplaceOs(opts.slow_save)  # type: ignore[assignment]
    from pipeline.cli import main as pipeline_main

    return pipeline_main(args)


if __name__ == "__main__":
    sys.exit(main())
