"""A world size / num_workers change mid-epoch continues the epoch: no sample read twice.

The stream-level tests read real shards (uneven sizes, partial last records, chunks that
span shards) through the real training readers (`worker_batches`): first the old
topology up to the checkpoint's position, then the new one from the plan that a resume
builds (`resume_stream.plan_of`). Every patch carries its sample's index in its first
bytes (checked against the ids in meta.json), so each emitted sample is identified.
For each epoch the change interrupted: every sample is read at most once, and the ones
never read are exactly `Plan.skipped` many, at most what the old shuffle buffers held.
The previous behaviour (each new reader restarts from the seeds and skips as many
batches as its rank consumed) reads samples twice, and the same check catches it.
"""

from __future__ import annotations

import collections
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline import checkpoint, config
from pipeline.data.format import expand_shards, manifest_counts, update_manifest, write_shard
from pipeline.data.loader import StreamSpec, TrainStream, build_loader, read_blocks, worker_batches
from pipeline.data.position import Plan, epoch_units, first_epoch, start_epoch
from pipeline.data.problems import ProblemLog
from pipeline.data.transition import BlockIndex
from pipeline.resume_stream import decide, plan_of
from tests.conftest import TINY, cli_env, run_cli, run_torchrun, train_args

SIZES = [43, 70, 56, 24, 61, 48, 37, 66]  # samples per shard: partial last records
BLOCK = 8
BUFFER = 3  # data.shuffle_blocks
BATCH = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("topology_shards")
    rng = np.random.default_rng(0)
    infos, start = [], 0
    for index, n in enumerate(SIZES):
        patch = rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)
        ids = np.arange(start, start + n, dtype="<u4")
        patch.reshape(n, -1)[:, :4] = ids.view(np.uint8).reshape(n, 4)  # the id, in the pixels
        label = (ids % 4 == 0).astype(np.uint8)
        infos.append(
            write_shard(
                out / f"train-{index:06d}.tar",
                patch,
                label,
                [str(i) for i in ids],
                block_size=BLOCK,
            )
        )
        start += n
    update_manifest(out, "train", infos, patch_shape=(1, 8, 8), dtype="uint8")
    return expand_shards(str(out / "train-*.tar"))


def _ids(patch: np.ndarray) -> list[int]:
    n = len(patch)
    return np.ascontiguousarray(patch.reshape(n, -1)[:, :4]).view("<u4").reshape(n).tolist()


def test_pixels_carry_the_meta_ids(shards):
    for block in read_blocks(shards, "fail", ProblemLog()):
        assert _ids(block.patch) == [int(i) for i in block.ids]


@pytest.mark.parametrize("reader", ["fast", "webdataset"])
def test_records_passed_over_by_their_headers_are_exactly_the_first_ones(shards, reader):
    whole = [b.ids for b in read_blocks(shards[:2], "fail", ProblemLog())]
    starts = [2, 5]
    problems = ProblemLog()
    read = [b.ids for b in read_blocks(shards[:2], "fail", problems, reader=reader, starts=starts)]
    first = -(-SIZES[0] // BLOCK)  # records of shard 0
    assert read == whole[2:first] + whole[first + 5 :] and problems.count == 0


def _base(shards: list[str]) -> StreamSpec:
    counts = [manifest_counts(shards)[s].samples for s in shards]
    return StreamSpec(shards, BATCH, seed=5, shuffle_blocks=BUFFER, counts=counts)


def _segment(step: int, world: int, workers: int, batch: int = BATCH) -> dict[str, int]:
    return dict(
        step=step,
        world_size=world,
        num_workers=workers,
        batch_size=batch,
        grad_accum=1,
        shuffle_blocks=BUFFER,
    )


def _index(shards: list[str]) -> BlockIndex:
    infos = manifest_counts(shards)
    return BlockIndex(shards, [infos[s].samples for s in shards], [infos[s].blocks for s in shards])


def _reader_ids(spec: StreamSpec, worker: int, workers: int, skip: int, wanted: int) -> list[int]:
    """The first `wanted` sample ids one reader emits after skipping `skip` batches."""
    ids: list[int] = []
    for batch in worker_batches(spec, worker, workers, skip):
        if len(ids) >= wanted:
            break
        ids.extend(_ids(batch["patch"].numpy()))
    return ids[:wanted]


def _share(plan: Plan, reader: int) -> int:
    return sum(u.samples for epoch in plan.epochs for u in epoch[reader])


def _read(base: StreamSpec, seg: dict, plan: Plan | None, consumed: int | None):
    """{epoch: sample ids} a segment's readers emit: `consumed` batches per rank, taken
    from its real DataLoader (worker processes, round-robin), or (None) exactly the epochs
    its plan continues, reader by reader."""
    workers = max(seg["num_workers"], 1)
    per_reader: dict[int, list[int]] = collections.defaultdict(list)
    for rank in range(seg["world_size"]):
        spec = replace(
            base,
            rank=rank,
            world_size=seg["world_size"],
            num_workers=seg["num_workers"],
            batch_size=seg["batch_size"],
            plan=plan,
        )
        if consumed is not None:
            loader = build_loader(TrainStream(spec), seg["num_workers"], False, 2)
            for batch, _ in zip(loader, range(consumed), strict=False):
                worker = int(batch["bad_records"][0])  # the logical worker that read it
                per_reader[rank * workers + worker] += _ids(batch["patch"].numpy())
            continue
        for worker in range(workers):
            wanted = _share(plan, rank * workers + worker)
            per_reader[rank * workers + worker] = _reader_ids(spec, worker, workers, 0, wanted)
    by_epoch: dict[int, list[int]] = collections.defaultdict(list)
    for reader, ids in per_reader.items():
        rank, worker = divmod(reader, workers)
        spec = replace(base, rank=rank, world_size=seg["world_size"], plan=plan)
        epoch = first_epoch(spec)
        while ids:
            n = sum(u.samples for u in epoch_units(spec, epoch, worker, workers))
            by_epoch[epoch].extend(ids[:n])
            ids, epoch = ids[n:], epoch + 1
    return by_epoch


def _restart(base: StreamSpec, seg: dict, plan: Plan) -> list[int]:
    """The previous behaviour: each new reader replays its own stream from the seeds and
    skips its share of the batches its rank consumed (as TrainStream does), then reads as
    many samples as the plan deals it."""
    workers = max(seg["num_workers"], 1)
    ids = []
    for rank in range(seg["world_size"]):
        spec = replace(
            base,
            rank=rank,
            world_size=seg["world_size"],
            num_workers=seg["num_workers"],
            batch_size=seg["batch_size"],
        )
        for worker in range(workers):
            skip = seg["step"] // workers + (1 if worker < seg["step"] % workers else 0)
            ids += _reader_ids(spec, worker, workers, skip, _share(plan, rank * workers + worker))
    return ids


def _check_epochs(
    epochs: range, reads: list[dict[int, list[int]]], skipped: int, total: int
) -> None:
    """Each epoch: no sample twice; `skipped` samples never read, all epochs together."""
    missing = 0
    for epoch in epochs:
        seen = [i for read in reads for i in read.get(epoch, [])]
        twice = [i for i, n in collections.Counter(seen).items() if n > 1]
        assert not twice, f"epoch {epoch}: {len(twice)} samples read twice, e.g. {twice[:5]}"
        missing += total - len(set(seen))
    assert missing == skipped, f"{missing} samples never read, the plan says {skipped} skipped"


CASES = {
    "2->1 ranks": [(0, 2, 0), (7, 1, 0)],
    "1->2 ranks": [(0, 1, 0), (13, 2, 0)],
    "2->1 workers": [(0, 1, 2), (11, 1, 1)],
    "2x2->1x3 readers": [(0, 2, 2), (5, 1, 3)],
    "later epochs, readers apart": [(0, 2, 2), (45, 1, 2)],
    "2->1 ranks, batch 8->12": [(0, 2, 0, 8), (9, 1, 0, 12)],
    "2->1->2 ranks in one epoch": [(0, 2, 0), (6, 1, 0), (15, 2, 0)],
}


@pytest.mark.parametrize("case", CASES)
def test_topology_change_reads_each_sample_of_the_epoch_at_most_once(shards, case):
    base, index = _base(shards), _index(shards)
    segments = [_segment(*row) for row in CASES[case]]
    reads, plans = [], []
    for k, seg in enumerate(segments):
        plan = plan_of(segments[: k + 1], base, index)
        plans.append(plan)
        if k + 1 < len(segments):
            reads.append(_read(base, seg, plan, segments[k + 1]["step"] - seg["step"]))
    final = plans[-1]
    reads.append(_read(base, segments[-1], final, None))
    epochs = range(final.first_epoch, final.first_epoch + len(final.epochs))
    skipped = sum(p.skipped for p in plans if p is not None)
    _check_epochs(epochs, reads, skipped, sum(SIZES))
    assert base.problems.count == 0, "every record read whole (none cut by a skip)"
    # What sat in a shuffle buffer is at most one chunk per old reader.
    old = segments[-2]
    assert final.skipped <= old["world_size"] * max(old["num_workers"], 1) * BUFFER * BLOCK
    assert final.remaining == sum(len(v) for v in reads[-1].values())
    if case == "later epochs, readers apart":
        assert len(final.epochs) > 1, "the case should put old readers in different epochs"

    # The previous behaviour, planted: the same check finds samples read twice.
    if len(final.epochs) == 1:
        restarted = {epochs[0]: _restart(base, segments[-1], final)}
        with pytest.raises(AssertionError, match="read twice"):
            _check_epochs(epochs, [*reads[:-1], restarted], skipped, sum(SIZES))


def test_a_resume_after_the_change_replays_the_new_stream_exactly(shards):
    """A requeue after the change (same new topology) continues the plan bit for bit,
    replaying from a later epoch when it can."""
    base, index = _base(shards), _index(shards)
    segments = [_segment(0, 2, 0), _segment(7, 1, 2)]
    spec = replace(base, world_size=1, num_workers=2, plan=plan_of(segments, base, index))

    def batches(consumed: int, n: int) -> list:
        loader = build_loader(TrainStream(replace(spec, consumed=consumed)), 2, False, 2)
        return [b["patch"].clone() for b, _ in zip(loader, range(n), strict=False)]

    straight = batches(0, 140)
    for consumed in (5, 120):
        resumed = batches(consumed, 140 - consumed)
        assert all(torch.equal(a, b) for a, b in zip(straight[consumed:], resumed, strict=True))
    # At 120 batches both readers are well past the plan's epoch: the replay skips it unread.
    assert start_epoch(spec, 0, 2, 60)[0] > spec.plan.first_epoch


@pytest.mark.slow
def test_two_ranks_resumed_as_one_continue_the_epoch_end_to_end(tiny_shards, tmp_path):
    """torchrun with 2 ranks stops mid-epoch; one plain process resumes and trains on."""
    env, run_dir = cli_env(tmp_path), tmp_path / "run"
    common = ("train.max_steps=14", "train.eval_every=1000", "checkpoint.every_steps=1000")
    first = run_torchrun(2, train_args(tiny_shards, run_dir, *common, "train.stop_at_step=10"), env)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(train_args(tiny_shards, run_dir, *common), env)
    assert second.returncode == 0, second.stderr[-3000:]
    # tiny: 4 shards of 512 samples in records of 64, batch 32, shuffle_blocks 4. Each old
    # reader (one per rank) had emitted 10 x 32 = 320 samples of its 1024: records 0-3
    # (chunk 0) and 64 of chunk 1 (records 4-7), whose other 192 sat in its buffer.
    line = (
        "resume: data readers 2 rank(s) x 1 reader(s) (batch 32) -> 1 rank(s) x 1 reader(s) "
        "(batch 32) at step 10: epoch 0 continues; 384 samples skipped from the old readers' "
        "shuffle buffers, 1024 samples left in the epoch"
    )
    assert second.stderr.count(line) == 1, second.stderr[-3000:]
    assert "world size changed (2 -> 1): RNG streams restart" in second.stderr
    assert "data order restarts from the seeds" not in second.stderr
    final = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert final["step"] == 14
    assert [s["world_size"] for s in final["loader"]["segments"]] == [2, 1]


def _saved(world: int, workers: int, batch: int = BATCH) -> dict:
    contract = {
        "world_size": world,
        "data.num_workers": workers,
        "train.batch_size": batch,
        "train.grad_accum": 1,
        "data.shuffle_blocks": BUFFER,
    }
    return {"contract": contract, "loader": {"consumed_batches": 9}, "rng": [{}] * world}


def test_the_resume_decision_continues_or_falls_back_to_the_seeds(shards):
    cfg = config.load(TINY, [f"train.batch_size={BATCH}", f"data.shuffle_blocks={BUFFER}"])
    counts = _base(shards).counts

    same = decide(_saved(1, 0), cfg, 1, 9, shards, counts, data_problems=False)
    assert (same.plan, same.fallback, len(same.segments)) == (None, False, 1)

    moved = decide(_saved(2, 0), cfg, 1, 9, shards, counts, data_problems=False)
    assert not moved.fallback and moved.plan is not None
    assert [s["world_size"] for s in moved.segments] == [2, 1]
    assert moved.message.startswith("resume: data readers 2 rank(s) x 1 reader(s) (batch 8) ->")
    assert f"{moved.plan.skipped} samples skipped" in moved.message

    # Saved again after the change, then resumed on the same topology: the same plan.
    again = {**_saved(1, 0), "loader": {"segments": moved.segments}}
    requeued = decide(again, cfg, 1, 12, shards, counts, data_problems=False)
    assert requeued.plan == moved.plan and requeued.message is None

    for problems, known, why in ((True, counts, "skipped as bad"), (False, None, "no manifest")):
        back = decide(_saved(2, 0), cfg, 1, 9, shards, known, data_problems=problems)
        assert back.fallback and back.plan is None and back.segments == [] and why in back.message
