"""A loader worker that hangs in its fork is killed and started again: the same batches, one
warning, nothing left behind (before, the trainer waited for its batches forever)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.faults import noise_shards

# The child process: its first forked worker hangs where CPython's gh-112275 deadlock
# strikes (after the fork, before any of the worker's own code); later forks are healthy.
HANG_ONCE = """
import json, logging, os, sys, time
import torch

flag = sys.argv[1]

def hang_once():
    if os.path.exists(flag):
        os.unlink(flag)
        print(json.dumps({"hung": os.getpid()}), flush=True)
        time.sleep(3600)

os.register_at_fork(after_in_child=hang_once)
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from pipeline.data.loader import StreamSpec, TrainStream, build_loader

spec = StreamSpec(sys.argv[2:], 64, seed=3, num_workers=1, shuffle_blocks=4)
reference = iter(TrainStream(spec))  # in-process: no fork
loader = build_loader(TrainStream(spec), 1, pin_memory=False, prefetch=2)
loader.start_s = 3.0
open(flag, "w").close()
batches = iter(loader)
same = all(torch.equal(next(batches)["patch"], next(reference)["patch"]) for _ in range(12))
print(json.dumps({"same": same}), flush=True)
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return noise_shards(tmp_path_factory.mktemp("worker_start"), 1024)


def test_a_worker_hung_in_its_fork_is_killed_and_started_again(shards, tmp_path):
    # One worker against the same stream read in-process (as in test_handover).
    done = subprocess.run(
        [sys.executable, "-c", HANG_ONCE, str(tmp_path / "hang"), *shards],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    hung = [o["hung"] for o in out if "hung" in o]
    assert len(hung) == 1, done.stdout
    warnings = [line for line in done.stderr.splitlines() if "did not start within" in line]
    assert len(warnings) == 1 and str(hung[0]) in warnings[0], done.stderr[-3000:]
    assert "(1/3)" in warnings[0] and "Traceback" not in done.stderr
    assert {"same": True} in out, done.stdout
    with pytest.raises(ProcessLookupError):
        os.kill(hung[0], 0)  # killed, not left asleep
