"""convert -> train -> evaluate -> predict: a user's own images become shards the trainer
learns from, and new unlabelled images become shards the trained model scores."""

import csv
import json

import numpy as np
from PIL import Image

from pipeline.convert.images import convert_images
from pipeline.data.synthetic import render_candidates
from tests.conftest import cli_env, run_cli


def test_images_csv_converts_trains_and_evaluates(tmp_path):
    rng = np.random.default_rng(3)
    patches, labels, _ = render_candidates(rng, 640, dims=2, size=48, positive_fraction=0.3)
    patches, labels, new_patches, new_labels = (
        patches[:600],
        labels[:600],
        patches[600:],
        labels[600:],
    )
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
    # The summary the CLI prints tells the truth about what was written.
    assert summary["rows"] == 600 and summary["patch_shape"] == [1, 48, 48]
    for split in ("train", "val"):
        written = manifest["splits"][split]
        assert summary["splits"][split]["samples"] == written["samples"]
        assert summary["splits"][split]["positives"] == written["positives"]
    assert sum(s["positives"] for s in summary["splits"].values()) == int(labels.sum())
    assert sum(s["groups"] for s in summary["splits"].values()) == 100  # 6 images per patient

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
    assert metrics["cpm_candidate"] is not None  # patients act as scans for FROC/CPM

    # New candidates without labels: convert --unlabelled, then predict with the checkpoint.
    new_rows = []
    for index, patch in enumerate(new_patches):
        name = f"images/new{index:04d}.png"
        Image.fromarray(patch[0]).save(tmp_path / name)
        new_rows.append([name, f"scan{index // 4:02d}"])
    new_table = tmp_path / "new.csv"
    with open(new_table, "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "patient"], *new_rows])
    new_out = tmp_path / "new_shards"
    converted = run_cli(
        ["convert", "images", "--unlabelled", "--csv", str(new_table), "--root", str(tmp_path),
         "--out", str(new_out), "--group-col", "patient", "--workers", "1", "--block-size", "8"],
        env,
    )  # fmt: skip
    assert converted.returncode == 0, converted.stderr[-3000:]
    predictions = tmp_path / "new_predictions.csv"
    predicted = run_cli(
        ["predict", "--checkpoint", str(run_dir / "checkpoints" / "last.pt"),
         "--shards", f"{new_out}/predict-*.tar", "--out", str(predictions)],
        env,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    with open(predictions, newline="") as handle:
        scored = {row["id"]: row for row in csv.DictReader(handle)}
    # Every new image scored once, under its CSV line number, with its patient and no label.
    assert sorted(scored) == sorted(f"row{line}" for line in range(2, 2 + len(new_rows)))
    assert all(scored[f"row{i + 2}"]["group"] == group for i, (_, group) in enumerate(new_rows))
    assert all(row["label"] == "" for row in scored.values())
    probability = np.array([float(scored[f"row{i + 2}"]["probability"]) for i in range(40)])
    # The model learned the task: it ranks the (hidden) positives above the negatives.
    positive, negative = probability[new_labels == 1], probability[new_labels == 0]
    assert len(positive) and len(negative)
    assert (positive[:, None] > negative[None, :]).mean() > 0.6
