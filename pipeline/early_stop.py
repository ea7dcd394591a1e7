"""Early stopping (`train.early_stop_patience`): end the run after P validations in a row
without a new best `checkpoint.metric` (in its mode, as `BestMetric` judges it).

The count lives in `BestMetric.since`: rank 0 updates it at each validation and broadcasts
it with `improved`, so every rank takes the same decision at the same step; it is saved
in every checkpoint. A resume of an early-stopped run therefore stops at once, saying so,
unless the patience was raised (or set to 0): then it trains on.
"""

from __future__ import annotations

import logging

from pipeline import distributed
from pipeline.tracking import Tracker
from pipeline.validation import BestMetric

log = logging.getLogger("pipeline")


class EarlyStop:
    def __init__(self, patience: int) -> None:
        self.patience = patience

    def due(self, best: BestMetric) -> bool:
        """True on every rank alike (`best.since` is rank 0's, broadcast)."""
        return self.patience > 0 and best.since >= self.patience

    def reason(self, best: BestMetric) -> str:
        value = "n/a" if best.value is None else f"{best.value:.4g}"
        return (
            f"no improvement of {best.metric} for {best.since} evaluation"
            f"{'' if best.since == 1 else 's'}, "
            f"best {value} at step {best.step}"
        )

    def announce(self, step: int, best: BestMetric, tracker: Tracker) -> None:
        """Rank 0: the event in metrics.jsonl and one console line."""
        tracker.event(
            "early_stop",
            step,
            {"metric": best.metric, "patience": self.patience, "since": best.since,
             "best": best.value, "best_step": best.step},
        )  # fmt: skip
        if distributed.is_main():
            print(f"early stop at step {step}: {self.reason(best)}", flush=True)

    def announce_resumed(self, step: int, best: BestMetric) -> None:
        """The run being resumed had stopped early: nothing to train, and say why."""
        log.warning(
            "this run stopped early at step %d (%s); not training again: raise "
            "train.early_stop_patience (now %d) or set it to 0 to train on",
            step,
            self.reason(best),
            self.patience,
        )
