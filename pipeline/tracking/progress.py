"""Progress: a tqdm bar on a terminal, plain periodic lines in log files.

`Progress` is training's (rank 0, step-based); `work_progress` serves everything else that
takes a while (make-synthetic, convert, evaluate, predict).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm

LOG_LINE_SECONDS = 30.0


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """step/max_steps, loss, lr, samples/s and ETA.

    SLURM log files are not terminals: there a carriage-return bar would leave thousands of
    partial lines, so we print one line per log interval instead.
    """

    def __init__(self, start_step: int, max_steps: int, enabled: bool) -> None:
        self.enabled = enabled
        self.max_steps = max_steps
        self.start_step = start_step
        self.started = time.monotonic()
        self.bar = None
        if enabled and sys.stdout.isatty():
            self.bar = tqdm(
                total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )

    def update(self, step: int, values: dict[str, float]) -> None:
        """Called at each log interval with the current step (1-based, completed steps)."""
        if not self.enabled:
            return
        shown = {
            "loss": f"{values.get('train/loss', float('nan')):.4f}",
            "lr": f"{values.get('train/lr', float('nan')):.2e}",
            "samples/s": f"{values.get('train/samples_per_s', float('nan')):.0f}",
        }
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(shown, refresh=False)
            return
        done = step - self.start_step
        elapsed = time.monotonic() - self.started
        eta = elapsed / done * (self.max_steps - step) if done else float("nan")
        parts = " ".join(f"{k} {v}" for k, v in shown.items())
        print(f"step {step}/{self.max_steps} {parts} eta {_duration(eta)}", flush=True)

    def write(self, line: str) -> None:
        """A message that does not break the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LineProgress:
    """tqdm's `update`/`close` for log files: one plain line every `interval` seconds.

    tqdm redraws with carriage returns even when stderr is a file, which fills SLURM logs
    with partial lines; this prints whole lines, and a last one when closed.
    """

    def __init__(
        self, total: int | None, desc: str, unit: str, interval: float = LOG_LINE_SECONDS
    ) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n = 0
        self.started = self.last = time.monotonic()
        self.shown = 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self._line(now)

    def _line(self, now: float, final: bool = False) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.n / elapsed
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        parts = [f"{self.desc}: {done} {self.unit}s"]
        if self.total:
            parts.append(f"({100 * self.n / self.total:.0f}%)")
        parts.append(f"{rate:,.0f} {self.unit}/s")
        if final or (self.total and self.n >= self.total):  # final: may end short of total
            parts.append(f"in {_duration(elapsed)}")
        elif self.total and rate > 0:
            parts.append(f"eta {_duration((self.total - self.n) / rate)}")
        print(" ".join(parts), file=sys.stderr, flush=True)
        self.last, self.shown = now, self.n

    def close(self) -> None:
        if self.n != self.shown:
            self._line(time.monotonic(), final=True)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def work_progress(total: int | None, desc: str, unit: str = "sample", enabled: bool = True) -> Any:
    """A bar for long work: tqdm on a terminal, LineProgress in log files, nothing if disabled.

    Either way the object has `update(n)`, `close()` and works as a context manager.
    """
    if not enabled:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
    return LineProgress(total, desc, unit)
