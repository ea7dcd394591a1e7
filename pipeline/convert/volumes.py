"""`pipeline convert volumes`: CT scans + a LUNA16-style candidate list -> [1, S, S, S] shards.

Each scan is read with SimpleITK and resampled (linear) onto an isotropic grid whose axes
are the world x, y, z axes (identity direction), so every patch has one orientation
whatever the scanner wrote. World (mm) candidates map to voxels through the resampled
image's origin, spacing and direction. Patches are stored in numpy (z, y, x) order:
`patch[0, z, y, x]`, world +z along axis 1, with the candidate at index S // 2.
"""

from __future__ import annotations

import itertools
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.convert.crop import PAD_MODES, crop_patch, inside
from pipeline.convert.driver import (
    Conversion,
    TaskResult,
    check_common_args,
    check_label_args,
    default_workers,
    label_parser,
    require,
)
from pipeline.convert.store import save_chunks
from pipeline.convert.table import Candidate, Problem, RowError, cell, parse_float
from pipeline.errors import ConfigError, DataError
from pipeline.luna16 import read_scans

SCAN_SUFFIXES = (".mhd", ".mha", ".nii.gz", ".nii", ".nrrd")
VOLUME_DTYPES = ("uint8", "int16")


@dataclass(frozen=True)
class VolumeOptions:
    size: int
    spacing: float
    window: tuple[float, float]
    dtype: str
    pad: str
    threads: int  # ITK threads per worker: CPUs shared out, so N workers don't oversubscribe


@dataclass
class ScanTask:
    """One scan and its candidates [(row, (x, y, z) in mm)]: a worker holds one at a time."""

    name: str
    tmp_dir: str
    options: VolumeOptions
    path: str
    candidates: list[tuple[int, tuple[float, float, float]]]


def find_scans(scans: str | Path) -> dict[str, Path]:
    """seriesuid -> file, for every scan file anywhere under `scans` (symlinks followed)."""
    found: dict[str, Path] = {}
    for directory, _, files in os.walk(scans, followlinks=True):
        for name in files:
            suffix = next((s for s in SCAN_SUFFIXES if name.lower().endswith(s)), None)
            if suffix is None:
                continue
            uid = name[: -len(suffix)]
            if uid in found:
                raise DataError(
                    f"scan {uid!r} found twice: {found[uid]} and {Path(directory) / name}"
                )
            found[uid] = Path(directory) / name
    return found


def resample_isotropic(image: Any, spacing: float, fill: float) -> Any:
    """Linear resample onto an identity-direction grid covering the scan's voxel centres."""
    import SimpleITK as sitk

    corners = np.array(
        [
            image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
            for corner in itertools.product(*[(0, n - 1) for n in image.GetSize()])
        ]
    )
    low, high = corners.min(axis=0), corners.max(axis=0)
    size = [int(np.floor((h - lo) / spacing + 1e-6)) + 1 for lo, h in zip(low, high, strict=True)]
    return sitk.Resample(
        image,
        size,
        sitk.Transform(),  # identity: the output grid lives in the same world space
        sitk.sitkLinear,
        low.tolist(),
        [spacing] * 3,
        np.eye(3).ravel().tolist(),
        fill,
        sitk.sitkFloat32,
    )


def apply_window(hu: np.ndarray, window: tuple[float, float], dtype: str) -> np.ndarray:
    """Clip to the HU window; uint8 maps it linearly to 0..255, int16 keeps HU."""
    low, high = window
    clipped = np.clip(hu, low, high)
    if dtype == "uint8":
        return np.rint((clipped - low) * (255.0 / (high - low))).astype(np.uint8)
    return np.rint(clipped).astype(np.int16)


def convert_scan_task(task: ScanTask) -> TaskResult:
    """Worker: read one scan, resample it, crop and window each candidate, save patches."""
    import SimpleITK as sitk

    opts = task.options
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(opts.threads)
    try:
        try:
            image = sitk.ReadImage(task.path)
        except RuntimeError as exc:
            raise RowError(
                "unreadable scan", f"{task.path}: {str(exc).strip().splitlines()[-1]}"
            ) from None
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise RowError("unreadable scan", f"{task.path}: expected a 3D scalar volume")
    except RowError as exc:
        return TaskResult([], [Problem(row, exc.reason, exc.detail) for row, _ in task.candidates])
    problems, kept = [], []
    for row, world in task.candidates:
        # Judge "inside" on the scan as acquired: the resampled grid is a bounding box.
        if inside(image.TransformPhysicalPointToContinuousIndex(world), image.GetSize()):
            kept.append((row, world))
        else:
            problems.append(
                Problem(row, "outside scan", f"world {world} mm is outside {Path(task.path).name}")
            )
    fill = opts.window[0]  # outside the scan reads as the window's low end (0 in uint8)
    iso = resample_isotropic(image, opts.spacing, fill)
    del image  # bound memory: only the resampled copy stays
    volume = sitk.GetArrayViewFromImage(iso)[None]  # [1, z, y, x], no copy
    rows, patches = [], []
    for row, world in kept:
        i, j, k = iso.TransformPhysicalPointToContinuousIndex(world)
        patch = crop_patch(volume, (k, j, i), opts.size, opts.pad, fill)
        rows.append(row)
        patches.append(apply_window(patch, opts.window, opts.dtype))
    return TaskResult(save_chunks(task.tmp_dir, task.name, rows, patches), problems)


def convert_volumes(
    *,
    candidates: str | Path,
    scans: str | Path,
    out: str | Path,
    spacing: float = 1.0,
    window: tuple[float, float] = (-1000.0, 400.0),
    size: int = 48,
    dtype: str = "uint8",
    pad: str = "constant",
    uid_col: str = "seriesuid",
    x_col: str = "coordX",
    y_col: str = "coordY",
    z_col: str = "coordZ",
    label_col: str | None = "class",
    label_threshold: float | None = None,
    drop_uncertain: tuple[float, float] | None = None,
    id_col: str | None = None,
    val_fraction: float | None = None,
    folds: int | None = None,
    val_fold: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    shard_size: int | None = None,
    block_size: int = 256,
    on_error: str = "skip",
    overwrite: bool = False,
    scan_list: str | Path | None = None,
) -> dict[str, Any]:
    """Convert scans + candidate list into `out/{train,val}-*.tar` + manifest; returns the summary.

    `label_col=None` converts unlabelled candidates (label 255) into `out/predict-*.tar`.
    `folds` without `val_fold` writes `out/fold<i>-*.tar` for every fold. Each split's
    scans are listed in `out/scans-<split>.csv` (the evaluated set for `pipeline evaluate
    --scans`); `scan_list` names every scan of the data set, so listed scans without
    candidates are split with the rest and listed too (they count in FP/scan).
    """
    require("SimpleITK")
    check_common_args(on_error, size, workers, shard_size, block_size)
    if not spacing > 0:
        raise ConfigError(f"--spacing must be positive, got {spacing}")
    if not window[0] < window[1]:
        raise ConfigError(f"--window: need LO < HI, got {window[0]},{window[1]}")
    if dtype not in VOLUME_DTYPES:
        raise ConfigError(f"--dtype must be one of {VOLUME_DTYPES}, got {dtype!r}")
    if dtype == "int16" and not (window[0] >= -32768 and window[1] <= 32767):
        raise ConfigError(f"--window {window[0]},{window[1]} does not fit int16")
    if pad not in PAD_MODES:
        raise ConfigError(f"--pad must be one of {PAD_MODES}, got {pad!r}")
    if not Path(scans).is_dir():
        raise DataError(f"--scans {scans}: not a directory")
    check_label_args(label_col, label_threshold, drop_uncertain, val_fraction, folds, val_fold)
    parse_label = label_parser(label_col, label_threshold, drop_uncertain)
    workers = workers or default_workers()

    def parse(line: int, row: dict[str, str]) -> Candidate | None:
        label = parse_label(row)
        if label is None:
            return None
        uid = cell(row, uid_col)
        if not uid:
            raise RowError("bad row", f"empty {uid_col!r}")
        world = tuple(parse_float(cell(row, c), c) for c in (x_col, y_col, z_col))
        return Candidate(
            line, cell(row, id_col) if id_col else f"row{line}", uid, label, world, uid
        )

    with Conversion(candidates, out, on_error, overwrite, labelled=label_col is not None) as run:
        run.collect([uid_col, x_col, y_col, z_col, label_col, id_col], parse)
        files = find_scans(scans)
        by_scan: dict[str, list[Candidate]] = defaultdict(list)
        for c in run.candidates.values():
            by_scan[c.source].append(c)
        missing = [c for uid, cs in by_scan.items() if uid not in files for c in cs]
        run.report(
            Problem(c.row, "missing scan", f"no {c.source}{{.mhd,.nii.gz,...}} under {scans}")
            for c in missing
        )
        for c in missing:
            del run.candidates[c.row]
        if not run.candidates:
            raise DataError(
                f"{candidates}: none of its {len(by_scan)} seriesuids has a scan under {scans}"
            )
        listed = read_scans(scan_list, "--scan-list") if scan_list is not None else []
        empty = sorted(set(listed) - set(by_scan))  # scans of the set without candidates
        split_of = run.split(val_fraction, folds, val_fold, seed, extra_groups=empty)
        scans_found = sorted(
            ((uid, cs) for uid, cs in by_scan.items() if uid in files),
            key=lambda kv: -len(kv[1]),  # busiest scans first: no big one left for the end
        )
        pool = min(workers, len(scans_found))
        options = VolumeOptions(
            size, spacing, window, dtype, pad, max(1, default_workers() // pool)
        )
        tasks = [
            ScanTask(
                f"scan-{n:06d}",
                str(run.tmp),
                options,
                str(files[uid]),
                [(c.row, c.coords) for c in cs],
            )
            for n, (uid, cs) in enumerate(scans_found)
        ]
        chunks = run.run(convert_scan_task, tasks, workers, desc="convert volumes")
        summary = run.finish(chunks, split_of, shard_size, block_size, seed)
        write_scan_lists(Path(out), run.group_split, set(files) | set(empty))
        return summary


def write_scan_lists(out: Path, group_split: dict[str, str], known: set[str]) -> None:
    """OUT/scans-<split>.csv: each split's seriesuids, one per line under a header.

    Scans whose every candidate was dropped (e.g. missing) are left out unless listed.
    """
    by_split: dict[str, list[str]] = defaultdict(list)
    for uid, split in sorted(group_split.items()):
        if uid in known:
            by_split[split].append(uid)
    for split, uids in by_split.items():
        (out / f"scans-{split}.csv").write_text("seriesuid\n" + "".join(f"{u}\n" for u in uids))
