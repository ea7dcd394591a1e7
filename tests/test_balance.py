"""`data.balance`: positives re-drawn from a reservoir fed by the training stream.

The shards are real tars (the public writer, `write_split`) whose patches hold each
sample's id, so every delivered sample can be traced: a batch is its B - k fresh stream
samples, then its k reservoir draws (balance.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data.balance import Reservoir, reservoir_draws
from pipeline.data.format import manifest_counts, write_split
from pipeline.data.loader import StreamSpec, TrainStream, build_loader, worker_batches
from pipeline.errors import ConfigError

N = 2000  # samples; ids 0..N-1, every 100th positive (1:100)
BATCH, TARGET = 32, 0.25


def _positive(ids: np.ndarray) -> np.ndarray:
    return ids % 100 == 0


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("balance_shards")
    ids = np.arange(N)
    # int16 patches of 2x2 pixels, all equal to the sample's id.
    patch = np.repeat(ids.astype(np.int16), 4).reshape(N, 1, 2, 2)
    write_split(out, "train", patch, _positive(ids).astype(np.uint8), [str(i) for i in ids],
                num_shards=4, block_size=16)  # fmt: skip
    return sorted(str(p) for p in Path(out).glob("train-*.tar"))


def _draws(shards: list[str]) -> int:
    counts = manifest_counts(shards).values()
    positives = sum(c.positives for c in counts)
    return reservoir_draws(TARGET, positives, sum(c.samples for c in counts) - positives, BATCH)


def _spec(shards: list[str], draws: int, **extra) -> StreamSpec:
    counts = [manifest_counts(shards)[s].samples for s in shards]
    return StreamSpec(shards, BATCH, seed=3, shuffle_blocks=4, counts=counts,
                      balance_draws=draws, balance_reservoir=64, **extra)  # fmt: skip


def _ids(batch: dict) -> np.ndarray:
    patch = np.asarray(batch["patch"])
    ids = patch.reshape(len(patch), -1)[:, 0].astype(np.int64)
    assert (np.asarray(batch["label"]) == _positive(ids)).all(), "labels do not match ids"
    return ids


def test_draws_per_batch_make_the_expected_fraction_the_target():
    # k = round(B (f - p) / (1 - p)): 20 % positives, target 50 %, B = 100 -> 37.5 -> 38,
    # and (38 + 62 x 0.2) / 100 = 0.504.
    assert reservoir_draws(0.5, 200, 800, 100) == 38
    assert reservoir_draws(None, 200, 800, 100) == 0
    assert reservoir_draws(0.2, 200, 800, 100) == 0  # f <= p: nothing to do
    with pytest.raises(ConfigError, match="all 8 samples of a batch"):
        reservoir_draws(0.99, 10, 990, 8)
    with pytest.raises(ConfigError, match="manifest.json"):
        reservoir_draws(0.5, None, None, 8)


def test_balanced_batches_hold_about_the_target_fraction_on_1_to_100_data(shards):
    draws = _draws(shards)
    assert draws == round(BATCH * (TARGET - 0.01) / 0.99) == 8
    for k, wanted in ((0, 0.01), (draws, TARGET)):
        stream = worker_batches(_spec(shards, k), 0, 1, 0)
        labels = np.concatenate([np.asarray(next(stream)["label"]) for _ in range(150)])
        assert len(labels) == 150 * BATCH
        # k draws of positives plus (B - k) fresh samples at 1 %: (8 + 0.24) / 32 = 0.2575.
        assert abs(labels.mean() - wanted) < 0.015, (k, labels.mean())


def test_every_sample_comes_once_per_epoch_and_draws_are_positives_already_streamed(shards):
    draws = _draws(shards)
    fresh = BATCH - draws
    stream = worker_batches(_spec(shards, draws), 0, 1, 0)  # one reader: an epoch is N
    batches = [_ids(next(stream)) for _ in range(3 * N // fresh + 1)]
    streamed = np.concatenate([b[:fresh] for b in batches])
    for epoch in range(3):
        # Nothing dropped, nothing repeated: the fresh parts are each epoch, once.
        assert sorted(streamed[epoch * N : (epoch + 1) * N]) == list(range(N)), epoch
    seen: set[int] = set()
    for index, batch in enumerate(batches):
        seen.update(batch[:fresh].tolist())
        drawn = batch[fresh:]
        if not any(_positive(b[:fresh]).any() for b in batches[: index + 1]):
            # Before the first positive, the draws repeat the batch's own fresh samples.
            assert set(drawn) <= set(batch[:fresh].tolist()), index
            continue
        # Only positives the stream has already delivered (none from later batches).
        assert _positive(drawn).all(), index
        assert set(drawn.tolist()) <= seen, index
    # Epochs 1 and 2 start drawing from the last epoch's positives too (the reservoir
    # window spans two epochs), not from the few the new epoch has delivered so far.
    for epoch in (1, 2):
        first = epoch * N // fresh + 1  # the first batch wholly inside the epoch
        early = np.concatenate([b[fresh:] for b in batches[first : first + 3]])
        new = set(streamed[epoch * N : (first + 3) * fresh].tolist())
        assert set(early.tolist()) - new, epoch
    assert len(set(np.concatenate([b[fresh:] for b in batches]).tolist())) > 10


def test_reservoir_keeps_a_uniform_sample_of_the_positives_fed():
    # Algorithm R: each of 2,000 positives ends in a 100-slot reservoir with p = 0.05,
    # whenever it came; negatives are never counted. Fed in uneven pieces, as the loader does.
    kept = np.zeros(2000)
    for seed in range(300):
        reservoir = Reservoir(100, np.random.default_rng(seed))
        ids = np.arange(4000)
        label = (ids % 2 == 0).astype(np.uint8)
        patch = ids.reshape(-1, 1)
        for start in range(0, 4000, 37):
            reservoir.feed(patch, label, np.arange(start, min(start + 37, 4000)))
        assert reservoir.seen == 2000 and len(reservoir) == 100
        assert reservoir.patch is not None
        held = reservoir.patch[:, 0]
        assert len(set(held.tolist())) == 100 and (held % 2 == 0).all()
        kept[held // 2] += 1
    rate = kept / 300
    for quarter in np.split(rate, 4):  # early and late positives alike
        assert abs(quarter.mean() - 0.05) < 0.006, rate.reshape(4, -1).mean(axis=1)


def _delivered(shards: list[str], draws: int, workers: int, consumed: int, n: int) -> list:
    spec = _spec(shards, draws, num_workers=workers, consumed=consumed)
    batches = iter(build_loader(TrainStream(spec), workers, False, 2))
    return [_ids(next(batches)).tolist() for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_balanced_stream_delivers_the_uninterrupted_batches(shards, workers):
    # With 2 workers a reader's epoch is ~1,000 samples, ~42 batches: consumed=300 is ~150
    # batches per worker, three epochs replayed from counts (reservoir copied in, draws
    # drawn, nothing gathered); 7 stays inside the first epoch.
    draws = _draws(shards)
    straight = _delivered(shards, draws, workers, 0, 330)
    for consumed in (7, 300):
        resumed = _delivered(shards, draws, workers, consumed, 30)
        assert resumed == straight[consumed : consumed + 30], consumed
        assert any(_positive(np.array(b[BATCH - draws :])).all() for b in resumed)


def test_a_target_at_or_below_the_data_fraction_warns_that_it_does_nothing(caplog):
    from types import SimpleNamespace

    from pipeline.data.balance import describe, draws_for

    cfg = SimpleNamespace(data=SimpleNamespace(balance=0.2), train=SimpleNamespace(batch_size=32))
    sources = SimpleNamespace(positives=300, negatives=700)
    assert draws_for(cfg, sources) == 0
    with caplog.at_level("INFO", logger="pipeline"):
        describe(cfg, sources, 0)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "data.balance=0.2 does nothing" in caplog.records[0].getMessage()
