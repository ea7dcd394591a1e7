"""Process-level setup shared by every command: logging, precision, run dir, system info."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pipeline import distributed
from pipeline.errors import ConfigError


def setup_logging(rank: int) -> None:
    """Rank-prefixed log lines; non-zero ranks only say warnings and errors."""
    fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=fmt,
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 on CUDA devices that support it, else fp32."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision: fp16 needs CUDA (use bf16 or fp32 on CPU)")
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _probe_write(probe: Path) -> None:
    """Write and remove a small file: permissions alone miss read-only mounts and root."""
    probe.write_text("ok")
    probe.unlink()


def requested_run_dir(requested: str | None) -> Path:
    """The configured dir, or runs/sweep-<id>/<run id> under a W&B sweep agent, or
    runs/<SLURM job id | timestamp>."""
    sweep, agent_run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if requested:
        return Path(requested).expanduser()
    if sweep and agent_run:
        # Under a W&B sweep agent: one dir per sweep run, found again when the agent (or a
        # requeued SLURM task) re-runs the same run id, so it resumes its own checkpoint.
        return Path("runs") / f"sweep-{sweep}" / agent_run
    job = os.environ.get("SLURM_JOB_ID")
    return Path("runs") / (f"slurm-{job}" if job else time.strftime("%Y%m%d-%H%M%S"))


def resolve_run_dir(requested: str | None) -> Path:
    """`requested_run_dir`, agreed by all ranks (rank 0's clock names a timestamped dir)."""
    path = requested_run_dir(requested)
    path = Path(distributed.broadcast_object(str(path)))
    try:
        if distributed.is_main():
            (path / "checkpoints").mkdir(parents=True, exist_ok=True)
            _probe_write(path / ".write-test")
    except OSError as exc:
        raise ConfigError(f"run.dir: cannot write to {path} ({exc.strerror})") from None
    distributed.barrier()
    return path


def check_output_file(path: str | Path, flag: str) -> Path:
    """Fail fast, in one line, when `path` cannot be written: before the work, not after it.

    Probes with a real file, then removes the probe and any folders it had to create, so a
    later error leaves nothing behind.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a directory; give a file name")
    created = [p for p in path.parents if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _probe_write(path.with_name(f".{path.name}.write-test-{os.getpid()}"))
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write there ({exc.strerror})") from None
    finally:
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
    return path


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def system_info(device: torch.device, world_size: int) -> dict[str, Any]:
    """What W&B and metrics.jsonl record about the machine and the job."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "world_size": world_size,
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_nodelist": os.environ.get("SLURM_JOB_NODELIST"),
        "git_commit": git_commit(),
    }
    if device.type == "cuda":
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return info
