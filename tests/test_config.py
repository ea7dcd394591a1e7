from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline import config
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_default_yaml_mirrors_built_in_defaults():
    on_disk = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "default.yaml"))
    assert config.to_dict(config.load(ROOT / "configs" / "default.yaml")) == config.to_dict(
        config.load()
    )
    assert on_disk == config.to_dict(config.load())


@pytest.mark.parametrize("name", ["default.yaml", "volume3d.yaml", "tiny.yaml"])
def test_shipped_configs_load(name):
    cfg = config.load(ROOT / "configs" / name)
    assert cfg.data.scales == [16, 32, 48]


def test_volume3d_is_three_dimensional():
    assert config.load(ROOT / "configs" / "volume3d.yaml").data.dims == 3


def test_overrides_apply_with_types():
    cfg = config.load(None, ["optim.lr=3e-4", "train.batch_size=7", "loss.pos_weight=12.5"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.batch_size == 7
    assert cfg.loss.pos_weight == 12.5


@pytest.mark.parametrize(
    "override, words",
    [
        ("optim.lrr=1", ["unknown key", "optim.lrr"]),
        ("nosection.x=1", ["unknown key", "nosection"]),
        ("train.max_steps=abc", ["train.max_steps"]),
        ("train.max_steps=0", ["train.max_steps", "> 0"]),
        ("optim.lr=-1", ["optim.lr"]),
        ("train.precision=fp8", ["train.precision", "auto|fp32|bf16|fp16"]),
        ("wandb.mode=sometimes", ["wandb.mode", "online|offline|disabled"]),
        ("data.dims=4", ["data.dims"]),
        ("data.scales=[48,16,32]", ["data.scales", "increasing"]),
        ("loss.pos_weight=lots", ["loss.pos_weight"]),
        ("loss.pos_weight=-2", ["loss.pos_weight"]),
        ("data.on_error=ignore", ["data.on_error", "skip|fail"]),
        ("noequals", ["noequals", "key=value"]),
    ],
)
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        config.load(None, [override])
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        config.load(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="scalar.yaml"):
        config.load(scalar)


def test_resolved_config_round_trips_through_dict():
    cfg = config.load(None, ["model.width=12", "wandb.tags=[a,b]"])
    again = config.from_dict(config.to_dict(cfg))
    assert config.to_dict(again) == config.to_dict(cfg)
