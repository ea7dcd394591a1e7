"""The shared-memory hand-over: the same batches as in-process, slots reused, never
overwritten while a batch is alive, and nothing left in /dev/shm."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pipeline.data import handover
from pipeline.data.loader import StreamSpec, TrainStream, build_loader
from tests.conftest import ROOT
from tests.faults import noise_shards


def shm_names() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("pipeline-batch")}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return noise_shards(tmp_path_factory.mktemp("handover"), 2048)


def stream(shards: list[str], workers: int, handover: str = "shared"):
    spec = StreamSpec(shards, 64, seed=3, num_workers=workers, shuffle_blocks=4, handover=handover)
    if workers == 0:
        return iter(TrainStream(spec))
    return iter(build_loader(TrainStream(spec), workers, pin_memory=False, prefetch=2))


def test_shared_batches_equal_the_in_process_stream_even_when_all_are_kept(shards):
    seen = set(handover._MAPPED)
    reference = stream(shards, 2, handover="copy")  # by value: the previous hand-over
    expected = [next(reference) for _ in range(handover.MAX_SLOTS + 8)]
    del reference
    batches = stream(shards, 2)
    kept = [next(batches) for _ in range(len(expected))]  # more than the ring: fallback
    for want, got in zip(expected, kept, strict=True):
        assert torch.equal(want["patch"], got["patch"]) and torch.equal(want["label"], got["label"])
        assert torch.equal(want["bad_records"], got["bad_records"])
    tags = {name.rsplit("-", 1)[0] for name in set(handover._MAPPED) - seen}
    assert len(tags) == 2  # one ring per worker
    del batches, kept
    # Every slot's name is gone: mapped ones at once, in-flight ones when the worker exited
    # (other processes on the machine may have their own, hence the tags).
    assert not {n for n in shm_names() if n.rsplit("-", 1)[0] in tags}


def test_released_slots_are_reused_and_live_batches_are_never_overwritten(shards):
    already = set(handover._MAPPED)
    batches = stream(shards, 1)
    held = next(batches)
    copy = held["patch"].clone()
    for _ in range(60):  # each dropped at once: the ring stays small
        next(batches)
    assert torch.equal(held["patch"], copy)  # its slot stayed reserved all along
    tickets = {n for n in handover._MAPPED if n not in already and not n.endswith("-held")}
    assert 2 <= len(tickets) <= 8, tickets  # prefetch + the batch in hand + one being freed
    del batches


def test_in_process_stream_equals_one_shared_worker(shards):
    shared, local = stream(shards, 1), stream(shards, 0)
    for _ in range(10):
        a, b = next(shared), next(local)
        assert torch.equal(a["patch"], b["patch"]) and torch.equal(a["label"], b["label"])


def test_a_forked_child_dropping_a_batch_does_not_free_its_slot(shards):
    # An evaluation loader forks its workers from the trainer, which holds a training batch.
    batches = stream(shards, 1)
    held = next(batches)
    copy = held["patch"].clone()
    child = os.fork()
    if child == 0:  # the child's copy of the batch dies here
        del held
        os._exit(0)
    os.waitpid(child, 0)
    for _ in range(60):
        next(batches)
    assert torch.equal(held["patch"], copy)
    del batches


EXIT_WITH_A_LIVE_LOADER = """
import sys, time
from pipeline.data.loader import StreamSpec, TrainStream, build_loader
spec = StreamSpec(sys.argv[1:], 64, seed=3, num_workers=1, shuffle_blocks=4, handover="shared")
batches = iter(build_loader(TrainStream(spec), 1, pin_memory=False, prefetch=4))
next(batches)
time.sleep(1)  # the worker fills its prefetch slots, which the trainer never maps
"""


def test_a_trainer_exiting_with_its_loader_alive_leaves_no_names(shards):
    # At exit multiprocessing terminates the worker (SIGTERM from the trainer), which
    # leaves by os._exit: no finalizer runs, so the watcher itself removes the names.
    before = shm_names()
    done = subprocess.run(
        [sys.executable, "-c", EXIT_WITH_A_LIVE_LOADER, *shards],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "leaked shared_memory" not in done.stderr, done.stderr[-2000:]
    assert not shm_names() - before
