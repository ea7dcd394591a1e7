"""Test-time augmentation: which views each setting takes, the mean logit over them through
the real eval transform, and invariance of the result under its own group.

The end-to-end check (`pipeline evaluate predict.tta=flips` on a trained checkpoint) is in
tests/test_predict_export.py, which trains its tiny checkpoint once for the module."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from pipeline.data.transforms import DeviceTransform
from pipeline.tta import apply_view, tta_logits, views

SCALES = [4, 8, 12]


def _transform() -> DeviceTransform:
    return DeviceTransform(SCALES, [0.0, 255.0], 0.0, 1.0, False)


def _patch(dims: int, batch: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(dims)
    return torch.randint(0, 256, (batch, 1) + (12,) * dims, generator=generator).to(torch.uint8)


class Pooled(nn.Module):
    """Invariant under every flip and rotation: the crops' means."""

    def forward(self, *crops: torch.Tensor) -> torch.Tensor:
        return sum(c.flatten(1).mean(1) * (i + 1) for i, c in enumerate(crops))


class Oriented(nn.Module):
    """Sees orientation: a fixed random weight on every pixel of the largest crop."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.weight = torch.randn(
            (1,) + (SCALES[-1],) * dims, generator=torch.Generator().manual_seed(7)
        )

    def forward(self, *crops: torch.Tensor) -> torch.Tensor:
        return (crops[-1] * self.weight).flatten(1).sum(1) + crops[0].flatten(1).mean(1)


def _logits(model: nn.Module, patch: torch.Tensor, name: str) -> torch.Tensor:
    return tta_logits(model, patch, _transform(), contextlib.nullcontext(), name)


@pytest.mark.parametrize(
    "name,dims,count", [("none", 2, 1), ("flips", 2, 4), ("dihedral", 2, 8),
                        ("none", 3, 1), ("flips", 3, 8), ("dihedral", 3, 16)],
)  # fmt: skip
def test_each_setting_takes_that_many_distinct_views_identity_first(name, dims, count):
    chosen = views(name, dims)
    assert len(chosen) == count and chosen[0] == ((), 0)
    patch = torch.arange(12**dims).view((1, 1) + (12,) * dims)
    images = {tuple(apply_view(patch, v).flatten().tolist()) for v in chosen}
    assert len(images) == count  # no view repeats another
    if dims == 3:  # no view mixes depth into the plane: depth slices stay depth slices
        slices = {tuple(sorted(patch[0, 0, d].flatten().tolist())) for d in range(12)}
        for view in chosen:
            out = apply_view(patch, view)
            assert {tuple(sorted(out[0, 0, d].flatten().tolist())) for d in range(12)} == slices


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", ["flips", "dihedral"])
def test_a_model_that_is_itself_invariant_gives_the_same_logits(dims, name):
    patch = _patch(dims)
    plain = _logits(Pooled(), patch, "none")
    torch.testing.assert_close(_logits(Pooled(), patch, name), plain, rtol=1e-5, atol=1e-5)


def test_none_is_the_plain_forward_pass():
    patch, model = _patch(2), Oriented(2)
    assert torch.equal(_logits(model, patch, "none"), model(*_transform()(patch, train=False)))


def test_an_oriented_model_gets_the_mean_over_the_flips_and_rotations():
    patch, model = _patch(2), Oriented(2)

    def plain(x: torch.Tensor) -> torch.Tensor:
        return model(*_transform()(x, train=False))

    flips = [patch, patch.flip(-1), patch.flip(-2), patch.flip(-2, -1)]
    expected = torch.stack([plain(x) for x in flips]).mean(0)
    got = _logits(model, patch, "flips")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain(patch), atol=1e-3)  # the views did change something
    square = [torch.rot90(x, k, (-2, -1)) for x in (patch, patch.flip(-1)) for k in range(4)]
    expected = torch.stack([plain(x) for x in square]).mean(0)
    torch.testing.assert_close(_logits(model, patch, "dihedral"), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_the_mean_is_invariant_under_its_own_views(dims):
    patch, model = _patch(dims), Oriented(dims)
    for name in ("flips", "dihedral"):
        reference = _logits(model, patch, name)
        for view in views(name, dims)[1:]:
            moved = apply_view(patch, view)
            torch.testing.assert_close(_logits(model, moved, name), reference, rtol=1e-4, atol=1e-4)
    # A quarter turn is not among the flips: their mean still sees it.
    turned = torch.rot90(patch, 1, (-2, -1))
    assert not torch.allclose(_logits(model, turned, "flips"), _logits(model, patch, "flips"))
