"""Resuming: rank 0 chooses the checkpoint, every rank loads that very file, and the
resume contract refuses silent changes to what fixes the data order and the trajectory.

1. Rank 0 picks the file (`CheckpointManager.choose`) and broadcasts its path, step and
   the digest of its bytes. Every other rank reads the same path and compares digests:
   a rank that cannot read it, or reads other bytes (a node-local or lagging run dir),
   stops every rank with one line naming that rank and the path.
2. Rank 0 compares the checkpoint's contract with this run's. Changed keys are refused,
   one line per key, unless `checkpoint.accept_changes` lists them. `train.max_steps` may
   change freely; world size and `data.num_workers` may change (logged).
3. After the state is restored (before DDP wraps the model), ranks compare step and
   parameter digest (`verify_ranks_agree`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import distributed
from pipeline.checkpoint import CheckpointManager, load_with_digest
from pipeline.config import RESUME_FREE, Config
from pipeline.errors import CheckpointError, PipelineError
from pipeline.failures import agreed

log = logging.getLogger("pipeline")
# May differ on resume (a requeued job on fewer nodes); the data position carries over.
RESUME_LOGGED = ("world_size", "global_batch", "data.num_workers")
# Keys whose change makes the saved weights unusable: never acceptable.
ARCHITECTURE = ("data.dims", "data.scales", "data.channels")


@dataclass
class Resume:
    path: Path
    state: dict[str, Any]
    changed: list[str]
    """Contract keys that differ from the checkpoint's (all accepted, or logged)."""


def _digest(items: list[str]) -> str:
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def contract(cfg: Config, world_size: int, train: list[str], val: list[str]) -> dict[str, Any]:
    """What fixes the data position and the optimization trajectory (saved in checkpoints)."""
    t, d, o, m = cfg.train, cfg.data, cfg.optim, cfg.model
    return {
        "train.batch_size": t.batch_size,
        "global_batch": t.batch_size * t.grad_accum * world_size,
        "train.grad_accum": t.grad_accum,
        "world_size": world_size,
        "data.num_workers": d.num_workers,
        "data.shuffle_blocks": d.shuffle_blocks,
        "data.balance": d.balance,
        "data.balance_reservoir": d.balance_reservoir,
        "train.seed": t.seed,
        "train.max_steps": t.max_steps,
        "data.train": _digest(train),
        "data.val": _digest(val),
        **{f"optim.{k}": getattr(o, k) for k in ("lr", "warmup_steps", "min_lr_ratio")},
        **{f"optim.{k}": getattr(o, k) for k in ("weight_decay", "betas")},
        **{f"optim.{k}": getattr(o, k) for k in ("name", "momentum", "nesterov", "schedule")},
        **{f"optim.{k}": getattr(o, k) for k in ("step_milestones", "step_gamma")},
        **{f"loss.{k}": getattr(cfg.loss, k) for k in ("name", "focal_gamma", "focal_alpha")},
        "loss.label_smoothing": cfg.loss.label_smoothing,
        **{f"data.{k}": getattr(d, k) for k in ("dims", "scales", "channels")},
        **{f"model.{k}": getattr(m, k) for k in ("name", "target", "kwargs", "width")},
        **{f"model.{k}": getattr(m, k) for k in ("depth", "features", "hidden", "dropout")},
        **{f"model.{k}": getattr(m, k) for k in ("ema_decay", "freeze_steps")},
    }


def check_contract(saved: dict[str, Any], now: dict[str, Any], accept: list[str], source: Path):
    """Rank 0: the changed keys, or CheckpointError listing every refused one."""
    changed = [k for k in now if k in saved and _plain(saved[k]) != _plain(now[k])]
    for key in (k for k in changed if k in ARCHITECTURE):
        raise CheckpointError(
            f"checkpoint {source}: {key}={saved[key]} does not match this config's "
            f"{now[key]}; use a new run.dir"
        )
    refused = [k for k in changed if k not in (*RESUME_FREE, *RESUME_LOGGED, *accept)]
    if refused:
        lines = [f"  {k}: {saved[k]} -> {now[k]}" for k in refused]
        raise CheckpointError(
            f"resume from {source} refused: {len(refused)} key(s) changed since the checkpoint "
            f"(keep them, accept with checkpoint.accept_changes=[{','.join(refused)}], or use "
            "a new run.dir)\n" + "\n".join(lines)
        )
    for key in changed:
        log.warning("resume: %s changed %s -> %s", key, saved[key], now[key])
    return changed


def _plain(value: Any) -> Any:
    # Saved configs come back with lists where the dataclass may hold tuples.
    return json.loads(json.dumps(value, default=str))


def choose(manager: CheckpointManager, cfg: Config, now: dict[str, Any]) -> Resume | None:
    """Every rank: the checkpoint rank 0 chose, loaded from the same bytes, or None."""
    env = distributed.env()
    found, problem, changed = None, None, []
    if distributed.is_main():
        try:
            found = manager.choose(cfg.checkpoint.resume)
            if found is not None:
                saved = found[1].get("contract") or contract_of_config(found[1])
                changed = check_contract(saved, now, cfg.checkpoint.accept_changes, found[0])
        except PipelineError as exc:
            problem = exc
    head = None if found is None else (str(found[0]), int(found[1]["step"]), found[2])
    head, message = distributed.broadcast_object((head, None if problem is None else str(problem)))
    if problem is not None:
        raise agreed(problem)
    if message is not None:
        raise agreed(CheckpointError(f"rank 0 refused the resume: {message.splitlines()[0]}"))
    if head is None:
        return None
    path, step, digest = head
    state, mine = (found[1], digest) if found is not None else _read(path)
    if mine != digest:
        mine = f"rank {env.rank} read other bytes in {path} than rank 0 ({mine} != {digest})"
    problems = distributed.gather_objects(None if mine == digest else mine)
    bad = [p for p in problems if p is not None]
    if bad:
        raise agreed(
            CheckpointError(f"{bad[0]}; every rank must see the same run.dir (shared storage)")
        )
    changed = distributed.broadcast_object(changed if distributed.is_main() else None)
    return Resume(Path(path), state, changed)


def _read(path: str) -> tuple[dict[str, Any] | None, str]:
    try:
        return load_with_digest(path)
    except CheckpointError as exc:
        rank = distributed.env().rank
        return None, f"rank {rank} cannot read the checkpoint rank 0 chose ({exc})"


def contract_of_config(state: dict[str, Any]) -> dict[str, Any]:
    """For checkpoints older than the contract: what their saved config says."""
    config = state.get("config", {})
    flat = {
        f"{section}.{key}": value
        for section, values in config.items()
        if isinstance(values, dict)
        for key, value in values.items()
    }
    # Their data.train/data.val are patterns, not the digests compared now: left out.
    keep = ("data.", "model.", "optim.", "train.")
    return {
        k: v for k, v in flat.items() if k.startswith(keep) and k not in ("data.train", "data.val")
    }


def verify_ranks_agree(step: int, digest: str, source: Path | None) -> None:
    """After restoring: same step and parameters on every rank, or every rank stops."""
    views = distributed.gather_objects((step, digest))
    for rank, view in enumerate(views):
        if view != views[0]:
            raise agreed(
                CheckpointError(
                    f"rank {rank} holds step {view[0]} (parameters {view[1]}) but rank 0 step "
                    f"{views[0][0]} ({views[0][1]}) after resuming from {source}"
                )
            )
