"""Bad records are skipped or fatal, never silent: each skip is counted and logged."""

from __future__ import annotations

import logging

from torch.utils.data import get_worker_info

log = logging.getLogger("pipeline.data")


class ProblemLog:
    """Counts skipped records in one process (a DataLoader worker or the main process).

    Workers cannot share a counter with the trainer, so each batch carries its worker's
    running count and the trainer sums the latest count of every worker.
    """

    def __init__(self) -> None:
        self.count = 0

    def record(self, where: str, reason: str) -> None:
        self.count += 1
        # The rank is in every log line's prefix; the worker says which reader saw it.
        info = get_worker_info()
        reader = f"loader worker {info.id}" if info is not None else "main process"
        log.warning(
            "skipped bad record (%d so far, %s) in %s: %s", self.count, reader, where, reason
        )
