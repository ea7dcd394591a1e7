"""configs/nodules3d.yaml and configs/images2d.yaml load through the real config loader and
say what the README's Recipes section says they do.

The recipes use keys that other branches add (balance, EMA, early stopping, losses,
optimizers, TTA). Until those are merged, the full load is skipped, and only for a key on
the agreed list (a typo or any other unknown key fails); the rest of each file is loaded
and checked today with those keys left out.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.config import Config, load
from tests.conftest import ROOT

# Agreed names (the helpers' common brief), added by other branches.
AGREED = {
    "data.balance",
    "model.ema_decay",
    "model.preset",
    "model.init_from",
    "model.init_strict",
    "model.freeze_steps",
    "train.early_stop_patience",
    "loss.name",
    "loss.focal_gamma",
    "loss.focal_alpha",
    "loss.label_smoothing",
    "optim.name",
    "optim.momentum",
    "optim.nesterov",
    "optim.schedule",
    "optim.step_milestones",
    "optim.step_gamma",
    "predict.tta",
}

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


def _known(key: str) -> bool:
    """Whether the config dataclasses of this checkout have `key`."""
    node = OmegaConf.structured(Config)
    for part in key.split("."):
        if part not in node:
            return False
        node = node[part]
    return True


def _leaves(mapping: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        out.update(_leaves(v, f"{key}.") if isinstance(v, dict) else {key: v})
    return out


def _value(cfg: Config, key: str) -> object:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _file_keys(name: str) -> dict[str, object]:
    return _leaves(OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / name)))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_config_loads_with_the_values_the_readme_names(name):
    unknown = [key for key in _file_keys(name) if not _known(key)]
    not_agreed = [key for key in unknown if key not in AGREED]
    assert not not_agreed, f"{name}: keys nobody agreed on: {not_agreed}"
    if unknown:  # only agreed keys of other branches are missing: skipped until the merge
        pytest.skip(f"{name}: keys not merged on this branch yet: {unknown}")
    cfg = load(ROOT / "configs" / name)
    for key, expected in RECIPES[name].items():
        assert _value(cfg, key) == expected, (name, key)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_config_without_the_unmerged_keys_loads_today(name, tmp_path):
    # What this branch can check now: every other key is real and holds the recipe's value
    # (e.g. translate within the stored margin, a metric validation reports).
    values = OmegaConf.load(ROOT / "configs" / name)
    dropped = []
    for key in _file_keys(name):
        if not _known(key):
            section, leaf = key.rsplit(".", 1)
            OmegaConf.select(values, section).pop(leaf)
            dropped.append(key)
    assert set(dropped) <= AGREED
    path = Path(tmp_path) / name
    OmegaConf.save(values, path)
    cfg = load(path)
    for key, expected in RECIPES[name].items():
        if key not in dropped:
            assert _value(cfg, key) == expected, (name, key)
    margin = (cfg.data.stored_size - cfg.data.scales[-1]) // 2
    assert 0 < cfg.data.augment.translate <= margin
