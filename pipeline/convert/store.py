"""Patches on their way to shards: per-task chunk files, then shuffled shards + manifest.

Workers write their patches to `.npy` chunk files under `OUT/.convert-tmp/` and send
back only row numbers, so the main process never holds the dataset in memory (LUNA16's
754k candidates at 48^3 are about 83 GB). Shards are then gathered from the memory-mapped
chunks in a seeded random order, one shard in memory at a time.
"""

from __future__ import annotations

import math
import shutil
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.convert.table import Candidate
from pipeline.errors import DataError

if TYPE_CHECKING:
    from pipeline.data.format import ShardInfo

TMP_NAME = ".convert-tmp"
REPORT_NAME = "convert_report.json"
# Output splits, in the order they are written; the index seeds each split's shuffle.
# The last is format.PREDICT_SPLIT (unlabelled candidates), spelled out here because
# importing pipeline.data.format pulls in webdataset and torch (~3 s per convert start).
SPLITS = ("train", "val", "predict")
PREDICT_SPLIT = SPLITS[-1]
# Auto shard size: about this many bytes of patches per shard (webdataset's sweet spot).
AUTO_SHARD_BYTES = 128 * 2**20
# ...and at least this many shards, enough for 8 GPUs x 8 loader workers (or 64 GPUs x 1).
MIN_AUTO_SHARDS = 64


@dataclass
class Chunk:
    """Patches of one task that share a layout, stored as one [N, C, S, ...] .npy file."""

    path: str
    rows: list[int]
    dtype: str
    shape: tuple[int, ...]


def save_chunks(
    tmp_dir: str | Path, name: str, rows: Sequence[int], patches: Sequence[np.ndarray]
) -> list[Chunk]:
    """Stack patches by (dtype, shape) and save each stack; mixed layouts are judged later."""
    by_layout: dict[tuple[str, tuple[int, ...]], list[int]] = defaultdict(list)
    for i, patch in enumerate(patches):
        by_layout[(patch.dtype.name, patch.shape)].append(i)
    chunks = []
    for n, ((dtype, shape), members) in enumerate(sorted(by_layout.items())):
        path = Path(tmp_dir) / f"{name}-{n}.npy"
        np.save(path, np.stack([patches[i] for i in members]), allow_pickle=False)
        chunks.append(Chunk(str(path), [rows[i] for i in members], dtype, tuple(shape)))
    return chunks


def prepare_out(out: str | Path, overwrite: bool) -> list[Path]:
    """Create OUT and a fresh scratch folder; return earlier outputs that `overwrite` replaces.

    Nothing is deleted here: old shards go only once new ones are about to be written, so
    a run that fails on a bad row leaves the previous conversion intact.
    """
    from pipeline.data.format import MANIFEST_NAME

    out = Path(out)
    shards = [p for split in [*SPLITS, "fold*"] for p in out.glob(f"{split}-*.tar")]
    old = [*shards, *out.glob("scans-*.csv"), out / MANIFEST_NAME, out / REPORT_NAME]
    old = [p for p in old if p.exists()]
    if old and not overwrite:
        raise DataError(
            f"{out}: already holds shards ({old[0].name}, ...); pass --overwrite to replace them"
        )
    shutil.rmtree(out / TMP_NAME, ignore_errors=True)
    (out / TMP_NAME).mkdir(parents=True)
    return old


def _fold_number(split: str) -> int:
    """fold<i> (from `convert --folds K` without --val-fold) sorts by i, not as text."""
    return int(split.removeprefix("fold"))


def common_layout(chunks: Sequence[Chunk]) -> tuple[tuple[int, ...], str]:
    """The one (shape, dtype) all patches share; DataError describing the mix otherwise."""
    from pipeline.data.format import ALLOWED_DTYPES

    layouts: dict[tuple[tuple[int, ...], str], list[int]] = defaultdict(list)
    for chunk in chunks:
        layouts[(chunk.shape, chunk.dtype)].extend(chunk.rows)
    if len(layouts) > 1:
        parts = [
            f"{dtype} {list(shape)} ({len(rows)} rows, e.g. row {min(rows)})"
            for (shape, dtype), rows in sorted(layouts.items(), key=lambda kv: min(kv[1]))
        ]
        raise DataError(
            "patches differ in dtype or channels: "
            + "; ".join(parts)
            + "; convert the sources to one bit depth, or pass --channels N"
        )
    ((shape, dtype),) = layouts
    if dtype not in ALLOWED_DTYPES:
        raise DataError(f"patch dtype {dtype} is not storable; shards allow {ALLOWED_DTYPES}")
    return shape, dtype


def shard_count(
    samples: int, shape: Sequence[int], dtype: str, shard_size: int | None, block_size: int
) -> int:
    """Shards for one split: `shard_size` samples each, or the automatic rule.

    The loader hands whole shards to ranks x loader workers, so too few shards leave GPUs
    idle: auto aims at MIN_AUTO_SHARDS shards (while each still holds a full block) and
    at most AUTO_SHARD_BYTES per shard.
    """
    if shard_size is not None:
        return math.ceil(samples / shard_size)
    sample_bytes = math.prod(shape) * np.dtype(dtype).itemsize
    by_bytes = math.ceil(samples * sample_bytes / AUTO_SHARD_BYTES)
    return max(by_bytes, min(MIN_AUTO_SHARDS, samples // block_size), 1)


def write_splits(
    out: Path,
    chunks: Sequence[Chunk],
    candidates: Mapping[int, Candidate],
    split_of: Mapping[int, str],
    shard_size: int | None,
    block_size: int,
    seed: int,
) -> dict[str, list[ShardInfo]]:
    """Shuffle each split's samples, cut them into shards, write them and the manifest."""
    from pipeline.data.format import update_manifest, write_shard

    shape, dtype = common_layout(chunks)
    where = {
        row: (c, offset) for c, chunk in enumerate(chunks) for offset, row in enumerate(chunk.rows)
    }
    written: dict[str, list[ShardInfo]] = {}
    folds = sorted({s for s in split_of.values() if s not in SPLITS}, key=_fold_number)
    for split_index, split in enumerate([*SPLITS, *folds]):
        # Sorted rows first, so the shuffle depends on the seed only, not on worker timing.
        rows = sorted(r for r in where if split_of[r] == split)
        if not rows:
            continue
        order = np.random.default_rng([seed, split_index]).permutation(len(rows))
        infos = []
        for k, part in enumerate(
            np.array_split(order, shard_count(len(rows), shape, dtype, shard_size, block_size))
        ):
            picked = [candidates[rows[i]] for i in part]
            infos.append(
                write_shard(
                    out / f"{split}-{k:06d}.tar",
                    _gather(chunks, [where[c.row] for c in picked], shape, dtype),
                    np.array([c.label for c in picked], dtype=np.uint8),
                    [c.id for c in picked],
                    [c.group for c in picked],
                    None if picked[0].coords is None else [c.coords for c in picked],
                    block_size=block_size,
                )
            )
        update_manifest(out, split, infos, patch_shape=shape, dtype=dtype)
        written[split] = infos
    return written


def _gather(
    chunks: Sequence[Chunk], places: Sequence[tuple[int, int]], shape: tuple[int, ...], dtype: str
) -> np.ndarray:
    """Patches at (chunk, offset) places, in that order; each chunk file opened once."""
    patch = np.empty((len(places), *shape), dtype=dtype)
    by_chunk: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for position, (c, offset) in enumerate(places):
        by_chunk[c].append((offset, position))
    for c, pairs in by_chunk.items():
        pairs.sort()  # ascending offsets read the memory map front to back
        source = np.load(chunks[c].path, mmap_mode="r", allow_pickle=False)
        patch[[p for _, p in pairs]] = source[[o for o, _ in pairs]]
        del source
    return patch
