"""A world size / `data.num_workers` change mid-epoch: the rest of the epoch, dealt anew.

The old stream is a pure function of its topology (ranks x workers, batch size, shuffle
buffer), so the checkpoint's position (batches consumed per rank) says how many samples
each old reader had emitted: DataLoader takes batch j from logical worker j % workers.
Each old reader emits its epoch chunk by chunk (a chunk = `shuffle_blocks` consecutive
records, shuffled), so:
- the records of chunks it had emitted completely were read: they are not read again;
- the chunk it was emitting when the checkpoint was taken sat in its shuffle buffer: the
  samples it had not emitted yet are skipped, and counted (`Plan.skipped`);
- everything after that chunk (the rest of a shard from the next record, then its whole
  later shards) is read by the new readers: dealt out whole, largest first, to the reader
  with the fewest samples so far.
Old readers need not be in the same epoch (a reader with smaller shards runs ahead):
every epoch from the oldest unfinished one to the newest started one is continued this way.
From the next epoch on, the normal (seed, epoch) rule applies with the new topology.

Only manifest counts and record headers are read (`BlockIndex`): no shard is decoded.
"""

from __future__ import annotations

import bisect
import itertools
import tarfile
from dataclasses import replace
from typing import TYPE_CHECKING

from pipeline.data import cache
from pipeline.data.position import Plan, Unit, epoch_units, first_epoch
from pipeline.data.remote import scrub
from pipeline.data.tar_records import label_lengths
from pipeline.errors import DataError

if TYPE_CHECKING:
    from pipeline.data.loader import StreamSpec

MAX_EPOCHS_APART = 64  # old readers further apart than this are not worth continuing


class BlockIndex:
    """Records per shard (from the manifest) and samples per record (from tar headers)."""

    def __init__(self, shards: list[str], counts: list[int], blocks: list[int] | None) -> None:
        self.shards, self.counts, self.blocks = shards, counts, blocks
        self._sizes: dict[int, list[int]] = {}

    def count(self, shard: int) -> int:
        if self.blocks is not None:
            return self.blocks[shard]
        return len(self.sizes(shard))

    def sizes(self, shard: int) -> list[int]:
        """Samples of each record of `shard`; raises DataError when they contradict the manifest."""
        if shard not in self._sizes:
            try:
                with cache.opened(self.shards[shard]) as path:
                    sizes = label_lengths(path)
            except (OSError, tarfile.TarError, ValueError) as exc:
                raise DataError(f"{scrub(self.shards[shard])}: {exc}") from None
            expected = self.count(shard) if self.blocks is not None else len(sizes)
            if sum(sizes) != self.counts[shard] or len(sizes) != expected:
                raise DataError(f"{scrub(self.shards[shard])}: records do not match the manifest")
            self._sizes[shard] = sizes
        return self._sizes[shard]


def emitted(consumed: int, worker: int, workers: int, batch_size: int) -> int:
    """Samples one logical worker had emitted when its rank had consumed `consumed` batches."""
    return (consumed // workers + (1 if worker < consumed % workers else 0)) * batch_size


def locate(spec: StreamSpec, worker: int, workers: int, samples: int) -> tuple[int, int]:
    """(epoch, samples emitted within it) of a reader that has emitted `samples` in all."""
    epoch, before = first_epoch(spec), 0
    for _ in range(1 << 20):
        n = sum(u.samples for u in epoch_units(spec, epoch, worker, workers))
        if n == 0 and not (spec.plan is not None and spec.plan.covers(epoch)):
            raise DataError("an epoch without samples: cannot locate the data position")
        if before + n > samples:
            return epoch, samples - before
        epoch, before = epoch + 1, before + n
    raise DataError("data position beyond any epoch")


def remainder(
    units: list[Unit], done: int, chunk: int, index: BlockIndex
) -> tuple[list[Unit], int]:
    """(units still unread, samples skipped) of an epoch whose first `done` samples were
    emitted, read in chunks of `chunk` records."""
    if done == 0:
        return units, 0
    # Record (counted over the whole epoch) that holds the last emitted sample.
    record, before = 0, 0
    for unit in units:
        if before + unit.samples >= done:
            sizes = index.sizes(unit.shard)[unit.first :]
            ends = list(itertools.accumulate(sizes))
            record += bisect.bisect_left(ends, done - before)
            break
        before += unit.samples
        record += index.count(unit.shard) - unit.first
    cut = (record // chunk + 1) * chunk  # first record of the next chunk: nothing of it read
    left, at, read = [], 0, 0
    for unit in units:
        n = index.count(unit.shard) - unit.first
        if at + n <= cut:
            read += unit.samples
        elif at >= cut:
            left.append(unit)
        else:
            part = sum(index.sizes(unit.shard)[unit.first : unit.first + cut - at])
            read += part
            left.append(Unit(unit.shard, unit.first + cut - at, unit.samples - part))
        at += n
    return left, read - done


def build_plan(
    old: StreamSpec, consumed: int, new: StreamSpec, index: BlockIndex
) -> tuple[Plan, list[tuple[int, int]]]:
    """The plan for `new`'s topology after `old`'s ranks each consumed `consumed` batches;
    with each old reader's (epoch, samples emitted in it)."""
    old_workers = max(old.num_workers, 1)
    readers = [(r, w) for r in range(old.world_size) for w in range(old_workers)]
    specs = {r: replace(old, rank=r) for r in range(old.world_size)}
    where = [
        locate(specs[r], w, old_workers, emitted(consumed, w, old_workers, old.batch_size))
        for r, w in readers
    ]
    low, high = min(e for e, _ in where), max(e for e, _ in where)
    if high - low > MAX_EPOCHS_APART:
        raise DataError(f"old readers {high - low} epochs apart")
    new_readers = new.world_size * max(new.num_workers, 1)
    loads = [0] * new_readers
    epochs, skipped = [], 0
    for epoch in range(low, high + 1):
        pieces: list[Unit] = []
        for (r, w), (at, done) in zip(readers, where, strict=True):
            if epoch < at:
                continue  # this old reader had finished the epoch
            units = epoch_units(specs[r], epoch, w, old_workers)
            if epoch == at:
                units, lost = remainder(units, done, old.shuffle_blocks, index)
                skipped += lost
            pieces.extend(units)
        epochs.append(_deal(pieces, loads))
    return Plan(low, epochs, skipped, sum(loads)), where


def _deal(pieces: list[Unit], loads: list[int]) -> list[list[Unit]]:
    """Largest piece first to the reader with the fewest samples; each keeps reading order."""
    shares: list[list[tuple[int, Unit]]] = [[] for _ in loads]
    for order, unit in sorted(enumerate(pieces), key=lambda p: (-p[1].samples, p[0])):
        reader = loads.index(min(loads))
        shares[reader].append((order, unit))
        loads[reader] += unit.samples
    return [[unit for _, unit in sorted(share)] for share in shares]
