"""The logit guard: refuse models whose output cannot be a logit (the ReLU->sigmoid bug).

The seed ended in `F.relu(self.fc_last_2(out))`: after the sigmoid every p >= 0.5, yet the
loss falls a little and nothing crashes. `check_static` runs one forward under a
TorchFunctionMode that records which torch op produced each tensor, from which inputs, in
which module. From the output it walks back through shape-only ops (view, squeeze,
getitem, eval dropout, casts) to the last affine op (linear, conv, matmul). An op on that
path whose range keeps sigmoid(output) from going below 1% or above 99% is refused:
>= 0 (ReLU, ReLU6, Softplus, abs, exp, even pow, clamp(min>=0)), [0, 1] (sigmoid, softmax),
[-1, 1] (tanh, softsign, hardtanh), <= 0 (log-sigmoid, log-softmax), or bounded below
near 0 (GELU, SiLU, ELU, SELU, Mish, Hardswish). LeakyReLU and clamp(-10, 10) pass.

Not torch.fx: it cannot trace data-dependent control flow (`if x.sum() > 0:`), common in
user models, while recording the real forward works for any model that runs (it sees the
branch taken for the example crops). Arithmetic (add, mul, batch_norm, ...) ends the walk
with no finding: `relu(x) - 1` needs range arithmetic, and a false refusal is worse than a
miss that the dynamic checks (`check_logits`, `check_validation_probs`) still catch.
"""

from __future__ import annotations

import math
import os
import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from pipeline.errors import BoundedHeadError

INF = math.inf
# sigmoid(-4.6) = 1%: a head whose output can never go below this (or above +4.6) cannot
# say "surely negative" (or "surely positive"), which a 1:600 imbalance demands.
_LOGIT_LIMIT = math.log(0.01 / 0.99)


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


_AFFINE = _names(
    "linear bilinear conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d "
    "matmul mm bmm addmm baddbmm addmv mv einsum tensordot dot inner"
)
# Ops that keep the values (shape, dtype, device, eval-mode dropout): the walk goes through.
_NEUTRAL = _names(
    "view view_as reshape reshape_as squeeze unsqueeze flatten unflatten ravel getitem select "
    "narrow contiguous clone detach float double half bfloat16 to type type_as cpu cuda t "
    "transpose permute movedim expand expand_as dropout dropout1d dropout2d dropout3d "
    "alpha_dropout feature_alpha_dropout"
)
_RANGES = {  # output range -> ops with that fixed range (argument-dependent ones: _bounds)
    (0, INF): "relu softplus abs square exp exp2 sqrt",
    (0, 6): "relu6",
    (0, 1): "sigmoid hardsigmoid softmax softmin",
    (-INF, 0): "log_softmax log_sigmoid logsigmoid",
    (-1, 1): "tanh softsign erf",
    (-1, INF): "expm1",
    (-0.17, INF): "gelu",
    (-0.279, INF): "silu",
    (-0.309, INF): "mish",
    (-0.375, INF): "hardswish",
    (-1.759, INF): "selu",
}
_FIXED = {name: bounds for bounds, names in _RANGES.items() for name in _names(names)}
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


@dataclass
class GuardFinding:
    """The op that bounds the model's output, and where it runs."""

    op: str
    """e.g. `torch.nn.functional.relu`, `nn.Sigmoid`, `Tensor.clamp(min=0)`."""
    where: str
    """Module path or forward, source line, and the affine layer it follows."""
    message: str = ""
    """The full explanation with the fix (what BoundedHeadError carries)."""


@dataclass
class _Node:
    name: str  # normalised op name: "relu", "linear", "getitem", ...
    op: str  # what the user wrote, for the message
    place: str  # module path, or the model's forward
    source: str  # file:line in user code
    bounds: tuple[float, float] | None  # output range when the op bounds it
    inputs: list[_Node | None] = field(default_factory=list)
    call: int = -1  # position among the forward's torch calls (the range probe's handle)
    value: Tensor | None = None  # the output of an affine op (the range probe's scale)


def check_static(
    model: nn.Module, example_crops: Sequence[Tensor], allow_bounded_head: bool = False
) -> GuardFinding | None:
    """Refuse (BoundedHeadError) a model whose output passes through a bounding op.

    With `allow_bounded_head` the finding is returned for the caller to warn about.
    """
    finding = _find(model, example_crops)
    if finding is not None and not allow_bounded_head:
        raise BoundedHeadError(finding.message)
    return finding


def _find(model: nn.Module, crops: Sequence[Tensor]) -> GuardFinding | None:
    recorder, out = record(model, crops)
    if not isinstance(out, Tensor):
        return None  # not our business: check_contract reports it
    bad, affine = _walk_back(recorder.node_of(out))
    if bad is None:
        return None
    where = f"{bad.place}, {bad.source}"
    if affine is not None:
        what = "" if affine.op.startswith("nn.") else f"{affine.op} in "
        where += f", after {what}{affine.place}"
    return GuardFinding(bad.op, where, _message(bad.op, where, bad.bounds))


def record(model: nn.Module, crops: Sequence[Tensor]) -> tuple[_Recorder, object]:
    """One eval-mode, no-grad forward that records each tensor's producing op; modes restored."""
    recorder = _Recorder()
    handles = []
    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(recorder.enter(path, module)))
        handles.append(module.register_forward_hook(recorder.leave, always_call=True))
    # eval(): BatchNorm must not update its running stats, dropout must not fire.
    training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), recorder:
            out = model(*crops)
    finally:
        for handle in handles:
            handle.remove()
        for module, was_training in training.items():
            module.training = was_training
    return recorder, out


def _walk_back(node: _Node | None) -> tuple[_Node | None, _Node | None]:
    """(bounding op closest to the output, the affine op before it) along the value path."""
    bad = None
    while node is not None and node.name not in _AFFINE:
        lo, hi = node.bounds or (-INF, INF)
        if lo > _LOGIT_LIMIT or hi < -_LOGIT_LIMIT:
            bad = bad or node
        elif node.name not in _NEUTRAL and node.bounds is None:
            return bad, None  # arithmetic or an unknown op: stop without guessing
        node = node.inputs[0] if node.inputs else None
    return bad, node


def _message(op: str, where: str, bounds: tuple[float, float]) -> str:
    lo, hi = bounds
    values = f">= {lo:g}" if hi == INF else f"<= {hi:g}" if lo == -INF else f"in [{lo:g}, {hi:g}]"
    if lo >= 0:
        effect = "sigmoid(output) >= 0.5 and no candidate can be predicted negative"
    elif hi <= 0:
        effect = "sigmoid(output) <= 0.5 and no candidate can be predicted positive"
    else:
        p_lo, p_hi = (1 / (1 + math.exp(-v)) for v in bounds)
        effect = f"sigmoid(output) stays in [{p_lo:.2f}, {p_hi:.2f}] and can never be confident"
    return (
        f"model output comes from {op} in {where}: its values are always {values}, so "
        f"{effect}. Fix: return the raw logit of the last Linear layer (no activation "
        "after it); the pipeline applies BCEWithLogitsLoss and reports sigmoid "
        "probabilities. Expert override: guard.allow_bounded_head=true."
    )


class _Recorder(TorchFunctionMode):
    """Maps every tensor made during the forward to the _Node (op) that produced it."""

    def __init__(self) -> None:
        super().__init__()
        # id -> (weakref, node): the weakref tells a live tensor from a recycled id.
        self.nodes: dict[int, tuple[weakref.ref, _Node]] = {}
        self.stack: list[tuple[str, nn.Module]] = []
        self.calls = 0

    def enter(self, path: str, module: nn.Module):
        return lambda _module, _args: self.stack.append((path, module))

    def leave(self, _module: nn.Module, _args: object, _out: object) -> None:
        self.stack.pop()

    def node_of(self, tensor: Tensor) -> _Node | None:
        ref, node = self.nodes.get(id(tensor), (None, None))
        return node if ref is not None and ref() is tensor else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)  # torch disables this mode inside, so no recursion
        self.calls += 1
        outs = _tensors([out])
        if outs:
            # Inputs resolve *before* the outputs are stored, so an in-place op points at
            # the tensor's previous producer rather than at itself.
            inputs = [self.node_of(t) for t in _tensors([*args, *kwargs.values()])]
            node = self._node(func, args, kwargs, inputs)
            node.call = self.calls
            if node.name in _AFFINE and isinstance(out, Tensor):
                node.value = out.detach()
            for o in outs:
                self.nodes[id(o)] = (weakref.ref(o), node)
        return out

    def _node(self, func, args, kwargs, inputs: list[_Node | None]) -> _Node:
        raw = getattr(func, "__name__", repr(func))
        name = raw.strip("_") if raw.startswith("__") else raw.rstrip("_")
        name = {"ipow": "pow", "imul": "mul", "rmul": "mul"}.get(name, name)
        bounds, detail = _bounds(name, args, kwargs)
        path, module = self.stack[-1]  # the root's pre-hook ran first, so never empty
        kind = type(module).__name__
        if type(module).__module__.startswith("torch.nn.modules") and not list(module.children()):
            op = f"nn.{kind}"  # nn.Sigmoid, nn.ReLU6, nn.Linear, ...
        elif getattr(F, raw, None) is func:
            op = f"torch.nn.functional.{raw}{detail}"
        elif getattr(torch, raw, None) is func:
            op = f"torch.{raw}{detail}"
        elif "Tensor" in getattr(func, "__qualname__", ""):
            op = f"Tensor.{raw}{detail}"
        else:
            op = f"{getattr(func, '__module__', None) or 'torch'}.{raw}{detail}"
        place = f"{path} ({kind})" if path else f"{kind}.forward"
        return _Node(name, op, place, _source(), bounds, inputs)


def _bounds(name: str, args: tuple, kwargs: dict) -> tuple[tuple[float, float] | None, str]:
    """Output range of a bounding op (None when unbounded) and its deciding arguments."""

    def arg(index: int, key: str, default: object = None) -> object:
        value = kwargs.get(key, args[index] if len(args) > index else default)
        if isinstance(value, Tensor) and value.numel() == 1:
            return value.item()
        return value if isinstance(value, (int, float)) else None

    if name in _FIXED:
        return _FIXED[name], ""
    if name in ("clamp", "clip", "clamp_min", "clamp_max", "hardtanh"):
        if name == "hardtanh":
            lo, hi = arg(1, "min_val", -1.0), arg(2, "max_val", 1.0)
        elif name in ("clamp_min", "clamp_max"):
            lo, hi = (arg(1, "min"), None) if name == "clamp_min" else (None, arg(1, "max"))
        else:
            lo, hi = arg(1, "min"), arg(2, "max")
        shown = ", ".join(f"{k}={v:g}" for k, v in (("min", lo), ("max", hi)) if v is not None)
        return (-INF if lo is None else lo, INF if hi is None else hi), f"({shown})"
    if name in ("elu", "celu") and arg(1, "alpha", 1.0) is not None:
        return (-arg(1, "alpha", 1.0), INF), ""
    slope = arg(1, "negative_slope", 0.01) if name == "leaky_relu" else None
    if slope is not None and slope <= 0:  # a zero slope is a ReLU
        return (0, INF), f"(negative_slope={slope:g})"
    if name == "mul" and len(args) == 2 and args[0] is args[1]:
        return (0, INF), " (x * x)"
    if name == "pow":
        base, exponent = args[0] if args else None, arg(1, "exponent")
        if isinstance(base, (int, float)) and base > 0:
            return (0, INF), f"({base:g} ** x)"
        if exponent is not None and float(exponent).is_integer() and int(exponent) % 2 == 0:
            return (0, INF), f"(exponent={exponent:g})"
    if name == "rpow" and len(args) == 2 and isinstance(args[1], (int, float)) and args[1] > 0:
        return (0, INF), f"({args[1]:g} ** x)"
    return None, ""


def _source() -> str:
    """file:line of the innermost user frame (outside torch and this file)."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(_TORCH_DIR) and path != __file__:
            rel = os.path.relpath(path) if path.startswith(os.getcwd()) else path
            return f"{rel}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def _tensors(values: Sequence[object]) -> list[Tensor]:
    """The tensors among `values`, looking one level into lists and tuples (torch.cat)."""
    flat = [v for x in values for v in (x if isinstance(x, (tuple, list)) else [x])]
    return [t for t in flat if isinstance(t, Tensor)]


# The dynamic checks live beside this file; they reuse the recorder above.
from pipeline.guard_dynamic import check_logits, check_range, check_validation_probs  # noqa: E402

__all__ = ["GuardFinding", "check_logits", "check_range", "check_static", "check_validation_probs"]
