"""Which shards (and from which record) each training reader reads in each epoch.

A reader is one (rank, logical worker). Normally epoch e permutes the shard list from
(seed, e), identically on every rank, and reader (r, w) takes shards[order][r::world][w::workers],
each from its first record. After a change of world size or `data.num_workers` mid-epoch,
a `Plan` (built by `pipeline.data.transition`) overrides the epochs that the old readers
had not finished: each new reader gets its share of what they had not read yet, some
shards from a record in the middle. Later epochs follow the normal rule again.

`start_epoch` turns a resume position (batches already consumed) into the epoch to
replay from, so a resume reads at most about one epoch instead of the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np


class Unit(NamedTuple):
    """A reader's piece of one epoch: shard `shard` from record `first` to its end."""

    shard: int
    """Index into the run's training shard list."""
    first: int
    """First record (block) to read; the earlier ones were read before a topology change."""
    samples: int
    """Samples from `first` to the shard's end (0 when the manifest counts are unknown)."""


@dataclass(frozen=True)
class Plan:
    """The rest of the epochs that a topology change interrupted, dealt to the new readers."""

    first_epoch: int
    """The oldest epoch some old reader had not finished: the new stream starts there."""
    epochs: list[list[list[Unit]]]
    """`epochs[e - first_epoch][rank * workers + worker]`: that new reader's units in epoch e."""
    skipped: int
    """Samples that sat in the old readers' shuffle buffers: never read in these epochs."""
    remaining: int
    """Samples of these epochs left to read, all new readers together."""

    def covers(self, epoch: int) -> bool:
        return 0 <= epoch - self.first_epoch < len(self.epochs)


class Layout(Protocol):
    """What fixes a reader's epochs (a `loader.StreamSpec` is one)."""

    shards: list[str]
    batch_size: int
    seed: int
    rank: int
    world_size: int
    counts: list[int] | None
    plan: Plan | None


def epoch_shards(spec: Layout, epoch: int, worker: int, workers: int) -> list[int]:
    """The normal rule: shard indices of reader (spec.rank, worker) in epoch `epoch`."""
    order = np.random.default_rng([spec.seed, epoch]).permutation(len(spec.shards))
    return [int(i) for i in order[spec.rank :: spec.world_size][worker::workers]]


def epoch_units(spec: Layout, epoch: int, worker: int, workers: int) -> list[Unit]:
    """What reader (spec.rank, worker) reads in `epoch`, in order (the plan's share if any)."""
    if spec.plan is not None and spec.plan.covers(epoch):
        return spec.plan.epochs[epoch - spec.plan.first_epoch][spec.rank * workers + worker]
    counts = spec.counts
    return [
        Unit(i, 0, counts[i] if counts is not None else 0)
        for i in epoch_shards(spec, epoch, worker, workers)
    ]


def first_epoch(spec: Layout) -> int:
    """The epoch a reader's stream begins with (0, or where a topology change resumed)."""
    return spec.plan.first_epoch if spec.plan is not None else 0


def start_epoch(
    spec: Layout, worker: int, workers: int, skip: int, fresh: int | None = None
) -> tuple[int, int]:
    """(epoch to replay from, samples emitted before it) so that `skip` batches are reachable.

    Each batch takes `fresh` stream samples (batch_size, less data.balance's draws).
    Replaying from epoch a is exact when at least one batch of real samples separates a's
    start from the first batch we keep (the unknown carry-in then only fills skipped batches).
    The epoch returned is the origin or one before the epoch of the first kept sample:
    balance.py's reservoir windows rely on that (a kept batch draws from the window opened
    an epoch before, so that window must be replayed whole).
    """
    fresh = spec.batch_size if fresh is None else fresh
    origin = first_epoch(spec)
    if spec.counts is None or skip == 0:
        return origin, 0
    target = skip * fresh
    totals = [0]  # samples emitted before each epoch (from `origin`)
    while totals[-1] <= target:
        epoch = origin + len(totals) - 1
        n = sum(unit.samples for unit in epoch_units(spec, epoch, worker, workers))
        # A plan may leave a reader an empty epoch; a normal one is never empty.
        if n == 0 and not (spec.plan is not None and spec.plan.covers(epoch)):
            return origin, 0
        totals.append(totals[-1] + n)
    current = len(totals) - 2  # epoch that holds the first kept sample
    start = current
    while start > 0 and totals[current] - totals[start] < fresh:
        start -= 1
    return origin + start, totals[start]
