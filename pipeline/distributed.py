"""torchrun / SLURM / single-process environments, the process group, and rank helpers.

The only module that touches `torch.distributed`. Everything else asks `is_main()` or calls
the collective helpers here, which are no-ops in a single process.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
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


def expand_nodelist(nodelist: str) -> list[str]:
    """Every hostname of a SLURM nodelist, in SLURM's order, without asking SLURM.

    `gpu[01-03,7]` -> gpu01 gpu02 gpu03 gpu7 (a range keeps the zero padding of its
    start), `rack[1-2]-node[01-02]` -> rack1-node01 rack1-node02 rack2-node01 ...
    (several brackets multiply, the last varies fastest), `gpu[01-02]-ib` keeps the
    suffix, and commas outside brackets separate entries.
    """
    hosts: list[str] = []
    for entry in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip()):
        # Alternating literal text and bracket bodies: "rack", "1-2", "-node", "01-02", "".
        parts = re.split(r"\[([^\]]*)\]", entry)
        choices: list[list[str]] = []
        for index, part in enumerate(parts):
            choices.append(_expand_ranges(part) if index % 2 else [part])
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def _expand_ranges(body: str) -> list[str]:
    out: list[str] = []
    for item in body.split(","):
        start, _, stop = item.partition("-")
        if not start.isdigit() or (stop and not stop.isdigit()):
            out.append(item)  # not a range SLURM writes: keep it as text rather than fail
            continue
        width = len(start) if start.startswith("0") else 1
        out.extend(f"{n:0{width}d}" for n in range(int(start), int(stop or start) + 1))
    return out


def hostnames(nodelist: str) -> list[str]:
    """The nodelist's hostnames: `scontrol show hostnames` where it exists (SLURM's own
    reading, site extensions included), else `expand_nodelist`."""
    return list(_hostnames(nodelist))


@functools.lru_cache(maxsize=8)  # detect_env runs more than once per process
def _hostnames(nodelist: str) -> tuple[str, ...]:
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=15,
            )
            if out.returncode == 0 and out.stdout.split():
                return tuple(out.stdout.split())
        except (OSError, subprocess.SubprocessError):
            pass  # a broken SLURM client: our own parser reads the same syntax
    return tuple(expand_nodelist(nodelist))


def first_host(nodelist: str) -> str:
    """First hostname of a SLURM nodelist such as `gpu[03-05,09],login1` -> `gpu03`."""
    names = hostnames(nodelist) if nodelist.strip() else []
    return names[0] if names else nodelist


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
    if dist.is_initialized() and not _WATCH.get("abandoned"):
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


# -- a failure on one rank ends every rank -------------------------------------------------
# A rank that fails while the others wait in a collective would leave them waiting up to
# dist.timeout_s. So the failing rank writes one key into the rendezvous store (torchrun's
# agent store, or rank 0's TCPStore under srun), and every rank runs a watcher thread
# that polls for it and ends its process at once, saying which rank failed and why.
_WATCH: dict[str, Any] = {}
POLL_S = 0.25
GRACE_S = 0.5  # for this rank's own error to arrive when all ranks raise it together
LINGER_S = 1.5  # the failing rank exits first, so launchers report it as the culprit


def _failure_key() -> str:
    # torchrun keeps one store across restarts: a dead attempt's key must not end the next.
    return f"pipeline/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _store_client(timeout_s: float) -> Any:
    return dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def start_failure_watch(command: str) -> None:
    """Every rank: end this process when another rank announces a failure."""
    if not dist.is_initialized() or _WATCH:
        return
    try:
        store = _store_client(30.0)
    except Exception as exc:  # noqa: BLE001 - a watcher we cannot start must not stop training
        log.warning("failure watcher not started (%s); a failing rank ends others late", exc)
        return
    done, failing = threading.Event(), threading.Event()
    _WATCH.update(store=store, done=done, failing=failing)
    me = _ENV.rank

    def watch() -> None:
        lost = 0
        while not done.wait(POLL_S):
            try:
                if not store.check([_failure_key()]):
                    lost = 0
                    continue
                failed = json.loads(store.get(_failure_key()))
            except Exception:  # noqa: BLE001 - the store's host (rank 0 under srun) is gone
                lost += 1
                if lost < 4 or done.is_set():
                    continue
                failed = {"rank": 0, "message": "the rendezvous store is gone", "exit_code": 1}
            if failed["rank"] == me or done.is_set():
                continue
            # Ranks often raise the same error together (a config or data check they all
            # make): give this rank's own error a moment to arrive and speak for itself.
            if failing.wait(GRACE_S):
                return
            print(
                f"[rank {me}] pipeline {command}: error: stopping: rank {failed['rank']} "
                f"failed: {failed['message']}",
                file=sys.stderr,
                flush=True,
            )
            _WATCH["reported"] = int(failed["exit_code"])
            time.sleep(LINGER_S)
            os._exit(int(failed["exit_code"]))

    threading.Thread(target=watch, name="failure-watch", daemon=True).start()


def stop_failure_watch() -> None:
    """Before a clean shutdown: rank 0's store goes away then, which is not a failure."""
    if _WATCH:
        _WATCH["done"].set()


def announce_failure(message: str, exit_code: int) -> dict[str, Any] | None:
    """This rank failed: tell the others (first failure wins). Returns the failure on
    record when another rank had already announced one (then this error is its echo)."""
    store = _WATCH.get("store")
    if store is None:
        return None
    if "reported" in _WATCH:  # the watcher already said which rank failed: this is its echo
        os._exit(_WATCH["reported"])
    _WATCH["failing"].set()
    record = json.dumps({"rank": _ENV.rank, "message": message, "exit_code": exit_code})
    try:
        first = store.compare_set(_failure_key(), "", record)
        first = json.loads(first)
    except Exception:  # noqa: BLE001 - the store is gone: nobody left to tell
        return None
    if first["rank"] != _ENV.rank:
        return first
    # The others' watchers see it (and print their line) before our sockets close.
    time.sleep(POLL_S + GRACE_S + 0.5)
    return None


def abandon(exit_code: int) -> None:
    """After a failure: leave the process group as it is and end the process with
    `exit_code` once the CLI has printed its line.

    Tearing the group down can block while a peer still waits in a collective, and gloo
    threads left running abort the interpreter's own teardown; so the process ends from
    an atexit hook (which runs before that teardown) with the exit code it meant.
    """
    if not dist.is_initialized():
        return
    first = not _WATCH.get("abandoned")
    _WATCH["abandoned"], _WATCH["exit_code"] = True, exit_code
    if not first:
        return
    import atexit

    def leave() -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(_WATCH["exit_code"])

    atexit.register(leave)
