"""The dynamic guard: fires on every bounded head, never on a healthy model.

The healthy matrix trains our own model from step 0 with `guard.dynamic=error` and the
logit check on every step: the tiny, default and volume3d configs x 3 seeds x balanced and
1:100 data (small batches, few steps). The zoo's bad heads must all be caught by the range
probe at train start; its good heads must pass it and the batch check.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zoo_heads as zoo
from torch import nn

from pipeline import config, guard
from pipeline.errors import BoundedHeadError
from pipeline.model import build_model
from pipeline.train import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["tiny", "default", "volume3d"]


def real_crops(dims: int, batch: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """Crops of synthetic candidates as the device transform makes them: [0, 1], 3 scales."""
    from pipeline.data.synthetic import render_candidates

    rng = np.random.default_rng(seed)
    patches, _, _ = render_candidates(rng, batch, dims, 48, positive_fraction=0.5)
    x = torch.from_numpy(patches).float() / 255
    crops = []
    for size in (16, 32, 48):
        lo = (48 - size) // 2
        crops.append(x[(..., *[slice(lo, lo + size)] * dims)])
    return crops


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("head", zoo.BAD, ids=lambda c: c.__name__)
def test_range_probe_fires_on_every_bad_zoo_head(head, dims):
    torch.manual_seed(0)
    message = guard.check_range(head(), real_crops(dims, batch=4))
    assert message is not None and "the model's output is bounded" in message
    assert "never goes below" in message or "never goes above" in message
    assert "Return the raw logit" in message and "\n" not in message


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("head", zoo.GOOD, ids=lambda c: c.__name__)
def test_good_zoo_heads_pass_the_range_probe_and_the_batch_check(head, seed):
    torch.manual_seed(seed)
    model = head()
    crops = real_crops(2, seed=seed)
    assert guard.check_range(model, crops) is None
    model.train()  # training mode: DropoutHead zeroes logits here
    with torch.no_grad():
        assert guard.check_logits(model(*crops)) is None
        assert guard.check_validation_probs(torch.sigmoid(model.eval()(*crops))) is None


class FnHead(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fc = nn.Linear(zoo.FEATURES, 1)
        self.fn = fn

    def forward(self, x16, x32, x48):
        return self.fn(self.fc(zoo.pooled(x16, x32, x48)))


def test_range_probe_catches_a_bound_the_static_walk_cannot_prove():
    # Arithmetic ends the static walk (no guessing), but relu(x) - 1 >= -1: p >= 0.27.
    for fn in (lambda x: F.relu(x) - 1, lambda x: torch.where(x > 0, x, 0.0)):
        model = FnHead(fn)
        assert guard.check_static(model, real_crops(2, batch=4)) is None
        message = guard.check_range(model, real_crops(2, batch=4))
        assert message is not None and "never goes below" in message
    for fn in (lambda x: x**3, F.leaky_relu, lambda x: 3 * x - 2):
        assert guard.check_range(FnHead(fn), real_crops(2, batch=4)) is None


def test_range_probe_leaves_modes_and_batchnorm_statistics_alone():
    model = build_model(dims=2, in_channels=1, scales=[16, 32, 48], width=4, depth=2)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert guard.check_range(model, real_crops(2, batch=4)) is None
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.overrides._get_current_function_mode_stack() == []


CLIPPING = [
    zoo.ReluHead,
    zoo.Relu6Head,
    zoo.ClampHead,
    zoo.SoftmaxHead,
    zoo.InplaceReluSqueezeHead,
    zoo.UntraceableReluHead,
]


@pytest.mark.parametrize("head", CLIPPING, ids=lambda c: c.__name__)
def test_batch_and_validation_checks_fire_on_heads_that_clip_to_a_value(head):
    torch.manual_seed(0)
    with torch.no_grad():
        logits = head()(*real_crops(2))
    assert "exactly at one value" in guard.check_logits(logits)
    assert "GUARD:" in guard.check_validation_probs(torch.sigmoid(logits))


def test_batch_check_sees_the_seed_relu_signature_not_the_side_of_zero():
    gen = torch.Generator().manual_seed(1)
    clipped = F.relu(torch.randn(64, generator=gen) - 1.5)  # ~93 % exactly 0
    message = guard.check_logits(clipped)
    assert message is not None and f"{int((clipped == 0).sum())} of 64" in message
    assert "(logits >= 0)" in message
    # All positive, or all negative, but distinct: an untrained or imbalanced healthy model.
    assert guard.check_logits(torch.rand(64, generator=gen) + 0.1) is None
    assert guard.check_logits(-torch.rand(64, generator=gen)) is None
    assert guard.check_logits(torch.rand(8)) is None  # too few to say anything
    # A dead model (one value, not a known bound) is not a bounded head.
    assert guard.check_logits(torch.full((64,), 0.3172)) is None
    # Dropout p=0.5 on positive logits: about half exactly 0, under the mass needed.
    dropped = F.dropout(torch.rand(64, generator=gen) + 0.1, 0.5, training=True)
    assert 0 < int((dropped == 0).sum()) < 48 and guard.check_logits(dropped) is None


def test_validation_check_is_silent_on_healthy_one_sided_and_saturated_probabilities():
    gen = torch.Generator().manual_seed(2)
    assert guard.check_validation_probs(torch.sigmoid(-3 * torch.rand(500, generator=gen))) is None
    assert guard.check_validation_probs(torch.sigmoid(torch.rand(500, generator=gen))) is None
    saturated = torch.sigmoid(torch.cat([torch.full((300,), 30.0), torch.randn(200)]))
    assert (saturated == 1).sum() == 300 and guard.check_validation_probs(saturated) is None
    assert guard.check_validation_probs(np.array([0.5] * 10)) is None  # too few


def test_the_loop_stops_a_bounded_head_at_step_0_in_error_mode(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))
    cfg = config.load(
        ROOT / "configs" / "tiny.yaml",
        [
            "model.target=tests.zoo_heads:SigmoidModuleHead",
            "guard.allow_bounded_head=true",
            "guard.dynamic=error",
            *small_data(2, 0.25),
            f"run.dir={tmp_path / 'run'}",
        ],
    )
    with pytest.raises(BoundedHeadError, match="never goes below 0 and above 1"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def small_data(dims: int, positive_fraction: float) -> list[str]:
    return [
        f"data.synthetic.train={256 if dims == 2 else 64}",
        f"data.synthetic.val={64 if dims == 2 else 16}",
        f"data.synthetic.positive_fraction={positive_fraction}",
        "data.synthetic.block_size=32",
        "data.synthetic.shards=2",
        "data.num_workers=0",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("positive_fraction", [0.5, 0.01], ids=["balanced", "1:100"])
@pytest.mark.parametrize("name", CONFIGS)
def test_healthy_model_never_trips_the_dynamic_guard(name, positive_fraction, tmp_path, caplog):
    """Our model, 3 seeds, from step 0: the range probe, every step's batch, the validation."""
    dims = 3 if name == "volume3d" else 2
    common = [
        *small_data(dims, positive_fraction),
        "guard.dynamic=error",
        "guard.check_every=1",
        f"train.batch_size={2 if dims == 3 else 16}",
        f"train.max_steps={2 if dims == 3 else 5}",
        "optim.warmup_steps=1",  # the configs' warm-ups are longer than these runs
        "train.threads=1",
        "train.eval_every=0",
        "train.log_every=1",
        "checkpoint.every_steps=1000",
        "wandb.mode=disabled",
        f"data.synthetic.dir={tmp_path / 'shards'}",
    ]
    for seed in (0, 1, 2):
        run = tmp_path / f"run{seed}"
        cfg = config.load(
            ROOT / "configs" / f"{name}.yaml", [*common, f"train.seed={seed}", f"run.dir={run}"]
        )
        with caplog.at_level(logging.WARNING, logger="pipeline"):
            train(cfg)  # guard.dynamic=error: a batch or range alarm raises
        rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
        warnings = [r["message"] for r in rows if r["event"] == "warning"]
        assert not [w for w in warnings if "guard" in w.lower()], (name, seed, warnings)
        assert "guard" not in caplog.text.lower(), caplog.text
        assert any(r["event"] == "eval" for r in rows)  # the validation check ran
