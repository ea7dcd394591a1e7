"""`pipeline train` and `pipeline evaluate`: argument wiring around train() and evaluation."""

from __future__ import annotations

import argparse
import json
import re
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
    parser.add_argument(
        "overrides",
        nargs="*",
        help="dotlist overrides, e.g. optim.lr=3e-4; W&B agents' --optim.lr=3e-4 works too",
    )
    parser.add_argument(
        "--preflight",
        action="store_true",
        help="only check the config and that run.dir is not held by a live job, then exit "
        "(the SLURM scripts run this before torchrun: one line instead of a failure per process)",
    )
    parser.set_defaults(func=run_train)


# `--optim.lr=0.01`: what a W&B sweep agent passes by default (its `${args}`).
_AGENT_ARG = re.compile(r"--([A-Za-z_]\w*(?:\.\w+)*)=(.*)", re.DOTALL)
_TRAIN_OPTIONS = ("--config",)


def agent_args_as_overrides(argv: list[str]) -> list[str]:
    """`pipeline train --key=value ...` (W&B agents) -> `pipeline train key=value ...`.

    Order is kept, so the last setting of a key wins as in a plain dotlist; train's own
    options (`--config=FILE`) stay options, and anything without `=` stays an argparse
    error. Unknown keys then fail in config loading, naming the key.
    """
    if not argv or argv[0] != "train":
        return argv
    out = argv[:1]
    for arg in argv[1:]:
        match = _AGENT_ARG.fullmatch(arg)
        if match and f"--{match.group(1)}" not in _TRAIN_OPTIONS:
            out.append(f"{match.group(1)}={match.group(2)}")
        else:
            out.append(arg)
    return out


def run_train(args: argparse.Namespace) -> int:
    from pipeline import distributed, sweep_task
    from pipeline.runtime import requested_run_dir
    from pipeline.train import train

    cfg = config_module.load(args.config, args.overrides)
    if args.preflight:
        from pipeline import run_lock

        run_lock.check_free(requested_run_dir(cfg.run.dir))
        return 0
    main = distributed.detect_env().rank == 0
    if main:  # under slurm/sweep.sbatch: how to restart this run after a requeue
        argv = ["train", *(["--config", args.config] if args.config else []), *args.overrides]
        sweep_task.started(argv, requested_run_dir(cfg.run.dir))
    result = train(cfg)
    if main and result is not None:
        sweep_task.ended(bool(result.get("stopped")))
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
    source.add_argument(
        "--checkpoint",
        help="path to a .pt checkpoint, or a W&B model artifact wandb:ENTITY/PROJECT/NAME:ALIAS",
    )
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
        from pipeline.inference import resolve_checkpoint

        args.checkpoint = str(resolve_checkpoint(args.checkpoint))  # wandb: -> a local file
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


def add_sweep_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="grid/random search without a W&B server (locally or as a SLURM array)",
        description="Train every point of a W&B-format sweep file, or rank a sweep's runs.",
    )
    parser.add_argument("space", nargs="?", metavar="SPACE.yaml", help="sweep file (W&B format)")
    parser.add_argument("--out", help="sweep directory (default runs/sweep-<file name>)")
    parser.add_argument(
        "--slurm",
        choices=("print", "submit"),
        help="print or submit a SLURM array (one preemptible task per point) instead of "
        "training the points here in sequence",
    )
    parser.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra sbatch argument for --slurm, e.g. --sbatch-arg=--partition=gpu (repeatable)",
    )
    parser.add_argument(
        "--summary",
        metavar="DIR",
        help="rank the runs of sweep DIR by their best metric (table, summary.json, summary.png)",
    )
    parser.add_argument("--json", action="store_true", help="with --summary: print JSON")
    parser.set_defaults(func=run_sweep)


def run_sweep(args: argparse.Namespace) -> int:
    import shlex
    import subprocess

    from pipeline import sweep, sweep_summary
    from pipeline.errors import ConfigError

    if args.summary:
        summary = sweep_summary.write(Path(args.summary))
        if args.json:
            json.dump(summary, sys.stdout, indent=2, default=str)
            print()
        else:
            print(sweep_summary.format_table(summary))
            print(f"wrote {Path(args.summary) / 'summary.json'} and summary.png")
        return 0
    if not args.space:
        raise ConfigError("pipeline sweep: give SPACE.yaml, or --summary DIR")
    space = sweep.load_space(args.space)
    group = f"sweep-{space.path.stem}"
    out = Path(args.out or Path("runs") / group)
    rows = sweep.plan(space, out)
    print(f"sweep {space.path} ({space.method}, {len(rows)} points) -> {out}", flush=True)
    if args.slurm:
        command = sweep.slurm_array(rows, out, group, args.sbatch_arg)
        if args.slurm == "print":
            print(shlex.join(command))
            return 0
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ConfigError(f"sbatch failed: {done.stderr.strip().splitlines()[-1:]}")
        print(done.stdout.strip())
        return 0
    codes = sweep.run_local(rows, out, group)
    failed = [r["name"] for r, c in zip(rows, codes, strict=True) if c != 0]
    print(sweep_summary.format_table(sweep_summary.write(out)))
    if failed:
        print(f"failed points: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
