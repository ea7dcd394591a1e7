"""Fine-tuning: `model.init_from` copies another run's (EMA) weights and nothing else,
strict and partial loading, and `model.freeze_steps` holds the branches still for N steps."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from pipeline import finetune
from pipeline.errors import CheckpointError, ConfigError
from pipeline.train_state import build_train_state
from tests.faults import small_shards
from tests.inproc import saved, tiny_config, train_tiny

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return small_shards(tmp_path_factory.mktemp("finetune_shards"), n_train=96, n_val=48)


@pytest.fixture(scope="module")
def source(shards, tmp_path_factory) -> Path:
    """A two-step run with EMA on: the checkpoint fine-tuning starts from."""
    tmp = tmp_path_factory.mktemp("source")
    mp = pytest.MonkeyPatch()
    mp.setenv("PIPELINE_CACHE", str(tmp / "cache"))
    train_tiny(shards, tmp / "run", "model.ema_decay=0.5", "train.max_steps=2")
    mp.undo()
    return tmp / "run"


def _split(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(branch parameter names, head parameter names) of `model`."""
    names = [n for n, _ in model.named_parameters()]
    return [n for n in names if n.startswith("branches.")], [
        n for n in names if n.startswith("head.")
    ]


def test_init_from_takes_only_the_weights_and_freeze_holds_the_branches(source, shards, tmp_path,
                                                                          monkeypatch, capsys):  # fmt: skip
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))
    origin = saved(source, "best.pt")
    assert origin["step"] == 2 and "ema" in origin
    run_dir = tmp_path / "run"
    extra = (f"model.init_from={source}", "model.freeze_steps=2", "train.max_steps=3",
             "checkpoint.every_steps=1", "checkpoint.keep_last=5", "train.eval_every=0")  # fmt: skip
    train_tiny(shards, run_dir, *extra)
    assert "EMA weights, from" in capsys.readouterr().err
    steps = {n: saved(run_dir, f"step-{n:08d}.pt") for n in (1, 2, 3)}
    model = build_train_state(tiny_config(shards, run_dir), CPU, "fp32", 0).model
    branches, head = _split(model)

    for n in (1, 2):  # frozen: exactly the source's EMA weights; the head learns
        weights = steps[n]["model"]
        for name in branches:
            assert torch.equal(weights[name], origin["ema"][name]), f"step {n}: {name} moved"
        assert any(not torch.equal(weights[k], origin["ema"][k]) for k in head)
        # Copied, not re-initialised: one small step away from the source.
        assert max(float((weights[k] - origin["ema"][k]).abs().max()) for k in head) < 0.05
    # Not the source's step, optimizer or schedule: a fresh step 1, only the head in AdamW.
    first = steps[1]
    assert first["step"] == 1 and first["scheduler"]["last_epoch"] == 1
    moments = first["optimizer"]["state"]
    assert len(moments) == len(head) and all(float(s["step"]) == 1 for s in moments.values())
    # Unfrozen at step 3: the branches train.
    assert any(not torch.equal(steps[3]["model"][k], origin["ema"][k]) for k in branches)
    assert len(steps[3]["optimizer"]["state"]) == len(branches) + len(head)

    train_tiny(shards, run_dir, *extra[:2], "train.max_steps=4", "train.eval_every=0")
    assert "model.init_from ignored: a resume continues" in capsys.readouterr().err
    assert saved(run_dir)["step"] == 4


def test_strict_init_refuses_a_misfit_in_one_line_and_partial_loads_what_fits(source, shards,
                                                                              tmp_path, caplog):  # fmt: skip
    wide = build_train_state(tiny_config(shards, tmp_path, "model.width=8"), CPU, "fp32", 0).model
    with pytest.raises(CheckpointError) as refused:
        finetune.init_weights(wide, str(source / "checkpoints" / "best.pt"), strict=True)
    message = str(refused.value)
    assert "\n" not in message and "shape differs, checkpoint vs model" in message
    assert "branches.0.net.0.weight [4, 1, 3, 3] vs [8, 1, 3, 3]" in message

    origin = saved(source, "best.pt")["ema"]
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        loaded = finetune.init_weights(wide, str(source), strict=False)  # a run dir: best.pt
    lines = [r.getMessage() for r in caplog.records if "model.init_from" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("model.init_from: shape differs"), lines
    after = wide.state_dict()
    fits = [k for k in after if origin[k].shape == after[k].shape]
    misfits = [k for k in after if k not in fits]
    assert fits and misfits and f"{len(fits)} of {len(after)} tensors, EMA weights" in loaded
    assert all(torch.equal(after[k], origin[k]) for k in fits)
    assert all(torch.equal(after[k], before[k]) for k in misfits)


def test_freeze_steps_on_a_model_without_branches_is_a_config_error(shards, tmp_path):
    cfg = tiny_config(shards, tmp_path, "model.target=tests.zoo_heads:LinearHead",
                      "model.freeze_steps=3")  # fmt: skip
    state = build_train_state(cfg, CPU, "fp32", 0)
    with pytest.raises(ConfigError, match="model.freeze_steps: model.target tests.zoo_heads"):
        finetune.freeze_branches(state, cfg.model)
