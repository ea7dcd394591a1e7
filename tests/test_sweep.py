"""Sweeps: W&B agents' `--key=value` arguments, and `pipeline sweep` without a W&B server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY, cli_env, run_cli, train_args
from tests.slurm_helpers import job_env, requires_slurm


def test_agent_style_arguments_resolve_to_the_same_config_as_a_dotlist(tiny_shards, tmp_path):
    env = cli_env(tmp_path)
    agent, dotlist = tmp_path / "agent", tmp_path / "dotlist"
    settings = {"optim.lr": "0.01", "data.scales": "[12, 32, 48]", "data.augment": "False"}
    runs = {
        agent: train_args(tiny_shards, agent, "train.max_steps=2", *[f"--{k}={v}" for k, v in settings.items()]),
        dotlist: train_args(tiny_shards, dotlist, "train.max_steps=2", *[f"{k}={v}" for k, v in settings.items()]),
    }  # fmt: skip
    for args in runs.values():
        result = run_cli(args, env)
        assert result.returncode == 0, result.stderr[-3000:]
    configs = [yaml.safe_load((d / "config.yaml").read_text()) for d in (agent, dotlist)]
    for config in configs:
        config["run"].pop("dir")
    assert configs[0] == configs[1]
    assert configs[0]["optim"]["lr"] == 0.01 and configs[0]["data"]["scales"] == [12, 32, 48]
    assert configs[0]["data"]["augment"]["enabled"] is False  # the old bool switch


def test_agent_style_unknown_key_is_one_line(tmp_path):
    result = run_cli(["train", "--optim.lrr=0.1"], cli_env(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "optim.lrr" in result.stderr


def _space(tmp_path: Path, tiny_shards: Path, **changes) -> Path:
    space = {
        "method": "grid",
        "metric": {"name": "val/auroc", "goal": "maximize"},
        "parameters": {"optim.lr": {"values": [0.0003, 0.01]}, "train.batch_size": {"values": [16, 32]}},
        "command": ["pipeline", "train", "--config", str(TINY), f"data.train={tiny_shards}/train-*.tar",
                    f"data.val={tiny_shards}/val-*.tar", "${args}"],
    }  # fmt: skip
    space.update(changes)
    path = tmp_path / f"space-{len(list(tmp_path.glob('space-*')))}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def _best(run_dir: Path, metric: str = "val/auroc") -> float:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max(r[metric] for r in lines if r["event"] == "eval")


@pytest.mark.slow
def test_local_grid_trains_every_point_once_and_ranks_them_by_best_metric(tiny_shards, tmp_path):
    space, out, env = _space(tmp_path, tiny_shards), tmp_path / "sweep", cli_env(tmp_path)
    result = run_cli(["sweep", str(space), "--out", str(out)], env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    points = sorted(out.glob("point-*"))
    assert [p.name for p in points] == [f"point-{i:03d}" for i in range(4)]
    seen = set()
    for point in points:
        config = yaml.safe_load((point / "config.yaml").read_text())
        seen.add((config["optim"]["lr"], config["train"]["batch_size"]))
    assert seen == {(0.0003, 16), (0.0003, 32), (0.01, 16), (0.01, 32)}
    summary = json.loads((out / "summary.json").read_text())
    expected = sorted(points, key=_best, reverse=True)
    assert [r["name"] for r in summary["ranked"]] == [p.name for p in expected]
    assert [r["best"] for r in summary["ranked"]] == [_best(p) for p in expected]
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Running the sweep again trains nothing: every point finished.
    before = {p: (p / "metrics.jsonl").read_text() for p in points}
    again = run_cli(["sweep", str(space), "--out", str(out)], env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier, skipped") == 4
    assert {p: (p / "metrics.jsonl").read_text() for p in points} == before


def test_summary_names_unfinished_points_and_never_ranks_them(tiny_shards, tmp_path):
    space, out, env = _space(tmp_path, tiny_shards), tmp_path / "sweep", cli_env(tmp_path)
    planned = run_cli(["sweep", str(space), "--out", str(out), "--slurm", "print"], env)
    assert planned.returncode == 0, planned.stderr
    assert "--array=0-3" in planned.stdout and "sweep_points.sbatch" in planned.stdout

    def write(name: str, events: list[dict]) -> None:
        (out / name).mkdir()
        (out / name / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))

    def evals(*values: float) -> list[dict]:
        return [
            {"event": "eval", "step": 10 * (i + 1), "val/auroc": x} for i, x in enumerate(values)
        ]

    write("point-000", [*evals(0.6, 0.7), {"event": "end", "step": 20, "stopped": False}])
    write("point-001", [*evals(0.9, 0.8), {"event": "end", "step": 20, "stopped": False}])
    write("point-002", [*evals(0.99), {"event": "end", "step": 10, "stopped": True}])
    # point-003 never started
    result = run_cli(["sweep", "--summary", str(out), "--json"], env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [(r["name"], r["best"], r["best_step"]) for r in summary["ranked"]] == [
        ("point-001", 0.9, 10),
        ("point-000", 0.7, 20),
    ]
    status = {r["name"]: r["status"] for r in summary["not_ranked"]}
    assert status == {"point-002": "stopped (resumable)", "point-003": "not started"}


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"method": "bayes"}, ["method", "grid|random", "bayes"]),
        ({"metric": {"goal": "maximize"}}, ["metric", "name"]),
        ({"parameters": {"optim.lr": {"min": 0.1, "max": 1.0}}}, ["parameters.optim.lr", "grid", "values"]),
        ({"method": "random"}, ["random", "run_cap"]),
        ({"command": ["pipeline", "train"]}, ["command", "${args}"]),
    ],
)  # fmt: skip
def test_bad_sweep_files_are_one_line_errors(tiny_shards, tmp_path, changes, words):
    space = _space(tmp_path, tiny_shards, **changes)
    result = run_cli(
        ["sweep", str(space), "--out", str(tmp_path / "s"), "--slurm", "print"], cli_env(tmp_path)
    )
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and all(w in line for w in words), line


def test_a_sweep_dir_never_mixes_two_sweeps(tiny_shards, tmp_path):
    out, env = tmp_path / "sweep", cli_env(tmp_path)
    first = run_cli(
        ["sweep", str(_space(tmp_path, tiny_shards)), "--out", str(out), "--slurm", "print"], env
    )
    assert first.returncode == 0, first.stderr
    other = _space(tmp_path, tiny_shards, parameters={"optim.lr": {"values": [0.1]}})
    second = run_cli(["sweep", str(other), "--out", str(out), "--slurm", "print"], env)
    assert second.returncode == 2 and "holds another sweep" in second.stderr
    assert second.stderr.strip().count("\n") == 0


@pytest.mark.slow
@pytest.mark.slurm
@requires_slurm
def test_slurm_array_trains_each_point_in_its_own_task(tiny_shards, tmp_path):
    space, out = _space(tmp_path, tiny_shards), tmp_path / "sweep"
    env = job_env({**cli_env(tmp_path), "NPROC_PER_NODE": "1"})
    sbatch = [
        "--sbatch-arg=--cpus-per-task=1",
        "--sbatch-arg=--gpus-per-node=1",
        "--sbatch-arg=--time=00:10:00",
    ]
    result = run_cli(["sweep", str(space), "--out", str(out), "--slurm", "submit", *sbatch], env)
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip().split()[-1]
    try:
        deadline = time.monotonic() + 480
        while time.monotonic() < deadline:
            queued = subprocess.run(
                ["squeue", "-h", "-j", job], capture_output=True, text=True
            ).stdout
            if not queued.strip():
                break
            time.sleep(3)
        logs = {p.name: p.read_text() for p in out.glob("slurm-*.out")}
        assert len(logs) == 4, f"expected one log per array task, got {sorted(logs)}"
        summary = run_cli(["sweep", "--summary", str(out), "--json"], env)
        ranked = json.loads(summary.stdout)["ranked"]
        assert len(ranked) == 4, (summary.stdout, logs)
        points = sorted(out.glob("point-*"))
        assert [r["name"] for r in ranked] == [
            p.name for p in sorted(points, key=_best, reverse=True)
        ]
    finally:
        subprocess.run(["scancel", job], capture_output=True)


@pytest.mark.slow
@pytest.mark.slurm
@requires_slurm
def test_requeued_agent_task_resumes_its_own_run_then_takes_the_rest_of_its_count(
    tiny_shards, tmp_path
):
    """slurm/sweep.sbatch with a stand-in for `wandb agent` (no W&B server runs here)."""
    from tests.slurm_helpers import (
        TERMINAL_STATES,
        job_state,
        log_text,
        start_requeued_now,
        submit,
        wait_for_state,
        wait_until,
    )

    grid = {"optim.lr": {"values": [0.001, 0.002, 0.003]}}
    space = _space(tmp_path, tiny_shards, parameters=grid)
    command = yaml.safe_load(space.read_text())["command"]
    command[-1:-1] = ["train.max_steps=30", "train.log_every=1", "wandb.mode=offline"]
    space.write_text(yaml.safe_dump({**yaml.safe_load(space.read_text()), "command": command}))
    agent = f"{sys.executable} {Path(__file__).parent / 'sweep_agent_standin.py'}"
    env = job_env({**cli_env(tmp_path), "WANDB_AGENT": agent, "PYTHON": sys.executable})
    job = submit(
        "sweep.sbatch", str(space), "2",
        sbatch_args=["--cpus-per-task=1", "--gpus-per-node=1", "--time=00:10:00"],
        env=env, log_dir=tmp_path,
    )  # fmt: skip
    runs = tmp_path / "runs" / f"sweep-{space.stem}"
    try:
        first = lambda: [d for d in runs.glob("*") if _steps(d) >= 5]  # noqa: E731
        ended = lambda: job_state(job) in TERMINAL_STATES  # noqa: E731
        wait_until(lambda: bool(first()) or ended(), 240, "the first run at step 5", job)
        assert first(), f"job ended {job_state(job)}:\n{log_text(job)[-3000:]}"
        (run,) = first()
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
        wait_for_state(job, "PENDING", timeout=120)
        start_requeued_now(job)
        wait_for_state(job, "COMPLETED", timeout=300)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    dirs = sorted(runs.glob("*"))
    assert len(dirs) == 2 and run in dirs  # the resumed run and one more: COUNT 2
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ends = [(e["step"], e["stopped"]) for e in events if e["event"] == "end"]
    assert ends[0][1] is True and ends[-1] == (30, False)
    assert [e["step"] for e in events if e["event"] == "resume"] == [ends[0][0]]
    assert json.loads(space.with_name(space.name + ".taken").read_text()) == [0, 1]


def _steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    records = [json.loads(x) for x in path.read_text().splitlines()]
    steps = [r["step"] for r in records if r["event"] == "train"]
    return max(steps, default=0)
