"""Shared fixtures: real tiny shards (made once per session) and a real CLI runner.

Tests drive the real `python -m pipeline` (or torchrun) in subprocesses on the real
`configs/tiny.yaml`, forced onto the CPU, with W&B disabled unless a test asks for it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


def cli_env(tmp: Path, **extra: str) -> dict[str, str]:
    """A clean environment: CPU only, one thread per process, private caches."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SLURM_"))}
    env.update(
        PIPELINE_CACHE=str(tmp / "cache"),
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        WANDB_SILENT="true",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def train_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """`train` on configs/tiny.yaml with `shards`' train/val splits into `run_dir`, then `extra`."""
    return [
        "train",
        "--config",
        str(TINY),
        f"data.train={shards}/train-*.tar",
        f"data.val={shards}/val-*.tar",
        f"run.dir={run_dir}",
        *extra,
    ]


def run_cli(args: list[str], env: dict[str, str], timeout: float = 300, cwd: Path = ROOT):
    """Run `python -m pipeline ARGS`; returns the CompletedProcess (never raises on rc)."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_torchrun(
    nproc: int, args: list[str], env: dict[str, str], timeout: float = 300, extra: list[str] = ()
):
    """`torchrun --standalone --nproc_per_node=N -m pipeline ARGS` (gloo on CPU)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *extra,
            "-m",
            "pipeline",
            *args,
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """2D synthetic shards shaped like configs/tiny.yaml's demo data (written once)."""
    from pipeline.data.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("tiny_shards")
    make_synthetic(
        out,
        dims=2,
        n_train=2048,
        n_val=512,
        positive_fraction=0.25,
        seed=0,
        block_size=64,
        train_shards=4,
        val_shards=2,
        workers=1,
        progress=False,
    )
    return out


@pytest.fixture
def tiny_args(tiny_shards: Path, tmp_path: Path) -> list[str]:
    """CLI args for a seconds-long run on the session's tiny shards, in a fresh run dir."""
    return [
        "--config",
        str(TINY),
        f"data.train={tiny_shards}/train-*.tar",
        f"data.val={tiny_shards}/val-*.tar",
        f"run.dir={tmp_path / 'run'}",
    ]
