"""convert -> train -> evaluate: a user's own images become shards the trainer can learn from."""

import csv
import json

import numpy as np
from PIL import Image

from pipeline.convert.images import convert_images
from pipeline.data.synthetic import render_candidates
from tests.conftest import cli_env, run_cli


def test_images_csv_converts_trains_and_evaluates(tmp_path):
    rng = np.random.default_rng(3)
    patches, labels, _ = render_candidates(rng, 600, dims=2, size=48, positive_fraction=0.3)
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for index, (patch, label) in enumerate(zip(patches, labels, strict=True)):
        name = f"images/cand{index:04d}.png"
        Image.fromarray(patch[0]).save(tmp_path / name)
        rows.append([name, int(label), f"patient{index // 6:03d}"])
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "label", "patient"], *rows])

    out = tmp_path / "shards"
    summary = convert_images(
        csv=table,
        root=tmp_path,
        out=out,
        group_col="patient",
        size=48,
        val_fraction=0.25,
        seed=0,
        workers=1,
        shard_size=128,
        block_size=32,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] + manifest["splits"]["val"]["samples"] == 600
    assert summary is not None

    run_dir = tmp_path / "run"
    env = cli_env(tmp_path)
    trained = run_cli(
        [
            "train",
            "--config",
            "configs/tiny.yaml",
            f"data.train={out}/train-*.tar",
            f"data.val={out}/val-*.tar",
            f"run.dir={run_dir}",
            "train.max_steps=40",
            "train.eval_every=40",
        ],
        env,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = run_cli(["evaluate", "--checkpoint", str(run_dir / "checkpoints" / "last.pt")], env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads(evaluated.stdout)
    assert metrics["positives"] + metrics["negatives"] == manifest["splits"]["val"]["samples"]
    assert metrics["auroc"] > 0.6
    assert metrics["cpm"] is not None  # patients act as scans for FROC/CPM
