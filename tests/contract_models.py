"""User models that break the three-input contract (loaded by import path in tests)."""

import torch
from torch import nn


class WrongShapeHead(nn.Module):
    """Returns [B, 2]: two logits per candidate instead of one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x16, x32, x48):
        pooled = torch.stack([x.mean(dim=tuple(range(1, x.ndim))) for x in (x16, x32, x48)], 1)
        return self.fc(pooled)
