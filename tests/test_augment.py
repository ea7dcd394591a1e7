"""Device augmentation: exact geometry, per-sample probabilities, determinism, exact resume."""

from __future__ import annotations

import pytest
import torch

from pipeline import checkpoint
from pipeline.config import AugmentConfig
from pipeline.data.transforms import DeviceTransform, affine_crop, shifted_crop
from tests.conftest import cli_env, run_cli, train_args
from tests.test_resume import assert_identical

SCALES = [16, 32, 48]


def _transform(**aug) -> DeviceTransform:
    return DeviceTransform(SCALES, None, 0.0, 1.0, AugmentConfig(**aug))


def _ramp(batch: int, size: int, dims: int = 2) -> torch.Tensor:
    """Every pixel a distinct value, so any crop position is recognisable."""
    n = size**dims
    return torch.arange(batch * n, dtype=torch.float32).view(batch, 1, *(size,) * dims)


@pytest.mark.parametrize("dims", [2, 3])
def test_integer_shift_is_an_exact_crop_at_the_jittered_centre(dims):
    x = _ramp(2, 64, dims)
    shift = torch.tensor([[3, -2, 1][:dims], [0, 5, -4][:dims]])
    for crop in (
        shifted_crop,
        lambda *a: affine_crop(x, 48, torch.eye(dims).expand(2, -1, -1), torch.ones(2), shift),
    ):
        out = crop(x, 48, shift)
        for b in range(2):
            # Axis order (x, y[, z]): shift[0] moves along the last tensor axis.
            want = x[b][
                (slice(None),) + tuple(slice(8 + int(s), 56 + int(s)) for s in shift[b].flip(0))
            ]
            assert torch.equal(out[b], want)


@pytest.mark.parametrize("dims", [2, 3])
def test_quarter_turn_equals_rot90(dims):
    x = _ramp(1, 56, dims)
    rotation = torch.eye(dims)
    rotation[:2, :2] = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # about the last grid axis
    out = affine_crop(x, 48, rotation[None], torch.ones(1), torch.zeros(1, dims))
    centre = x[(...,) + (slice(4, 52),) * dims]
    # grid x/y are the last two tensor axes
    expected = torch.rot90(centre, 1, (x.ndim - 2, x.ndim - 1))
    assert torch.allclose(out, expected, atol=1e-3)


def test_zoom_two_samples_the_central_half():
    x = _ramp(1, 48)  # value = 48 * row + column: bilinear sampling of it is exact
    out = affine_crop(x, 48, torch.eye(2)[None], torch.full((1,), 2.0), torch.zeros(1, 2))
    # Output pixel i looks at input coordinate i / 2 + 11.75: the central 24 pixels, doubled.
    at = torch.arange(48, dtype=torch.float32) / 2 + 11.75
    assert torch.allclose(out[0, 0], at[:, None] * 48 + at[None, :], atol=1e-3)


def test_translation_draws_every_shift_up_to_the_limit_and_no_more():
    patch = torch.zeros(512, 1, 56, 56, dtype=torch.uint8)
    patch[:, :, 28, 28] = 255  # one bright pixel at the stored centre
    t = _transform(flips=False, translate=4)
    g = torch.Generator().manual_seed(0)
    big = t(patch, train=True, generator=g)[-1]  # the 48-crop
    rows = big[:, 0].amax(dim=2).argmax(dim=1) - 24
    cols = big[:, 0].amax(dim=1).argmax(dim=1) - 24
    assert set(rows.tolist()) == set(range(-4, 5)) and set(cols.tolist()) == set(range(-4, 5))
    assert torch.all(big.amax(dim=(1, 2, 3)) == 255.0)  # integer shifts: the pixel stays sharp


def test_probabilities_choose_a_share_of_the_batch():
    patch = torch.full((2000, 1, 48, 48), 100, dtype=torch.uint8)
    t = DeviceTransform(
        SCALES, [0, 255], 0.0, 1.0, AugmentConfig(flips=False, intensity_shift=0.2, intensity_p=0.3)
    )
    out = t(patch, train=True, generator=torch.Generator().manual_seed(1))[-1]
    changed = (out[:, 0, 0, 0] != 100 / 255).float().mean().item()
    assert 0.25 < changed < 0.35
    none = AugmentConfig(flips=False, noise_std=0.5, noise_p=0.0)
    same = DeviceTransform(SCALES, [0, 255], 0.0, 1.0, none)(
        patch, True, torch.Generator().manual_seed(1)
    )
    assert torch.all(same[-1] == 100 / 255)


@pytest.mark.parametrize("dims", [2, 3])
def test_same_seed_same_batch_other_seed_other_batch_and_no_augmentation_in_validation(dims):
    aug = dict(translate=4, rotate=30.0, scale=[0.9, 1.1], intensity_scale=0.1, noise_std=0.05)
    t = _transform(**aug)
    patch = (_ramp(4, 56, dims) % 251).to(torch.uint8)
    torch.manual_seed(123)  # the global RNG must play no part: reseeded between the calls
    a = t(patch, True, torch.Generator().manual_seed(5))[-1]
    torch.manual_seed(321)
    b, c = (t(patch, True, torch.Generator().manual_seed(s))[-1] for s in (5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    val = t(patch, train=False)
    assert torch.equal(val[-1], patch[(...,) + (slice(4, 52),) * dims].float())


def test_affine_p_shifts_only_that_share_of_the_batch():
    patch = torch.zeros(4000, 1, 56, 56, dtype=torch.uint8)
    patch[:, :, 28, 28] = 255
    big = _transform(flips=False, translate=4, affine_p=0.3)(
        patch, True, torch.Generator().manual_seed(2)
    )[-1]
    moved = (big[:, 0, 24, 24] != 255).float().mean().item()
    assert 0.26 < moved < 0.34  # 0.3 x (1 - 1/81): a drawn shift of (0, 0) does not show


def test_augment_false_still_switches_everything_off(tmp_path):
    from pipeline.config import load

    cfg = load(None, ["data.augment=false", "data.patch_size=56", "data.augment.translate=2"])
    assert cfg.data.augment.enabled is False and cfg.data.augment.translate == 2


@pytest.mark.slow
def test_full_augmentation_resumes_bit_exactly(tmp_path):
    from pipeline.data.synthetic import make_synthetic

    shards = tmp_path / "shards"
    make_synthetic(shards, dims=2, n_train=70, n_val=32, positive_fraction=0.25, seed=0,
                   block_size=16, train_shards=4, val_shards=2, workers=1, progress=False, size=56)  # fmt: skip
    common = (
        "train.batch_size=8", "train.eval_every=5", "checkpoint.every_steps=1000",
        "train.max_steps=14", "data.patch_size=56", "data.augment.translate=4",
        "data.augment.rotate=45", "data.augment.scale=[0.9,1.2]", "data.augment.intensity_scale=0.1",
        "data.augment.intensity_shift=0.05", "data.augment.noise_std=0.05",
    )  # fmt: skip
    env = cli_env(tmp_path)
    straight = run_cli(train_args(shards, tmp_path / "straight", *common), env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    run_dir = tmp_path / "interrupted"
    first = run_cli(train_args(shards, run_dir, *common, "train.stop_at_step=9"), env)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(train_args(shards, run_dir, *common), env)
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = (
        checkpoint.load(d / "checkpoints" / "last.pt") for d in (tmp_path / "straight", run_dir)
    )
    assert a["step"] == b["step"] == 14
    for key in ("model", "optimizer", "rng"):
        assert_identical(a[key], b[key], key)
