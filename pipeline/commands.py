"""`pipeline train` and `pipeline evaluate`: argument wiring around train() and evaluation."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline import config as config_module


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train (or resume) a model",
        description="Train from shards; with no arguments, the built-in 2D synthetic demo.",
    )
    parser.add_argument("--config", help="YAML config file (defaults are the built-in 2D demo)")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. optim.lr=3e-4")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from pipeline.train import train

    cfg = config_module.load(args.config, args.overrides)
    result = train(cfg)
    return 0 if result is not None else 1


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a checkpoint on validation shards, or a LUNA16 submission CSV; prints JSON",
        description="Score a checkpoint on its validation shards (candidate metrics; with "
        "--annotations also the LUNA16 FROC/CPM per nodule), or score any LUNA16 submission "
        "CSV (--predictions) against the annotations, without a checkpoint.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="path to a .pt checkpoint")
    source.add_argument(
        "--predictions",
        help="a LUNA16 submission CSV (seriesuid,coordX,coordY,coordZ,probability) to score",
    )
    parser.add_argument(
        "--annotations",
        help="annotations.csv (seriesuid,coordX,coordY,coordZ,diameter_mm): LUNA16 FROC/CPM",
    )
    parser.add_argument(
        "--excluded", help="annotations_excluded.csv: marks on these findings are ignored"
    )
    parser.add_argument(
        "--scans",
        help="the evaluated scans, one seriesuid per line (default: the scans with marks); "
        "scans without marks still count in FP/scan",
    )
    parser.add_argument(
        "--max-marks", type=int, default=100, help="marks kept per scan, best first (default 100)"
    )
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples of scans (default 1000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("overrides", nargs="*", help="e.g. data.val='shards/val-*.tar'")
    parser.set_defaults(func=run_evaluate)


def eval_dir(checkpoint: Path) -> Path:
    """RUN_DIR/eval for RUN_DIR/checkpoints/*.pt; beside the checkpoint for one moved elsewhere."""
    folder = checkpoint.resolve().parent
    return (folder.parent if folder.name == "checkpoints" else folder) / "eval"


def run_evaluate(args: argparse.Namespace) -> int:
    from pipeline.errors import ConfigError
    from pipeline.evaluate import LunaOptions, evaluate_checkpoint, score_submission

    if args.annotations is None:
        for flag, value in (
            ("--predictions", args.predictions),
            ("--excluded", args.excluded),
            ("--scans", args.scans),
        ):
            if value is not None:
                raise ConfigError(f"{flag} needs --annotations annotations.csv")
    if args.predictions is not None and args.overrides:
        raise ConfigError("overrides apply to --checkpoint only, not to --predictions")
    if args.max_marks < 0:
        raise ConfigError(f"--max-marks must be >= 0 (0: keep all), got {args.max_marks}")
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    luna = None
    if args.annotations is not None:
        luna = LunaOptions(
            args.annotations, args.excluded, args.scans, args.max_marks, args.bootstrap, args.seed
        )
    if args.predictions is not None:
        result = score_submission(args.predictions, luna)  # type: ignore[arg-type]
    else:
        result = evaluate_checkpoint(
            args.checkpoint, args.overrides, eval_dir(Path(args.checkpoint)), luna
        )
    if result is not None:
        # Strict JSON: undefined metrics (one class only) are null, not NaN.
        json.dump(_strict(result), sys.stdout, indent=2, default=float)
        print()
    return 0


def _strict(value):
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value
