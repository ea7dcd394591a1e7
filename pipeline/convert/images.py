"""`pipeline convert images`: a folder of 2D images + a CSV -> [C, S, S] patch shards.

With `--x-col/--y-col` each row is a candidate at pixel (x = column, y = row, 0-based)
and its patch is centred there; without them each row is a whole image, centred
(and, with `--resize-to`, first scaled so its longer side is that many pixels).
8-bit sources are stored as uint8, 16-bit ones keep uint16/int16.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
from pipeline.errors import ConfigError

# Pillow modes read as they are (bit depth kept); anything else is converted first.
_KEEP_MODES = {"L", "RGB", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
_TO_MODE = {"1": "L", "LA": "L", "La": "L"}  # others (P, RGBA, CMYK, YCbCr...) -> RGB


@dataclass(frozen=True)
class ImageOptions:
    size: int
    pad: str
    pad_value: float
    resize_to: int | None
    channels: int | None


@dataclass
class ImageTask:
    """Some images and their candidate rows: (display path, file path, [(row, (x, y)|None)])."""

    name: str
    tmp_dir: str
    options: ImageOptions
    images: list[tuple[str, str, list[tuple[int, tuple[float, float] | None]]]]


def read_image(path: str | Path) -> np.ndarray:
    """[C, H, W] in a storable dtype from PNG/JPEG/TIFF/.npy; alpha is dropped."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = np.load(path, allow_pickle=False)
    elif suffix in (".tif", ".tiff"):
        import tifffile

        array = tifffile.imread(path)
    else:
        from PIL import Image

        with Image.open(path) as image:
            if image.mode not in _KEEP_MODES:
                image = image.convert(_TO_MODE.get(image.mode, "RGB"))
            array = np.asarray(image)
    return _to_chw(_storable(array))


def _storable(array: np.ndarray) -> np.ndarray:
    """Keep 8- and 16-bit depth; narrow wider integers when their values allow it."""
    array = array.astype(array.dtype.newbyteorder("="), copy=False)  # I;16B is big-endian
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype.name in ("uint8", "int8", "uint16", "int16", "float16", "float32"):
        return array
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    if array.dtype.kind in "iu":
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        for target in (np.uint16, np.int16):
            if np.iinfo(target).min <= low and high <= np.iinfo(target).max:
                return array.astype(target)
        raise ValueError(f"values {low}..{high} do not fit 16 bits")
    raise ValueError(f"unsupported dtype {array.dtype}")


def _to_chw(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3:
        if array.shape[-1] <= 4 < min(array.shape[:2]):
            return np.moveaxis(array, -1, 0)  # HWC, as Pillow and tifffile give colour
        if array.shape[0] < min(array.shape[1:]):
            return array  # already channel-first (multi-page TIFF, CHW .npy)
    raise ValueError(f"expected a 2D image [H,W], [H,W,C] or [C,H,W], got shape {array.shape}")


def _resize(image: np.ndarray, longer_side: int) -> np.ndarray:
    """Scale so the longer side is `longer_side`, keeping the aspect ratio and dtype."""
    from PIL import Image

    height, width = image.shape[1:]
    scale = longer_side / max(height, width)
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    if new == (width, height):
        return image
    # Per channel in float mode 'F': Pillow antialiases when shrinking, at any bit depth.
    planes = [
        np.asarray(Image.fromarray(c.astype(np.float32)).resize(new, Image.BILINEAR)) for c in image
    ]
    return _cast_like(np.stack(planes), image.dtype)


def _cast_like(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    return values.astype(dtype)


def _match_channels(image: np.ndarray, channels: int | None) -> np.ndarray:
    if channels is None or image.shape[0] == channels:
        return image
    if channels == 1 and image.shape[0] == 3:
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as Pillow's 'L'
        return _cast_like(
            np.tensordot(weights, image.astype(np.float32), axes=1)[None], image.dtype
        )
    if image.shape[0] == 1:
        return np.repeat(image, channels, axis=0)
    raise RowError("bad channels", f"image has {image.shape[0]} channels; cannot make {channels}")


def convert_image_task(task: ImageTask) -> TaskResult:
    """Worker: read each image once, crop every candidate in it, save the patches."""
    opts = task.options
    rows: list[int] = []
    patches: list[np.ndarray] = []
    problems: list[Problem] = []
    for shown, path, candidates in task.images:
        try:
            if not Path(path).is_file():
                raise RowError("missing file", f"{shown} not found")
            try:
                image = read_image(path)
            except Exception as exc:  # any decoder failure is the file's fault, not ours
                raise RowError("unreadable image", f"{shown}: {exc}") from None
            if opts.resize_to is not None:
                image = _resize(image, opts.resize_to)
            image = _match_channels(image, opts.channels)
        except RowError as exc:
            problems.extend(Problem(row, exc.reason, exc.detail) for row, _ in candidates)
            continue
        height, width = image.shape[1:]
        for row, xy in candidates:
            centre = ((height - 1) / 2, (width - 1) / 2) if xy is None else (xy[1], xy[0])
            if not inside(centre, (height, width)):
                problems.append(
                    Problem(
                        row,
                        "outside image",
                        f"(x={xy[0]}, y={xy[1]}) is outside {shown} ({width}x{height})",
                    )
                )
                continue
            rows.append(row)
            patches.append(crop_patch(image, centre, opts.size, opts.pad, opts.pad_value))
    return TaskResult(save_chunks(task.tmp_dir, task.name, rows, patches), problems)


def _tasks(
    candidates: Sequence[Candidate], root: Path, tmp: Path, options: ImageOptions, workers: int
) -> list[ImageTask]:
    """One entry per image (read once for all its candidates), packed into balanced tasks."""
    by_image: dict[str, list[tuple[int, Any]]] = {}
    for c in candidates:
        by_image.setdefault(c.source, []).append((c.row, c.coords))
    # Several tasks per worker keep all busy; a cap keeps each chunk file and reply small.
    per_task = min(512, max(1, math.ceil(len(candidates) / (workers * 8))))
    tasks: list[ImageTask] = []
    batch: list[Any] = []
    for shown, items in by_image.items():
        batch.append((shown, str(root / shown), items))
        if sum(len(i) for _, _, i in batch) >= per_task:
            tasks.append(ImageTask(f"images-{len(tasks):06d}", str(tmp), options, batch))
            batch = []
    if batch:
        tasks.append(ImageTask(f"images-{len(tasks):06d}", str(tmp), options, batch))
    return tasks


def convert_images(
    *,
    csv: str | Path,
    out: str | Path,
    root: str | Path | None = None,
    path_col: str = "path",
    label_col: str | None = "label",
    label_threshold: float | None = None,
    drop_uncertain: tuple[float, float] | None = None,
    x_col: str | None = None,
    y_col: str | None = None,
    group_col: str | None = None,
    id_col: str | None = None,
    size: int = 48,
    resize_to: int | None = None,
    pad: str = "constant",
    pad_value: float = 0.0,
    channels: int | None = None,
    val_fraction: float | None = None,
    folds: int | None = None,
    val_fold: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    shard_size: int | None = None,
    block_size: int = 256,
    on_error: str = "skip",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert images + CSV into `out/{train,val}-*.tar` + manifest; returns the summary.

    `label_col=None` converts unlabelled candidates (label 255) into `out/predict-*.tar`.
    """
    require("PIL", "tifffile")
    check_common_args(on_error, size, workers, shard_size, block_size)
    if (x_col is None) != (y_col is None):
        raise ConfigError("--x-col and --y-col go together: give both or neither")
    if resize_to is not None and x_col is not None:
        raise ConfigError(
            "--resize-to applies to whole images; it cannot be combined with --x-col/--y-col"
        )
    if pad not in PAD_MODES:
        raise ConfigError(f"--pad must be one of {PAD_MODES}, got {pad!r}")
    check_label_args(label_col, label_threshold, drop_uncertain, val_fraction, folds, val_fold)
    parse_label = label_parser(label_col, label_threshold, drop_uncertain)
    workers = workers or default_workers()
    root = Path(root) if root is not None else Path(csv).parent

    def parse(line: int, row: dict[str, str]) -> Candidate | None:
        label = parse_label(row)
        if label is None:
            return None
        path = cell(row, path_col)
        if not path:
            raise RowError("bad row", f"empty {path_col!r}")
        coords = None
        if x_col is not None and y_col is not None:
            coords = (parse_float(cell(row, x_col), "x"), parse_float(cell(row, y_col), "y"))
        group = cell(row, group_col) if group_col else path
        if not group:
            raise RowError("bad row", f"empty {group_col!r}")
        return Candidate(
            line, cell(row, id_col) if id_col else f"row{line}", group, label, coords, path
        )

    with Conversion(csv, out, on_error, overwrite, labelled=label_col is not None) as run:
        run.collect([path_col, label_col, x_col, y_col, group_col, id_col], parse)
        split_of = run.split(val_fraction, folds, val_fold, seed)
        options = ImageOptions(size, pad, pad_value, resize_to, channels)
        tasks = _tasks(list(run.candidates.values()), root, run.tmp, options, workers)
        chunks = run.run(convert_image_task, tasks, workers, desc="convert images")
        return run.finish(chunks, split_of, shard_size, block_size, seed)
