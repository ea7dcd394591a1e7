"""`pipeline make-synthetic`: deterministic real shards, right counts, and a task that needs context."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline.data.format import MANIFEST_NAME, decode_block
from pipeline.data.phantoms import KINDS, NEGATIVE_KINDS, POSITIVE_KINDS
from pipeline.data.synthetic import add_parser, make_synthetic, render_candidates
from pipeline.errors import ConfigError
from tests.conftest import cli_env, run_cli

ROOT = Path(__file__).resolve().parent.parent


def small(out: Path, seed: int = 7, workers: int = 1, dims: int = 2, **kw) -> Path:
    args = {"n_train": 600, "n_val": 200, "train_shards": 3, "val_shards": 2, "block_size": 64}
    args.update(kw)
    return make_synthetic(
        out, dims=dims, positive_fraction=0.25, seed=seed, workers=workers, progress=False, **args
    )


def read_blocks(out: Path, split: str) -> list:
    """Every block record of a split, read back through webdataset's tar reader."""
    blocks = []
    for shard in sorted(out.glob(f"{split}-*.tar")):
        with open(shard, "rb") as stream:
            members = ({**m, "__url__": str(shard)} for m in tar_file_iterator(stream))
            blocks += [(shard.name, decode_block(r)) for r in group_by_keys(members)]
    return blocks


def test_same_seed_gives_identical_shard_bytes_whatever_the_worker_count(tmp_path):
    small(tmp_path / "one", workers=1)
    small(tmp_path / "two", workers=2)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert "train-000002.tar" in names and "val-000001.tar" in names
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), (
            name
        )


def test_different_seed_gives_different_patches(tmp_path):
    small(tmp_path / "a", seed=1, n_train=64, n_val=16, train_shards=1)
    small(tmp_path / "b", seed=2, n_train=64, n_val=16, train_shards=1)
    a, b = read_blocks(tmp_path / "a", "train"), read_blocks(tmp_path / "b", "train")
    assert not np.array_equal(a[0][1].patch, b[0][1].patch)


def test_manifest_counts_match_the_shards_and_meta_names_scans(tmp_path):
    small(tmp_path, n_train=1000, n_val=300, train_shards=3)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    for split, expected in (("train", 1000), ("val", 300)):
        entry = manifest["splits"][split]
        blocks = read_blocks(tmp_path, split)
        assert entry["samples"] == expected == sum(len(b) for _, b in blocks)
        assert entry["positives"] == sum(int(b.label.sum()) for _, b in blocks)
        for shard in entry["shards"]:
            mine = [b for name, b in blocks if name == shard["name"]]
            assert shard["samples"] == sum(len(b) for b in mine)
            assert shard["positives"] == sum(int(b.label.sum()) for b in mine)
            assert shard["blocks"] == len(mine)
        ids = [i for _, b in blocks for i in b.ids]
        assert len(set(ids)) == expected and all(i.startswith(f"{split}/") for i in ids)
        groups = [g for _, b in blocks for g in b.groups]
        # Several candidates per scan, so per-scan metrics (CPM) have something to group.
        assert 1 < len(groups) / len(set(groups)) <= 16
        coords = np.array([c for _, b in blocks for c in b.coords])
        assert coords.shape == (expected, 2) and np.abs(coords - 23.5).max() <= 4.0


def test_positive_fraction_is_kept_in_every_shard(tmp_path):
    small(tmp_path, n_train=1200, n_val=400, train_shards=4)
    for split, n in (("train", 1200), ("val", 400)):
        entry = json.loads((tmp_path / MANIFEST_NAME).read_text())["splits"][split]
        assert entry["positives"] == round(0.25 * n)
        for shard in entry["shards"]:
            assert abs(shard["positives"] / shard["samples"] - 0.25) <= 1 / shard["samples"]


def test_regenerating_with_fewer_shards_leaves_no_stale_shards(tmp_path):
    small(tmp_path, n_train=90, n_val=30, train_shards=3)
    small(tmp_path, n_train=90, n_val=30, train_shards=2)
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == [
        "train-000000.tar",
        "train-000001.tar",
    ]


@pytest.mark.parametrize("dims", [2, 3])
def test_candidates_are_uint8_patches_with_labels_matching_their_kind(dims):
    patches, labels, kinds = render_candidates(np.random.default_rng(0), 40, dims, size=48)
    assert patches.dtype == np.uint8 and patches.shape == (40, 1) + (48,) * dims
    assert labels.dtype == np.uint8 and labels.shape == (40,) and labels.sum() == 10
    assert set(kinds) <= set(KINDS)
    for label, kind in zip(labels, kinds, strict=True):
        assert kind in (POSITIVE_KINDS if label else NEGATIVE_KINDS)
    assert patches.std() > 10  # structure and noise, not a blank image


def test_volume_shards_are_written_with_cubic_patches(tmp_path):
    small(tmp_path, dims=3, n_train=24, n_val=8, train_shards=2, block_size=8)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["splits"]["train"]["patch_shape"] == [1, 48, 48, 48]
    block = read_blocks(tmp_path, "train")[0][1]
    assert block.patch.dtype == np.uint8 and block.patch.shape[1:] == (1, 48, 48, 48)


def test_cli_writes_shards_with_progress_on_a_non_tty(tmp_path):
    # stdout/stderr are pipes here, as under CI or nohup: the bar must not break anything.
    code = (
        "import sys; from pipeline.cli import main; "
        "sys.exit(main(['make-synthetic', '--out', sys.argv[1], '--train', '300', '--val', '100',"
        " '--shards', '2', '--workers', '2', '--seed', '3']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # Whole lines in log files (no tqdm carriage returns), the last one at 100%.
    assert "\r" not in done.stderr
    assert "make-synthetic: 400/400 samples (100%)" in done.stderr
    assert str(tmp_path / MANIFEST_NAME) in done.stdout
    assert len(list(tmp_path.glob("*.tar"))) == 4


def test_bad_arguments_are_user_errors_naming_the_argument(tmp_path):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["make-synthetic", "--out", str(tmp_path), "--positive-fraction", "1.5"]
    )
    with pytest.raises(ConfigError, match="positive_fraction"):
        args.func(args)
    with pytest.raises(ConfigError, match="train"):
        make_synthetic(tmp_path, 2, 0, 10, 0.25, 0, progress=False)


class _TinyNet(nn.Module):
    """A small CNN per input; every input is pooled to 16x16 so all branches cost the same."""

    def __init__(self, inputs: int) -> None:
        super().__init__()

        def branch() -> nn.Module:
            return nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )  # fmt: skip

        self.branches = nn.ModuleList(branch() for _ in range(inputs))
        self.head = nn.Linear(32 * inputs, 1)

    def forward(self, *crops: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([b(c) for b, c in zip(self.branches, crops, strict=True)], 1))[
            :, 0
        ]


def _crops(x: torch.Tensor, scales: tuple[int, ...]) -> list[torch.Tensor]:
    out = []
    for s in scales:
        lo = (x.shape[-1] - s) // 2
        out.append(nn.functional.avg_pool2d(x[..., lo : lo + s, lo : lo + s], s // 16))
    return out


def _val_auroc(scales: tuple[int, ...], train, val, steps: int, seed: int) -> float:
    torch.manual_seed(seed)
    model = _TinyNet(len(scales))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = train
    order = np.random.default_rng(seed).permutation(np.arange(steps * 64) % len(y))
    for step in range(steps):
        idx = order[step * 64 : (step + 1) * 64]
        batch = torch.from_numpy(x[idx]).float() / 255
        loss = nn.functional.binary_cross_entropy_with_logits(
            model(*_crops(batch, scales)),
            torch.from_numpy(y[idx]).float(),
            pos_weight=torch.tensor(3.0),
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        scores = model(*_crops(torch.from_numpy(val[0]).float() / 255, scales)).numpy()
    return float(roc_auc_score(val[1], scores))


def test_small_crop_alone_classifies_clearly_worse_than_three_scales():
    # The generator must need context: a large nodule and the inside of a mass (or a nodule
    # and a ridge on the wall) look alike in the 16 crop. Same net, data, steps and seed
    # as scripts/bench_context.py, whose table in BENCHMARKS.md has the measured AUROCs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic, and polite to parallel test workers
    try:
        patches, labels, _ = render_candidates(np.random.default_rng(2024), 5000, dims=2)
        train, val = (patches[:4000], labels[:4000]), (patches[4000:], labels[4000:])
        centre_only = _val_auroc((16,), train, val, steps=150, seed=0)
        three = _val_auroc((16, 32, 48), train, val, steps=150, seed=0)
    finally:
        torch.set_num_threads(threads)
    assert three > 0.85, (three, centre_only)
    assert three - centre_only > 0.1, (three, centre_only)


def test_cli_refuses_a_non_empty_out_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    small(out, n_train=32, n_val=16, train_shards=1, block_size=16)
    shard = out / "train-000000.tar"
    before = shard.stat().st_mtime_ns
    args = ["make-synthetic", "--out", str(out), "--train", "48", "--val", "16",
            "--shards", "1", "--workers", "1", "--no-progress"]  # fmt: skip
    refused = run_cli(args, cli_env(tmp_path), 120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"--out {out}: not empty" in refused.stderr and "--overwrite" in refused.stderr
    assert shard.stat().st_mtime_ns == before  # nothing deleted, nothing rewritten
    replaced = run_cli([*args, "--overwrite"], cli_env(tmp_path), 120)
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads((out / MANIFEST_NAME).read_text())["splits"]["train"]["samples"] == 48


# sha256 over (name, bytes) of every shard of `_pinned(dims)`, from the generator before
# `--difficulty` existed: the easy demo (and every cache of it) must keep its bytes.
EASY_DIGESTS = {
    2: "0a2cb19ddb0711eb9d22af4641ae33cba5efd21d83a8c34d5efa054ecfd19ab7",
    3: "c1f4622fbd50b67e62aef8673fa8164bb262b04b4bb3d587d5a07ef6867c94be",
}


@pytest.mark.parametrize("dims", [2, 3])
def test_easy_shards_keep_the_bytes_of_the_generator_before_difficulties(tmp_path, dims):
    import hashlib

    n = 96 if dims == 2 else 16
    make_synthetic(tmp_path, dims=dims, n_train=n, n_val=n // 2, positive_fraction=0.25,
                   seed=11, block_size=16, train_shards=2, val_shards=2, workers=1,
                   progress=False, difficulty="easy")  # fmt: skip
    digest = hashlib.sha256()
    for path in sorted(tmp_path.glob("*.tar")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    assert digest.hexdigest() == EASY_DIGESTS[dims]


def _offsets(out: Path, split: str, size: int) -> np.ndarray:
    coords = np.array([c for _, b in read_blocks(out, split) for c in b.coords])
    return np.linalg.norm(coords - (size - 1) / 2, axis=1)


def test_hard_candidates_are_rare_and_sit_two_to_six_pixels_off_centre(tmp_path):
    # The real CLI parser, with no --positive-fraction: hard means 1:100 by default.
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["make-synthetic", "--out", str(tmp_path / "hard"), "--train",
                              "3000", "--val", "400", "--shards", "2", "--size", "64",
                              "--difficulty", "hard", "--workers", "1", "--no-progress"])  # fmt: skip
    assert args.func(args) == 0
    manifest = json.loads((tmp_path / "hard" / MANIFEST_NAME).read_text())
    assert manifest["splits"]["train"]["positives"] == 30  # 1:100
    assert manifest["splits"]["val"]["positives"] == 4
    assert manifest["splits"]["train"]["patch_shape"] == [1, 64, 64]
    hard = _offsets(tmp_path / "hard", "train", 64)
    assert hard.min() >= 2.0 - 0.01 and hard.max() <= 6.0 + 0.01  # coords are rounded
    assert 3.8 < hard.mean() < 4.2  # U(2, 6)
    small(tmp_path / "easy", n_train=3000, n_val=64, train_shards=2, size=64)
    easy = _offsets(tmp_path / "easy", "train", 64)
    assert easy.mean() < 2.2 and np.mean(easy < 2.0) > 0.5  # the demo: mostly within 2


def test_hard_structures_are_drawn_where_their_centre_says(tmp_path):
    # The offset is in the picture, not only in the meta: render small nodules with no
    # texture and no noise; each centre is bright, the patch centre of a far one is not.
    from pipeline.data.phantoms import render

    n, size = 200, 48
    kinds = np.array(["small_nodule"] * n, dtype=object)
    flat = {"tissue": np.full(n, 200.0), "background": np.full(n, 20.0),
            "texture": np.zeros(n), "noise": np.zeros(n)}  # fmt: skip
    patches, centres = render(np.random.default_rng(3), kinds, 2, size, **flat, offset=(2.0, 6.0))
    at = np.rint(centres).astype(int)
    assert np.all(patches[np.arange(n), 0, at[:, 0], at[:, 1]] > 150)
    offset = np.linalg.norm(centres - (size - 1) / 2, axis=1)
    assert 3.8 < offset.mean() < 4.2
    # A bright pixel-mass centroid off the patch centre by about the offset (clutter aside).
    ys, xs = np.mgrid[:size, :size]
    mass = (patches[:, 0] > 110) & (np.hypot(ys - 23.5, xs - 23.5) < 14)
    cy = (mass * ys).sum((1, 2)) / mass.sum((1, 2))
    cx = (mass * xs).sum((1, 2)) / mass.sum((1, 2))
    seen = np.hypot(cy - 23.5, cx - 23.5)
    assert np.median(seen) > 2.5, np.median(seen)


def test_the_demo_config_generates_hard_data_at_the_stored_size(tmp_path):
    from pipeline.config import load
    from pipeline.data.sources import ensure_synthetic, synthetic_dir

    easy = load(None, [])
    assert synthetic_dir(easy.data).name == "synthetic-v2-2d-s0-n24576-4096-p0.25-k256-x8"
    cfg = load(None, ["data.synthetic.difficulty=hard", "data.patch_size=64",
                      "data.synthetic.train=800", "data.synthetic.val=200",
                      "data.synthetic.block_size=64", "data.synthetic.shards=2"])  # fmt: skip
    assert synthetic_dir(cfg.data).name.endswith("-p0.01-k64-x2-hard-S64")
    cfg.data.synthetic.dir = str(tmp_path)
    manifest = json.loads((ensure_synthetic(cfg.data, is_main=True) / MANIFEST_NAME).read_text())
    assert manifest["splits"]["train"]["patch_shape"] == [1, 64, 64]
    assert manifest["splits"]["train"]["positives"] == 8
    assert np.abs(_offsets(tmp_path, "train", 64)).mean() > 3.5
