"""Optimizers and LR schedules: the lr each schedule gives at chosen steps, SGD with Nesterov
momentum updating as its formula says, and a warm-up that cannot finish refused at load."""

from __future__ import annotations

import pytest
import torch

from pipeline import config
from pipeline.config import OptimConfig
from pipeline.errors import ConfigError
from pipeline.optim import apply_optim_config, build_optimizer, build_scheduler

CPU = torch.device("cpu")


def _lrs(cfg: OptimConfig, max_steps: int) -> list[float]:
    """The lr used at steps 0 .. max_steps (the real optimizer and scheduler, stepped)."""
    optimizer = build_optimizer(torch.nn.Linear(2, 1), cfg, CPU)
    scheduler = build_scheduler(optimizer, cfg, max_steps)
    out = []
    for _ in range(max_steps + 1):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


def test_cosine_warms_up_linearly_then_decays_to_min_lr_ratio():
    lrs = _lrs(OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1), 20)
    # Warm-up (s + 1) / 5; then 0.1 + 0.9 * (1 + cos(pi * (s - 4) / 16)) / 2.
    assert lrs[0] == pytest.approx(0.2) and lrs[3] == pytest.approx(0.8)
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[12] == pytest.approx(0.55)
    assert lrs[20] == pytest.approx(0.1)


def test_step_schedule_drops_by_gamma_at_each_milestone_fraction():
    cfg = OptimConfig(
        lr=1.0, warmup_steps=4, schedule="step", step_milestones=[0.5, 0.75], step_gamma=0.1
    )
    lrs = _lrs(cfg, 20)  # milestones at steps 10 and 15
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == lrs[9] == pytest.approx(1.0)
    assert lrs[10] == lrs[14] == pytest.approx(0.1)
    assert lrs[15] == lrs[20] == pytest.approx(0.01)


def test_constant_schedule_holds_the_peak_after_the_warm_up():
    lrs = _lrs(OptimConfig(lr=0.5, warmup_steps=1, schedule="constant"), 10)
    assert lrs[0] == pytest.approx(0.25)
    assert lrs[1:] == [pytest.approx(0.5)] * 10


def test_sgd_with_nesterov_momentum_steps_as_its_formula_says():
    cfg = OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.0, warmup_steps=0)
    model = torch.nn.Linear(3, 1, bias=False)
    optimizer = build_optimizer(model, cfg, CPU)
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["nesterov"] and optimizer.param_groups[0]["momentum"] == 0.9
    w = model.weight.detach().clone()
    buf = torch.zeros_like(w)
    for _ in range(3):
        optimizer.zero_grad()
        (model.weight**2).sum().backward()  # gradient 2 w
        grad = 2 * w
        # Nesterov: buf = m buf + g; step along g + m buf.
        buf = 0.9 * buf + grad
        w = w - 0.1 * (grad + 0.9 * buf)
        optimizer.step()
        torch.testing.assert_close(model.weight.detach(), w)


def test_apply_optim_config_sets_sgd_momentum_and_the_new_peak():
    cfg = OptimConfig(name="sgd", lr=0.1, warmup_steps=0, schedule="constant")
    optimizer = build_optimizer(torch.nn.Linear(2, 1), cfg, CPU)
    scheduler = build_scheduler(optimizer, cfg, 10)
    changed = OptimConfig(name="sgd", lr=0.3, momentum=0.5, nesterov=False, warmup_steps=0,
                          schedule="constant")  # fmt: skip
    apply_optim_config(optimizer, scheduler, changed)
    for group in optimizer.param_groups:
        assert (group["lr"], group["momentum"], group["nesterov"]) == (0.3, 0.5, False)
        assert "betas" not in group
    assert optimizer.param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("warmup,steps", [(300, 300), (500, 300), (5, 2)])
def test_a_warm_up_that_cannot_finish_is_a_one_line_config_error(warmup, steps):
    with pytest.raises(ConfigError) as err:
        config.load(None, [f"optim.warmup_steps={warmup}", f"train.max_steps={steps}"])
    message = str(err.value)
    assert "optim.warmup_steps" in message and f"train.max_steps ({steps})" in message
    assert "\n" not in message
    config.load(None, [f"optim.warmup_steps={steps - 1}", f"train.max_steps={steps}"])


@pytest.mark.parametrize(
    "override,words",
    [
        ("optim.step_milestones=[0.8,0.5]", ["optim.step_milestones", "increasing"]),
        ("optim.step_milestones=[0.5,1.0]", ["optim.step_milestones", "(0, 1)"]),
        ("optim.momentum=1.0", ["optim.momentum", "[0, 1)"]),
        ("optim.step_gamma=0", ["optim.step_gamma"]),
    ],
)
def test_bad_schedule_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        config.load(None, [override])
    assert all(w in str(err.value) for w in words), str(err.value)


def test_sgd_nesterov_without_momentum_says_what_to_do():
    with pytest.raises(ConfigError, match="optim.nesterov: needs optim.momentum > 0"):
        config.load(None, ["optim.name=sgd", "optim.momentum=0"])
    config.load(None, ["optim.name=sgd", "optim.momentum=0", "optim.nesterov=false"])
