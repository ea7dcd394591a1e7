"""`pipeline make-synthetic`: realistic synthetic candidates written as shards, in parallel.

Each shard is rendered from its own RNG, `default_rng([seed, split_index, shard_index])`,
by one worker that also writes it, so the bytes depend only on the seed and the shard,
never on how many workers ran. The parent only gathers ShardInfo and writes the manifest.
What the candidates look like, and why the task needs context, is in `phantoms.py`.

Two difficulties (`--difficulty`, `data.synthetic.difficulty`):
- `easy` (the demo): structures within a few pixels of the patch centre, 1 positive in 4.
  Its bytes are those of GENERATOR_VERSION 2 before difficulties existed (a test pins them).
- `hard`: what a detector hands over. Each structure sits 2-6 pixels/voxels from the patch
  centre in a random direction (mean 4), and 1 candidate in 100 is positive. Orientation
  is uniformly random in both (every structure's axis is a random unit vector, not a
  multiple of 90 degrees). Suggested for a small training set as real studies have:
  `--train 4096 --val 4096 --size 64` (about 40 positives to learn from; the 64-pixel
  patch leaves a margin of 8 for `data.augment.translate`, train with `data.patch_size=64`).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import SyntheticConfig
from pipeline.data.format import MANIFEST_NAME, ShardInfo, update_manifest, write_shard
from pipeline.data.phantoms import KINDS, NEGATIVE_KINDS, POSITIVE_KINDS, render
from pipeline.errors import ConfigError
from pipeline.tracking.progress import work_progress

# Bump when the rendering changes, so caches keyed on it are regenerated, not reused.
GENERATOR_VERSION = 2
SPLITS = ("train", "val")
SCAN_SIZE = 16  # candidates per synthetic scan, so per-scan metrics (CPM) have groups


@dataclass(frozen=True)
class Difficulty:
    positive_fraction: float
    """Default share of positives (`--positive-fraction` overrides it)."""
    offset: tuple[float, float] | None
    """Distance range of each structure from the patch centre; None = the easy jitter."""


DIFFICULTIES = {
    "easy": Difficulty(positive_fraction=0.25, offset=None),
    "hard": Difficulty(positive_fraction=0.01, offset=(2.0, 6.0)),
}


def _draw_kinds(rng: np.random.Generator, n: int, positives: int) -> tuple[np.ndarray, np.ndarray]:
    """Exactly `positives` ones in random order, and a kind per candidate from its class mix."""
    labels = rng.permutation(np.arange(n) < positives).astype(np.uint8)
    kinds = np.empty(n, dtype=object)
    for label, mix in ((1, POSITIVE_KINDS), (0, NEGATIVE_KINDS)):
        members = labels == label
        p = np.array(list(mix.values()))
        kinds[members] = rng.choice(list(mix), size=int(members.sum()), p=p / p.sum())
    return labels, kinds


def _scan_intensities(rng: np.random.Generator, scans: int) -> dict[str, np.ndarray]:
    """One tissue/lung intensity, texture and noise level per scan, shared by its structures."""
    return {
        "tissue": rng.uniform(100.0, 220.0, scans),
        "background": rng.uniform(15.0, 60.0, scans),
        "texture": rng.uniform(8.0, 28.0, scans),
        "noise": rng.uniform(4.0, 16.0, scans),
    }


def render_candidates(
    rng: np.random.Generator,
    n: int,
    dims: int,
    size: int = 48,
    positive_fraction: float | None = None,
    difficulty: str = "easy",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """n candidates, each its own scan: patches uint8 [n, 1, S, S(, S)], labels uint8 [n], kinds.

    `positive_fraction` None = the difficulty's default (easy 0.25, hard 0.01).
    """
    level = DIFFICULTIES[difficulty]
    fraction = level.positive_fraction if positive_fraction is None else positive_fraction
    labels, kinds = _draw_kinds(rng, n, int(round(n * fraction)))
    scan = _scan_intensities(rng, n)
    patches, _ = render(rng, kinds, dims, size, **scan, offset=level.offset)
    return patches, labels, [str(k) for k in kinds]


@dataclass(frozen=True)
class _ShardJob:
    path: str
    split: str
    split_index: int
    shard_index: int
    samples: int
    positives: int
    dims: int
    size: int
    seed: int
    block_size: int
    difficulty: str = "easy"


def _write_one(job: _ShardJob) -> ShardInfo:
    """Render and write one whole shard; runs in a worker process."""
    rng = np.random.default_rng([job.seed, job.split_index, job.shard_index])
    labels, kinds = _draw_kinds(rng, job.samples, job.positives)
    scans = -(-job.samples // SCAN_SIZE)
    # Candidates of one scan are spread through the shard, so each block mixes scans.
    scan_of = rng.permutation(np.arange(job.samples) % scans)
    intensity = {k: v[scan_of] for k, v in _scan_intensities(rng, scans).items()}
    offset = DIFFICULTIES[job.difficulty].offset
    patches, centres = render(rng, kinds, job.dims, job.size, **intensity, offset=offset)
    prefix = f"{job.split}/{job.shard_index:06d}"
    return write_shard(
        job.path,
        patches,
        labels,
        ids=[f"{prefix}/{i:05d}" for i in range(job.samples)],
        groups=[f"scan-{job.split}-{job.shard_index:03d}-{s:04d}" for s in scan_of],
        coords=np.round(centres.astype(np.float64), 2).tolist(),  # short JSON numbers
        block_size=job.block_size,
    )


def _shard_jobs(
    out_dir: Path,
    split: str,
    split_index: int,
    n: int,
    shards: int,
    positive_fraction: float,
    **common: int | str,
) -> list[_ShardJob]:
    sizes = [len(part) for part in np.array_split(np.arange(n), min(shards, n))]
    # At least one of each class when possible, so validation AUROC is defined.
    total = (
        min(max(int(round(n * positive_fraction)), 1), n - 1)
        if n > 1
        else int(round(n * positive_fraction))
    )
    cumulative = np.rint(np.cumsum(sizes) * total / n).astype(int)
    positives = np.diff(np.concatenate([[0], cumulative]))
    return [
        _ShardJob(
            str(out_dir / f"{split}-{i:06d}.tar"), split, split_index, i, size, int(pos), **common
        )
        for i, (size, pos) in enumerate(zip(sizes, positives, strict=True))
    ]


def _check(name: str, ok: bool, problem: str) -> None:
    if not ok:
        raise ConfigError(f"make-synthetic: {name}: {problem}")


def make_synthetic(
    out_dir: str | Path,
    dims: int,
    n_train: int,
    n_val: int,
    positive_fraction: float | None,
    seed: int,
    block_size: int = 256,
    train_shards: int = 8,
    val_shards: int = 2,
    workers: int | None = None,
    progress: bool = True,
    size: int = 48,
    difficulty: str = "easy",
) -> Path:
    """Write `<out_dir>/{train,val}-NNNNNN.tar` and `manifest.json`; return the manifest path.

    Byte-identical for a seed whatever `workers` is (default: all cores).
    `positive_fraction` None = the difficulty's default (easy 0.25, hard 0.01).
    """
    _check(
        "difficulty",
        difficulty in DIFFICULTIES,
        f"must be one of {'|'.join(DIFFICULTIES)}, got {difficulty!r}",
    )
    if positive_fraction is None:
        positive_fraction = DIFFICULTIES[difficulty].positive_fraction
    _check("dims", dims in (2, 3), f"must be 2 or 3, got {dims}")
    _check("train", n_train > 0, f"must be > 0, got {n_train}")
    _check("val", n_val > 0, f"must be > 0, got {n_val}")
    _check(
        "positive_fraction",
        0.0 < positive_fraction < 1.0,
        f"must be in (0, 1), got {positive_fraction}",
    )
    _check("block_size", block_size > 0, f"must be > 0, got {block_size}")
    _check("shards", train_shards > 0 and val_shards > 0, "must be > 0")
    _check("size", size >= 8, f"must be >= 8, got {size}")
    _check("workers", workers is None or workers > 0, f"must be > 0, got {workers}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # No manifest until every shard is written: an interrupted run is seen as missing.
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    common = {"dims": dims, "size": size, "seed": seed, "block_size": block_size}
    common["difficulty"] = difficulty
    jobs = {
        split: _shard_jobs(out_dir, split, index, n, shards, positive_fraction, **common)
        for index, (split, n, shards) in enumerate(
            zip(SPLITS, (n_train, n_val), (train_shards, val_shards), strict=True)
        )
    }
    all_jobs = [job for split_jobs in jobs.values() for job in split_jobs]
    # Largest first, so one big shard does not start last and leave the other cores idle.
    all_jobs.sort(key=lambda job: -job.samples)
    workers = max(1, min(workers or os.cpu_count() or 1, len(all_jobs)))
    infos: dict[str, list[ShardInfo]] = {split: [] for split in SPLITS}
    bar = work_progress(n_train + n_val, "make-synthetic", enabled=progress)
    with bar:
        if workers == 1:
            for job in all_jobs:
                infos[job.split].append(_write_one(job))
                bar.update(job.samples)
        else:
            # fork: workers start in milliseconds and need nothing from the parent but the job.
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                futures = {pool.submit(_write_one, job): job for job in all_jobs}
                for future in as_completed(futures):
                    infos[futures[future].split].append(future.result())
                    bar.update(futures[future].samples)
    _remove_stale(out_dir, {Path(job.path).name for job in all_jobs})
    for split in SPLITS:
        update_manifest(
            out_dir, split, infos[split], patch_shape=(1,) + (size,) * dims, dtype="uint8"
        )
    return out_dir / MANIFEST_NAME


def _remove_stale(out_dir: Path, written: set[str]) -> None:
    """Drop our own shards left by an earlier, larger run, so globs match only this one."""
    for split in SPLITS:
        for path in out_dir.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
            if path.name not in written:
                path.unlink()


def refuse_non_empty(out: str | os.PathLike, overwrite: bool) -> None:
    """ConfigError unless `out` is new or empty, or `overwrite` allows replacing it (as convert)."""
    path = Path(out).expanduser()
    entries = sorted(path.iterdir()) if path.is_dir() else []
    if entries and not overwrite:
        raise ConfigError(
            f"--out {out}: not empty ({entries[0].name}, ... {len(entries)} entries); "
            "pass --overwrite to replace its shards"
        )


def _run(args: argparse.Namespace) -> int:
    from pipeline.data.publish import is_upload_target, output_dir

    if not is_upload_target(args.out):
        refuse_non_empty(args.out, args.overwrite)
    start = time.perf_counter()
    # s3:// and gs://: uploaded, the manifest last (an existing remote one needs --overwrite)
    with output_dir(args.out, overwrite=args.overwrite) as out:
        manifest = make_synthetic(
            out,
            dims=args.dims,
            n_train=args.train,
            n_val=args.val,
            positive_fraction=args.positive_fraction,
            seed=args.seed,
            block_size=args.block_size,
            train_shards=args.shards,
            val_shards=max(2, args.shards // 4),
            workers=args.workers,
            progress=not args.no_progress,
            size=args.size,
            difficulty=args.difficulty,
        )
        if out != Path(args.out):
            manifest = f"{args.out.rstrip('/')}/{MANIFEST_NAME}"
    print(
        f"wrote {args.train} train + {args.val} val candidates in {time.perf_counter() - start:.1f}s: {manifest}"
    )
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `pipeline make-synthetic`."""
    defaults = SyntheticConfig()
    parser = subparsers.add_parser(
        "make-synthetic",
        help="write realistic synthetic candidate shards (2D or 3D)",
        description=(
            "Nodule-like positives (small, vessel-attached, juxtapleural, large) and hard "
            "negatives (vessel crossings, bifurcations, bulges, mass interiors, wall ridges, "
            f"background). Kinds: {', '.join(KINDS)}."
        ),
    )
    parser.add_argument("--out", required=True, help="output directory for shards + manifest.json")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2)
    parser.add_argument("--train", type=int, default=defaults.train, help="training candidates")
    parser.add_argument("--val", type=int, default=defaults.val, help="validation candidates")
    parser.add_argument(
        "--difficulty",
        choices=tuple(DIFFICULTIES),
        default=defaults.difficulty,
        help="easy: the demo (centred, 1:3); hard: centres 2-6 px off, 1:100 (see the module doc"
        " for suggested sizes: --train 4096 --val 4096 --size 64)",
    )
    parser.add_argument(
        "--positive-fraction",
        type=float,
        default=None,
        help="share of positives (default: easy 0.25, hard 0.01)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--block-size", type=int, default=defaults.block_size, help="samples per record"
    )
    parser.add_argument(
        "--shards", type=int, default=defaults.shards, help="training shards (val: a quarter, >= 2)"
    )
    parser.add_argument(
        "--size",
        type=int,
        default=48,
        help="stored patch size (default 48 = the largest crop; larger leaves a margin for data.augment.translate, then train with data.patch_size=SIZE)",
    )
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace shards already in a non-empty --out"
    )
    parser.set_defaults(func=_run)
