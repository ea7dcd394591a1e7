"""Doctor checks of the machine: torch, GPUs, torchrun/SLURM variables, W&B credentials."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch

from pipeline import distributed
from pipeline.config import Config
from pipeline.doctor import FAIL, OK, WARN, Check
from pipeline.errors import PipelineError

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_STEP_ID",
    "SLURM_JOB_NODELIST",
)


def environment(cfg: Config | None) -> Iterator[Check]:
    cuda = torch.version.cuda or "none (CPU build)"
    yield Check(
        OK, "torch", f"{torch.__version__}, CUDA build {cuda}, python {sys.version.split()[0]}"
    )
    wants_cuda = cfg is not None and cfg.train.device == "cuda"
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except (AttributeError, RuntimeError):
            nccl = "unavailable (multi-GPU needs dist.backend=gloo)"
        yield Check(
            OK, "GPUs", f"{torch.cuda.device_count()} visible ({', '.join(names)}), NCCL {nccl}"
        )
    else:
        seen = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={seen!r})" if seen is not None else ""
        yield Check(
            FAIL if wants_cuda else WARN,
            "GPUs",
            f"none visible{where}; "
            + ("train.device=cuda cannot start" if wants_cuda else "training runs on the CPU"),
            "check `nvidia-smi`, CUDA_VISIBLE_DEVICES and that torch is a CUDA build"
            + ("" if wants_cuda else ", or ignore this for CPU runs"),
        )
    yield from _dist_env()
    yield from _slurm_env()


def _dist_env() -> Iterator[Check]:
    present = {k: os.environ[k] for k in DIST_VARS if k in os.environ}
    if not present:
        yield Check(OK, "distributed env", "single process (no RANK/WORLD_SIZE/LOCAL_RANK set)")
        return
    shown = " ".join(f"{k}={v}" for k, v in present.items())
    bad = [
        k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in present and not present[k].isdigit()
    ]
    if bad:
        yield Check(
            FAIL,
            "distributed env",
            f"{shown}: {', '.join(bad)} not a non-negative integer",
            "launch with torchrun, which sets these",
        )
    elif ("RANK" in present) != ("WORLD_SIZE" in present):
        missing = "WORLD_SIZE" if "RANK" in present else "RANK"
        yield Check(
            FAIL,
            "distributed env",
            f"{shown}: {missing} is not set",
            "set both RANK and WORLD_SIZE, or launch with torchrun",
        )
    elif "RANK" in present and int(present["RANK"]) >= int(present["WORLD_SIZE"]):
        yield Check(
            FAIL,
            "distributed env",
            f"{shown}: RANK must be < WORLD_SIZE",
            "launch with torchrun, which sets these",
        )
    elif (
        torch.cuda.is_available() and int(present.get("LOCAL_RANK", 0)) >= torch.cuda.device_count()
    ):
        yield Check(
            FAIL,
            "distributed env",
            f"{shown}: LOCAL_RANK has no GPU ({torch.cuda.device_count()} visible)",
            "use --nproc_per_node <= the GPUs per node",
        )
    else:
        env = distributed.detect_env()
        yield Check(OK, "distributed env", f"{shown} (rank {env.rank} of {env.world_size})")


def _slurm_env() -> Iterator[Check]:
    present = {k: os.environ[k] for k in SLURM_VARS if k in os.environ}
    if "SLURM_JOB_ID" not in present:
        yield Check(OK, "SLURM", "not inside a SLURM job")
        return
    shown = " ".join(f"{k}={v}" for k, v in present.items())
    tasks = present.get("SLURM_NTASKS", "1")
    if tasks.isdigit() and int(tasks) > 1 and "SLURM_STEP_ID" not in present:
        yield Check(
            WARN,
            "SLURM",
            f"{shown}: {tasks} tasks but not inside srun, so one process trains",
            "start training with `srun` (one task per GPU) or torchrun",
        )
    else:
        yield Check(OK, "SLURM", f"{shown} (launcher: {distributed.detect_env().launcher})")


def wandb_credentials() -> str | None:
    """Where W&B would find an API key ('WANDB_API_KEY' or the netrc path), never the key."""
    if os.environ.get("WANDB_API_KEY", "").strip():
        return "WANDB_API_KEY"
    import netrc

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc")).expanduser()
    try:
        if path.is_file() and netrc.netrc(str(path)).authenticators(host or "api.wandb.ai"):
            return str(path)
    except (netrc.NetrcParseError, OSError):
        return None
    return None


def wandb(cfg: Config) -> Check:
    from pipeline.tracking.wandb_identity import resolve_target

    try:
        target = resolve_target(cfg.wandb, Path(cfg.run.dir or "runs"))
    except PipelineError as exc:
        return Check(FAIL, "W&B", str(exc), "use online, offline or disabled")
    source = "WANDB_MODE" if os.environ.get("WANDB_MODE") else "wandb.mode"
    creds = wandb_credentials()
    found = f"credentials in {creds}" if creds else "no credentials"
    if target.mode == "online" and creds is None:
        return Check(
            FAIL,
            "W&B",
            f"online ({source}) but no credentials: WANDB_API_KEY unset and no api.wandb.ai entry in ~/.netrc",
            "run `wandb login`, export WANDB_API_KEY, or use wandb.mode=offline and `wandb sync` later",
        )
    if target.mode == "offline":
        return Check(
            OK,
            "W&B",
            f"offline ({source}), project {target.project}; upload later with `wandb sync` ({found})",
        )
    if target.mode == "disabled":
        return Check(OK, "W&B", f"disabled ({source})")
    return Check(OK, "W&B", f"online ({source}), project {target.project}, {found}")
