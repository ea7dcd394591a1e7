"""The logit guard as the training loop uses it: static before training, dynamic during.

`guard.py` holds the checks themselves; this module decides what the loop does with a
finding (warn, or stop with `guard.dynamic=error`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pipeline import guard
from pipeline.config import Config
from pipeline.tracking import Tracker

log = logging.getLogger("pipeline")


def guard_static(model: nn.Module, cfg: Config) -> str | None:
    """Refuse a bounded head before training (unless `guard.allow_bounded_head`).

    Returns the range probe's warning for the tracker (None for a raw-logit head); with
    `guard.dynamic=error` a bounded range is a BoundedHeadError instead.
    """
    crops = [torch.randn((2, cfg.data.channels) + (s,) * cfg.data.dims) for s in cfg.data.scales]
    finding = guard.check_static(model, crops, cfg.guard.allow_bounded_head)
    if finding is not None:
        log.warning(
            "guard.allow_bounded_head=true: training a bounded head (%s at %s)",
            finding.op,
            finding.where,
        )
    # The dynamic range probe, from step 0: also catches what the static walk cannot name.
    message = guard.check_range(model, crops)
    if message and cfg.guard.dynamic == "error":
        raise guard.BoundedHeadError(message)
    return message  # warned through the tracker once it exists (Trainer.fit)


class LogitCheck:
    """Dynamic guard: suspicious logits on two checks in a row are reported.

    A freshly initialised healthy model often gives one batch of same-signed logits, so the
    first suspicious batch only arms the check; the next check decides.
    """

    def __init__(
        self, dynamic: str, tracker: Tracker, range_warning: str | None = None, step: int = 0
    ) -> None:
        self.dynamic, self.tracker = dynamic, tracker
        self.suspect = False
        if range_warning:  # the range probe's finding, from before the tracker existed
            tracker.warn(step, range_warning)

    def check(self, logits: torch.Tensor, step: int) -> None:
        message = guard.check_logits(logits.detach())
        armed, self.suspect = self.suspect, message is not None
        if message is None:
            return
        if not armed:
            log.info("guard: first suspicious batch at step %d; re-checking later", step)
            return
        if self.dynamic == "error":
            raise guard.BoundedHeadError(message)
        self.tracker.warn(step, message, local=True)
