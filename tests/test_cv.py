"""K-fold cross-validation: folds by scan from `convert --folds`, `pipeline cv` end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.convert.volumes import convert_volumes
from pipeline.cv import fold_overrides
from pipeline.data.format import expand_shards
from pipeline.data.loader import read_blocks
from pipeline.data.problems import ProblemLog
from pipeline.errors import ConfigError
from tests import reliability
from tests.conftest import TINY, cli_env, run_cli
from tests.luna16_helpers import TINY_3D, make_case, read_rows
from tests.slurm_helpers import (
    PARTITION,
    cancel,
    requires_slurm,
    start_requeued_now,
    submit,
    wait_for_state,
    wait_until,
)

FOLDS = 3


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("luna16_cv")
    make_case(root / "demo")
    convert_volumes(
        candidates=root / "demo" / "candidates.csv",
        scans=root / "demo" / "scans",
        out=root / "folds",
        size=24,
        folds=FOLDS,
        scan_list=root / "demo" / "seriesuids.csv",
        workers=1,
    )
    return root


def scans_in(pattern: str) -> dict[str, int]:
    """seriesuid -> samples, read back from the shards themselves."""
    counts: dict[str, int] = {}
    for block in read_blocks(expand_shards(pattern), "raise", ProblemLog()):
        for group in block.groups:
            counts[group] = counts.get(group, 0) + 1
    return counts


def test_folds_split_by_scan_without_leak_and_match_val_fold(case, tmp_path):
    folds = [scans_in(f"{case}/folds/fold{i}-*.tar") for i in range(FOLDS)]
    candidates = read_rows(case / "demo" / "candidates.csv")
    per_scan = {}
    for row in candidates:
        per_scan[row["seriesuid"]] = per_scan.get(row["seriesuid"], 0) + 1
    # Every scan in exactly one fold, with all of its candidates.
    seen = [uid for fold in folds for uid in fold]
    assert sorted(seen) == sorted(per_scan)
    for fold in folds:
        assert all(fold[uid] == per_scan[uid] for uid in fold)
    # The scan lists partition every scan of the set, those without candidates included.
    lists = [
        {r["seriesuid"] for r in read_rows(case / f"folds/scans-fold{i}.csv")} for i in range(FOLDS)
    ]
    everything = {r["seriesuid"] for r in read_rows(case / "demo" / "seriesuids.csv")}
    assert set().union(*lists) == everything and sum(map(len, lists)) == len(everything)
    assert all(set(folds[i]) <= lists[i] for i in range(FOLDS))
    # Fold 1 of the all-folds conversion is exactly --folds 3 --val-fold 1's val split.
    convert_volumes(
        candidates=case / "demo" / "candidates.csv",
        scans=case / "demo" / "scans",
        out=tmp_path / "one",
        size=24,
        folds=FOLDS,
        val_fold=1,
        scan_list=case / "demo" / "seriesuids.csv",
        workers=1,
    )
    assert scans_in(f"{tmp_path}/one/val-*.tar") == folds[1]
    assert set(scans_in(f"{tmp_path}/one/train-*.tar")) == set(folds[0]) | set(folds[2])


def test_fold_overrides_train_on_the_other_folds_only(case):
    train, val = fold_overrides(case / "folds", FOLDS, 1)
    assert train.startswith("data.train=") and val.startswith("data.val=")
    assert expand_shards(train.split("=", 1)[1]) == sorted(
        expand_shards(f"{case}/folds/fold0-*.tar") + expand_shards(f"{case}/folds/fold2-*.tar")
    )
    assert expand_shards(val.split("=", 1)[1]) == expand_shards(f"{case}/folds/fold1-*.tar")
    with pytest.raises(ConfigError, match="--folds 4: .* has folds \\[0, 1, 2\\]"):
        fold_overrides(case / "folds", 4, 0)


def cv_args(case: Path, runs: Path, *extra: str) -> list[str]:
    return [
        "cv", "--folds", str(FOLDS), "--shards", str(case / "folds"), "--runs", str(runs),
        "--annotations", str(case / "demo" / "annotations.csv"),
        "--excluded", str(case / "demo" / "annotations_excluded.csv"),
        "--bootstrap", "100", *extra,
    ]  # fmt: skip


TRAIN = ["--config", str(TINY), *TINY_3D, "train.max_steps=6", "train.eval_every=6"]


def check_summary(summary: dict, folds: list[int]) -> None:
    assert summary["finished"] == folds
    assert sorted(summary["per_fold"]) == [str(i) for i in folds]
    for fold in summary["per_fold"].values():
        assert 0.0 <= fold["cpm"] <= 1.0 and fold["hits"] + fold["misses"] > 0
    pooled = summary["pooled"]
    assert pooled["over_folds"] == folds
    low, high = pooled["ci"]["cpm"]
    assert low <= pooled["cpm"] <= high
    # Pooled over the folds' scan lists: every scan of those folds once.
    assert pooled["scans"] == sum(summary["per_fold"][str(i)]["scans"] for i in folds)


@pytest.mark.slow
def test_cv_runs_three_folds_in_sequence_and_names_failed_and_unfinished_folds(case, tmp_path):
    runs = tmp_path / "cv"
    # Fold 1 fails: its run directory holds an unreadable checkpoint to resume from.
    broken = runs / "fold1" / "checkpoints" / "last.pt"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a checkpoint")
    failed = run_cli([*cv_args(case, runs), *TRAIN], cli_env(tmp_path), timeout=900)
    assert failed.returncode == 1, failed.stderr[-3000:]
    partial = json.loads(failed.stdout[failed.stdout.index("{\n") :])
    assert partial["not_finished"] == {"1": "training failed (exit 2)"}
    check_summary(partial, [0, 2])  # the others trained anyway, and only they are pooled
    assert "fold 1: training failed (exit 2)" in failed.stderr.strip().splitlines()[-1]

    # Run again once the cause is gone: only fold 1 trains, the summary is complete.
    shutil.rmtree(runs / "fold1")
    done = run_cli([*cv_args(case, runs), *TRAIN], cli_env(tmp_path), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fold 0 already finished, not retrained" in done.stdout
    assert "fold 2 already finished, not retrained" in done.stdout
    summary = json.loads(done.stdout[done.stdout.index("{\n") :])
    check_summary(summary, [0, 1, 2])
    assert json.loads((runs / "cv_summary.json").read_text()) == summary
    # Training's own evaluation files trace every prediction to its candidate.
    with np.load(sorted((runs / "fold0" / "eval").glob("predictions-step-*.npz"))[-1]) as data:
        assert data["coords"].shape == (data["labels"].size, 3)
        assert set(data["groups"].tolist()) == set(scans_in(f"{case}/folds/fold0-*.tar"))
        assert len(set(data["ids"].tolist())) == data["labels"].size
    for i in range(FOLDS):  # each fold trained without its own scans
        config = (runs / f"fold{i}" / "config.yaml").read_text()
        assert f"fold{i}-*.tar" in config.split("val:")[1].splitlines()[0]
        assert f"fold{i}" not in config.split("train:")[1].splitlines()[0]

    # Fold 1 "still running": its run has no end record. It is named, left out, exit 1.
    metrics = runs / "fold1" / "metrics.jsonl"
    lines = [ln for ln in metrics.read_text().splitlines() if '"event": "end"' not in ln]
    metrics.write_text("\n".join(lines) + "\n")
    again = run_cli(cv_args(case, runs, "--summarise"), cli_env(tmp_path), timeout=300)
    assert again.returncode == 1
    partial = json.loads(again.stdout)
    assert partial["not_finished"] == {"1": "running or interrupted (at step 6)"}
    check_summary(partial, [0, 2])
    assert "fold 1: running or interrupted" in again.stderr.strip().splitlines()[-1]
    reliability.record(
        "cv summary while a fold is unfinished: named, left out of the pooled CPM",
        exit_code=again.returncode,
        seconds=None,
        lines=len(again.stderr.strip().splitlines()),
        checkpoint_ok=None,
        launcher="cli",
    )


PREEMPT_STEPS = 16


@pytest.mark.slow
@pytest.mark.slurm
@requires_slurm
def test_cv_runs_three_folds_as_a_slurm_array_with_a_preempted_fold_then_summarises(case, tmp_path):
    runs = tmp_path / "cv"
    # What a user's shell exports: the venv first on PATH, and where the folds are.
    path = f"{Path(sys.executable).parent}:{cli_env(tmp_path)['PATH']}"
    env = cli_env(tmp_path, PATH=path, SBATCH_PARTITION=PARTITION)
    env.update(CV_SHARDS=str(case / "folds"), CV_FOLDS=str(FOLDS), CV_RUNS=str(runs))
    train = [*TRAIN, f"train.max_steps={PREEMPT_STEPS}", f"train.eval_every={PREEMPT_STEPS}",
             "train.log_every=1", "checkpoint.every_steps=100"]  # fmt: skip
    job = submit(
        "cv.sbatch",
        *train,
        sbatch_args=[f"--array=0-{FOLDS - 1}", "--cpus-per-task=1", "--gpus-per-node=1",
                     "--time=00:10:00"],
        env=env,
        log_dir=tmp_path,
    )  # fmt: skip
    task = f"{job}_1"
    try:
        # Preempt fold 1 mid-run: it checkpoints, requeues, and resumes in its own run dir.
        wait_until(lambda: last_step(runs / "fold1") >= 3, 300, "fold 1 at step 3", task)
        subprocess.run(["scancel", "--signal=USR1", "--batch", task], check=True, timeout=30)
        wait_for_state(task, "PENDING", timeout=120)
        start_requeued_now(task)
        wait_until(lambda: not queued(job), 900, f"array job {job} to finish", job)
    finally:
        cancel(job)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("pipeline-cv-*.out")))
    for i in range(FOLDS):  # one array task per fold, each ended well
        assert f"cv fold {i}/{FOLDS}" in logs, logs[-3000:]
        assert f"fold {i}: launcher exited with status 0" in logs, logs[-3000:]
    ends = [e for e in events(runs / "fold1") if e["event"] == "end"]
    assert [e["stopped"] for e in ends] == [True, False] and ends[-1]["step"] == PREEMPT_STEPS
    resumed = [e["step"] for e in events(runs / "fold1") if e["event"] == "resume"]
    assert resumed == [ends[0]["step"]] and 3 <= resumed[0] < PREEMPT_STEPS
    done = run_cli(cv_args(case, runs, "--summarise"), cli_env(tmp_path), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    check_summary(json.loads(done.stdout), [0, 1, 2])
    reliability.record(
        "cv array task preempted (USR1): fold checkpoints, requeues, resumes; cv completes",
        exit_code=0,
        seconds=None,
        lines=0,
        checkpoint_ok=True,
        launcher="sbatch --array",
    )


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            continue
    return out


def last_step(run_dir: Path) -> int:
    return max((e["step"] for e in events(run_dir) if e["event"] == "train"), default=0)


def queued(job: str) -> bool:
    """Any task of the array still pending or running."""
    out = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, timeout=30)
    return bool(out.stdout.strip())
