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


def add_cv_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cv",
        help="K-fold cross-validation: one run per fold, then per-fold and pooled CPM",
        description="Train one model per fold of `convert --folds K` shards (in sequence, or "
        "one fold per SLURM array task with --fold), then evaluate each fold on its held-out "
        "scans and print per-fold and pooled metrics as JSON.",
    )
    parser.add_argument("--folds", type=int, required=True, help="K, as given to convert")
    parser.add_argument(
        "--shards", required=True, help="folder with fold0-*.tar .. fold<K-1>-*.tar"
    )
    parser.add_argument("--runs", default="runs/cv", help="run folders RUNS/fold<i> (runs/cv)")
    parser.add_argument("--config", help="YAML config file for every fold")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--fold", type=int, help="train only this fold (a SLURM array task)")
    mode.add_argument(
        "--summarise", action="store_true", help="train nothing: evaluate and summarise"
    )
    mode.add_argument(
        "--print-fold-args",
        type=int,
        metavar="I",
        help="print fold I's `pipeline train` overrides, one per line (used by slurm/cv.sbatch)",
    )
    parser.add_argument("--annotations", help="annotations.csv: LUNA16 CPM per fold and pooled")
    parser.add_argument("--excluded", help="annotations_excluded.csv")
    parser.add_argument(
        "--scans", help="evaluated scans (default: convert's scans-fold<i>.csv per fold)"
    )
    parser.add_argument("--max-marks", type=int, default=100, help="marks per scan (100)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides for every fold's training")
    parser.set_defaults(func=run_cv)


def run_cv(args: argparse.Namespace) -> int:
    from pipeline import cv
    from pipeline.errors import ConfigError
    from pipeline.evaluate import LunaOptions

    shards, runs = Path(args.shards), Path(args.runs)
    cv.fold_shards(shards, args.folds)  # a wrong folder or K fails before any training
    if args.print_fold_args is not None:
        print("\n".join(cv.fold_overrides(shards, args.folds, args.print_fold_args)))
        return 0
    if args.config is not None:
        config_module.load(args.config, args.overrides)  # bad config: one line, now
    if args.annotations is None and (args.excluded or args.scans):
        raise ConfigError("--excluded and --scans need --annotations annotations.csv")
    if args.fold is not None:
        return cv.train_fold(args.config, args.overrides, shards, args.folds, args.fold, runs)
    failed: dict[int, int] = {}
    if not args.summarise:
        for fold in range(args.folds):
            if cv.status(runs, fold).done:
                print(f"cv: fold {fold} already finished, not retrained", flush=True)
                continue
            rc = cv.train_fold(args.config, args.overrides, shards, args.folds, fold, runs)
            if rc != 0:
                failed[fold] = rc  # the other folds still train; the summary names this one
    luna = None
    if args.annotations is not None:
        luna = LunaOptions(
            args.annotations, args.excluded, args.scans, args.max_marks, args.bootstrap, args.seed
        )
    summary = cv.summarise(runs, shards, args.folds, luna, failed)
    (runs / "cv_summary.json").write_text(json.dumps(_strict(summary), indent=2))
    json.dump(_strict(summary), sys.stdout, indent=2)
    print()
    if summary["not_finished"]:
        names = ", ".join(f"fold {k}: {v}" for k, v in summary["not_finished"].items())
        print(f"pipeline cv: not finished, left out of the pooled CPM: {names}", file=sys.stderr)
        return 1
    return 0
