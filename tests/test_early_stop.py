"""Early stopping on validation loss: the stop step follows from the logged evaluations,
a resume of a stopped run stops at once, a raised patience trains on, and under torchrun
both ranks end at the same step (with EMA on)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import cli_env, run_torchrun, train_args
from tests.faults import small_shards
from tests.inproc import saved, train_tiny

PATIENCE = 2
STOP_ON_LOSS = ("checkpoint.metric=loss", f"train.early_stop_patience={PATIENCE}",
                "train.eval_every=2", "train.max_steps=24")  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return small_shards(tmp_path_factory.mktemp("early_stop_shards"), n_train=96, n_val=48)


def _events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == kind]


def _expected_stop(losses: list[float], patience: int) -> int | None:
    """Index of the evaluation after which `patience` in a row did not lower the loss."""
    best, since = None, 0
    for index, loss in enumerate(losses):
        best, since = (loss, 0) if best is None or loss < best else (best, since + 1)
        if since >= patience:
            return index
    return None


def test_early_stop_on_validation_loss_and_a_resume_that_stops_at_once(shards, tmp_path,
                                                                       monkeypatch, capsys):  # fmt: skip
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    result = train_tiny(shards, run_dir, *STOP_ON_LOSS)
    evals = _events(run_dir, "eval")
    losses = [e["val/loss"] for e in evals]  # validation loss is logged at every evaluation
    index = _expected_stop(losses, PATIENCE)
    assert index is not None, f"the loss improved at every evaluation: {losses}"
    step = evals[index]["step"]
    assert result["step"] == step < 24 and result["early_stopped"], (result, losses)
    assert not result["stopped"]  # a finished run: sweeps and cv do not resume it
    assert len(evals) == index + 1  # nothing after the stop
    best = min(losses[: index + 1])
    best_step = evals[losses.index(best)]["step"]
    out = capsys.readouterr().out
    assert (f"early stop at step {step}: no improvement of loss for {PATIENCE} evaluations, "
            f"best {best:.4g} at step {best_step}") in out  # fmt: skip
    [event] = _events(run_dir, "early_stop")
    assert event["step"] == step and event["best_step"] == best_step
    state = saved(run_dir)
    assert state["step"] == step and state["best"]["since"] == PATIENCE

    again = train_tiny(shards, run_dir, *STOP_ON_LOSS)
    assert again["step"] == step and again["early_stopped"]
    assert len(_events(run_dir, "eval")) == len(evals), "the resumed run trained again"
    assert f"this run stopped early at step {step}" in capsys.readouterr().err

    more = train_tiny(shards, run_dir, *STOP_ON_LOSS[:-2], "train.early_stop_patience=50",
                      f"train.max_steps={step + 2}")  # fmt: skip
    assert more["step"] == step + 2 and not more["early_stopped"]


@pytest.mark.slow
def test_two_ranks_fine_tuned_with_ema_and_frozen_branches_stop_early_at_the_same_step(
    shards, tmp_path, monkeypatch
):
    """One torchrun run for the DDP side of §3: init_from on every rank, frozen branches
    under DDP, EMA, and the early stop agreed by both ranks."""
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "source"
    train_tiny(shards, source, "model.ema_decay=0.5", "train.max_steps=1", "optim.warmup_steps=0")
    run_dir = tmp_path / "run"
    args = train_args(shards, run_dir, "train.batch_size=8", "model.ema_decay=0.9",
                      f"model.init_from={source}", "model.freeze_steps=2",
                      "checkpoint.every_steps=2", "checkpoint.keep_last=20",
                      "dist.timeout_s=60", *STOP_ON_LOSS)  # fmt: skip
    result = run_torchrun(2, args, cli_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model.init_from: " in result.stderr and "EMA weights" in result.stderr
    evals = _events(run_dir, "eval")
    index = _expected_stop([e["val/loss"] for e in evals], PATIENCE)
    assert index is not None
    step = evals[index]["step"]
    assert step < 24 and f"early stop at step {step}:" in result.stdout
    [end] = _events(run_dir, "end")
    # Finished, not stopped on request: sweeps and cv must not resume it.
    assert end["steps_per_rank"] == [step, step] and end["early_stopped"] and not end["stopped"]
    state = saved(run_dir)
    assert state["step"] == step and state["ema_updates"] == step + 1
    origin, frozen = saved(source)["ema"], saved(run_dir, "step-00000002.pt")["model"]
    branches = [k for k in frozen if k.startswith("branches.") and k.endswith("weight")]
    assert branches and all(torch.equal(frozen[k], origin[k]) for k in branches)
    assert any(not torch.equal(state["model"][k], origin[k]) for k in branches)


def test_the_count_resets_on_a_new_best_counts_nan_and_skips_unmeasured_metrics():
    from pipeline.validation import BestMetric

    best = BestMetric("loss")  # auto: lower is better
    counts = []
    for value in (1.0, 0.9, 0.95, float("nan"), None, 0.9, 0.5):
        best.update({} if value is None else {"val/loss": value}, step=len(counts))
        counts.append(best.since)
    assert counts == [0, 0, 1, 2, 2, 3, 0]  # 0.9 again is no improvement
    restored = BestMetric("loss")
    restored.load_state_dict(best.state_dict())
    assert restored.since == 0 and restored.value == 0.5
    higher = BestMetric("loss", "max")
    for value in (1.0, 0.9):
        higher.update({"val/loss": value}, 0)
    assert higher.since == 1
