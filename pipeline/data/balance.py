"""Class-balanced training batches: positives re-drawn from a reservoir fed by the stream.

With `data.balance = f` every batch of B samples is B - k fresh samples of the stream, as
without balance (every label: nothing is dropped), followed by k positives drawn with
replacement from a reservoir of the positives that stream already delivered. With p the
training set's positive fraction (manifest counts), k = round(B * m), m = (f - p) / (1 - p),
makes the expected fraction of positives per batch about f. No extra pass over the data.

The reservoir (Algorithm R, with its own generator) is a uniform sample of at most
`data.balance_reservoir` positives, and must be rebuilt exactly on a resume, which replays
the stream from an epoch boundary (loader.py `_start_epoch`) rather than from step 0. So a
reader keeps two windows: the draws of epoch e come from the window opened at the start of
epoch e - 1 (every positive of e - 1 and of e so far), and a second one, opened at e's
start, becomes the next epoch's. A resume replays from 0 or from an epoch before the one
holding the first kept batch, so the window that batch draws from is rebuilt whole: the
skipped batches copy their positives in and draw the same random numbers, but are never
gathered. Memory per reader: at most 2 x balance_reservoir x bytes per sample, allocated
as positives arrive.

Until a reader has seen its first positive (the start of the run), the k slots repeat
random samples of the batch's own fresh part: each batch still takes exactly B - k stream
samples, which keeps the resume arithmetic a division.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipeline.errors import ConfigError

log = logging.getLogger("pipeline")

Piece = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(patch, label, indices): the loader's unit of a batch (see loader.py `_gather`)."""


def reservoir_draws(
    balance: float | None, positives: int | None, negatives: int | None, batch_size: int
) -> int:
    """k: samples per batch drawn from the reservoir (0 = no balancing)."""
    if balance is None:
        return 0
    if positives is None or negatives is None:
        raise ConfigError(
            "data.balance needs manifest.json listing every training shard (for the "
            "data's positive fraction); set data.balance=null"
        )
    if positives == 0:
        raise ConfigError("data.balance: the training shards hold no positives")
    p = positives / (positives + negatives)
    if balance <= p:
        return 0
    draws = round(batch_size * (balance - p) / (1 - p))
    if draws >= batch_size:
        raise ConfigError(
            f"data.balance={balance:g} with train.batch_size={batch_size}: all {batch_size} "
            "samples of a batch would come from the reservoir; lower data.balance or raise "
            "train.batch_size"
        )
    return draws


def draws_for(cfg: Any, sources: Any) -> int:
    """`reservoir_draws` for a Config and its resolved Sources."""
    return reservoir_draws(
        cfg.data.balance, sources.positives, sources.negatives, cfg.train.batch_size
    )


def describe(cfg: Any, sources: Any, draws: int) -> None:
    """One log line on what balancing does for this run (a warning when it does nothing)."""
    balance, batch = cfg.data.balance, cfg.train.batch_size
    if balance is None:
        return
    p = sources.positives / (sources.positives + sources.negatives)
    if draws == 0:
        log.warning(
            "data.balance=%g does nothing: the training data already holds %.3g positives "
            "(or batch %d is too small for one reservoir draw)",
            balance,
            p,
            batch,
        )
        return
    expected = (draws + (batch - draws) * p) / batch
    log.info(
        "balanced batches: %d of %d samples per batch from the positives reservoir (data "
        "%.3g positive, batches about %.3g); an epoch takes about %.2fx the batches",
        draws,
        batch,
        p,
        expected,
        batch / (batch - draws),
    )


def balanced_pos_weight(balance: float, cap: float) -> float:
    """`loss.pos_weight=auto` under balance: the batches' negatives/positives, (1 - f) / f."""
    return min((1.0 - balance) / balance, cap)


class Reservoir:
    """A uniform sample of at most `capacity` of the positives fed to it (Algorithm R)."""

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self.capacity, self.rng = capacity, rng
        self.seen = 0
        """Positives fed so far (kept or not)."""
        self.patch: np.ndarray | None = None  # grown on demand, up to `capacity` rows
        self.label: np.ndarray | None = None  # all ones, as long as `patch`

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def feed(self, patch: np.ndarray, label: np.ndarray, index: np.ndarray) -> None:
        """Offer the samples patch[index] in stream order; only positives are considered."""
        picked = index[label[index] == 1]
        if len(picked) == 0:
            return
        number = self.seen + np.arange(len(picked))  # 0-based count of each positive
        slot = number.copy()
        late = number >= self.capacity
        if late.any():
            # The n-th positive replaces a uniform slot of [0, n] when that slot exists.
            slot[late] = self.rng.integers(0, number[late] + 1)
        keep = slot < self.capacity
        slot, picked = slot[keep], picked[keep]
        # A slot hit twice in one call keeps the later positive, as one-by-one feeding would.
        _, last = np.unique(slot[::-1], return_index=True)
        chosen = len(slot) - 1 - last
        self._room(patch, int(slot.max(initial=-1)) + 1)
        if self.patch is not None and len(chosen):
            self.patch[slot[chosen]] = patch[picked[chosen]]
        self.seen += int(len(number))

    def _room(self, like: np.ndarray, rows: int) -> None:
        """Rows up to `rows` exist (doubling, capped): memory follows the positives seen."""
        have = 0 if self.patch is None else len(self.patch)
        if rows <= have:
            return
        grown = np.empty((min(max(rows, 2 * have, 16), self.capacity), *like.shape[1:]), like.dtype)
        if self.patch is not None:
            grown[:have] = self.patch
        self.patch, self.label = grown, np.ones(len(grown), np.uint8)


class Balancer:
    """One reader's reservoir windows and draws; a pure function of (seed, rank, worker)."""

    def __init__(
        self, batch_size: int, draws: int, capacity: int, seed: int, rank: int, worker: int
    ) -> None:
        self.draws, self.capacity = draws, capacity
        self.fresh = batch_size - draws
        """Stream samples per batch."""
        self.key = (seed, rank, worker)
        self.current: Reservoir | None = None
        self.next: Reservoir | None = None
        self.rng = np.random.default_rng(0)

    def open_epoch(self, epoch: int) -> None:
        """Call before epoch `epoch`'s first sample: rotate windows, fresh draw generator."""
        seed, rank, worker = self.key
        opened = Reservoir(self.capacity, np.random.default_rng([seed, epoch, rank, worker, 1]))
        # The first epoch a reader plays has no older window: draws use the new one. On a
        # resume from epoch a > 0, epoch a's batches are all skipped, so its draws never show.
        self.current = self.next if self.next is not None else opened
        self.next = opened
        self.rng = np.random.default_rng([seed, epoch, rank, worker, 2])

    def feed(self, patch: np.ndarray, label: np.ndarray, index: np.ndarray) -> None:
        """Fresh stream samples, in order (skipped batches too: the resume replays them)."""
        assert self.current is not None and self.next is not None, "open_epoch first"
        self.current.feed(patch, label, index)
        if self.next is not self.current:
            self.next.feed(patch, label, index)

    def draw(self, fresh: list[Piece], gather: bool) -> list[Piece]:
        """The k pieces completing a batch whose fresh part is `fresh` (empty when skipped).

        The same random numbers are drawn whether or not the batch is gathered.
        """
        assert self.current is not None, "open_epoch first"
        window = self.current
        if len(window) > 0:
            picks = self.rng.integers(0, len(window), size=self.draws)
            if not gather:
                return []
            assert window.patch is not None and window.label is not None
            return [(window.patch, window.label, picks)]
        # No positive yet: repeat samples of this batch's fresh part (one piece each). The
        # bound is fixed, so a skipped batch (no pieces) draws the same numbers.
        picks = self.rng.integers(0, self.fresh, size=self.draws)
        if not gather:
            return []
        sizes = np.cumsum([len(index) for _, _, index in fresh])
        pieces = []
        for at in picks:
            which = int(np.searchsorted(sizes, at, side="right"))
            patch, label, index = fresh[which]
            offset = int(at - (sizes[which - 1] if which else 0))
            pieces.append((patch, label, index[offset : offset + 1]))
        return pieces
