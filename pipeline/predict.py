"""`pipeline predict`: a checkpoint's logits, probabilities and decisions for every sample.

Under torchrun each rank predicts its share of the shards (shards[rank::world], as
validation does), rank 0 gathers the rows and writes one file. The transform is
validation's: the checkpoint's normalisation, no augmentation.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pipeline import distributed
from pipeline.data.format import UNKNOWN_LABEL
from pipeline.errors import ConfigError
from pipeline.metrics import resolve_threshold

log = logging.getLogger("pipeline")

COLUMNS = ("id", "group", "logit", "probability", "predicted", "label")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="score shards with a checkpoint; writes one row per sample (CSV or Parquet)",
        description="Score every sample of the shards with a trained checkpoint.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="path to a .pt checkpoint, or a W&B model artifact wandb:ENTITY/PROJECT/NAME:ALIAS",
    )
    parser.add_argument(
        "--shards", required=True, help="shard pattern, e.g. 'shards/test-{000..009}.tar'"
    )
    parser.add_argument("--out", default="preds.csv", help="output file: .csv or .parquet")
    parser.add_argument(
        "--threshold",
        help="probability (e.g. 0.3) or operating point of the checkpoint "
        "(youden|f1|sens90|sens95|fpr01); default: config predict.threshold",
    )
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.batch_size=256")
    parser.set_defaults(func=run_predict)


def threshold_of(spec: str | float, points: Mapping[str, float] | None, checkpoint: str) -> float:
    """A probability threshold from a number or a name the checkpoint stores.

    The error for an unknown name lists what this checkpoint does have, with values.
    """
    try:
        float(spec)
    except (TypeError, ValueError):
        name = str(spec).strip()
        usable = {k: v for k, v in (points or {}).items() if not math.isnan(float(v))}
        if name not in usable:
            have = (
                ", ".join(f"{k}={v:.4g}" for k, v in usable.items()) or "none (no validation ran)"
            )
            raise ConfigError(
                f"threshold {name!r}: checkpoint {checkpoint} has no such operating point; "
                f"available: {have}; or give a probability such as 0.5"
            ) from None
    return resolve_threshold(spec, points)


def output_format(out: str) -> str:
    """csv | parquet from the file name; parquet needs pyarrow (checked before any work)."""
    suffix = Path(out).suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"--out {out}: writing Parquet needs pyarrow (pip install pyarrow), or write .csv"
            ) from None
        return "parquet"
    raise ConfigError(f"--out {out}: must end in .csv or .parquet")


def rows_of(preds, threshold: float) -> dict[str, list]:
    """Column name -> values, one entry per sample (group is '' when shards carry none)."""
    probs = preds.probs
    groups = preds.groups if preds.groups is not None else [""] * len(preds.ids)
    return {
        "id": list(preds.ids),
        "group": list(groups),
        "logit": preds.logits.astype(np.float64).tolist(),
        "probability": probs.astype(np.float64).tolist(),
        # The metrics' convention: positive when p >= threshold.
        "predicted": (probs >= threshold).astype(int).tolist(),
        # Empty where the shard marks the label unknown (255): new candidates to score.
        "label": [None if y == UNKNOWN_LABEL else int(y) for y in preds.labels.tolist()],
    }


def write_rows(columns: dict[str, list], out: Path, fmt: str) -> None:
    """Write atomically: a reader never sees a half-written file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table(columns), tmp)
        else:
            with open(tmp, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(COLUMNS)
                # repr() of a float round-trips exactly, so logits survive the text file.
                writer.writerows(zip(*(columns[c] for c in COLUMNS), strict=True))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def run_predict(args: argparse.Namespace) -> int:
    from pipeline.data.format import expand_shards
    from pipeline.evaluate import predict_shards
    from pipeline.inference import load_trained
    from pipeline.runtime import check_output_file, setup_logging

    env = distributed.detect_env()
    setup_logging(env.rank)
    # Every user error surfaces here, on every rank, before a process group exists.
    fmt = output_format(args.out)
    out = check_output_file(args.out, "--out")
    shards = expand_shards(args.shards, "--shards")
    cfg, model, state = load_trained(args.checkpoint, args.overrides)
    spec_value = args.threshold if args.threshold is not None else cfg.predict.threshold
    threshold = threshold_of(spec_value, state.get("thresholds"), args.checkpoint)

    device = distributed.select_device(cfg.train.device, env.local_rank)
    distributed.init(cfg.dist.backend, cfg.dist.timeout_s, device, env)
    try:
        model.to(device)
        preds = predict_shards(model, cfg, shards, device, allow_unknown=True, progress="predict")
        if distributed.is_main():
            columns = rows_of(preds, threshold)
            write_rows(columns, out, fmt)
            if preds.bad_records:
                log.warning("skipped %d unreadable records (data.on_error=skip)", preds.bad_records)
            print(
                f"wrote {len(preds.ids)} predictions from {len(shards)} shards to {out} "
                f"(threshold {spec_value} = {threshold:.6g}; "
                f"{sum(columns['predicted'])} predicted positive, "
                f"{columns['label'].count(None)} unlabelled)",
                flush=True,
            )
        distributed.barrier()  # rank 0 wrote the file; everyone leaves together
    finally:
        distributed.shutdown()
    return 0
