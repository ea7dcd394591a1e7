"""`pipeline cv`: K-fold cross-validation over the folds `convert --folds K` wrote.

Fold i trains on every other fold's shards and validates on `fold<i>-*.tar`; folds are
split by scan (group), so no scan is in two folds. Each fold is an ordinary run
directory, RUNS/fold<i>: started again, it resumes from its last checkpoint, exactly as
`pipeline train` does. Folds run here one after another, or as a SLURM job array
(`slurm/cv.sbatch`, one task per fold). The summary evaluates each finished fold on its
held-out scans (best.pt, else last.pt), and pools the predictions of all finished folds
into one FROC/CPM with a bootstrap interval over scans. A fold that failed, is still
running or never started is named in the summary, left out of the pool, and makes the
command exit 1: nothing is averaged in silently.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, DataError

FOLD_PREFIX = "fold"


@dataclass(frozen=True)
class FoldStatus:
    fold: int
    run_dir: Path
    done: bool
    reason: str  # "" when done; else why it cannot be scored yet


def fold_shards(shards: Path, folds: int) -> list[list[str]]:
    """Shard paths per fold; ConfigError unless DIR holds exactly folds 0..K-1."""
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}")
    if not shards.is_dir():
        raise DataError(f"--shards {shards}: not a directory")
    found = {}
    for path in sorted(shards.glob(f"{FOLD_PREFIX}*-*.tar")):
        name = path.name.split("-", 1)[0].removeprefix(FOLD_PREFIX)
        if name.isdigit():
            found.setdefault(int(name), []).append(str(path))
    if sorted(found) != list(range(folds)):
        have = f"folds {sorted(found)}" if found else "no fold<i>-*.tar shards"
        raise ConfigError(
            f"--folds {folds}: {shards} has {have}; write them with "
            f"`pipeline convert ... --folds {folds}` (without --val-fold)"
        )
    return [found[i] for i in range(folds)]


def fold_overrides(shards: Path, folds: int, fold: int) -> list[str]:
    """The `pipeline train` overrides of one fold: train on the others, validate on it."""
    if not 0 <= fold < folds:
        raise ConfigError(f"--fold must be in 0..{folds - 1}, got {fold}")
    fold_shards(shards, folds)
    others = [str(i) for i in range(folds) if i != fold]
    # braceexpand leaves a one-item brace alone, so two folds name the other one directly.
    train = others[0] if len(others) == 1 else "{" + ",".join(others) + "}"
    root = shards.resolve()
    return [
        f"data.train={root}/{FOLD_PREFIX}{train}-*.tar",
        f"data.val={root}/{FOLD_PREFIX}{fold}-*.tar",
    ]


def fold_dir(runs: Path, fold: int) -> Path:
    return runs / f"{FOLD_PREFIX}{fold}"


def train_fold(
    config: str | None, overrides: list[str], shards: Path, folds: int, fold: int, runs: Path
) -> int:
    """`pipeline train` for one fold, in a child process (a fresh process per run)."""
    args = [sys.executable, "-m", "pipeline", "train"]
    if config:
        args += ["--config", config]
    args += [*overrides, *fold_overrides(shards, folds, fold), f"run.dir={fold_dir(runs, fold)}"]
    print(f"cv: training fold {fold}/{folds} in {fold_dir(runs, fold)}", flush=True)
    return subprocess.run(args, check=False).returncode


def status(runs: Path, fold: int, failed: dict[int, int] | None = None) -> FoldStatus:
    """Done when metrics.jsonl ends with an unstopped `end` at the configured max_steps."""
    run_dir = fold_dir(runs, fold)
    if failed and fold in failed:
        return FoldStatus(fold, run_dir, False, f"training failed (exit {failed[fold]})")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return FoldStatus(fold, run_dir, False, "not started (no metrics.jsonl)")
    events = []
    for line in metrics.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line: the run is still writing or was killed
    last = next((e for e in reversed(events) if e.get("event") in ("start", "resume", "end")), {})
    if last.get("event") != "end":
        step = max((int(e.get("step") or 0) for e in events), default=0)
        return FoldStatus(fold, run_dir, False, f"running or interrupted (at step {step})")
    if last.get("stopped"):
        return FoldStatus(fold, run_dir, False, f"stopped at step {last.get('step')}, resumable")
    return FoldStatus(fold, run_dir, True, "")


def checkpoint_of(run_dir: Path) -> Path:
    best = run_dir / "checkpoints" / "best.pt"
    return best if best.is_file() else run_dir / "checkpoints" / "last.pt"


def summarise(
    runs: Path,
    shards: Path,
    folds: int,
    luna: Any = None,
    failed: dict[int, int] | None = None,
) -> dict[str, Any]:
    """Per-fold metrics and the pooled FROC/CPM over the finished folds (see module doc)."""
    from pipeline.evaluate import evaluate_checkpoint

    fold_shards(shards, folds)
    states = [status(runs, i, failed) for i in range(folds)]
    per_fold: dict[str, Any] = {}
    pooled_preds = []
    for st in states:
        if not st.done:
            continue
        ckpt = checkpoint_of(st.run_dir)
        data = f"data.val={shards.resolve()}/{FOLD_PREFIX}{st.fold}-*.tar"
        fold_luna = _with_scans(luna, shards / f"scans-{FOLD_PREFIX}{st.fold}.csv")
        metrics = evaluate_checkpoint(str(ckpt), [data], st.run_dir / "eval", fold_luna)
        keep = ("cpm", "cpm_candidate", "auroc", "ap", "hits", "misses", "scans")
        per_fold[str(st.fold)] = {k: metrics[k] for k in keep if k in metrics}
        per_fold[str(st.fold)]["checkpoint"] = str(ckpt)
        pooled_preds.append(st.run_dir / "eval" / f"predictions-{ckpt.stem}.npz")
    summary: dict[str, Any] = {
        "folds": folds,
        "finished": [st.fold for st in states if st.done],
        "not_finished": {str(st.fold): st.reason for st in states if not st.done},
        "per_fold": per_fold,
    }
    if pooled_preds:
        summary["pooled"] = _pooled(pooled_preds, shards, states, luna)
    return summary


def _with_scans(luna: Any, scans: Path) -> Any:
    """The fold's evaluated scans from convert's list, unless the user gave one."""
    if luna is None or luna.scans is not None or not scans.is_file():
        return luna
    from dataclasses import replace

    return replace(luna, scans=str(scans))


def _pooled(files: list[Path], shards: Path, states: list[FoldStatus], luna: Any) -> dict:
    """One FROC over every finished fold's held-out predictions (each scan scored once)."""
    from pipeline import froc, luna16
    from pipeline.metrics import froc as candidate_froc

    arrays = [np.load(f, allow_pickle=False) for f in files]
    labels = np.concatenate([a["labels"] for a in arrays])
    probs = np.concatenate([a["probs"] for a in arrays])
    groups = [str(g) for a in arrays for g in a.get("groups", [])]
    out: dict[str, Any] = {"over_folds": [st.fold for st in states if st.done]}
    if len(groups) == labels.size:
        out.update(candidate_froc(labels, probs, groups))
    if luna is None:
        return out
    if not all("coords" in a and "groups" in a for a in arrays):
        raise DataError("pooled CPM needs predictions with seriesuid and world coordinates")
    marks = froc.Marks(groups, np.concatenate([a["coords"] for a in arrays]), probs)
    scans = None
    if luna.scans is not None:
        scans = luna16.read_scans(luna.scans)
    else:
        lists = [shards / f"scans-{FOLD_PREFIX}{st.fold}.csv" for st in states if st.done]
        if all(p.is_file() for p in lists):
            scans = [uid for p in lists for uid in luna16.read_scans(p)]
    result = luna16.score_files(
        marks,
        luna.annotations,
        luna.excluded,
        scans,
        luna.max_marks,
        luna.bootstrap,
        luna.seed,
    )
    out.update(result.summary())
    return out
