"""The W&B sink, checked by reading back the `.wandb` files that wandb itself wrote offline."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from wandb_offline import BLOCK, read_config, read_history, read_run, read_summary, run_files

from pipeline.config import WandbConfig
from pipeline.errors import ConfigError
from pipeline.tracking.wandb_identity import RUN_FILE, plan_run, resolve_target
from pipeline.tracking.wandb_sink import WandbSink, wandb_sink_or_none

REPO = Path(__file__).resolve().parents[1]
ENV_KEYS = (
    "WANDB_MODE",
    "WANDB_PROJECT",
    "WANDB_ENTITY",
    "WANDB_DIR",
    "WANDB_RUN_GROUP",
    "WANDB_TAGS",
    "WANDB_NAME",
    "WANDB_NOTES",
    "WANDB_API_KEY",
    "WANDB_BASE_URL",
    "WANDB_CONFIG_DIR",
    "NETRC",
)
CONFIG = {"optim": {"lr": 0.003, "betas": [0.9, 0.999]}, "train": {"max_steps": 30}}
SYSTEM = {"torch": "2.13.0", "world_size": 1, "slurm_job_id": None, "git_commit": "abc1234"}


@pytest.fixture(autouse=True)
def clean_wandb_env(monkeypatch):
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)


def start(run_dir: Path, resumed_from_step: int | None = None, **cfg) -> WandbSink:
    sink = wandb_sink_or_none(
        WandbConfig(**{"mode": "offline", **cfg}), run_dir, CONFIG, SYSTEM, resumed_from_step
    )
    assert sink is not None and sink.active
    return sink


def predictions(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.02).astype(np.int64)
    probs = 1 / (1 + np.exp(-(rng.normal(0, 1.5, n) + 2.5 * labels - 2)))
    return labels, probs


def test_offline_run_file_holds_config_train_steps_and_eval_metrics(tmp_path):
    sink = start(tmp_path)
    for step in (10, 20, 30):
        sink.log(step, {"train/loss": 1.0 / step, "train/lr": 0.003 * step / 30})
    sink.log(30, {"val/auroc": 0.875, "val/ap": 0.5, "val/n_pos": 12})
    sink.alert("guard: logits are all >= 0")
    sink.finish()
    assert not sink.active
    sink.log(40, {"train/loss": 0.0})  # after finish: a no-op, never an error

    rows = read_history(tmp_path)
    assert [r["_step"] for r in rows] == [10, 20, 30]
    assert [r["train/loss"] for r in rows] == pytest.approx([0.1, 0.05, 1 / 30])
    assert rows[-1]["val/auroc"] == 0.875 and rows[-1]["val/n_pos"] == 12
    assert "val/auroc" not in rows[0]
    config = read_config(tmp_path)
    assert config["optim"] == CONFIG["optim"] and config["train"]["max_steps"] == 30
    assert config["system"] == SYSTEM
    run = read_run(tmp_path)
    # Offline runs are grouped under their name, so later resumed pieces join the same group.
    assert run.display_name == tmp_path.name and run.run_group == tmp_path.name
    assert run.project == "pipeline"
    assert read_summary(tmp_path)["alerts"] == ["guard: logits are all >= 0"]
    stored = json.loads((tmp_path / RUN_FILE).read_text())
    assert run_files(tmp_path)[0].name == f"run-{stored['id']}.wandb" == f"run-{run.run_id}.wandb"
    assert [s["mode"] for s in stored["segments"]] == ["offline"]


def test_reader_reassembles_records_across_32k_blocks_and_checks_crcs(tmp_path):
    sink = start(tmp_path)
    for step in range(1, 701):
        sink.log(step, {"train/loss": 1.0 / step, "train/a_long_metric_name_for_size": step})
    sink.finish()
    path = run_files(tmp_path)[0]
    assert path.stat().st_size > 2 * BLOCK
    rows = read_history(tmp_path)
    assert [r["_step"] for r in rows] == list(range(1, 701))
    assert rows[599]["train/a_long_metric_name_for_size"] == 600

    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # inside the last record's payload
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        read_history(tmp_path)


def test_curves_are_logged_as_small_exact_tables_for_100k_samples(tmp_path):
    labels, probs = predictions(100_000)
    sink = start(tmp_path)
    started = time.perf_counter()
    sink.log_curves(50, labels, probs)
    elapsed = time.perf_counter() - started
    sink.finish()
    assert elapsed < 5.0, f"log_curves took {elapsed:.2f} s for 100k samples"

    row = read_history(tmp_path)[-1]
    assert row["_step"] == 50
    for key in ("val/roc_curve_table", "val/pr_curve_table", "val/prob_hist_table"):
        assert row[f"{key}._type"] == "table-file"
        assert row[f"{key}.nrows"] <= 500
    table = run_files(tmp_path)[0].parent / "files" / row["val/roc_curve_table.path"]
    fpr, tpr = np.array(json.loads(table.read_text())["data"]).T
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    # Thinned to 500 points, the curve's area still matches the exact AUROC closely.
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(labels, probs), abs=2e-3)


def test_disabled_mode_creates_no_wandb_dir_and_never_imports_wandb(tmp_path):
    script = (
        "import sys; from pathlib import Path\n"
        "from pipeline.config import WandbConfig\n"
        "from pipeline.tracking.wandb_sink import wandb_sink_or_none\n"
        f"sink = wandb_sink_or_none(WandbConfig(mode='offline'), Path({str(tmp_path)!r}), {{}}, {{}}, None)\n"
        "print(sink, 'wandb' in sys.modules)\n"
    )
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "False"]  # WANDB_MODE beats the config's offline
    assert list(tmp_path.iterdir()) == []


def test_environment_overrides_config_as_wandb_users_expect(tmp_path, monkeypatch):
    cfg = WandbConfig(mode="online", project="cfg-project", group="cfg-group", tags=["cfg"])
    env = {
        "WANDB_MODE": "dryrun",
        "WANDB_PROJECT": "env-project",
        "WANDB_ENTITY": "env-team",
        "WANDB_RUN_GROUP": "env-group",
        "WANDB_TAGS": "a, b,",
        "WANDB_DIR": str(tmp_path / "elsewhere"),
    }
    target = resolve_target(cfg, tmp_path, env)
    assert (target.mode, target.project, target.entity, target.group) == (
        "offline",
        "env-project",
        "env-team",
        "env-group",
    )
    assert target.tags == ["a", "b"] and target.dir == tmp_path / "elsewhere"
    assert resolve_target(cfg, tmp_path, {}).project == "cfg-project"
    with pytest.raises(ConfigError, match="WANDB_MODE"):
        resolve_target(cfg, tmp_path, {"WANDB_MODE": "onlien"})

    # And the real run honours them.
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    monkeypatch.setenv("WANDB_TAGS", "x,y")
    start(tmp_path, project="cfg-project").finish()
    run = read_run(tmp_path)
    assert run.project == "env-project" and list(run.tags) == ["x", "y"]


def _start_online_in_subprocess(tmp_path: Path, env: dict[str, str], tty: bool = False):
    script = (
        "import logging, time; from pathlib import Path\n"
        "logging.basicConfig(level=logging.WARNING, format='%(message)s')\n"
        "from pipeline.config import WandbConfig\n"
        "from pipeline.tracking.wandb_sink import wandb_sink_or_none\n"
        "t = time.time()\n"
        f"sink = wandb_sink_or_none(WandbConfig(mode='offline', init_timeout=3), Path({str(tmp_path)!r}), {{}}, {{}}, None)\n"
        "print('RESULT', sink, round(time.time() - t, 1), flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(tmp_path / "home"), **env}
    command = [sys.executable, "-c", script]
    if tty:  # a terminal that never answers: where wandb would prompt and wait forever
        command = ["script", "-qec", shlex.join(command), "/dev/null"]
    logs = {name: tmp_path / f"{name}.txt" for name in ("stdout", "stderr")}
    started = time.perf_counter()
    with open(logs["stdout"], "w") as stdout, open(logs["stderr"], "w") as stderr:
        # stdin is a pipe nobody writes to or closes, like a user who walked away.
        proc = subprocess.Popen(
            command, env=env, stdin=subprocess.PIPE, stdout=stdout, stderr=stderr
        )
        try:
            proc.wait(timeout=45)
        finally:
            proc.kill()
            proc.stdin.close()
    elapsed = time.perf_counter() - started
    out = subprocess.CompletedProcess(
        command, proc.returncode, logs["stdout"].read_text(), logs["stderr"].read_text()
    )
    return out, elapsed


def test_online_init_failure_falls_back_to_local_logging_with_one_warning(tmp_path):
    key = "0123456789abcdef" * 5  # a well-formed but fake key; it must never be printed
    env = {"WANDB_MODE": "online", "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": key}
    out, elapsed = _start_online_in_subprocess(tmp_path, env)
    assert out.returncode == 0, out.stderr
    assert "RESULT None" in out.stdout
    warnings = [line for line in out.stderr.splitlines() if "could not start W&B" in line]
    assert len(warnings) == 1, out.stderr
    assert "continuing with local logging only" in warnings[0]
    assert key not in out.stdout + out.stderr
    assert elapsed < 30
    assert not (tmp_path / RUN_FILE).exists()  # no segment recorded for a run that never started


@pytest.mark.skipif(shutil.which("script") is None, reason="needs util-linux `script` for a TTY")
def test_online_without_credentials_on_a_terminal_does_not_wait_for_a_prompt(tmp_path):
    env = {"WANDB_MODE": "online", "WANDB_BASE_URL": "http://127.0.0.1:9"}
    out, elapsed = _start_online_in_subprocess(tmp_path, env, tty=True)
    assert "RESULT None" in out.stdout, out.stdout + out.stderr
    assert "no W&B credentials" in out.stdout  # `script` merges the child's stderr
    assert elapsed < 30


def test_offline_resume_logs_a_new_run_in_the_same_group_pointing_at_the_first(tmp_path):
    first = start(tmp_path)
    for step in (10, 20, 30):
        first.log(step, {"train/loss": 1.0})
    first.finish()
    second = start(tmp_path, resumed_from_step=20)
    second.log(30, {"train/loss": 0.5})
    second.log(40, {"train/loss": 0.25})
    second.finish()

    stored = json.loads((tmp_path / RUN_FILE).read_text())
    first_id, second_id = (s["id"] for s in stored["segments"])
    assert first_id == stored["id"] != second_id
    assert [s["resumed_from_step"] for s in stored["segments"]] == [None, 20]
    assert [p.name for p in run_files(tmp_path)] == [
        f"run-{first_id}.wandb",
        f"run-{second_id}.wandb",
    ]
    runs = [read_run(tmp_path, first_id), read_run(tmp_path, second_id)]
    assert {r.display_name for r in runs} == {tmp_path.name}
    assert {r.run_group for r in runs} == {tmp_path.name}
    assert f"resume_of={first_id}" in runs[1].notes
    config = read_config(tmp_path, second_id)
    assert (config["resume_of"], config["resumed_from_step"]) == (first_id, 20)
    assert [r["_step"] for r in read_history(tmp_path, second_id)] == [30, 40]


def test_stored_run_id_is_reused_with_resume_allow_for_online_resumes(tmp_path):
    (tmp_path / RUN_FILE).write_text(
        json.dumps(
            {
                "id": "abc12345",
                "name": "exp",
                "group": None,
                "segments": [{"id": "abc12345", "mode": "online", "resumed_from_step": None}],
            }
        )
    )
    online = resolve_target(WandbConfig(mode="online"), tmp_path, {})
    plan = plan_run(online, tmp_path, resumed_from_step=200)
    assert (plan.id, plan.resume, plan.name, plan.resume_of) == ("abc12345", "allow", "exp", None)
    # Restarted from step 0 (requeued before the first checkpoint): a new run, not a resume,
    # or W&B would drop every step below the one it already holds.
    restart = plan_run(online, tmp_path, resumed_from_step=None)
    assert restart.id != "abc12345" and restart.resume_of == "abc12345"
    # Offline after online: W&B cannot continue it offline, so a new piece.
    offline = resolve_target(WandbConfig(mode="offline"), tmp_path, {})
    piece = plan_run(offline, tmp_path, resumed_from_step=200)
    assert piece.id != "abc12345" and piece.resume is None and piece.group == "exp"
    # A fresh online run gets a new id, created with resume="allow" so a requeue can continue it.
    (tmp_path / RUN_FILE).unlink()
    fresh = plan_run(online, tmp_path, resumed_from_step=None)
    assert fresh.resume == "allow" and len(fresh.id) == 8
