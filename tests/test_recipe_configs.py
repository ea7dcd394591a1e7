"""configs/nodules3d.yaml and configs/images2d.yaml load through the real config loader and
say what the README's Recipes section says they do.

Each file loads with the real loader (an unknown key or a bad value fails in one line),
and every key the README's Recipes lines promise holds the recipe's value.
"""

from __future__ import annotations

import pytest

from pipeline.config import Config, load
from tests.conftest import ROOT

# config -> key -> the recipe's value. Every key the README's Recipes lines promise.
RECIPES = {
    "nodules3d.yaml": {
        "data.dims": 3,
        "data.window": [-1000.0, 400.0],
        "data.patch_size": 64,
        "data.scales": [16, 32, 48],
        "data.balance": 0.25,
        "data.augment.translate": 6,
        "data.augment.rotate": 180.0,
        "data.augment.scale": [0.9, 1.1],
        "data.augment.intensity_scale": 0.1,
        "data.augment.intensity_shift": 0.1,
        "data.augment.noise_std": 0.03,
        "model.ema_decay": 0.999,
        "loss.name": "bce",
        "loss.pos_weight": 1.0,
        "train.early_stop_patience": 10,
        "checkpoint.metric": "cpm_candidate",
        "predict.tta": "flips",
    },
    "images2d.yaml": {
        "data.dims": 2,
        "data.window": [0.0, 255.0],
        "data.patch_size": 144,
        "data.scales": [32, 64, 128],
        "data.balance": 0.5,
        "data.augment.translate": 8,
        "data.augment.rotate": 180.0,
        "data.augment.scale": [0.85, 1.15],
        "data.augment.intensity_scale": 0.15,
        "model.ema_decay": 0.999,
        "model.depth": 4,
        "loss.pos_weight": 1.0,
        "train.early_stop_patience": 8,
        "checkpoint.metric": "auroc",
        "predict.tta": "dihedral",
    },
}


def _value(cfg: Config, key: str) -> object:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_config_loads_with_the_values_the_readme_names(name):
    cfg = load(ROOT / "configs" / name)
    for key, expected in RECIPES[name].items():
        assert _value(cfg, key) == expected, (name, key)
    margin = (cfg.data.stored_size - cfg.data.scales[-1]) // 2
    assert 0 < cfg.data.augment.translate <= margin
