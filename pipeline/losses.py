"""The training criterion on raw logits: BCEWithLogits (the default) or sigmoid focal loss.

Both take the model's raw logits, never probabilities, so the logit guard's contract is
unchanged. Optional label smoothing moves hard targets towards 1/2: y -> y (1 - eps) + eps / 2.

How `pos_weight` combines with focal loss (one rule):
- `loss.focal_alpha` null: focal loss weighs the positive term by `pos_weight`, exactly as
  BCEWithLogits does (at gamma 0 it *is* BCEWithLogits with pos_weight);
- `loss.focal_alpha` set: alpha weighs the classes (alpha for positives, 1 - alpha for
  negatives) *instead of* pos_weight, which is then not used (the two would count the
  class imbalance twice).

Validation loss (`val/loss`, pipeline/validation.py) is always plain BCEWithLogits with
pos_weight on the raw labels, whatever the training loss: a number comparable across
losses and smoothing settings.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config import LossConfig

log = logging.getLogger("pipeline")


def smooth_targets(target: torch.Tensor, eps: float) -> torch.Tensor:
    """y -> y (1 - eps) + eps / 2: 1 becomes 1 - eps/2, 0 becomes eps/2."""
    return target * (1.0 - eps) + eps / 2 if eps else target


class FocalLoss(nn.Module):
    """Sigmoid focal loss (Lin et al. 2017) on logits, mean over the batch.

    loss = w * BCE(x, y) * (1 - p_t)^gamma, with 1 - p_t = y sigmoid(-x) + (1 - y) sigmoid(x)
    (for hard labels: the probability given to the wrong class). The modulating factor is
    computed as exp(gamma * log(1 - p_t)) from log-sigmoids, so neither the value nor the
    gradient overflows or turns NaN at |logit| ~ 1e4 (a naive sigmoid -> log does), and
    gamma < 1 has no infinite gradient where 1 - p_t underflows to 0.
    """

    def __init__(
        self, gamma: float, alpha: float | None, pos_weight: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.gamma, self.alpha = float(gamma), alpha
        self.register_buffer("pos_weight", None if alpha is not None else pos_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # fp32 whatever autocast hands in: bf16 log-sigmoids lose the small losses.
        x, y = logits.float(), target.float()
        if self.alpha is None:
            ce = F.binary_cross_entropy_with_logits(
                x, y, pos_weight=self.pos_weight, reduction="none"
            )
        else:
            ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
            ce = ce * (self.alpha * y + (1 - self.alpha) * (1 - y))
        if self.gamma == 0:
            return ce.mean()
        # log(1 - p_t) = logaddexp(log y + logsigmoid(-x), log(1 - y) + logsigmoid(x));
        # log(0) = -inf drops a term exactly (and its gradient is 0, not NaN).
        log_wrong = torch.logaddexp(
            torch.log(y) + F.logsigmoid(-x), torch.log1p(-y) + F.logsigmoid(x)
        )
        return (ce * torch.exp(self.gamma * log_wrong)).mean()


class SmoothedLoss(nn.Module):
    """`inner` on smoothed targets (label smoothing in front of any criterion)."""

    def __init__(self, inner: nn.Module, eps: float) -> None:
        super().__init__()
        self.inner, self.eps = inner, float(eps)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.inner(logits, smooth_targets(target, self.eps))


def build_loss(cfg: LossConfig, pos_weight: torch.Tensor | float) -> nn.Module:
    """The criterion `train_step` calls as `criterion(logits, labels)`.

    `loss.name=bce` without smoothing is exactly `nn.BCEWithLogitsLoss(pos_weight=...)`,
    the criterion of every run before losses became configurable (bit-identical results).
    """
    weight = pos_weight if torch.is_tensor(pos_weight) else torch.tensor(float(pos_weight))
    if cfg.name == "bce":
        criterion: nn.Module = nn.BCEWithLogitsLoss(pos_weight=weight)
    else:
        if cfg.focal_alpha is not None:
            log.info(
                "loss: focal (gamma %g, alpha %g); pos_weight is not used with focal_alpha",
                cfg.focal_gamma,
                cfg.focal_alpha,
            )
        criterion = FocalLoss(cfg.focal_gamma, cfg.focal_alpha, weight)
    if cfg.label_smoothing:
        criterion = SmoothedLoss(criterion, cfg.label_smoothing)
    return criterion
