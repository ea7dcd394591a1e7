"""A DataLoader whose forked workers are known to be up before the trainer waits on them.

Forking a process that has other threads can leave the child stuck before it runs a line
of Python: CPython before 3.11.8 / 3.12.1 (gh-112275) deadlocks in `PyOS_AfterFork_Child`
when another thread held the interpreter's HEAD_LOCK at the fork. Here that other thread
is gloo's work thread, which creates and deletes a Python thread state when it drops the
last reference to a tensor. Seen on Python 3.11.7 in a two-rank test under load: rank 0
waited forever for its first validation batch, and rank 1 in the next collective.
A stuck worker looks alive to DataLoader, so the trainer would wait forever. Here each
worker raises its flag in shared memory as its first act. A worker that has not raised it
within `start_s` is killed with SIGKILL (SIGTERM would only set a flag that its stuck
interpreter never reads), and its iterator is rebuilt. Nothing was read from it yet, so
the batches are the same.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader
from torch.utils.data import _utils as loader_utils

from pipeline.errors import DataError

log = logging.getLogger("pipeline")
START_S = 60.0  # a fork of a large process takes well under a second, even under load
ATTEMPTS = 3


class _Started:
    """worker_init_fn: the caller's set-up, then this worker's flag (fork shares the array)."""

    def __init__(self, num_workers: int, init: Callable[[int], None]) -> None:
        self.flags = multiprocessing.get_context("fork").RawArray("b", max(num_workers, 1))
        self.init = init

    def __call__(self, worker_id: int) -> None:
        self.init(worker_id)
        self.flags[worker_id] = 1


class StartedLoader(DataLoader):
    """`DataLoader` whose `iter()` returns only once every worker is running."""

    def __init__(
        self, *args: Any, worker_init_fn: Callable[[int], None], start_s: float = START_S, **kw: Any
    ) -> None:
        self.started = _Started(kw.get("num_workers", 0), worker_init_fn)
        self.start_s = start_s
        super().__init__(*args, worker_init_fn=self.started, **kw)

    def __iter__(self) -> Iterator[Any]:
        if self.num_workers == 0 or (self.persistent_workers and self._iterator is not None):
            return super().__iter__()  # nothing to fork
        for attempt in range(1, ATTEMPTS + 1):
            self.started.flags[:] = bytes(len(self.started.flags))
            batches = super().__iter__()
            stuck = self._stuck(batches)
            if not stuck:
                return batches
            log.warning(
                "data loader: worker(s) %s did not start within %.0f s (a fork that hung; "
                "CPython < 3.11.8 / 3.12.1, gh-112275); killed, starting them again (%d/%d)",
                ", ".join(str(pid) for pid in stuck),
                self.start_s,
                attempt,
                ATTEMPTS,
            )
            _discard(batches, stuck)
        raise DataError(
            f"data loader workers did not start {ATTEMPTS} times in a row "
            f"({self.start_s:.0f} s each); see the warnings above"
        )

    def _stuck(self, batches: Any) -> list[int]:
        flags, deadline = self.started.flags, time.monotonic() + self.start_s
        while time.monotonic() < deadline:
            if all(flags[i] for i in range(self.num_workers)):
                return []
            time.sleep(0.01)
        return [w.pid for i, w in enumerate(batches._workers) if not flags[i]]


def _discard(batches: Any, stuck: list[int]) -> None:
    # Unregister the workers first: DataLoader's SIGCHLD handler would otherwise report
    # the killed one as a crashed worker and raise in the trainer.
    if batches._worker_pids_set:
        loader_utils.signal_handling._remove_worker_pids(id(batches))
        batches._worker_pids_set = False
    for pid in stuck:
        with contextlib.suppress(ProcessLookupError):  # it got through after all and ended
            os.kill(pid, signal.SIGKILL)
    batches._shutdown_workers()
