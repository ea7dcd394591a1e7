"""Shards -> fixed-size batches of stored-dtype tensors, split by rank, then by worker.

Training reads an infinite, epoch-structured stream per (rank, worker):
- epoch e shuffles the shard order from (seed, e), identically on every rank; rank r takes
  shards[r::world], its worker w takes those [w::workers]. Across all ranks and workers,
  epoch e reads every sample exactly once.
- blocks go through a shuffle buffer that permutes whole arrays with numpy, never
  per-sample Python objects. Patches are read straight into the buffer's arena and
  gathered once into each batch (two copies per sample, the disk read included). The
  buffer's memory is recycled, so host memory per worker is one or two (more when a batch
  is bigger than a buffer) x shuffle_blocks x K x bytes per sample, plus the prefetched
  batches (see scripts/bench_loader.py);
- with `data.balance`, each batch is its fresh stream samples followed by draws from a
  reservoir of positives that the stream fed (`balance.py`); resumes replay it too;
- the stream never ends, so every rank takes exactly `max_steps` steps whatever the shard
  sizes: a rank with smaller shards simply starts its next epoch sooner. No rank can run
  dry and leave the others waiting in all-reduce.
- the stream is a pure function of (seed, rank, worker), so resuming after `consumed`
  batches replays it from the nearest epoch boundary (found from the manifest counts) and
  rotates workers so the DataLoader's round-robin continues exactly where it stopped.
  Which shards a reader reads per epoch is `position.py`'s; after a world size or
  num_workers change, its `Plan` deals the rest of the interrupted epoch to the new readers.

Validation reads each shard once, in order, rank r taking shards[r::world].

Remote shards (http(s)://, s3://, gs://, pipe:) are opened through the node-local cache
(`pipeline.data.cache`), which downloads the next ones while a worker reads.
Shards are read by `tar_records` (local files, one readinto per member) rather than
webdataset's streaming tar reader, and DataLoader workers gather each batch straight into
a reused shared-memory slot that the trainer maps without a copy (`handover.py`; `ship`
by value is the fallback): both were measured bottlenecks (scripts/bench_loader.py). The
files stay plain WebDataset tars.
"""

from __future__ import annotations

import itertools
import os
import signal
import tarfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data import cache
from pipeline.data.arena import Arena
from pipeline.data.balance import Balancer
from pipeline.data.format import Block, decode_block
from pipeline.data.handover import InShared, Ring, make_ring, prepare_trainer, remove_unmapped
from pipeline.data.position import Plan, epoch_units, start_epoch
from pipeline.data.problems import ProblemLog
from pipeline.data.remote import is_remote, scrub
from pipeline.data.tar_records import Placer, tar_records, webdataset_records
from pipeline.data.worker_start import StartedLoader
from pipeline.errors import DataError


@dataclass
class StreamSpec:
    """Everything that decides a rank's stream (and nothing that does not)."""

    shards: list[str]
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    shuffle_blocks: int = 16
    on_error: str = "skip"
    counts: list[int] | None = None
    """Samples per shard (from the manifest); lets a resume skip whole epochs."""
    consumed: int = 0
    """Batches this rank already consumed (resume position), since `plan` began if set."""
    plan: Plan | None = None
    """The interrupted epochs after a world size / num_workers change (`transition.py`)."""
    sample_shape: tuple[int, ...] | None = None
    """(C, S, S[, S]) every block must have (from the config); None = not checked."""
    reader: str = "fast"
    """`fast` (tar_records) or `webdataset` (the library's streaming reader); same records."""
    allow_unknown: bool = False
    """Admit label 255 (unknown): only `pipeline predict` reads such shards."""
    handover: str = "shared"
    """Worker -> trainer: `shared` (a ring of shared-memory slots, `handover.py`) or `copy`."""
    balance_draws: int = 0
    """Samples per batch drawn from a reservoir of positives (`balance.py`); 0 = off."""
    balance_reservoir: int = 1024
    """Positives each reservoir window keeps (`data.balance_reservoir`)."""
    problems: ProblemLog = field(default_factory=ProblemLog)


def read_blocks(
    shards: Sequence[str],
    on_error: str,
    problems: ProblemLog,
    meta: bool = True,
    sample_shape: tuple[int, ...] | None = None,
    place: Placer | None = None,
    reader: str = "fast",
    allow_unknown: bool = False,
    then: Sequence[str] = (),
    starts: Sequence[int] = (),
) -> Iterator[Block]:
    """Decoded blocks of `shards`, in order; bad records are skipped and counted, or raise.

    `meta=False` leaves ids/groups/coords unparsed (training needs only patch and label);
    `place` may read members into caller-owned memory (the training stream's Arena).
    Blocks whose sample shape is not `sample_shape` are bad records too (one odd shard
    would otherwise break batching far from its cause), and so is a shard with no records.
    `reader="webdataset"` reads through webdataset instead (no arena placement).
    `then`: the shards read after these (the next epoch's), so remote prefetch carries on
    across the boundary. `starts`: per shard, the records to pass over unread (a shard
    partly read before a topology change, `position.py`).
    """
    remote = any(is_remote(s) for s in shards)
    upcoming = [*shards, *then]
    for index, shard in enumerate(shards):
        records = 0
        if remote:
            # Remote shards: the next ones download while this one is read.
            ahead = upcoming[index + 1 : index + 1 + cache.settings().prefetch]
            cache.shard_cache().prefetch([s for s in ahead if is_remote(s)])
        try:
            with cache.opened(shard) as path:
                yield from _shard_blocks(
                    shard,
                    path,
                    on_error,
                    problems,
                    meta,
                    sample_shape,
                    place,
                    reader,
                    allow_unknown,
                    counter := [0],
                    starts[index] if starts else 0,
                )
            records = counter[0]
        except (OSError, tarfile.TarError) as exc:
            # Truncated or unreadable tar, or a download that failed after its retries:
            # the rest of this shard is lost, the others are read.
            if on_error == "fail":
                raise DataError(f"unreadable shard data: {scrub(shard)}: {exc}") from None
            problems.record("tar", f"{scrub(shard)}: {exc}")
            continue
        if records == 0:
            if on_error == "fail":
                raise DataError(f"{scrub(shard)}: empty shard (a tar with no records)")
            problems.record(shard, f"{scrub(shard)}: empty shard (a tar with no records)")


def _shard_blocks(
    shard: str,
    path: str,
    on_error: str,
    problems: ProblemLog,
    meta: bool,
    sample_shape: tuple[int, ...] | None,
    place: Placer | None,
    reader: str,
    allow_unknown: bool,
    counter: list[int],
    first: int = 0,
) -> Iterator[Block]:
    """Blocks of one shard already on local disk (`path`: the shard or its cached copy)."""
    if reader == "webdataset":
        source = itertools.islice(webdataset_records(path), first, None)
    else:
        source = tar_records(path, place, skip=first)
    name = scrub(shard)
    for sample in source:
        counter[0] += 1
        if path != shard:
            sample["__url__"] = name  # messages name the URL, not the cache file
        try:
            block = decode_block(sample, meta, allow_unknown)
            if sample_shape is not None and block.patch.shape[1:] != sample_shape:
                found, wanted = (
                    "x".join(map(str, shape)) for shape in (block.patch.shape[1:], sample_shape)
                )
                raise DataError(
                    f"{name}:{sample['__key__']}: samples of shape {found}, but the "
                    f"config (data.channels, data.scales[-1], data.dims) says {wanted}"
                )
        except DataError as exc:
            if on_error == "fail":
                raise
            problems.record(shard, str(exc))
            continue
        yield block


Chunk = tuple[np.ndarray, np.ndarray, np.ndarray, "np.ndarray | None"]
"""(patch, label, order, arena memory to release once every sample has been gathered)."""


def _as_tensors(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


class _Shipped:
    """A worker's batch that crosses to the trainer pickled by value, arriving as tensors.

    The fallback when the shared-memory ring (`handover.py`) is off or full. Tensors sent
    from a DataLoader worker each get a fresh shared-memory segment whose file descriptor
    travels over a socket, per tensor and per batch: for small (2D) batches that fixed cost
    was higher than pickling the bytes through the result pipe; for big (3D) ones shared
    memory wins. Unpickling rebuilds the plain dict.
    """

    def __init__(self, batch: dict[str, Any]) -> None:
        self.batch = batch

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        return _as_tensors, (self.batch,)


INLINE_MAX_BYTES = 1 << 20


def ship(batch: dict[str, Any]) -> Any:
    """A batch of numpy arrays -> tensors, or, inside a worker, a by-value package if small."""
    if get_worker_info() is None:
        return _as_tensors(batch)
    size = sum(v.nbytes for v in batch.values() if isinstance(v, np.ndarray))
    return _Shipped(batch) if size <= INLINE_MAX_BYTES else _as_tensors(batch)


def _own_epoch(
    spec: StreamSpec, epoch: int, worker: int, workers: int, arena: Arena
) -> Iterator[Chunk]:
    """One epoch of one worker's samples, shuffled over a buffer of blocks.

    Each chunk is (patch, label, order, memory): its samples are patch[order], gathered
    batch by batch straight into the batch arrays, so the buffer is copied once on its way
    out; then its arena memory goes back to `arena`.
    """
    rng = np.random.default_rng([spec.seed, epoch, spec.rank, worker])
    units = epoch_units(spec, epoch, worker, workers)
    shards = [spec.shards[unit.shard] for unit in units]
    following = [spec.shards[unit.shard] for unit in epoch_units(spec, epoch + 1, worker, workers)]
    buffer: list[Block] = []

    def flush() -> Chunk:
        # The patches were read back to back into the arena: no concatenation needed.
        patch, memory = arena.take([b.patch for b in buffer])
        label = buffer[0].label if len(buffer) == 1 else np.concatenate([b.label for b in buffer])
        order = rng.permutation(len(label))
        buffer.clear()
        return patch, label, order, memory

    for block in read_blocks(
        shards,
        spec.on_error,
        spec.problems,
        meta=False,
        sample_shape=spec.sample_shape,
        place=arena.place,
        reader=spec.reader,
        then=following,
        starts=[unit.first for unit in units],
    ):
        buffer.append(block)
        if len(buffer) >= spec.shuffle_blocks:
            yield flush()
    if buffer:
        yield flush()


Piece = tuple[np.ndarray, np.ndarray, np.ndarray]


def _gather(
    pieces: list[Piece], size: int, patch: np.ndarray | None = None, label: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One batch from (patch, label, indices) pieces, in order, with one copy per sample."""
    if patch is None or label is None:
        patch = np.empty((size, *pieces[0][0].shape[1:]), _dtype(pieces))
        label = np.empty(size, np.uint8)
    # Stand-ins (zeros) lead where an unreplayed carry-in would have been (see _start_epoch).
    at = size - sum(len(index) for _, _, index in pieces)
    patch[:at], label[:at] = 0, 0
    for source_patch, source_label, index in pieces:
        # mode="clip" writes into `out` directly (indices are valid); "raise" buffers a copy.
        np.take(source_patch, index, axis=0, out=patch[at : at + len(index)], mode="clip")
        np.take(source_label, index, out=label[at : at + len(index)], mode="clip")
        at += len(index)
    return patch, label


def _dtype(pieces: list[Piece]) -> np.dtype:
    return np.result_type(*(p for p, _, _ in pieces))


def _batch(pieces: list[Piece], size: int, ring: Ring | None, bad: np.ndarray) -> Any:
    """Gather a batch into a free shared slot when a ring is given and has one, else ship it."""
    if ring is not None:
        slot = ring.arrays((size, *pieces[0][0].shape[1:]), _dtype(pieces), size)
        if slot is not None:
            ticket, patch, label = slot
            _gather(pieces, size, patch, label)
            return InShared(ticket, bad)
    patch, label = _gather(pieces, size)
    return ship({"patch": patch, "label": label, "bad_records": bad})


MAX_EMPTY_EPOCHS = 16


def worker_batches(spec: StreamSpec, worker: int, workers: int, skip: int) -> Iterator[Any]:
    """Infinite batches of one logical worker, after discarding its first `skip` batches.

    Skipped batches are counted but never gathered, so a resume costs reading, not copying.
    """
    size = spec.batch_size
    balancer = None
    if spec.balance_draws:
        balancer = Balancer(
            size, spec.balance_draws, spec.balance_reservoir, spec.seed, spec.rank, worker
        )
    fresh = size - spec.balance_draws  # stream samples per batch
    epoch, emitted = start_epoch(spec, worker, workers, skip, fresh)
    # `filled` stand-ins for the carry-in of an epoch we did not replay: they only take
    # positions in skipped batches.
    batch_index, filled = divmod(emitted, fresh)
    pieces: list[Piece] = []
    arena = Arena(spec.shuffle_blocks)
    read_out: list[np.ndarray | None] = []  # memories of chunks fully dealt into batches
    empty_epochs = 0
    in_worker = get_worker_info() is not None
    ring = make_ring() if in_worker and spec.handover == "shared" else None
    while True:
        got_any = False
        if balancer is not None:
            balancer.open_epoch(epoch)
        for patch, label, order, memory in _own_epoch(spec, epoch, worker, workers, arena):
            got_any = True
            start = 0
            while start < len(order):
                take = min(fresh - filled, len(order) - start)
                if batch_index >= skip:
                    pieces.append((patch, label, order[start : start + take]))
                if balancer is not None:
                    balancer.feed(patch, label, order[start : start + take])
                start, filled = start + take, filled + take
                if start == len(order):
                    read_out.append(memory)
                if filled == fresh:
                    if balancer is not None:
                        pieces += balancer.draw(pieces, gather=batch_index >= skip)
                    if batch_index >= skip:
                        bad = np.array([worker, spec.problems.count])
                        yield _batch(pieces, size, ring, bad)
                    # Every chunk dealt out so far is now in a gathered (or skipped) batch.
                    for done in read_out:
                        arena.release(done)
                    pieces, read_out, filled, batch_index = [], [], 0, batch_index + 1
        # With as many shards as readers, one bad shard empties a reader's whole epoch:
        # with on_error=skip that is a skip like any other (the next epoch deals it other
        # shards). Only a reader that never finds a readable sample must stop the run.
        empty_epochs = 0 if got_any else empty_epochs + 1
        if empty_epochs >= max(MAX_EMPTY_EPOCHS, 2 * len(spec.shards)):
            raise DataError(
                f"rank {spec.rank} worker {worker}: {empty_epochs} epochs in a row yielded no "
                f"readable samples from its shards; check them with `pipeline check-shards`"
            )
        epoch += 1


def check_readers(shards: int, world_size: int, num_workers: int) -> None:
    """Every (rank, worker) reader needs a shard of its own each epoch: no duplicates, no idlers."""
    workers = max(num_workers, 1)
    if shards < world_size * workers:
        raise DataError(
            f"data.train: {shards} shards cannot feed {world_size} ranks x {workers} workers "
            f"({world_size * workers} readers); write more shards or lower data.num_workers"
        )


class TrainStream(IterableDataset):
    """A rank's infinite training stream; each DataLoader worker plays one logical worker."""

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec = spec
        check_readers(len(spec.shards), spec.world_size, spec.num_workers)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        workers = max(self.spec.num_workers, 1)
        consumed = self.spec.consumed
        # DataLoader takes batch j from worker j % workers; rotate so the worker that owes
        # the next batch after a resume is the one asked first.
        logical = (physical + consumed) % workers
        skip = consumed // workers + (1 if logical < consumed % workers else 0)
        return worker_batches(self.spec, logical, workers, skip)


class EvalStream(IterableDataset):
    """Every sample of a rank's validation shards, once, with ids and groups."""

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.spec.shards[self.spec.rank :: self.spec.world_size][worker::workers]
        # Batches never span two shards, so every sample meets the same batch (and gets the
        # same logit, bit for bit) however shards are split across ranks and workers.
        for shard in mine:
            pending: list[Block] = []
            for block in read_blocks(
                [shard],
                self.spec.on_error,
                self.spec.problems,
                sample_shape=self.spec.sample_shape,
                reader=self.spec.reader,
                allow_unknown=self.spec.allow_unknown,
            ):
                pending.append(block)
                if sum(len(b) for b in pending) >= self.spec.batch_size:
                    yield _eval_batch(pending, worker, self.spec.problems.count)
                    pending = []
            if pending:
                yield _eval_batch(pending, worker, self.spec.problems.count)


def _eval_batch(blocks: list[Block], worker: int, bad_records: int) -> dict[str, Any]:
    groups = None
    if all(b.groups is not None for b in blocks):
        groups = [g for b in blocks for g in b.groups]  # type: ignore[union-attr]
    return ship(
        {
            "patch": np.concatenate([b.patch for b in blocks]),
            "label": np.concatenate([b.label for b in blocks]),
            "ids": [i for b in blocks for i in b.ids],
            "groups": groups,
            "coords": _eval_coords(blocks),
            "bad_records": np.array([worker, bad_records]),
        }
    )


def _eval_coords(blocks: list[Block]) -> np.ndarray | None:
    """[n, D] float64 coordinates (world mm for volumes, pixels for images), or None.

    None unless every block carries coordinates of one dimensionality: a prediction is
    traced to its candidate by them, so a partial column would be worse than none.
    """
    if not blocks or any(b.coords is None or len(b.coords) != len(b) for b in blocks):
        return None
    rows = [np.asarray(b.coords, dtype=np.float64).reshape(len(b), -1) for b in blocks]
    if len({r.shape[1] for r in rows}) != 1:
        return None
    return np.concatenate(rows)


def _exit_with_parent(worker_id: int) -> None:
    """Worker side: obey only the trainer's SIGTERM, and leave at once when the trainer dies.

    SLURM (time limit, scancel, preemption) and torchrun signal the whole process group, so
    a worker with the default SIGTERM/SIGUSR1/SIGINT action would die under the trainer
    while it finishes its last step and checkpoint. SIGUSR1 and SIGINT are ignored; SIGTERM
    is blocked and taken by a watcher thread that exits only when the sender is the trainer
    (DataLoader's and multiprocessing's shutdown terminate workers that way; ignoring those
    too would hang the trainer's exit).
    Shipped batches are larger than a pipe's buffer, so a worker whose trainer died blocks
    forever in its exit handler, flushing a batch nobody will read; os._exit skips that.
    """
    for sig in (signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    # Blocked before any thread starts, so every thread inherits the mask and a pending
    # SIGTERM waits for the watcher's sigtimedwait, which tells who sent it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    parent = os.getppid()

    def watch() -> None:
        while True:
            sent = signal.sigtimedwait([signal.SIGTERM], 1.0)
            if os.getppid() != parent or (sent is not None and sent.si_pid == parent):
                remove_unmapped()
                os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def build_loader(
    stream: IterableDataset, num_workers: int, pin_memory: bool, prefetch: int
) -> DataLoader:
    """A DataLoader over ready-made batches (batch_size=None: the stream already batches)."""
    if num_workers > 0:
        prepare_trainer()  # the shared-memory ring's cleanup, shared with the workers
    return StartedLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch if num_workers > 0 else None,
        persistent_workers=False,
        worker_init_fn=_exit_with_parent,
        # Its own generator: DataLoader draws a worker seed per iterator, and drawing it from
        # the global RNG would shift dropout after a resume (which builds one more loader).
        # Our streams seed themselves from (seed, epoch, rank, worker), so this seed is unused.
        generator=torch.Generator(),
    )
