"""Bad records are skipped or fatal, never silent: each skip is counted and logged."""

from __future__ import annotations

import logging

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
        log.warning("skipped bad record (%d so far) in %s: %s", self.count, where, reason)
