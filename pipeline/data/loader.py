"""Shards -> fixed-size batches of stored-dtype tensors, split by rank, then by worker.

Training reads an infinite, epoch-structured stream per (rank, worker):
- epoch e shuffles the shard order from (seed, e), identically on every rank; rank r takes
  shards[r::world], its worker w takes those [w::workers]. Across all ranks and workers,
  epoch e reads every sample exactly once.
- blocks go through a shuffle buffer that permutes whole arrays with numpy, never
  per-sample Python objects;
- the stream never ends, so every rank takes exactly `max_steps` steps whatever the shard
  sizes: a rank with smaller shards simply starts its next epoch sooner. No rank can run
  dry and leave the others waiting in all-reduce.
- the stream is a pure function of (seed, rank, worker), so resuming after `consumed`
  batches replays it from the nearest epoch boundary (found from the manifest counts) and
  rotates workers so the DataLoader's round-robin continues exactly where it stopped.

Validation reads each shard once, in order, rank r taking shards[r::world].
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.format import Block, decode_block
from pipeline.data.problems import ProblemLog
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
    """Batches this rank already consumed (resume position)."""
    problems: ProblemLog = field(default_factory=ProblemLog)


def read_blocks(shards: Sequence[str], on_error: str, problems: ProblemLog) -> Iterator[Block]:
    """Decoded blocks of `shards`, in order; bad records are skipped and counted, or raise."""

    def tar_error(exc: Exception) -> bool:
        # Truncated or unreadable tars: webdataset asks us whether to go on.
        if on_error == "fail":
            raise DataError(f"unreadable shard data: {exc}") from None
        problems.record("tar", str(exc))
        return True

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list(shards)), wds.tarfile_to_samples(handler=tar_error)
    )
    for sample in pipeline:
        try:
            yield decode_block(sample)
        except DataError as exc:
            if on_error == "fail":
                raise
            problems.record(sample.get("__url__", "?"), str(exc))


def _epoch_shards(spec: StreamSpec, epoch: int, worker: int, workers: int) -> list[int]:
    order = np.random.default_rng([spec.seed, epoch]).permutation(len(spec.shards))
    return [int(i) for i in order[spec.rank :: spec.world_size][worker::workers]]


def _own_epoch(spec: StreamSpec, epoch: int, worker: int, workers: int) -> Iterator[dict]:
    """One epoch of one worker's samples, shuffled over a buffer of blocks, as array chunks."""
    rng = np.random.default_rng([spec.seed, epoch, spec.rank, worker])
    shards = [spec.shards[i] for i in _epoch_shards(spec, epoch, worker, workers)]
    buffer: list[Block] = []

    def flush() -> dict:
        patch = np.concatenate([b.patch for b in buffer])
        label = np.concatenate([b.label for b in buffer])
        order = rng.permutation(len(label))
        buffer.clear()
        return {"patch": patch[order], "label": label[order]}

    for block in read_blocks(shards, spec.on_error, spec.problems):
        buffer.append(block)
        if len(buffer) >= spec.shuffle_blocks:
            yield flush()
    if buffer:
        yield flush()


def _start_epoch(spec: StreamSpec, worker: int, workers: int, skip: int) -> tuple[int, int]:
    """(epoch to replay from, samples emitted before it) so that `skip` batches are reachable.

    Replaying from epoch a is exact when at least one batch of real samples separates a's
    start from the first batch we keep (the unknown carry-in then only fills skipped batches).
    """
    if spec.counts is None or skip == 0:
        return 0, 0
    target = skip * spec.batch_size
    totals = [0]  # samples emitted before each epoch
    while totals[-1] <= target:
        epoch = len(totals) - 1
        n = sum(spec.counts[i] for i in _epoch_shards(spec, epoch, worker, workers))
        if n == 0:
            return 0, 0
        totals.append(totals[-1] + n)
    current = len(totals) - 2  # epoch that holds the first kept sample
    start = current
    while start > 0 and totals[current] - totals[start] < spec.batch_size:
        start -= 1
    return start, totals[start]


def worker_batches(spec: StreamSpec, worker: int, workers: int, skip: int) -> Iterator[dict]:
    """Infinite batches of one logical worker, after discarding its first `skip` batches."""
    size = spec.batch_size
    epoch, emitted = _start_epoch(spec, worker, workers, skip)
    batch_index = emitted // size
    # Stand-ins for the carry-in of an epoch we did not replay; they only fill skipped batches.
    stand_ins = emitted % size
    carry_patch: list[np.ndarray] = []
    carry_label: list[np.ndarray] = []
    while True:
        got_any = False
        for chunk in _own_epoch(spec, epoch, worker, workers):
            got_any = True
            if stand_ins:
                carry_patch.append(
                    np.zeros((stand_ins, *chunk["patch"].shape[1:]), chunk["patch"].dtype)
                )
                carry_label.append(np.zeros(stand_ins, np.uint8))
                stand_ins = 0
            carry_patch.append(chunk["patch"])
            carry_label.append(chunk["label"])
            pending = sum(len(x) for x in carry_label)
            if pending < size:
                continue
            patch, label = np.concatenate(carry_patch), np.concatenate(carry_label)
            full = (len(label) // size) * size
            for start in range(0, full, size):
                if batch_index >= skip:
                    yield {
                        "patch": torch.from_numpy(patch[start : start + size]),
                        "label": torch.from_numpy(label[start : start + size]),
                        "bad_records": torch.tensor([worker, spec.problems.count]),
                    }
                batch_index += 1
            carry_patch, carry_label = [patch[full:]], [label[full:]]
        if not got_any:
            raise DataError(
                f"rank {spec.rank} worker {worker}: epoch {epoch} yielded no readable samples "
                f"from its shards; check them with `pipeline check-shards`"
            )
        epoch += 1


class TrainStream(IterableDataset):
    """A rank's infinite training stream; each DataLoader worker plays one logical worker."""

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec = spec
        workers = max(spec.num_workers, 1)
        if len(spec.shards) < spec.world_size * workers:
            raise DataError(
                f"data.train: {len(spec.shards)} shards cannot feed {spec.world_size} ranks x "
                f"{workers} workers ({spec.world_size * workers} readers); write more shards "
                f"or lower data.num_workers"
            )

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
        pending: list[Block] = []
        for block in read_blocks(mine, self.spec.on_error, self.spec.problems):
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
    return {
        "patch": torch.from_numpy(np.concatenate([b.patch for b in blocks])),
        "label": torch.from_numpy(np.concatenate([b.label for b in blocks])),
        "ids": [i for b in blocks for i in b.ids],
        "groups": groups,
        "bad_records": torch.tensor([worker, bad_records]),
    }


def build_loader(
    stream: IterableDataset, num_workers: int, pin_memory: bool, prefetch: int
) -> DataLoader:
    """A DataLoader over ready-made batches (batch_size=None: the stream already batches)."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch if num_workers > 0 else None,
        persistent_workers=False,
    )
