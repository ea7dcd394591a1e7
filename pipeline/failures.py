"""What a rank does with an exception: one line for the user, and every other rank told.

`on_failure` runs on the rank that raised. It turns an out-of-memory error into a
one-line `OutOfMemory`, announces the failure to the other ranks (whose watchers then end
their processes, naming this rank; see `distributed.start_failure_watch`), and returns the
exception to raise. When another rank had failed first, this rank's error is only the echo
of it (a closed connection, a timeout), and the returned `PeerFailed` says so instead.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import torch

from pipeline import distributed
from pipeline.checkpoint import DiskFullError
from pipeline.errors import PipelineError


class OutOfMemory(PipelineError):
    """The device (or host) ran out of memory: not bad input, so exit 1, but one line."""

    exit_code = 1


class PeerFailed(PipelineError):
    """Another rank failed first; this one stops with its exit code."""

    def __init__(self, rank: int, message: str, exit_code: int) -> None:
        super().__init__(f"stopping: rank {rank} failed: {message}")
        self.exit_code = exit_code


def first_line(exc: BaseException) -> str:
    """The user's message, also when a DataLoader worker re-raised it with its traceback."""
    message = str(exc).strip()
    if "Original Traceback" in message:  # "Caught X in DataLoader worker ...", then the trace
        message = message.splitlines()[-1].split(": ", 1)[-1]
    lines = message.splitlines()
    return lines[0] if lines else type(exc).__name__


def is_out_of_memory(exc: BaseException) -> bool:
    return (
        isinstance(exc, torch.OutOfMemoryError)
        or (isinstance(exc, (RuntimeError, MemoryError)) and "out of memory" in str(exc).lower())
        or isinstance(exc, MemoryError)
    )


def agreed(exc: PipelineError) -> PipelineError:
    """Mark an error that every rank raises together (after a collective that told them
    all): nobody needs telling, and each rank's own line says what happened."""
    exc.agreed = True  # type: ignore[attr-defined]
    return exc


def on_failure(exc: BaseException, step: int | None, device: torch.device) -> BaseException:
    """The exception this rank should raise for `exc` (after telling the other ranks)."""
    if isinstance(exc, SystemExit):
        return exc
    rank = distributed.env().rank
    if is_out_of_memory(exc):
        where = f" at step {step + 1}" if step is not None else ""
        exc = OutOfMemory(
            f"out of memory on rank {rank} ({device}){where}: {first_line(exc)}; lower "
            "train.batch_size (raise train.grad_accum to keep the global batch)"
        )
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = Path(exc.filename) if exc.filename else None
        free = shutil.disk_usage(where.parent).free if where is not None else None
        exc = DiskFullError(
            f"no space left on device writing {where or '(unknown file)'}"
            + (f" ({free / 2**20:.1f} MiB free in {where.parent})" if free is not None else "")
        )
    if isinstance(exc, KeyboardInterrupt):
        code = 130
    else:
        code = exc.exit_code if isinstance(exc, PipelineError) else 1
    distributed.abandon(code)
    if getattr(exc, "agreed", False):
        return exc
    earlier = distributed.announce_failure(first_line(exc), code)
    if earlier is not None and earlier["message"] != first_line(exc):
        distributed.abandon(int(earlier["exit_code"]))
        return PeerFailed(earlier["rank"], earlier["message"], int(earlier["exit_code"]))
    return exc
