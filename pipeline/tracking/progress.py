"""Rank-0 progress: a tqdm bar on a terminal, plain periodic lines in log files."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


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
