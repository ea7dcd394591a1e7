"""Checkpoints and data as W&B artifacts, read back from real offline run files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli_env, run_cli, run_torchrun, train_args
from tests.wandb_offline import read_artifacts, run_files


def _models(run_dir: Path) -> list[dict]:
    return [a for a in read_artifacts(run_dir) if a["type"] == "model"]


def test_best_and_last_checkpoints_are_model_artifacts_with_aliases_and_metadata(
    tiny_shards, tmp_path
):
    run_dir = tmp_path / "run"
    result = run_cli(
        train_args(tiny_shards, run_dir, "wandb.mode=offline", "wandb.log_checkpoints=all"),
        cli_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    models = _models(run_dir)
    assert {m["name"] for m in models} == {f"model-{_first_id(run_dir)}"}
    lasts = _holding(models, "last.pt")
    assert [m["metadata"]["step"] for m in lasts] == [10, 20]  # every save with `all`
    assert all({"latest", f"step-{m['metadata']['step']}"} <= m["aliases"] for m in lasts)
    last = lasts[-1]
    assert "val/auroc" in last["metadata"]["metrics"]
    assert len(last["metadata"]["config_digest"]) == 16
    assert set(last["metadata"]["data_digest"]) == {"train", "val"}
    bests = _holding(models, "best.pt")
    assert bests and all("best" in m["aliases"] for m in bests)
    # The data: references to every shard, nothing uploaded, digest in the metadata.
    data = {a["metadata"]["split"]: a for a in read_artifacts(run_dir) if a["type"] == "dataset"}
    train_shards = sorted(tiny_shards.glob("train-*.tar"))
    assert sorted(ref for _, ref, _ in data["train"]["entries"]) == [
        p.resolve().as_uri() for p in train_shards
    ]
    assert data["train"]["metadata"]["digest"] == last["metadata"]["data_digest"]["train"]
    assert data["val"]["metadata"]["shards"] == len(list(tiny_shards.glob("val-*.tar")))


def test_log_checkpoints_none_logs_no_model_and_best_logs_last_only_at_the_end(
    tiny_shards, tmp_path
):
    env = cli_env(tmp_path)
    none_dir, best_dir = tmp_path / "none", tmp_path / "best"
    for run_dir, policy in ((none_dir, "none"), (best_dir, "best")):
        args = train_args(
            tiny_shards, run_dir, "wandb.mode=offline", f"wandb.log_checkpoints={policy}"
        )
        result = run_cli(args, env)
        assert result.returncode == 0, result.stderr[-3000:]
    assert _models(none_dir) == []
    lasts = _holding(_models(best_dir), "last.pt")
    assert [m["metadata"]["step"] for m in lasts] == [20]  # not at the step-10 save
    assert _holding(_models(best_dir), "best.pt")


def test_resumed_run_adds_versions_to_the_same_model_collection(tiny_shards, tmp_path):
    run_dir, env = tmp_path / "run", cli_env(tmp_path)
    for steps in (10, 20):
        args = train_args(
            tiny_shards, run_dir, "wandb.mode=offline", "wandb.log_checkpoints=all",
            f"train.max_steps={steps}",
        )  # fmt: skip
        result = run_cli(args, env)
        assert result.returncode == 0, result.stderr[-3000:]
    pieces = run_files(run_dir)
    assert len(pieces) == 2  # offline cannot resume a run: a second piece, same collection
    models = _models(run_dir)
    assert {m["run_file"] for m in models} == {p.name for p in pieces}
    assert {m["name"] for m in models} == {f"model-{_first_id(run_dir)}"}
    assert [m["metadata"]["step"] for m in _holding(models, "last.pt")] == [10, 20]


@pytest.mark.slow
def test_only_rank_zero_logs_artifacts_under_torchrun(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = train_args(tiny_shards, run_dir, "wandb.mode=offline", "wandb.log_checkpoints=all")
    result = run_torchrun(2, args, cli_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(run_files(run_dir)) == 1
    steps = [m["metadata"]["step"] for m in _holding(_models(run_dir), "last.pt")]
    assert steps == [10, 20]  # once per save, not once per rank


def _holding(models: list[dict], name: str) -> list[dict]:
    """The model versions whose one file is `name`, in logging order."""
    return [m for m in models if [e[0] for e in m["entries"]] == [name]]


def _first_id(run_dir: Path) -> str:
    return json.loads((run_dir / "wandb_run.json").read_text())["id"]
