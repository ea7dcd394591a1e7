"""Which W&B run a segment of training logs to: env overrides, and the id kept in RUN_DIR.

No wandb import here, so the decision is made (and tested) before W&B is started.

`RUN_DIR/wandb_run.json` holds {"id", "name", "group", "segments": [...]}, one segment per
start of training in this run directory (first start, resume, SLURM requeue):
- online after online: same id with `resume="allow"`, so W&B continues the run;
- anything else gets a new id with the same name and group and `resume_of` = the first id:
  W&B cannot resume offline runs (wandb 0.31 ignores `resume=` offline and writes a second
  `offline-run-*-<same id>` directory), and an online run must not reuse an id an offline
  piece will upload to later. Offline runs default their group to the run name, so all
  pieces of a preempted run land in one group whichever piece was first.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import string
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import WANDB_MODES, WandbConfig
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

RUN_FILE = "wandb_run.json"
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}  # older spellings wandb still accepts


@dataclass(frozen=True)
class Target:
    """Where and how to log, after `WANDB_*` environment overrides."""

    mode: str
    project: str
    entity: str | None
    group: str | None
    name: str
    tags: list[str]
    notes: str | None
    dir: Path


def resolve_target(cfg: WandbConfig, run_dir: Path, env: dict[str, str] | None = None) -> Target:
    """Config values, overridden by WANDB_MODE/PROJECT/ENTITY/DIR/RUN_GROUP/TAGS/NAME/NOTES."""
    env = dict(os.environ if env is None else env)
    mode = env.get("WANDB_MODE", "").strip().lower() or cfg.mode
    mode = _MODE_ALIASES.get(mode, mode)
    if mode not in WANDB_MODES:
        source = "environment WANDB_MODE" if env.get("WANDB_MODE") else "config: wandb.mode"
        raise ConfigError(f"{source}: must be one of {'|'.join(WANDB_MODES)}, got {mode!r}")
    tags = cfg.tags
    if env.get("WANDB_TAGS") is not None:
        tags = [t.strip() for t in env["WANDB_TAGS"].split(",") if t.strip()]
    return Target(
        mode=mode,
        project=env.get("WANDB_PROJECT") or cfg.project,
        entity=env.get("WANDB_ENTITY") or cfg.entity,
        group=env.get("WANDB_RUN_GROUP") or cfg.group,
        name=env.get("WANDB_NAME") or cfg.name or Path(run_dir).resolve().name,
        tags=list(tags),
        notes=env.get("WANDB_NOTES") or cfg.notes,
        dir=Path(env.get("WANDB_DIR") or run_dir),
    )


@dataclass(frozen=True)
class Plan:
    """The W&B identity of this segment of the run."""

    id: str
    name: str
    group: str | None
    resume: str | None
    resume_of: str | None


def sweep_run_id(env: dict[str, str] | None = None) -> str | None:
    """The run id a W&B sweep agent assigned (WANDB_SWEEP_ID and WANDB_RUN_ID set), or None."""
    env = os.environ if env is None else env
    if env.get("WANDB_SWEEP_ID") and env.get("WANDB_RUN_ID"):
        return env["WANDB_RUN_ID"]
    return None


def _new_id() -> str:
    # Same alphabet and length as wandb's own ids; no wandb import needed to plan.
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def read_run_file(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("wandb: ignoring unreadable %s (%s); starting a new W&B run", path, exc)
        return None


def plan_run(target: Target, run_dir: Path, resumed_from_step: int | None) -> Plan:
    """Reuse the stored id only where W&B can continue it: an online resume after an online run.

    `resumed_from_step` None with segments on record means training restarted from step 0
    in the same directory (e.g. requeued before its first checkpoint): a new run, so its
    steps are not dropped as lower than those W&B already holds.
    """
    stored = read_run_file(run_dir)
    agent_id = sweep_run_id()
    if agent_id is not None:
        # A W&B sweep agent started us and owns the id (it also re-runs a preempted run
        # under the same id): keep it, resumable, in the group of the run dir's history.
        return Plan(agent_id, target.name, target.group, "allow", None)
    if stored is None or not stored.get("segments"):
        group = target.group or (target.name if target.mode == "offline" else None)
        return Plan(
            _new_id(), target.name, group, "allow" if target.mode == "online" else None, None
        )
    first_id, name = stored["id"], stored.get("name") or target.name
    group = target.group or stored.get("group") or name
    last = stored["segments"][-1]
    if target.mode == "online" and last.get("mode") == "online" and resumed_from_step is not None:
        return Plan(last["id"], name, target.group or stored.get("group"), "allow", None)
    # A new piece: offline cannot resume, and an online run must not reuse an offline id
    # (syncing that offline piece later would collide with it).
    return Plan(_new_id(), name, group, None, first_id)


def record_segment(run_dir: Path, plan: Plan, mode: str, resumed_from_step: int | None) -> None:
    stored = read_run_file(run_dir) or {"id": plan.id, "name": plan.name, "group": plan.group}
    stored.setdefault("segments", []).append(
        {
            "id": plan.id,
            "mode": mode,
            "resumed_from_step": resumed_from_step,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    path = Path(run_dir) / RUN_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(stored, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: a preemption mid-write leaves the old file
