"""torchrun / SLURM / single-process environments, the process group, and rank helpers.

The only package that touches `torch.distributed`. Everything else asks `is_main()` or
calls the collective helpers here, which are no-ops in a single process. SLURM nodelists
are read in `nodelist.py`; the watcher that ends every rank when one fails is
`failure_watch.py` (both re-exported here).
"""

from __future__ import annotations

import gc
import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError

log = logging.getLogger("pipeline")


@dataclass
class DistEnv:
    """Where this process sits, and who launched it."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # torchrun | slurm | single

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def detect_env(environ: dict[str, str] | None = None) -> DistEnv:
    """torchrun's variables win; else srun's one-task-per-process variables; else single."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env["WORLD_SIZE"]),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    # Inside `srun` (a job step) with several tasks: each task is one training process.
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=int(env["SLURM_NTASKS"]),
            master_addr=env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "")),
            # Derived from the job id so concurrent jobs on one node do not collide.
            master_port=int(env.get("MASTER_PORT", 20000 + job_id % 20000)),
            launcher="slurm",
        )
    return DistEnv()


_ENV = DistEnv()
_CONTROL: Any = None  # a gloo group for small host-side decisions (stop, non-finite)


def env() -> DistEnv:
    return _ENV


def is_main() -> bool:
    return _ENV.rank == 0


def select_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init(backend: str, timeout_s: float, device: torch.device, environ: DistEnv) -> DistEnv:
    """Start the process group when there is more than one process."""
    global _ENV, _CONTROL
    _ENV = environ
    if not environ.distributed or dist.is_initialized():
        return environ
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", environ.master_addr)
    os.environ.setdefault("MASTER_PORT", str(environ.master_port))
    timeout = timedelta(seconds=timeout_s)
    if (
        environ.rank == 0
        and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0
        and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    ):
        # torch 2.13's agent keeps one store across restarts: a restarted rank can read a
        # dead peer's address and fail to connect (seen here about half the time).
        log.warning(
            "torchrun --max-restarts with the shared rendezvous store may hand restarted "
            "workers dead peers' addresses (pytorch#135712); export "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun"
        )
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=environ.rank,
        world_size=environ.world_size,
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,
    )
    _CONTROL = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    log.info(
        "process group: %s, rank %d/%d via %s on %s",
        backend,
        environ.rank,
        environ.world_size,
        environ.launcher,
        socket.gethostname(),
    )
    return environ


def placement() -> dict[str, Any]:
    """Where this rank runs: recorded for every rank in the run's start event."""
    return {
        "rank": _ENV.rank,
        "local_rank": _ENV.local_rank,
        "host": socket.gethostname(),
        # srun sets it per task (and torchrun passes it on): the node as SLURM names it.
        "node": os.environ.get("SLURMD_NODENAME"),
        "launcher": _ENV.launcher,
    }


def shutdown() -> None:
    """Destroy the process groups once nothing else holds them (not after a failure: see
    `abandon`).

    DDP's reducer keeps its group alive, and the trainer sits in a reference cycle: without
    the collection the group's gloo threads would outlive destroy_process_group and die in
    interpreter teardown, which can abort ("terminate called without an active exception").
    """
    if dist.is_initialized() and not abandoned():
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier(group=_CONTROL)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_CONTROL)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (uneven sizes are fine)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_CONTROL)
    return out


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 only (None elsewhere).

    For big payloads such as validation predictions: an all-gather would hold every rank's
    share on every rank, which at 64 ranks is 64 copies nobody else reads.
    """
    if not dist.is_initialized():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0, group=_CONTROL)
    return out


def any_rank(*flags: bool) -> list[bool]:
    """Element-wise OR of host-side flags across ranks: one small CPU all-reduce."""
    if not dist.is_initialized():
        return list(flags)
    tensor = torch.tensor([float(f) for f in flags])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_CONTROL)
    return [bool(v) for v in tensor.tolist()]


def sum_across(values: list[float]) -> list[float]:
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, group=_CONTROL)
    return tensor.tolist()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running stats) everywhere.

    DDP broadcasts buffers at the start of each forward, but the forward then updates them
    with each rank's own batch; evaluating with rank 0's (the checkpointed ones) keeps
    distributed validation equal to evaluating the saved checkpoint.
    """
    if not dist.is_initialized():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def wrap_ddp(model: torch.nn.Module, device: torch.device, sync_batchnorm: bool) -> torch.nn.Module:
    if not dist.is_initialized():
        return model
    if sync_batchnorm:
        if device.type == "cpu":
            # torch's SyncBatchNorm refuses CPU tensors, but only at the first forward.
            raise ConfigError(
                "model.sync_batchnorm: SyncBatchNorm runs on GPUs only; set it false on CPU"
            )
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    inner = getattr(model, "module", model)
    return getattr(inner, "_orig_mod", inner)


from pipeline.distributed.failure_watch import (  # noqa: E402 - they use the helpers above
    abandon,
    abandoned,
    announce_failure,
    start_failure_watch,
    stop_failure_watch,
)
from pipeline.distributed.nodelist import expand_nodelist, first_host, hostnames  # noqa: E402

__all__ = [
    "abandon",
    "abandoned",
    "announce_failure",
    "expand_nodelist",
    "first_host",
    "hostnames",
    "start_failure_watch",
    "stop_failure_watch",
]
