"""A zoo of small three-input models for the logit guard, loadable as `model.target`.

BAD heads end in an op that makes the output non-negative or bounded (the ReLU->sigmoid
bug this project was born from); the guard must refuse each one and name the op. GOOD
heads return a raw logit and must pass. Every model pools each crop to four statistics,
so it accepts any channel count, 2D or 3D: `model.target=tests.zoo_heads:ReluHead`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEATURES = 12  # 3 crops x 4 statistics


def pooled(*crops: torch.Tensor) -> torch.Tensor:
    """[B, 12]: mean, std, max and min of each crop."""
    stats = []
    for crop in crops:
        flat = crop.flatten(1).float()
        stats += [flat.mean(1), flat.std(1), flat.amax(1), flat.amin(1)]
    return torch.stack(stats, dim=1)


class _TwoLayer(nn.Module):
    """Shared body: pooled features -> Linear -> ReLU (fine: it is *before* the last Linear)."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.fc_last_1 = nn.Linear(FEATURES, hidden)
        self.fc_last_2 = nn.Linear(hidden, 1)

    def hidden(self, x16: torch.Tensor, x32: torch.Tensor, x48: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc_last_1(pooled(x16, x32, x48)))


# --- BAD: the output passes through a non-negative or bounded op after the last Linear ---


class ReluHead(_TwoLayer):
    """The seed's exact head."""

    def forward(self, x16, x32, x48):
        out = self.hidden(x16, x32, x48)
        return F.relu(self.fc_last_2(out))


class SigmoidModuleHead(nn.Module):
    """nn.Sigmoid() last in a Sequential."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.head = nn.Sequential(
            nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid()
        )

    def forward(self, x16, x32, x48):
        return self.head(pooled(x16, x32, x48))


class TorchSigmoidHead(_TwoLayer):
    def forward(self, x16, x32, x48):
        return torch.sigmoid(self.fc_last_2(self.hidden(x16, x32, x48)))


class SoftplusHead(_TwoLayer):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__(hidden)
        self.act = nn.Softplus()

    def forward(self, x16, x32, x48):
        return self.act(self.fc_last_2(self.hidden(x16, x32, x48)))


class AbsHead(_TwoLayer):
    def forward(self, x16, x32, x48):
        return self.fc_last_2(self.hidden(x16, x32, x48)).abs()


class Relu6Head(_TwoLayer):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__(hidden)
        self.act = nn.ReLU6()

    def forward(self, x16, x32, x48):
        return self.act(self.fc_last_2(self.hidden(x16, x32, x48)))


class SquareHead(_TwoLayer):
    def forward(self, x16, x32, x48):
        return self.fc_last_2(self.hidden(x16, x32, x48)) ** 2


class ExpHead(_TwoLayer):
    def forward(self, x16, x32, x48):
        return self.fc_last_2(self.hidden(x16, x32, x48)).exp()


class ClampHead(_TwoLayer):
    def forward(self, x16, x32, x48):
        return self.fc_last_2(self.hidden(x16, x32, x48)).clamp(min=0)


class SoftmaxHead(_TwoLayer):
    """Softmax over a [B, 1] output: always exactly 1."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__(hidden)
        self.act = nn.Softmax(dim=1)

    def forward(self, x16, x32, x48):
        return self.act(self.fc_last_2(self.hidden(x16, x32, x48)))


class TanhHead(_TwoLayer):
    """Bounded to (-1, 1): probabilities stuck in [0.27, 0.73]."""

    def forward(self, x16, x32, x48):
        return torch.tanh(self.fc_last_2(self.hidden(x16, x32, x48)))


class GeluHead(_TwoLayer):
    """GELU >= -0.17: probabilities never below 0.46."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__(hidden)
        self.act = nn.GELU()

    def forward(self, x16, x32, x48):
        return self.act(self.fc_last_2(self.hidden(x16, x32, x48)))


class InplaceReluSqueezeHead(_TwoLayer):
    """In-place ReLU, then a shape-only squeeze: the guard must look through the squeeze."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__(hidden)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x16, x32, x48):
        return self.act(self.fc_last_2(self.hidden(x16, x32, x48))).squeeze(-1)


class UntraceableReluHead(_TwoLayer):
    """Data-dependent control flow: torch.fx cannot trace it; the seed's ReLU on the output."""

    def forward(self, x16, x32, x48):
        out = self.hidden(x16, x32, x48)
        if x16.sum() > 0:
            out = out * 2
        return F.relu(self.fc_last_2(out))


BAD = [
    ReluHead,
    SigmoidModuleHead,
    TorchSigmoidHead,
    SoftplusHead,
    AbsHead,
    Relu6Head,
    SquareHead,
    ExpHead,
    ClampHead,
    SoftmaxHead,
    TanhHead,
    GeluHead,
    InplaceReluSqueezeHead,
    UntraceableReluHead,
]


# --- GOOD: the output is the raw logit of the last Linear (shape-only ops allowed after) ---


class LinearHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(FEATURES, 1)

    def forward(self, x16, x32, x48):
        return self.fc(pooled(x16, x32, x48))


class DropoutHead(_TwoLayer):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__(hidden)
        self.drop = nn.Dropout(0.5)

    def forward(self, x16, x32, x48):
        return self.drop(self.fc_last_2(self.hidden(x16, x32, x48)))


class IdentityHead(_TwoLayer):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__(hidden)
        self.out = nn.Identity()

    def forward(self, x16, x32, x48):
        return self.out(self.fc_last_2(self.hidden(x16, x32, x48)))


class SqueezeHead(_TwoLayer):
    def forward(self, x16, x32, x48):
        return self.fc_last_2(self.hidden(x16, x32, x48)).squeeze(-1)


class ViewHead(_TwoLayer):
    def forward(self, x16, x32, x48):
        return self.fc_last_2(self.hidden(x16, x32, x48)).view(-1)


class WideClampHead(_TwoLayer):
    """Clipping logits to [-10, 10] for stability still lets p reach 0.00005 and 0.99995."""

    def forward(self, x16, x32, x48):
        return self.fc_last_2(self.hidden(x16, x32, x48)).clamp(-10, 10)


class UntraceableLinearHead(_TwoLayer):
    """Data-dependent control flow with a raw-logit output."""

    def forward(self, x16, x32, x48):
        out = self.hidden(x16, x32, x48)
        if x16.sum() > 0:
            out = out * 2
        return self.fc_last_2(out)


GOOD = [
    LinearHead,
    DropoutHead,
    IdentityHead,
    SqueezeHead,
    ViewHead,
    WideClampHead,
    UntraceableLinearHead,
]
