"""The training losses on logits: focal loss reduces to BCE, matches its formula by hand,
stays finite at extreme logits (fp32 and bf16 autocast), and label smoothing moves targets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.config import LossConfig
from pipeline.losses import build_loss, smooth_targets

LOGITS = torch.tensor([-6.0, -2.0, -0.5, 0.0, 0.3, 1.5, 4.0, 9.0])
LABELS = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0])


def _loss(**cfg) -> nn.Module:
    pos_weight = cfg.pop("pos_weight", 3.0)
    return build_loss(LossConfig(**cfg), torch.tensor(pos_weight))


def test_default_bce_is_exactly_bce_with_logits_and_pos_weight():
    criterion = _loss()
    assert type(criterion) is nn.BCEWithLogitsLoss and float(criterion.pos_weight) == 3.0
    reference = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(3.0))(LOGITS, LABELS)
    assert torch.equal(criterion(LOGITS, LABELS), reference)  # bit-identical


@pytest.mark.parametrize("pos_weight", [1.0, 3.0, 50.0])
def test_focal_with_gamma_0_and_no_alpha_equals_bce_with_pos_weight(pos_weight):
    focal = _loss(name="focal", focal_gamma=0.0, pos_weight=pos_weight)
    bce = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight))
    torch.testing.assert_close(focal(LOGITS, LABELS), bce(LOGITS, LABELS), rtol=1e-6, atol=0)
    x = LOGITS.clone().requires_grad_(True)
    focal(x, LABELS).backward()
    y = LOGITS.clone().requires_grad_(True)
    bce(y, LABELS).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-9)


def _by_hand(x: float, y: int, gamma: float, alpha: float | None, pos_weight: float) -> float:
    """Lin et al.: -w (1 - p_t)^gamma log p_t, p_t the probability of the true class."""
    p = 1 / (1 + math.exp(-x))
    p_t = p if y == 1 else 1 - p
    weights = (pos_weight, 1.0) if alpha is None else (alpha, 1 - alpha)
    w = weights[0] if y == 1 else weights[1]
    return -w * (1 - p_t) ** gamma * math.log(p_t)


@pytest.mark.parametrize(
    "gamma,alpha",
    [(2.0, None), (2.0, 0.25), (0.5, None), (1.0, 0.9)],
)
def test_focal_value_matches_the_formula_worked_by_hand(gamma, alpha):
    # x = 0, y = 1, gamma 2, alpha 0.25: 0.25 * 0.5^2 * log 2 = 0.0433, and so on per sample.
    criterion = _loss(name="focal", focal_gamma=gamma, focal_alpha=alpha, pos_weight=3.0)
    for x, y in zip(LOGITS.tolist(), LABELS.tolist(), strict=True):
        got = float(criterion(torch.tensor([x]), torch.tensor([y])))
        assert got == pytest.approx(
            _by_hand(x, int(y), gamma, alpha, 3.0), rel=1e-4, abs=1e-12
        )  # fp32 BCE: ~1e-5 at tiny losses
    if (gamma, alpha) == (2.0, 0.25):
        got = float(criterion(torch.tensor([0.0]), torch.tensor([1.0])))
        assert got == pytest.approx(0.25 * 0.25 * math.log(2), rel=1e-6)
    mean = float(criterion(LOGITS, LABELS))
    hand = [
        _by_hand(x, int(y), gamma, alpha, 3.0)
        for x, y in zip(LOGITS.tolist(), LABELS.tolist(), strict=True)
    ]
    assert mean == pytest.approx(sum(hand) / len(hand), rel=1e-5)


def test_focal_down_weights_easy_examples_relative_to_bce():
    bce, focal = _loss(pos_weight=1.0), _loss(name="focal", pos_weight=1.0)
    easy, hard = torch.tensor([6.0]), torch.tensor([-2.0])  # both labelled 1
    one = torch.tensor([1.0])
    assert float(focal(easy, one)) / float(bce(easy, one)) < 1e-4
    assert float(focal(hard, one)) / float(bce(hard, one)) > 0.7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"name": "focal"},
        {"name": "focal", "focal_gamma": 0.5, "focal_alpha": 0.25},
        {"name": "focal", "label_smoothing": 0.1},
        {"label_smoothing": 0.1},
    ],
)
def test_losses_and_gradients_are_finite_at_logits_of_1e4(cfg, dtype):
    logits = torch.tensor([1e4, -1e4, 1e4, -1e4, 0.0], dtype=dtype, requires_grad=True)
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])  # right, right, wrong, wrong, unsure
    criterion = _loss(**cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = criterion(logits, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # Two confidently wrong samples cost about |logit| each (times the class weight).
    assert 1e3 < loss.item() < 1e5
    per_sample = [float(criterion(logits[i : i + 1].detach(), labels[i : i + 1])) for i in (0, 1)]
    if not cfg.get("label_smoothing"):
        assert per_sample == [0.0, 0.0]  # confidently right costs nothing


def test_label_smoothing_moves_targets_towards_one_half():
    targets = smooth_targets(torch.tensor([0.0, 1.0]), 0.1)
    torch.testing.assert_close(targets, torch.tensor([0.05, 0.95]))
    assert torch.equal(smooth_targets(LABELS, 0.0), LABELS)
    smoothed = _loss(label_smoothing=0.1, pos_weight=2.0)
    reference = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(2.0))
    expected = reference(LOGITS, LABELS * 0.9 + 0.05)
    torch.testing.assert_close(smoothed(LOGITS, LABELS), expected, rtol=1e-6, atol=0)
    # The smoothed loss is lowest at a finite logit: log(0.95 / 0.05), not at +infinity.
    grid = torch.linspace(0, 8, 801)
    best = grid[
        torch.stack([smoothed(torch.tensor([g]), torch.tensor([1.0])) for g in grid]).argmin()
    ]
    assert float(best) == pytest.approx(math.log(2 * 0.95 / 0.05), abs=0.02)
