"""Sweeps without a W&B server: grid or random search over the same YAML W&B sweeps read.

A sweep file is W&B's format (`method`, `metric`, `parameters`, `command`), so one file
serves `wandb sweep FILE` on a connected cluster and `pipeline sweep FILE` on an offline
one. Offline, each point is one `pipeline train` run in `SWEEP_DIR/point-NNN`, started the
way a W&B agent starts it: the file's `command` with `${args}` replaced by `--key=value`.
Points run in sequence here, or as a SLURM array (one preemptible task per point). A
finished point is never re-run; an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pipeline.errors import ConfigError

PLAN_FILE = "sweep.json"
METHODS = ("grid", "random")
DISTRIBUTIONS = ("uniform", "log_uniform_values", "int_uniform")
_DEFAULT_COMMAND = ["pipeline", "train", "${args}"]


@dataclass(frozen=True)
class Space:
    """A parsed sweep file."""

    path: Path
    method: str
    metric: str
    goal: str
    parameters: dict[str, dict[str, Any]]
    command: list[str]
    count: int | None
    seed: int


def load_space(path: str | Path) -> Space:
    """Read and check a sweep file; ConfigError naming the file and key on bad input."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:
        raise ConfigError(f"sweep file {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {path}: must be a mapping")
    method = raw.get("method", "grid")
    if method not in METHODS:
        raise ConfigError(
            f"sweep file {path}: method must be grid|random for pipeline sweep, got {method!r}"
        )
    metric = raw.get("metric") or {}
    goal = metric.get("goal", "maximize")
    if "name" not in metric or goal not in ("maximize", "minimize"):
        raise ConfigError(f"sweep file {path}: metric needs a name and goal maximize|minimize")
    parameters = raw.get("parameters") or {}
    if not parameters:
        raise ConfigError(f"sweep file {path}: no parameters")
    for name, spec in parameters.items():
        _check_parameter(path, name, spec, method)
    count = raw.get("run_cap", raw.get("count"))
    if method == "random" and not (isinstance(count, int) and count > 0):
        raise ConfigError(f"sweep file {path}: random search needs run_cap (number of points) > 0")
    command = [str(c) for c in raw.get("command") or _DEFAULT_COMMAND]
    if "${args}" not in command and "${args_no_hyphens}" not in command:
        raise ConfigError(
            f"sweep file {path}: command must contain ${{args}} or ${{args_no_hyphens}}"
        )
    return Space(
        path, method, metric["name"], goal, parameters, command, count, int(raw.get("seed", 0))
    )


def _check_parameter(path: Path, name: str, spec: Any, method: str) -> None:
    where = f"sweep file {path}: parameters.{name}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping with values, value or a distribution")
    if "values" in spec:
        if not isinstance(spec["values"], list) or not spec["values"]:
            raise ConfigError(f"{where}.values: must be a non-empty list")
    elif "value" not in spec:
        dist = spec.get("distribution", "uniform")
        if method == "grid":
            raise ConfigError(f"{where}: grid search needs values (a list), not a distribution")
        if dist not in DISTRIBUTIONS:
            raise ConfigError(
                f"{where}.distribution: one of {'|'.join(DISTRIBUTIONS)}, got {dist!r}"
            )
        if not ("min" in spec and "max" in spec and spec["min"] < spec["max"]):
            raise ConfigError(f"{where}: needs min < max")
        if dist == "log_uniform_values" and spec["min"] <= 0:
            raise ConfigError(f"{where}: log_uniform_values needs min > 0")


def points(space: Space) -> list[dict[str, Any]]:
    """Every grid point, or `count` seeded random draws; keys in the file's order."""
    names = list(space.parameters)
    if space.method == "grid":
        choices = [_grid_values(space.parameters[n]) for n in names]
        return [dict(zip(names, combo, strict=True)) for combo in product(*choices)]
    rng = random.Random(space.seed)
    return [{n: _draw(space.parameters[n], rng) for n in names} for _ in range(space.count or 0)]


def _grid_values(spec: dict[str, Any]) -> list[Any]:
    return list(spec["values"]) if "values" in spec else [spec["value"]]


def _draw(spec: dict[str, Any], rng: random.Random) -> Any:
    if "values" in spec:
        return rng.choice(spec["values"])
    if "value" in spec:
        return spec["value"]
    lo, hi = spec["min"], spec["max"]
    dist = spec.get("distribution", "uniform")
    if dist == "int_uniform":
        return rng.randint(int(lo), int(hi))
    if dist == "log_uniform_values":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return rng.uniform(lo, hi)


def _format(value: Any) -> str:
    """A value as OmegaConf reads it back (lists and bools as YAML, not Python repr)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def point_command(space: Space, point: dict[str, Any], run_dir: Path | None) -> list[str]:
    """The command a W&B agent would run for `point`, with this point's run dir (if any)."""
    hyphens = [f"--{k}={_format(v)}" for k, v in point.items()]
    plain = [f"{k}={_format(v)}" for k, v in point.items()]
    out: list[str] = []
    for part in space.command:
        if part == "${args}":
            out += hyphens
        elif part == "${args_no_hyphens}":
            out += plain
        elif part == "${interpreter}":
            out.append(sys.executable)
        elif part != "${env}":
            out.append(part)
    if out and out[0] == "pipeline":  # the venv's own pipeline, whatever PATH says
        out[:1] = [sys.executable, "-m", "pipeline"]
    return out + ([f"run.dir={run_dir}"] if run_dir is not None else [])


def plan(space: Space, out: Path) -> list[dict[str, Any]]:
    """Write (or check) SWEEP_DIR/sweep.json: one sweep per directory, never two mixed."""
    rows = [
        {
            "index": i,
            "name": f"point-{i:03d}",
            "params": p,
            "command": point_command(space, p, out / f"point-{i:03d}"),
        }
        for i, p in enumerate(points(space))
    ]
    text = json.dumps(
        {
            "space": str(space.path),
            "metric": space.metric,
            "goal": space.goal,
            "points": [r["params"] for r in rows],
        },
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = out / PLAN_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("digest") != digest:
            raise ConfigError(
                f"sweep dir {out} holds another sweep ({old.get('space')}, digest {old.get('digest')}); "
                "use a new --out"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        record = {
            "digest": digest,
            "space": str(space.path),
            "metric": space.metric,
            "goal": space.goal,
            "points": rows,
        }
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return rows


def read_plan(out: Path) -> dict[str, Any]:
    path = Path(out) / PLAN_FILE
    if not path.is_file():
        raise ConfigError(f"{out}: no {PLAN_FILE} (not a sweep directory made by `pipeline sweep`)")
    return json.loads(path.read_text())


def finished(run_dir: Path) -> bool:
    """Whether a point's run ended normally (not stopped, not crashed)."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return False
    for line in reversed(metrics.read_text().splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "end":
            return not record.get("stopped", False)
    return False


def run_local(rows: list[dict[str, Any]], out: Path, group: str) -> list[int]:
    """Train the points in sequence; returns the exit code of each (0 for already finished)."""
    codes = []
    env = {**os.environ, "WANDB_RUN_GROUP": os.environ.get("WANDB_RUN_GROUP", group)}
    for row in rows:
        run_dir = out / row["name"]
        if finished(run_dir):
            print(f"{row['name']}: finished earlier, skipped", flush=True)
            codes.append(0)
            continue
        print(f"{row['name']}: {' '.join(shlex.quote(a) for a in row['command'][1:])}", flush=True)
        codes.append(subprocess.run(row["command"], env=env, check=False).returncode)
        print(f"{row['name']}: exit {codes[-1]}", flush=True)
    return codes


def slurm_array(
    rows: list[dict[str, Any]], out: Path, group: str, sbatch_args: list[str]
) -> list[str]:
    """The sbatch command for one preemptible array task per point (files written to `out`).

    Each task reads its command from SWEEP_DIR/points/NNN.args and runs it through a frozen
    copy of slurm/preemptible.sbatch, so requeued tasks resume their own point.
    """
    slurm = Path(__file__).resolve().parents[1] / "slurm"
    for name in ("preemptible.sbatch", "sweep_points.sbatch"):
        if not (slurm / name).is_file():
            raise ConfigError(
                f"pipeline sweep --slurm: {slurm / name} not found (run from a checkout)"
            )
    (out / "points").mkdir(parents=True, exist_ok=True)
    shutil.copy(slurm / "preemptible.sbatch", out / "preemptible.sbatch")
    for row in rows:
        # Train arguments only: preemptible.sbatch adds the launcher and run.dir itself.
        args = row["command"][row["command"].index("train") + 1 : -1]
        (out / "points" / f"{row['index']:03d}.args").write_text("\n".join(args) + "\n")
    return [
        "sbatch",
        f"--array=0-{len(rows) - 1}",
        f"--job-name={group}",
        f"--output={out}/slurm-%A_%a.out",
        "--export=ALL,WANDB_RUN_GROUP=" + group,
        *sbatch_args,
        str(slurm / "sweep_points.sbatch"),
        str(out.resolve()),
    ]
