"""The static logit guard refuses bounded heads by name and passes raw-logit heads.

The dynamic checks (range probe, batch and validation checks) are in test_guard_dynamic.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import zoo_heads as zoo
from torch import nn

from pipeline.errors import BoundedHeadError
from pipeline.guard import check_static
from pipeline.model import XceptionLike, build_model

ROOT = Path(__file__).resolve().parents[1]


def crops(batch: int = 4, dims: int = 2, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((batch, 1) + (s,) * dims, generator=gen) for s in (16, 32, 48)]


BAD_OPS = {
    zoo.ReluHead: "torch.nn.functional.relu",
    zoo.SigmoidModuleHead: "nn.Sigmoid",
    zoo.TorchSigmoidHead: "torch.sigmoid",
    zoo.SoftplusHead: "nn.Softplus",
    zoo.AbsHead: "Tensor.abs",
    zoo.Relu6Head: "nn.ReLU6",
    zoo.SquareHead: "Tensor.pow(exponent=2)",
    zoo.ExpHead: "Tensor.exp",
    zoo.ClampHead: "Tensor.clamp(min=0)",
    zoo.SoftmaxHead: "nn.Softmax",
    zoo.TanhHead: "torch.tanh",
    zoo.GeluHead: "nn.GELU",
    zoo.InplaceReluSqueezeHead: "nn.ReLU",
    zoo.UntraceableReluHead: "torch.nn.functional.relu",
}


def test_bad_op_table_covers_the_whole_bad_zoo():
    assert set(BAD_OPS) == set(zoo.BAD)


@pytest.mark.parametrize("head", zoo.BAD, ids=lambda c: c.__name__)
def test_bad_head_is_refused_with_a_one_line_message_naming_the_op(head):
    with pytest.raises(BoundedHeadError) as info:
        check_static(head(), crops())
    message = str(info.value)
    assert f"comes from {BAD_OPS[head]}" in message
    assert "\n" not in message  # the CLI prints user errors on one line
    assert "raw logit" in message and "BCEWithLogitsLoss" in message
    assert "guard.allow_bounded_head=true" in message
    assert "after fc_last_2 (Linear)" in message or "after head.2 (Linear)" in message


def test_seed_head_message_explains_p_at_least_half_and_points_at_the_forward_line():
    with pytest.raises(BoundedHeadError) as info:
        check_static(zoo.ReluHead(), crops())
    message = str(info.value)
    assert "always >= 0" in message and "sigmoid(output) >= 0.5" in message
    assert "predicted negative" in message
    line = (
        Path(zoo.__file__)
        .read_text()
        .splitlines()
        .index("        return F.relu(self.fc_last_2(out))")
    )
    assert f"ReluHead.forward, tests/zoo_heads.py:{line + 1}" in message


def test_model_that_fx_cannot_trace_is_still_caught():
    with pytest.raises(Exception):  # noqa: B017 - any fx failure proves the point
        torch.fx.symbolic_trace(zoo.UntraceableReluHead())
    with pytest.raises(BoundedHeadError, match="torch.nn.functional.relu"):
        check_static(zoo.UntraceableReluHead(), crops())
    assert check_static(zoo.UntraceableLinearHead(), crops()) is None


class FnHead(nn.Module):
    """Pooled crops -> Linear -> `fn`: one place to try every functional spelling."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fc = nn.Linear(zoo.FEATURES, 1)
        self.fn = fn

    def forward(self, x16, x32, x48):
        return self.fn(self.fc(zoo.pooled(x16, x32, x48)))


FUNCTIONAL_BAD = {
    "F.relu6": (F.relu6, "relu6"),
    "relu_": (lambda x: x.relu_(), "relu_"),
    "torch.abs": (torch.abs, "torch.abs"),
    "builtin abs": (abs, "abs"),
    "torch.pow": (lambda x: torch.pow(x, 4), "pow(exponent=4)"),
    "x * x": (lambda x: x * x, "x * x"),
    "2 ** x": (lambda x: 2**x, "2 ** x"),
    "torch.clamp": (lambda x: torch.clamp(x, 0), "clamp(min=0)"),
    "clamp_min": (lambda x: x.clamp_min(0.5), "clamp_min(min=0.5)"),
    "hardtanh": (lambda x: F.hardtanh(x, -1, 1), "hardtanh(min=-1, max=1)"),
    "leaky_relu(0)": (lambda x: F.leaky_relu(x, 0.0), "leaky_relu(negative_slope=0)"),
    "F.softplus": (F.softplus, "torch.nn.functional.softplus"),
    "F.logsigmoid": (F.logsigmoid, "log_sigmoid"),
    "F.elu": (F.elu, "torch.nn.functional.elu"),
    "F.silu": (F.silu, "silu"),
    "hardsigmoid": (F.hardsigmoid, "hardsigmoid"),
    "softmax then getitem": (lambda x: torch.softmax(x, dim=1)[:, 0], "softmax"),
    "sigmoid then float": (lambda x: x.sigmoid().float(), "Tensor.sigmoid"),
}


@pytest.mark.parametrize("fn, op", FUNCTIONAL_BAD.values(), ids=FUNCTIONAL_BAD.keys())
def test_functional_spellings_of_bounding_ops_are_refused(fn, op):
    with pytest.raises(BoundedHeadError) as info:
        check_static(FnHead(fn), crops())
    assert op in str(info.value)
    assert "after fc (Linear)" in str(info.value)


@pytest.mark.parametrize("head", zoo.GOOD, ids=lambda c: c.__name__)
def test_good_head_passes(head):
    assert check_static(head(), crops()) is None


FUNCTIONAL_GOOD = {
    "leaky_relu": F.leaky_relu,  # unbounded both ways
    "clamp(-10, 10)": lambda x: x.clamp(-10, 10),
    "cube": lambda x: x**3,
    "relu then shift": lambda x: F.relu(x) - 1,  # arithmetic ends the walk: no guessing
    "reshape + contiguous": lambda x: x.reshape(-1).contiguous(),
}


@pytest.mark.parametrize("fn", FUNCTIONAL_GOOD.values(), ids=FUNCTIONAL_GOOD.keys())
def test_unbounded_or_unprovable_outputs_pass(fn):
    assert check_static(FnHead(fn), crops()) is None


@pytest.mark.parametrize("dims", [2, 3])
def test_our_xception_like_passes_despite_relu_inside_its_head(dims):
    model = XceptionLike(dims=dims, width=4, depth=2, features=16, hidden=8)
    assert any(isinstance(m, nn.ReLU) for m in model.head)
    assert check_static(model, crops(batch=2, dims=dims)) is None


def test_allow_bounded_head_returns_the_finding_instead_of_raising():
    finding = check_static(zoo.SigmoidModuleHead(), crops(), allow_bounded_head=True)
    assert finding is not None
    assert finding.op == "nn.Sigmoid"
    assert finding.where.startswith("head.3 (Sigmoid)")
    assert "guard.allow_bounded_head=true" in finding.message
    assert check_static(zoo.LinearHead(), crops(), allow_bounded_head=True) is None


class BatchNormSigmoidHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(zoo.FEATURES, 8)
        self.norm = nn.BatchNorm1d(8)
        self.frozen = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 1)

    def forward(self, x16, x32, x48):
        hidden = self.frozen(self.norm(self.fc1(zoo.pooled(x16, x32, x48))))
        return torch.sigmoid(self.fc2(hidden))


def test_check_leaves_modes_batchnorm_stats_grads_and_outputs_untouched():
    model = BatchNormSigmoidHead()
    model.frozen.eval()  # a user's frozen norm must stay frozen
    stats = model.norm.running_mean.clone(), model.norm.num_batches_tracked.clone()
    inputs = crops(batch=8)
    model.eval()
    before = model(*inputs)
    model.train()
    model.frozen.eval()
    with pytest.raises(BoundedHeadError, match="torch.sigmoid"):
        check_static(model, inputs)
    assert model.training and model.norm.training and not model.frozen.training
    assert torch.equal(model.norm.running_mean, stats[0])
    assert torch.equal(model.norm.num_batches_tracked, stats[1])
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    model.eval()
    assert torch.equal(model(*inputs), before)


class BrokenHead(zoo.LinearHead):
    def forward(self, x16, x32, x48):
        raise RuntimeError("shape mismatch in the user's head")


def test_check_cleans_up_when_the_forward_fails():
    model = BrokenHead().train()
    with pytest.raises(RuntimeError, match="shape mismatch"):
        check_static(model, crops())
    assert model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert torch.overrides._get_current_function_mode_stack() == []


def test_user_model_loaded_by_import_path_passes_the_contract_but_not_the_guard(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    model = build_model(
        dims=2, in_channels=1, scales=[16, 32, 48], target="tests.zoo_heads:ReluHead"
    )
    with pytest.raises(BoundedHeadError, match="fc_last_2"):
        check_static(model, crops())
