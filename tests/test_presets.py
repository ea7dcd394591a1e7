"""Model size presets: base is today's defaults, sizes grow small < base < large, a preset
conflicts loudly with a differing explicit key, and the benchmark script reports them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline import config
from pipeline.config import MODEL_PRESETS
from pipeline.errors import ConfigError
from pipeline.model import build_model
from tests.conftest import ROOT, cli_env

KEYS = ("width", "depth", "features", "hidden")


def _params(cfg: config.Config) -> int:
    model = build_model(
        dims=cfg.data.dims,
        in_channels=cfg.data.channels,
        scales=cfg.data.scales,
        **{k: getattr(cfg.model, k) for k in KEYS},
    )
    return sum(p.numel() for p in model.parameters())


def test_base_preset_is_exactly_the_defaults():
    plain, base = config.load(None), config.load(None, ["model.preset=base"])
    assert base.model.preset == "base"
    base.model.preset = None
    assert base.model == plain.model


@pytest.mark.parametrize("dims", [2, 3])
def test_parameter_counts_grow_small_base_large(dims):
    counts = [
        _params(config.load(None, [f"model.preset={name}", f"data.dims={dims}"]))
        for name in ("small", "base", "large")
    ]
    assert counts[0] < counts[1] < counts[2], counts
    assert counts[1] == _params(config.load(None, [f"data.dims={dims}"]))


def test_a_preset_sets_its_keys_and_a_differing_explicit_key_is_an_error():
    small = config.load(None, ["model.preset=small"]).model
    assert {k: getattr(small, k) for k in KEYS} == MODEL_PRESETS["small"]
    # Equal to the preset's value: fine. Equal to the default: counts as not given.
    config.load(None, ["model.preset=small", "model.width=4"])
    assert config.load(ROOT / "configs" / "default.yaml", ["model.preset=large"]).model.width == 16
    with pytest.raises(ConfigError, match="model.depth: 5 conflicts with model.preset=large"):
        config.load(None, ["model.preset=large", "model.depth=5"])
    with pytest.raises(ConfigError, match="model.preset: sizes the built-in model only"):
        config.load(None, ["model.preset=small", "model.target=tests.zoo_heads:Net"])


def test_a_preset_survives_the_checkpoint_config_round_trip():
    cfg = config.load(None, ["model.preset=large"])
    again = config.from_dict(config.to_dict(cfg))
    assert again.model == cfg.model


@pytest.mark.slow
def test_bench_models_reports_each_preset_through_the_real_train_step(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_models.py"), "--quick", "--dims", "2"],
        cwd=ROOT, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    presets = result["results"]["2d"]["presets"]
    assert [presets[n]["params"] for n in ("small", "base", "large")] == [
        _params(config.load(None, [f"model.preset={n}"])) for n in ("small", "base", "large")
    ]
    assert all(p["samples_per_s"] > 0 for p in presets.values())
    assert result["results"]["2d"]["planted_delay_s"] > 0
    assert not md.exists()  # --quick without --md leaves BENCHMARKS.md alone
