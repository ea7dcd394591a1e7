"""`pipeline train` and `pipeline evaluate`: argument wiring around train() and evaluation."""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. optim.lr=3e-4")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from pipeline.train import train

    cfg = config_module.load(args.config, args.overrides)
    result = train(cfg)
    return 0 if result is not None else 1


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="score a checkpoint on validation shards; prints JSON metrics"
    )
    parser.add_argument("--checkpoint", required=True, help="path to a .pt checkpoint")
    parser.add_argument("overrides", nargs="*", help="e.g. data.val='shards/val-*.tar'")
    parser.set_defaults(func=run_evaluate)


def eval_dir(checkpoint: Path) -> Path:
    """RUN_DIR/eval for RUN_DIR/checkpoints/*.pt; beside the checkpoint for one moved elsewhere."""
    folder = checkpoint.resolve().parent
    return (folder.parent if folder.name == "checkpoints" else folder) / "eval"


def run_evaluate(args: argparse.Namespace) -> int:

    from pipeline.data.sources import resolve
    from pipeline.evaluate import metrics_of, predict_shards
    from pipeline.inference import load_trained
    from pipeline.metrics import probability_histogram
    from pipeline.runtime import setup_logging

    env = distributed.detect_env()
    setup_logging(env.rank)
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
