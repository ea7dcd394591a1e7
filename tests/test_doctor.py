"""`pipeline doctor` passes a healthy setup and names each problem of a broken one."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from pipeline.doctor import FAIL, OK, WARN, diagnose
from tests.conftest import TINY, cli_env, run_cli


def data_args(shards: Path) -> list[str]:
    return [f"data.train={shards}/train-*.tar", f"data.val={shards}/val-*.tar"]


def lines_with(output: str, mark: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(mark + " ")]


def line_for(output: str, name: str) -> str:
    (line,) = [line for line in output.splitlines() if line[2:].startswith(name + ": ")]
    return line


def test_healthy_setup_passes_with_exit_0_and_never_prints_the_wandb_key(tiny_shards, tmp_path):
    key = secrets.token_hex(20)
    env = cli_env(tmp_path, WANDB_API_KEY=key, HOME=str(tmp_path))
    args = ["doctor", "--config", str(TINY), *data_args(tiny_shards), "wandb.mode=online"]
    done = run_cli(args, env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert not lines_with(done.stdout, FAIL)
    for name in ("torch", "distributed env", "SLURM", "config", "model", "guard", "W&B"):
        assert line_for(done.stdout, name).startswith(OK)
    # No GPU here (CUDA_VISIBLE_DEVICES=""): a warning that says so and why, never a failure.
    gpus = line_for(done.stdout, "GPUs")
    assert gpus.startswith(WARN), gpus
    assert "none visible (CUDA_VISIBLE_DEVICES='')" in gpus and "runs on the CPU" in gpus
    assert line_for(done.stdout, "data.train records").endswith("decodes: [1, 48, 48] uint8")
    # It says how much it read: 3 of 4 shards, one block of 64 samples from each.
    assert "first record of 3 of 4 shard(s) (192 samples, 9.4% of 2048" in done.stdout
    assert "2048 samples, 512 positive" in done.stdout  # the train manifest
    assert "credentials in WANDB_API_KEY" in done.stdout
    assert key not in output and key[:8] not in output
    assert done.stdout.strip().endswith("doctor: all checks passed")


def test_broken_setup_names_each_problem_and_exits_non_zero(tiny_shards, tmp_path):
    env = cli_env(tmp_path, HOME=str(tmp_path))  # no ~/.netrc, no WANDB_API_KEY
    args = [
        "doctor",
        "--config",
        str(TINY),
        f"data.train={tiny_shards}/missing-*.tar",
        f"data.val={tiny_shards}/val-*.tar",
        "model.target=tests.zoo_heads:ReluHead",
        "wandb.mode=online",
    ]
    done = run_cli(args, env)
    assert done.returncode == 1, done.stdout + done.stderr
    failed = lines_with(done.stdout, FAIL)
    assert len(failed) == 3, done.stdout
    data, head, wandb = failed
    assert data.startswith(f"{FAIL} data.train: pattern '{tiny_shards}/missing-*.tar' matches no")
    assert "fix:" in data
    assert head.startswith(f"{FAIL} guard: model output comes from torch.nn.functional.relu")
    assert "ReluHead.forward" in head and "return the raw logit" in head
    assert wandb.startswith(f"{FAIL} W&B: online") and "no credentials" in wandb
    assert "wandb login" in wandb
    assert line_for(done.stdout, "data.val records").startswith(OK)  # the rest is still checked
    assert done.stdout.strip().endswith("doctor: 3 problem(s)")


def failures(checks) -> list[str]:
    return [c.line() for c in checks if c.status == FAIL]


def test_model_target_that_does_not_import_is_named(tiny_shards, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    checks = diagnose(str(TINY), [*data_args(tiny_shards), "model.target=tests.no_such_zoo:Head"])
    (line,) = failures(checks)
    assert line.startswith(f"{FAIL} model: model.target: cannot import 'tests.no_such_zoo'")
    assert "importable from the working directory" in line


def test_model_breaking_the_contract_is_named(tiny_shards, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    target = "model.target=tests.contract_models:WrongShapeHead"
    (line,) = failures(diagnose(str(TINY), [*data_args(tiny_shards), target]))
    assert line.startswith(f"{FAIL} model: model.target tests.contract_models:WrongShapeHead")
    assert "[B] or [B, 1], got (2, 2)" in line


def test_allowed_bounded_head_is_a_warning_not_a_failure(tiny_shards, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    overrides = ["model.target=tests.zoo_heads:SigmoidModuleHead", "guard.allow_bounded_head=true"]
    checks = diagnose(str(TINY), [*data_args(tiny_shards), *overrides])
    assert failures(checks) == []
    (guard,) = [c for c in checks if c.name == "guard"]
    assert guard.status == "!" and "nn.Sigmoid" in guard.detail


def test_bad_config_key_stops_the_later_checks(tmp_path):
    checks = diagnose(str(TINY), ["data.nope=1"])
    lines = failures(checks)
    assert lines[0].startswith(f"{FAIL} config: ") and "unknown key 'data.nope'" in lines[0]
    assert lines[1].startswith(f"{FAIL} data, model, W&B: not checked")


def test_shards_that_do_not_fit_the_config_are_named(tiny_shards, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    checks = diagnose(str(TINY), [*data_args(tiny_shards), "data.channels=3"])
    lines = failures(checks)
    assert lines and all("data.channels=3 but the patches have 1" in line for line in lines[:2])


def test_truncated_shard_is_named(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    broken = tmp_path / "train-000000.tar"
    broken.write_bytes((tiny_shards / "train-000000.tar").read_bytes()[:700])
    checks = diagnose(str(TINY), [f"data.train={broken}", f"data.val={tiny_shards}/val-*.tar"])
    records = [c for c in checks if c.name == "data.train records"]
    assert records[0].status == FAIL and str(broken) in records[0].detail


@pytest.mark.parametrize("where", ["netrc", "env"])
def test_wandb_credentials_are_found_but_never_shown(tmp_path, monkeypatch, capsys, where):
    from pipeline.doctor import run_doctor

    key = secrets.token_hex(20)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    if where == "netrc":
        (tmp_path / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {key}\n")
        (tmp_path / ".netrc").chmod(0o600)
    else:
        monkeypatch.setenv("WANDB_API_KEY", key)
    args = type("Args", (), {"config": str(TINY), "overrides": ["model.depth=1"]})()
    run_doctor(args)
    out = capsys.readouterr()
    (wandb,) = [line for line in out.out.splitlines() if " W&B: " in line]
    assert wandb.startswith(OK)
    assert (
        "credentials in " + (str(tmp_path / ".netrc") if where == "netrc" else "WANDB")
    ) in wandb
    assert key not in out.out + out.err
