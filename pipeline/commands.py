"""`pipeline train` and `pipeline evaluate`: argument wiring around train() and evaluation."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from pipeline import config as config_module
from pipeline import distributed


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
    from pipeline import sweep_task
    from pipeline.runtime import requested_run_dir
    from pipeline.train import train

    cfg = config_module.load(args.config, args.overrides)
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
        "evaluate", help="score a checkpoint on validation shards; prints JSON metrics"
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="path to a .pt checkpoint, or a W&B model artifact wandb:ENTITY/PROJECT/NAME:ALIAS",
    )
    parser.add_argument("overrides", nargs="*", help="e.g. data.val='shards/val-*.tar'")
    parser.set_defaults(func=run_evaluate)


def eval_dir(checkpoint: Path) -> Path:
    """RUN_DIR/eval for RUN_DIR/checkpoints/*.pt; beside the checkpoint for one moved elsewhere."""
    folder = checkpoint.resolve().parent
    return (folder.parent if folder.name == "checkpoints" else folder) / "eval"


def run_evaluate(args: argparse.Namespace) -> int:

    from pipeline.data.sources import resolve
    from pipeline.evaluate import metrics_of, predict_shards
    from pipeline.inference import load_trained, resolve_checkpoint
    from pipeline.metrics import probability_histogram
    from pipeline.runtime import setup_logging

    env = distributed.detect_env()
    setup_logging(env.rank)
    args.checkpoint = str(resolve_checkpoint(args.checkpoint))  # wandb: -> a local file
    cfg, _, _ = load_trained(args.checkpoint, args.overrides)
    device = distributed.select_device(cfg.train.device, env.local_rank)
    distributed.init(cfg.dist.backend, cfg.dist.timeout_s, device, env)
    try:
        cfg, model, _ = load_trained(args.checkpoint, args.overrides, device)
        val = resolve(cfg.data).val
        preds = predict_shards(model, cfg, val, device, progress="evaluate")
        if distributed.is_main():
            metrics = metrics_of(preds)
            out_dir = eval_dir(Path(args.checkpoint))
            out_dir.mkdir(parents=True, exist_ok=True)
            histogram = probability_histogram(preds.labels, preds.probs)
            (out_dir / f"histogram-{Path(args.checkpoint).stem}.json").write_text(
                json.dumps(histogram)
            )
            # Strict JSON: undefined metrics (one class only) are null, not NaN.
            clean = {
                k: (None if isinstance(v, float) and v != v else v) for k, v in metrics.items()
            }
            json.dump(clean, sys.stdout, indent=2, default=float)
            print()
        distributed.barrier()  # rank 0 scored and wrote; everyone leaves together
    finally:
        distributed.shutdown()
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
