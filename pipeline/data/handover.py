"""Worker -> trainer hand-over without a per-batch copy: a ring of shared-memory batch slots.

A DataLoader worker gathers each batch straight into a slot of POSIX shared memory
(/dev/shm) that it made once, and sends only the slot's name and the batch's shape: a
pickle of about 200 bytes, whatever the batch size. The trainer maps each slot once
(then removes its name, so nothing is left in /dev/shm) and wraps the bytes as tensors,
without copying. Before this, a 2D batch crossed pickled by value (two copies and the
pipe) and a 3D batch as a torch tensor moved into a fresh shared-memory segment per batch
(a copy, zeroed pages and a file descriptor per tensor).

A slot is reused only after the trainer let go of every tensor made from it: one shared
byte per slot says "held"; the worker sets it when it sends, and the trainer clears it
when the last view of the batch is garbage collected (a weakref finalizer). A consumer
that keeps batches (a list of them, pinning threads, queues) just makes the ring grow; past
`MAX_SLOTS` held batches a worker falls back to the by-value path, so a batch is never
overwritten while it is alive.

Segments are registered with multiprocessing's resource tracker (shared by the trainer
and its forked workers, see `prepare_trainer`), which removes any the trainer never
mapped if every process dies.
"""

from __future__ import annotations

import mmap
import os
import uuid
import weakref
from multiprocessing import resource_tracker, util
from typing import Any

import numpy as np
import torch

MAX_SLOTS = 32
_PREFIX = "pipeline-batch"
_RINGS: list[Ring] = []  # this worker's rings, for `remove_unmapped`


def make_ring() -> Ring | None:
    """A worker's ring, or None where POSIX shared memory is unavailable (by value then)."""
    try:
        return Ring()
    except OSError:
        return None


def prepare_trainer() -> None:
    """Start the resource tracker in the trainer, so forked workers share it (call first)."""
    resource_tracker.ensure_running()


def _create(name: str, size: int) -> mmap.mmap:
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        # Reserve the pages now: a full /dev/shm (64 MB in a default Docker container) is
        # then an OSError here, and the batch goes by value, instead of a SIGBUS mid-gather.
        os.posix_fallocate(fd, 0, size)
        memory = mmap.mmap(fd, size)
    except OSError:
        os.unlink(f"/dev/shm/{name}")
        raise
    finally:
        os.close(fd)
    resource_tracker.register(f"/{name}", "shared_memory")
    return memory


class Ring:
    """Worker side: the slots, and the shared bytes that say which ones the trainer holds."""

    def __init__(self) -> None:
        self.tag = f"{_PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.names = [f"{self.tag}-held"]
        self.held = _create(self.names[0], MAX_SLOTS)
        self.slots: list[tuple[str, mmap.mmap]] = []
        # When the worker exits (the trainer reads no more), remove the names of slots the
        # trainer never mapped: batches still in flight at shutdown.
        util.Finalize(self, _unlink_all, (self.names,), exitpriority=10)
        _RINGS.append(self)

    def arrays(
        self, shape: tuple[int, ...], dtype: np.dtype, size: int
    ) -> tuple[Any, np.ndarray, np.ndarray] | None:
        """(ticket, patch, label) views into a free slot, or None when all are held."""
        patch_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        need = patch_bytes + size
        slot = next(
            (i for i, (_, m) in enumerate(self.slots) if self.held[i] == 0 and len(m) >= need),
            None,
        )
        if slot is None:
            if len(self.slots) >= MAX_SLOTS:
                return None
            slot = len(self.slots)
            name = f"{self.tag}-{slot}"
            try:
                self.slots.append((name, _create(name, need)))
            except OSError:
                return None  # /dev/shm full: this batch goes by value
            self.names.append(name)
        name, memory = self.slots[slot]
        self.held[slot] = 1  # cleared by the trainer once the batch is garbage
        patch = np.ndarray(shape, dtype, buffer=memory, offset=0)
        label = np.ndarray((size,), np.uint8, buffer=memory, offset=patch_bytes)
        ticket = (name, len(memory), f"{self.tag}-held", slot, shape, np.dtype(dtype).str, size)
        return ticket, patch, label


def remove_unmapped() -> None:
    """Worker side, before an `os._exit` (which runs no finalizer): remove the names of
    slots the trainer never mapped. Else the resource tracker removes them only when the
    trainer exits, warning about "leaked shared_memory objects"."""
    for ring in _RINGS:
        _unlink_all(list(ring.names))


def _unlink_all(names: list[str]) -> None:
    for name in names:
        try:
            os.unlink(f"/dev/shm/{name}")
        except FileNotFoundError:
            continue  # mapped (and removed) by the trainer
        resource_tracker.unregister(f"/{name}", "shared_memory")


class InShared:
    """A batch in a ring slot; pickling it sends the ticket, unpickling maps the slot."""

    def __init__(self, ticket: tuple, bad_records: np.ndarray) -> None:
        self.ticket, self.bad_records = ticket, bad_records

    def __reduce__(self) -> tuple[Any, tuple]:
        return open_batch, (self.ticket, self.bad_records)


# Trainer side: slot name -> its mapping, kept while the worker that made it lives.
_MAPPED: dict[str, mmap.mmap] = {}


def _map(name: str, size: int) -> mmap.mmap:
    memory = _MAPPED.get(name)
    if memory is None:
        _forget_dead_workers()
        fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
        try:
            memory = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        # Mapped: the name is no longer needed by anyone (the worker keeps its own mapping).
        os.unlink(f"/dev/shm/{name}")
        resource_tracker.unregister(f"/{name}", "shared_memory")
        _MAPPED[name] = memory
    return memory


def _forget_dead_workers() -> None:
    for name in list(_MAPPED):
        pid = int(name[len(_PREFIX) + 1 :].split("-")[0])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            del _MAPPED[name]  # unmapped once no batch from it is alive
        except PermissionError:
            pass


def _release(held: mmap.mmap, slot: int, owner: int) -> None:
    # Only in the process that mapped the batch: a forked child (an evaluation loader's
    # worker) inherits the batch objects and the mapping, and must not free the slot when
    # its copies of them die.
    if os.getpid() == owner:
        held[slot] = 0


def open_batch(ticket: tuple, bad_records: np.ndarray) -> dict[str, Any]:
    """The batch as tensors over the slot's memory; the slot is released when they die."""
    name, nbytes, held_name, slot, shape, dtype, size = ticket
    memory, held = _map(name, nbytes), _map(held_name, MAX_SLOTS)
    base = np.frombuffer(memory, np.uint8)
    patch_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    patch = base[:patch_bytes].view(dtype).reshape(shape)
    label = base[patch_bytes : patch_bytes + size]
    # Every tensor view keeps `base` alive; when the last one goes, the worker may reuse it.
    weakref.finalize(base, _release, held, slot, os.getpid())
    return {
        "patch": torch.from_numpy(patch),
        "label": torch.from_numpy(label),
        "bad_records": torch.from_numpy(bad_records),
    }
