"""What a resume tells the training stream: the topology segments and the interrupted epoch.

A run's data stream is read by one topology (ranks x `data.num_workers`, batch size,
shuffle buffer) per segment. The checkpoint keeps the list of segments with the step each
began at (none saved: one, the contract's, from step 0). A resume with the topology of
the last segment replays that segment's stream exactly; a resume with another topology
starts a new segment whose first epochs continue what the old readers had not read
(`data.transition.build_plan`). Rank 0 derives the plans and broadcasts them, so every
rank reads by the same one.

When the position cannot be derived (no manifest counts, records skipped as bad, an old
checkpoint without its topology), a topology change falls back to restarting the data
order from the seeds (segments reset), with a warning.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, replace
from typing import Any

from pipeline import distributed
from pipeline.config import Config
from pipeline.data.format import manifest_counts
from pipeline.data.loader import StreamSpec
from pipeline.data.position import Plan
from pipeline.data.sources import Sources
from pipeline.data.transition import BlockIndex, build_plan
from pipeline.errors import PipelineError
from pipeline.train_state import TrainState

log = logging.getLogger("pipeline")
KEYS = ("world_size", "num_workers", "batch_size", "grad_accum", "shuffle_blocks")


@dataclass
class StreamResume:
    segments: list[dict[str, int]]
    """To keep in the train state (saved with every checkpoint)."""
    plan: Plan | None
    """The current segment's plan (None: the normal stream from step `segments[-1]`)."""
    message: str | None = None
    """The topology change, for rank 0 to log once; or, with `fallback`, why not continued."""
    fallback: bool = False
    """The topology changed and the data order restarts from the seeds."""


def topology(cfg: Config, world_size: int, step: int) -> dict[str, int]:
    """This run's segment, starting at `step`."""
    t, d = cfg.train, cfg.data
    return {
        "step": step,
        "world_size": world_size,
        "num_workers": d.num_workers,
        "batch_size": t.batch_size,
        "grad_accum": t.grad_accum,
        "shuffle_blocks": d.shuffle_blocks,
    }


def saved_segments(saved: dict[str, Any]) -> list[dict[str, int]] | None:
    """The checkpoint's segments, or the one its contract describes; None if unknown."""
    segments = saved.get("loader", {}).get("segments")
    if segments:
        return [dict(s) for s in segments]
    c = saved.get("contract") or {}
    try:
        first = {
            "step": 0,
            "world_size": int(c["world_size"]),
            "num_workers": int(c["data.num_workers"]),
            "batch_size": int(c["train.batch_size"]),
            "grad_accum": int(c.get("train.grad_accum", 1)),
            "shuffle_blocks": int(c["data.shuffle_blocks"]),
        }
    except (KeyError, TypeError, ValueError):
        return None
    return [first]


def plan_of(segments: list[dict[str, int]], base: StreamSpec, index: BlockIndex) -> Plan | None:
    """The last segment's plan, built segment by segment from the first (plain) one."""
    plan = None
    for prev, seg in itertools.pairwise(segments):
        old = _spec(base, prev, plan)
        consumed = (seg["step"] - prev["step"]) * prev["grad_accum"]
        plan, _ = build_plan(old, consumed, _spec(base, seg, None), index)
    return plan


def _spec(base: StreamSpec, seg: dict[str, int], plan: Plan | None) -> StreamSpec:
    return replace(
        base,
        rank=0,
        world_size=seg["world_size"],
        num_workers=seg["num_workers"],
        batch_size=seg["batch_size"],
        shuffle_blocks=seg["shuffle_blocks"],
        plan=plan,
        consumed=0,
    )


def _describe(seg: dict[str, int]) -> str:
    return (
        f"{seg['world_size']} rank(s) x {max(seg['num_workers'], 1)} reader(s) "
        f"(batch {seg['batch_size']})"
    )


def resume_stream(
    saved: dict[str, Any], cfg: Config, world_size: int, state: TrainState, sources: Sources
) -> StreamResume:
    """Rank 0 decides (reading the manifest and a few record headers) and logs it once;
    every rank gets its decision."""
    result = None
    if distributed.is_main():
        result = decide(
            saved, cfg, world_size, state.step, sources.train, sources.train_counts,
            state.data_problems,
        )  # fmt: skip
        if result.fallback:
            log.warning(
                "data readers changed and the data position cannot be continued (%s): the "
                "data order restarts from the seeds at this step (samples of the current "
                "epoch may repeat)",
                result.message,
            )
        elif result.message and result.plan is not None:
            log.info("%s", result.message)
    return distributed.broadcast_object(result)


def decide(
    saved: dict[str, Any],
    cfg: Config,
    world_size: int,
    step: int,
    shards: list[str],
    counts: list[int] | None,
    data_problems: bool,
) -> StreamResume:
    """The segments to keep and the plan to read by (rank 0; `resume_stream` shares it)."""
    now = topology(cfg, world_size, step)
    segments = saved_segments(saved)
    if segments is None:  # a checkpoint older than the contract: the plain stream
        moved = len(saved.get("rng", [])) != world_size
        return StreamResume([], None, "the checkpoint records no data topology", moved)
    changed = any(segments[-1][k] != now[k] for k in KEYS)
    if changed and data_problems:
        return StreamResume([], None, "records were skipped as bad", fallback=True)
    if changed and cfg.data.balance is not None:
        # Balanced batches take fewer stream samples each, and each reader's reservoir of
        # positives is its own: neither carries over to readers of another topology.
        return StreamResume([], None, "data.balance is on", fallback=True)
    if changed:
        segments = [*segments, now]
    if len(segments) == 1:
        return StreamResume(segments, None)
    if counts is None:
        return StreamResume([], None, "no manifest counts", fallback=True)
    base = StreamSpec(shards, cfg.train.batch_size, cfg.train.seed, counts=counts)
    try:
        infos = manifest_counts(shards)
        blocks = [infos[s].blocks for s in shards] if len(infos) == len(shards) else None
        plan = plan_of(segments, base, BlockIndex(shards, counts, blocks))
    except PipelineError as exc:
        return StreamResume([], None, str(exc), fallback=True)
    if not changed:
        return StreamResume(segments, plan)
    assert plan is not None
    epochs = f"{plan.first_epoch}-{plan.first_epoch + len(plan.epochs) - 1}"
    message = (
        f"resume: data readers {_describe(segments[-2])} -> {_describe(now)} at step {step}: "
        f"epoch {epochs if len(plan.epochs) > 1 else plan.first_epoch} continues; "
        f"{plan.skipped} samples skipped from the old readers' shuffle buffers, "
        f"{plan.remaining} samples left in the epoch"
    )
    return StreamResume(segments, plan, message)
