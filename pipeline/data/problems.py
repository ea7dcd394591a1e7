"""Bad records are skipped or fatal, never silent: each skip is counted and logged.

Logged once per kind, not once per record: a problem that repeats (the same message apart
from where it was found) is logged in full the first time, then summarised with its count
at 10, 100, 1000, ... occurrences. A thousand records of the wrong shape cost four lines,
not a thousand, and the count still reaches the trainer with every batch.
"""

from __future__ import annotations

import logging

from torch.utils.data import get_worker_info

log = logging.getLogger("pipeline.data")


def problem_kind(where: str, reason: str) -> str:
    """`reason` without the place it names: `shard:key: problem` -> `problem`."""
    if not reason.startswith(where):
        return reason
    rest = reason[len(where) :].removeprefix(": ")
    return rest[1:].split(": ", 1)[-1] if rest.startswith(":") else rest


class ProblemLog:
    """Counts skipped records in one process (a DataLoader worker or the main process).

    Workers cannot share a counter with the trainer, so each batch carries its worker's
    running count and the trainer sums the latest count of every worker.
    """

    def __init__(self) -> None:
        self.count = 0
        self.kinds: dict[str, int] = {}

    def record(self, where: str, reason: str) -> None:
        self.count += 1
        kind = problem_kind(where, reason)
        seen = self.kinds[kind] = self.kinds.get(kind, 0) + 1
        # The rank is in every log line's prefix; the worker says which reader saw it.
        info = get_worker_info()
        reader = f"loader worker {info.id}" if info is not None else "main process"
        if seen == 1:
            log.warning(
                "skipped bad record (%d so far, %s) in %s: %s", self.count, reader, where, reason
            )
        elif _is_power_of_ten(seen):
            log.warning(
                "skipped %d bad records with the same problem (%d in all, %s), e.g. %s; "
                "`pipeline check-shards` lists every one",
                seen,
                self.count,
                reader,
                reason,
            )


def _is_power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1
