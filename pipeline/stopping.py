"""Graceful stop: SIGTERM/SIGUSR1/SIGINT or a `RUN_DIR/STOP` file -> all ranks stop at one step.

torchrun forwards only some signals to its workers, and SLURM signals the batch shell, so
the batch script's trap touches a stop file that rank 0 polls. Signals that do reach us
(SIGTERM from a time limit or scancel) set the same flag. Ctrl-C (SIGINT) does too; a
second Ctrl-C raises KeyboardInterrupt at once (exit 130, no checkpoint). Ranks agree
through one tiny all-reduce every `train.log_every` steps (not every step: no host sync
per step), so they all save the same step and exit together. DataLoader workers
ignore these signals (see data.loader), so the trainer still has its batches while it
finishes the step and saves.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

from pipeline import distributed

log = logging.getLogger("pipeline")
STOP_FILE = "STOP"


class StopRequest:
    """Installed first thing in `train()`: a SIGTERM that arrives while the data, model and
    loaders are still being set up (a preemption right after the job starts) is a stop
    request too, obeyed at the first agreed step, not a death without a checkpoint."""

    def __init__(self) -> None:
        self.stop_file: Path | None = None  # known once run.dir is resolved
        self.signalled: str | None = None
        self._previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
        }

    def close(self) -> None:
        """The run is over: signals mean what they meant before (cv runs folds in turn)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def watch_file(self, run_dir: Path) -> None:
        self.stop_file = run_dir / STOP_FILE

    def _on_signal(self, signum: int, _frame: object) -> None:
        # Repeats are normal, not "die now": on a time limit or scancel SLURM signals every
        # process of the step and torchrun then forwards its own SIGTERM, milliseconds
        # apart. The checkpoint comes first; SIGKILL at the end of the grace period is the
        # escalation.
        if signum == signal.SIGINT and self.signalled == "SIGINT":
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        if self.signalled is None:
            self.signalled = signal.Signals(signum).name
            if signum == signal.SIGINT:
                log.warning("Ctrl-C: stopping at the next agreed step and saving a "
                            "checkpoint; press Ctrl-C again to exit at once")  # fmt: skip

    def local(self) -> bool:
        """This rank's view: a signal arrived, or (rank 0) the stop file exists."""
        if self.signalled is not None:
            return True
        return distributed.is_main() and self.stop_file is not None and self.stop_file.exists()

    def consume(self) -> None:
        """Forget the request once its checkpoint is safe, so a requeued run does not stop."""
        if distributed.is_main() and self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)
        reason = self.signalled or f"stop file {self.stop_file}"
        log.info("stopped on request (%s); checkpoint saved, resume with the same run.dir", reason)

    def consume_stale(self) -> None:
        """The run finished anyway: a late stop file must not stop a future resume."""
        if distributed.is_main() and self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)
