"""The resume contract: what a checkpoint fixes is refused if changed, unless accepted.

A 6-step run is resumed with changed keys. Refused: exit 2 before any work, one line per
changed key (`optim.lr: 0.003 -> 0.03`), the checkpoint untouched. Accepted with
`checkpoint.accept_changes=[...]`: the new lr really drives the schedule from the resume
step on, and a changed validation set starts `best` afresh.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint, config
from pipeline.optim import build_optimizer, build_scheduler
from tests.conftest import TINY, cli_env, run_cli, train_args
from tests.faults import small_shards


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("contract")
    shards = small_shards(tmp / "shards", n_train=128, n_val=32)
    other_val = small_shards(tmp / "other", n_train=64, n_val=48)
    run_dir = tmp / "run"
    result = run_cli(_args(shards, run_dir, "train.max_steps=6"), cli_env(tmp))
    assert result.returncode == 0, result.stderr[-3000:]
    return shards, other_val, run_dir


def _args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return train_args(shards, run_dir, "train.batch_size=8", "train.eval_every=3",
                      "train.log_every=1", "checkpoint.every_steps=3", *extra)  # fmt: skip


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def test_changed_keys_are_refused_one_line_each_before_any_work(trained, tmp_path):
    shards, _, source = trained
    run_dir = _copy(source, tmp_path)
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    result = run_cli(
        _args(shards, run_dir, "train.max_steps=10", "optim.lr=0.03", "data.shuffle_blocks=2"),
        cli_env(tmp_path),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-3].startswith("pipeline train: error: resume from ")
    assert "accept with checkpoint.accept_changes=[data.shuffle_blocks,optim.lr]" in lines[-3]
    assert sorted(lines[-2:]) == ["  data.shuffle_blocks: 4 -> 2", "  optim.lr: 0.003 -> 0.03"]
    # train.max_steps grew, which is allowed, and is not among the refused keys.
    assert "max_steps" not in "\n".join(lines[-3:])
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before
    assert "resumed from" not in result.stderr


def _lr_at(step: int, *overrides: str) -> float:
    """The schedule `build_scheduler` gives at `step` for the tiny config with overrides."""
    cfg = config.load(TINY, list(overrides))
    optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg.optim, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    for _ in range(step):
        optimizer.step()
        scheduler.step()
    return scheduler.get_last_lr()[0]


def test_an_accepted_lr_drives_the_schedule_from_the_resume_step(trained, tmp_path):
    shards, _, source = trained
    run_dir = _copy(source, tmp_path)
    extra = ("train.max_steps=10", "optim.lr=0.03", "checkpoint.accept_changes=[optim.lr]")
    result = run_cli(_args(shards, run_dir, *extra), cli_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resume: optim.lr changed 0.003 -> 0.03" in result.stderr
    logged = {
        r["step"]: r["train/lr"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if r["event"] == "train"
    }
    # Before the resume: the old lr over 6 max steps; after it: the new lr over 10.
    assert logged[6] == pytest.approx(_lr_at(6, "optim.lr=0.003", "train.max_steps=6"))
    for step in (7, 8, 10):
        assert logged[step] == pytest.approx(_lr_at(step, "optim.lr=0.03", "train.max_steps=10"))
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert state["contract"]["optim.lr"] == 0.03
    assert {g["initial_lr"] for g in state["optimizer"]["param_groups"]} == {0.03}


def test_an_accepted_new_validation_set_starts_best_afresh(trained, tmp_path):
    shards, other, source = trained
    run_dir = _copy(source, tmp_path)
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["best"]["step"] in (3, 6)
    extra = (
        f"data.val={other}/val-*.tar",
        "train.max_steps=9",
        "checkpoint.accept_changes=[data.val]",
    )
    result = run_cli(_args(shards, run_dir, *extra), cli_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "best auroc starts afresh: the validation set (data.val) changed" in result.stderr
    best = checkpoint.load(run_dir / "checkpoints" / "last.pt")["best"]
    assert best["step"] == 9  # the only evaluation on the new set


def test_a_changed_optimizer_and_schedule_are_refused_unless_accepted(trained, tmp_path):
    shards, _, source = trained
    run_dir = _copy(source, tmp_path)
    change = ("train.max_steps=8", "optim.name=sgd", "optim.schedule=constant")
    refused = run_cli(_args(shards, run_dir, *change), cli_env(tmp_path))
    assert refused.returncode == 2, refused.stderr[-3000:]
    lines = refused.stderr.strip().splitlines()
    assert sorted(lines[-2:]) == [
        "  optim.name: adamw -> sgd",
        "  optim.schedule: cosine -> constant",
    ]
    accept = "checkpoint.accept_changes=[optim.name,optim.schedule]"
    result = run_cli(_args(shards, run_dir, *change, accept), cli_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    # AdamW's moments mean nothing to SGD: the new optimizer starts from fresh state.
    assert "optim.name adamw -> sgd: the optimizer state starts fresh" in result.stderr
    logged = {
        r["step"]: r["train/lr"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if r["event"] == "train"
    }
    assert logged[7] == logged[8] == pytest.approx(0.003)  # constant after the warm-up
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 8 and state["contract"]["optim.name"] == "sgd"
    assert {(g["momentum"], g["nesterov"]) for g in state["optimizer"]["param_groups"]} == {
        (0.9, True)
    }
