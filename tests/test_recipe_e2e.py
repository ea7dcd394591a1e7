"""The 3D recipe preset under torchrun with 2 processes, stopped and resumed, then TTA.

One run for what issue 16 asks of every recipe feature beyond its own tests: 3D, two
ranks, a resume. `configs/nodules3d.yaml` brings balanced batches, translation, rotation,
scaling, intensity and noise augmentation, EMA and early stopping on CPM; the overrides
add focal loss, label smoothing, SGD with Nesterov and a step schedule, so the other
optimizer and loss take the same path. The resume contract must accept the resumed run
(same config), both ranks must end at the same step, and `pipeline evaluate` must score
the EMA weights with 3D test-time flips.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import checkpoint
from tests.conftest import ROOT, cli_env, run_cli, run_torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards_3d(tmp_path_factory) -> Path:
    from pipeline.data.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("recipe3d")
    make_synthetic(out, dims=3, n_train=96, n_val=32, positive_fraction=0.1, seed=0,
                   block_size=8, train_shards=4, val_shards=2, workers=1, progress=False,
                   size=64, difficulty="hard")  # fmt: skip
    return out


def _args(shards: Path, run: Path, *extra: str) -> list[str]:
    return [
        "train", "--config", str(ROOT / "configs" / "nodules3d.yaml"),
        f"data.train={shards}/train-*.tar", f"data.val={shards}/val-*.tar", f"run.dir={run}",
        "data.window=[0,255]",  # synthetic uint8 volumes, not HU
        "data.num_workers=0", "model.preset=small", "train.batch_size=4",
        "train.max_steps=6", "optim.warmup_steps=1", "train.eval_every=3",
        "checkpoint.every_steps=3", "train.log_every=1", "wandb.mode=disabled",
        "loss.name=focal", "loss.focal_alpha=0.5", "loss.label_smoothing=0.05",
        "optim.name=sgd", "optim.lr=0.01", "optim.schedule=step", "dist.timeout_s=60",
        *extra,
    ]  # fmt: skip


def test_the_3d_recipe_trains_on_two_ranks_resumes_and_evaluates_with_tta(shards_3d, tmp_path):
    run, env = tmp_path / "run", cli_env(tmp_path)
    first = run_torchrun(2, _args(shards_3d, run, "train.stop_at_step=3"), env, 600)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_torchrun(2, _args(shards_3d, run), env, 600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 3" in second.stderr, second.stderr[-3000:]
    assert "from the positives reservoir" in second.stderr  # balanced batches are on

    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ends = [e for e in events if e["event"] == "end"]
    assert [e["steps_per_rank"] for e in ends] == [[3, 3], [6, 6]]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [3, 6]
    assert all("val/cpm_candidate" in e and "val/loss" in e for e in evals)
    state = checkpoint.load(run / "checkpoints" / "last.pt")
    assert state["step"] == 6 and "ema" in state
    assert state["optimizer"]["param_groups"][0]["nesterov"] is True
    assert any(key != "step" for key in state["ema"])

    scored = run_cli(["evaluate", "--checkpoint", str(run / "checkpoints" / "last.pt"),
                      "predict.tta=flips"], env, 300)  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert 0.0 <= json.loads(scored.stdout)["auroc"] <= 1.0, scored.stdout
    assert "using its EMA weights" in scored.stderr
