"""EMA of the weights: the formula after one real step, and the EMA weights are what
validation scored, what best.pt holds and what `load_trained`/export use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.evaluate import predict_shards
from pipeline.export import export
from pipeline.inference import load_trained
from pipeline.train_state import build_train_state
from tests.faults import small_shards
from tests.inproc import saved, tiny_config, train_tiny

DECAY = 0.9
FIRST = 0.1  # the decay of the first update: min(DECAY, (1 + 0) / (10 + 0)), the warm-up


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return small_shards(tmp_path_factory.mktemp("ema_shards"), n_train=96, n_val=48)


@pytest.fixture(scope="module")
def one_step(shards, tmp_path_factory):
    """One optimizer step with EMA on (eval at the end writes best.pt)."""
    tmp = tmp_path_factory.mktemp("ema_run")
    mp = pytest.MonkeyPatch()
    mp.setenv("PIPELINE_CACHE", str(tmp / "cache"))
    extra = (f"model.ema_decay={DECAY}", "train.max_steps=1", "optim.warmup_steps=0")
    result = train_tiny(shards, tmp / "run", *extra)
    initial = build_train_state(tiny_config(shards, tmp / "run", *extra), torch.device("cpu"),
                                "fp32", 0).model.state_dict()  # fmt: skip
    yield tmp / "run", result, initial
    mp.undo()


def test_ema_after_one_step_is_the_blend_of_init_and_trained_weights(one_step):
    run_dir, result, initial = one_step
    assert result["step"] == 1
    state = saved(run_dir)
    raw, ema = state["model"], state["ema"]
    assert set(raw) == set(ema) == set(initial)
    moved = 0.0
    for key, w1 in raw.items():
        if not w1.is_floating_point():  # num_batches_tracked: copied, not blended
            assert torch.equal(ema[key], w1), key
            continue
        want = FIRST * initial[key] + (1 - FIRST) * w1
        assert torch.allclose(ema[key], want, rtol=0, atol=1e-6), key
        moved = max(moved, float((ema[key] - w1).abs().max()))
    assert moved > 1e-4, "EMA equals the raw weights: it did not average"
    assert any("running_mean" in k for k in ema), "BatchNorm statistics are not in the EMA"


def test_validation_best_pt_and_export_use_the_ema_weights(one_step, shards, tmp_path):
    run_dir, _, _ = one_step
    best, last = saved(run_dir, "best.pt"), saved(run_dir)
    for key in best["ema"]:
        assert torch.equal(best["ema"][key], last["ema"][key]), key

    cfg, model, _ = load_trained(str(run_dir / "checkpoints" / "best.pt"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, best["ema"][key]), f"{key}: inference did not load the EMA"
    val = sorted(str(p) for p in shards.glob("val-*.tar"))
    ours = predict_shards(model, cfg, val, torch.device("cpu"))
    logged = np.load(run_dir / "eval" / "predictions-step-00000001.npz")
    order = {i: n for n, i in enumerate(ours.ids)}
    again = ours.logits[[order[str(i)] for i in logged["ids"]]]
    np.testing.assert_allclose(logged["logits"], again, rtol=0, atol=1e-5)

    raw_model = load_trained(str(run_dir / "checkpoints" / "best.pt"))[1]
    raw_model.load_state_dict(best["model"])
    crops = [torch.randn(3, 1, s, s, generator=torch.Generator().manual_seed(s))
             for s in cfg.data.scales]  # fmt: skip
    out = tmp_path / "model.pt"
    export(str(run_dir / "checkpoints" / "best.pt"), "torchscript", out)
    graph = torch.jit.load(str(out))
    with torch.no_grad():
        got, want, raw = graph(*crops), model(*crops), raw_model(*crops)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert float((got - raw).abs().max()) > 1e-4, "raw and EMA weights give the same logits"


def test_a_skipped_step_leaves_the_average_alone_without_a_host_read():
    # The gate is the step's device-side `finite`; reading it would be a host sync.
    from pipeline.ema import Ema
    from tests.test_step_syncs import CountHostReads

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    ema = Ema(model, DECAY)
    model(torch.randn(8, 4))  # BatchNorm statistics and its counter move
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with CountHostReads() as counter:
        ema.update(model, torch.tensor(False))
    assert counter.count == 0
    assert all(torch.equal(before[k], v) for k, v in ema.module.state_dict().items())
    decay = ema.current_decay()
    assert decay == pytest.approx(2 / 11)  # the warm-up: min(DECAY, (1 + 1) / (10 + 1))
    ema.update(model, torch.tensor(True))
    now, current = ema.module.state_dict(), model.state_dict()
    for key, value in now.items():
        want = current[key] if not value.is_floating_point() else (
            decay * before[key] + (1 - decay) * current[key])  # fmt: skip
        assert torch.allclose(value, want, rtol=0, atol=1e-6), key
