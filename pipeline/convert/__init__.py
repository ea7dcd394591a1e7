"""`pipeline convert images|volumes`: bring your own data into shard format v2.

Only argument parsing lives here; `convert_images` and `convert_volumes` do the work and
can be called directly with keyword arguments. Pillow, tifffile and SimpleITK (the
`convert` extra) are imported only when a conversion runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.convert.table import parse_pair
from pipeline.errors import ConfigError


def _pair(text: str) -> tuple[float, float]:
    try:
        return parse_pair(text, "--drop-uncertain")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _window(values: list[str]) -> tuple[float, float]:
    """--window=-1000,400 or --window -1000 400 (argparse reads '-1000,400' as a flag)."""
    return parse_pair(",".join(values), "--window")


def _add_common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("labels")
    group.add_argument(
        "--label-threshold", type=float, help="label = 1 where the value >= T (for probabilities)"
    )
    group.add_argument(
        "--drop-uncertain",
        type=_pair,
        metavar="LO,HI",
        help="drop rows whose label value v has LO < v < HI",
    )
    group.add_argument(
        "--id-col", help="column with sample ids (default: row<N>, N = CSV line number)"
    )
    group.add_argument(
        "--unlabelled",
        action="store_true",
        help="candidates without labels, to score with `pipeline predict`: no label column, "
        "no split, all samples to predict-*.tar",
    )
    group = parser.add_argument_group("split")
    group.add_argument(
        "--val-fraction",
        type=float,
        help="fraction of groups for val (default 0.2; 0 = train only)",
    )
    group.add_argument(
        "--folds",
        type=int,
        help="K-fold split by group: with --val-fold i, fold i is val and the rest train; "
        "alone, every fold is written as fold0..fold{K-1} (for `pipeline cv`)",
    )
    group.add_argument("--val-fold", type=int, help="which fold (0..K-1) is val")
    group.add_argument("--seed", type=int, default=0, help="split and shuffle seed (default 0)")
    group = parser.add_argument_group("output")
    group.add_argument(
        "--size",
        type=int,
        default=48,
        help="patch side S in pixels/voxels (default 48); larger than the largest crop leaves a margin for data.augment.translate",
    )
    group.add_argument(
        "--pad",
        choices=("constant", "reflect"),
        default="constant",
        help="padding where a crop crosses the border",
    )
    group.add_argument(
        "--shard-size", type=int, help="samples per shard (default: about 128 MiB per shard)"
    )
    group.add_argument(
        "--block-size", type=int, default=256, help="samples per record (default 256)"
    )
    group.add_argument("--workers", type=int, help="parallel processes (default: CPUs available)")
    group.add_argument(
        "--on-error",
        choices=("skip", "fail"),
        default="skip",
        help="bad rows: drop and report (default) or stop",
    )
    group.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")


def _label_col(args: argparse.Namespace, default: str) -> str | None:
    """None for --unlabelled; refusing --label-col with it beats silently ignoring one."""
    if args.unlabelled and args.label_col is not None:
        raise ConfigError("--label-col and --unlabelled contradict each other; give one")
    return None if args.unlabelled else args.label_col or default


def _common_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = (
        "label_threshold drop_uncertain id_col val_fraction folds val_fold seed size pad "
        "shard_size block_size workers on_error overwrite"
    )
    return {name: getattr(args, name) for name in names.split()}


def run_images(args: argparse.Namespace) -> int:
    from pipeline.convert.images import convert_images
    from pipeline.data.publish import output_dir

    with output_dir(args.out, args.overwrite) as out:  # s3://, gs://: uploaded, manifest last
        convert_images(
            csv=args.csv,
            root=args.root,
            out=out,
            path_col=args.path_col,
            label_col=_label_col(args, "label"),
            x_col=args.x_col,
            y_col=args.y_col,
            group_col=args.group_col,
            resize_to=args.resize_to,
            pad_value=args.pad_value,
            channels=args.channels,
            **_common_kwargs(args),
        )
    return 0


def run_volumes(args: argparse.Namespace) -> int:
    from pipeline.convert.volumes import convert_volumes
    from pipeline.data.publish import output_dir

    with output_dir(args.out, args.overwrite) as out:  # s3://, gs://: uploaded, manifest last
        convert_volumes(
            candidates=args.candidates,
            scans=args.scans,
            out=out,
            spacing=args.spacing,
            window=_window(args.window),
            dtype=args.dtype,
            uid_col=args.uid_col,
            x_col=args.x_col,
            y_col=args.y_col,
            z_col=args.z_col,
            label_col=_label_col(args, "class"),
            scan_list=args.scan_list,
            **_common_kwargs(args),
        )
    return 0


def add_parser(subparsers: Any) -> None:
    """Register `convert images` and `convert volumes` on the top-level subparsers."""
    convert = subparsers.add_parser(
        "convert", help="convert images or CT volumes + CSV into shards"
    )
    kinds = convert.add_subparsers(dest="convert_kind", metavar="{images,volumes}", required=True)

    images = kinds.add_parser("images", help="2D images (PNG/JPEG/TIFF/.npy) + labels.csv")
    images.add_argument("--csv", required=True, help="one row per sample or candidate")
    images.add_argument(
        "--root", help="image paths are relative to this (default: the CSV's folder)"
    )
    images.add_argument("--out", required=True, help="output folder for shards + manifest.json")
    images.add_argument("--path-col", default="path", help="image path column (default path)")
    images.add_argument("--label-col", help="label column (default label)")
    images.add_argument("--x-col", help="candidate x (column, 0-based pixels); with --y-col")
    images.add_argument("--y-col", help="candidate y (row, 0-based pixels); with --x-col")
    images.add_argument(
        "--group-col", help="patient/group column for the split (default: the image path)"
    )
    images.add_argument(
        "--resize-to", type=int, help="whole images only: scale so the longer side is this"
    )
    images.add_argument(
        "--pad-value", type=float, default=0.0, help="value for --pad constant (default 0)"
    )
    images.add_argument(
        "--channels", type=int, help="force N channels (RGB->gray by luminance, gray->N by copy)"
    )
    _add_common(images)
    images.set_defaults(func=run_images)

    volumes = kinds.add_parser(
        "volumes", help="CT scans (.mhd/.raw, .nii.gz) + LUNA16-style candidates.csv"
    )
    volumes.add_argument(
        "--candidates", required=True, help="CSV: seriesuid,coordX,coordY,coordZ,class (mm)"
    )
    volumes.add_argument(
        "--scans", required=True, help="folder searched recursively for <seriesuid>.mhd etc."
    )
    volumes.add_argument("--out", required=True, help="output folder for shards + manifest.json")
    volumes.add_argument(
        "--spacing", type=float, default=1.0, help="isotropic voxel size in mm (default 1.0)"
    )
    volumes.add_argument(
        "--window",
        type=str,
        nargs="+",
        default=["-1000,400"],
        help="HU window LO,HI (default -1000,400); write --window=-1000,400 or --window -1000 400",
    )
    volumes.add_argument(
        "--dtype",
        choices=("uint8", "int16"),
        default="uint8",
        help="uint8 (window->0..255) or int16 (HU, clipped)",
    )
    volumes.add_argument(
        "--uid-col",
        default="seriesuid",
        help="scan id column (default seriesuid); also the split group",
    )
    volumes.add_argument("--x-col", default="coordX", help="world x column in mm (default coordX)")
    volumes.add_argument("--y-col", default="coordY", help="world y column in mm (default coordY)")
    volumes.add_argument("--z-col", default="coordZ", help="world z column in mm (default coordZ)")
    volumes.add_argument("--label-col", help="label column (default class)")
    volumes.add_argument(
        "--scan-list",
        help="every scan of the data set, one seriesuid per line (LUNA16's seriesuids.csv): "
        "listed scans without candidates are split too and named in OUT/scans-<split>.csv",
    )
    _add_common(volumes)
    volumes.set_defaults(func=run_volumes)
