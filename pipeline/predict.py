"""`pipeline predict`: a checkpoint's logits, probabilities and decisions for every sample.

Each row keeps its candidate: id, group (scan) and coordinates from the shard meta
(x, y, z in world mm for volumes; x, y in pixels for images). `--format luna16` writes
the LUNA16 submission CSV instead: `seriesuid,coordX,coordY,coordZ,probability`.

Under torchrun each rank predicts its share of the shards (shards[rank::world], as
validation does), rank 0 gathers the rows and writes one file. The transform is
validation's: the checkpoint's normalisation, no augmentation; `predict.tta=flips|dihedral`
averages the logit over flipped/rotated views of each patch (pipeline/tta.py).
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
from pipeline.errors import ConfigError, DataError
from pipeline.metrics import resolve_threshold

log = logging.getLogger("pipeline")

COLUMNS = ("id", "group", "logit", "probability", "predicted", "label")
COORD_NAMES = ("x", "y", "z")
FORMATS = ("rows", "luna16")


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
        "--format",
        choices=FORMATS,
        default="rows",
        help="rows: id,group,x,y[,z],logit,probability,predicted,label (default); "
        "luna16: the challenge's submission CSV seriesuid,coordX,coordY,coordZ,probability",
    )
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
    """Column name -> values, one entry per sample (group is '' when shards carry none).

    Coordinate columns x, y[, z] follow `group` when the shards carry coordinates.
    """
    probs = preds.probs
    groups = preds.groups if preds.groups is not None else [""] * len(preds.ids)
    where = {}
    coords = getattr(preds, "coords", None)
    if coords is not None and 1 <= coords.shape[1] <= len(COORD_NAMES):
        where = {COORD_NAMES[d]: coords[:, d].tolist() for d in range(coords.shape[1])}
    return {
        "id": list(preds.ids),
        "group": list(groups),
        **where,
        "logit": preds.logits.astype(np.float64).tolist(),
        "probability": probs.astype(np.float64).tolist(),
        # The metrics' convention: positive when p >= threshold.
        "predicted": (probs >= threshold).astype(int).tolist(),
        # Empty where the shard marks the label unknown (255): new candidates to score.
        "label": [None if y == UNKNOWN_LABEL else int(y) for y in preds.labels.tolist()],
    }


def luna16_rows(preds) -> dict[str, list]:
    """The LUNA16 submission columns; DataError unless every sample has a scan and x, y, z."""
    coords = getattr(preds, "coords", None)
    if preds.groups is None or coords is None or coords.shape[1] != 3:
        have = "no coordinates" if coords is None else f"{coords.shape[1]}-D coordinates"
        raise DataError(
            f"--format luna16 needs a seriesuid and world x, y, z per sample; these shards "
            f"have {'no groups' if preds.groups is None else 'groups'} and {have} "
            "(convert CT volumes with `pipeline convert volumes`)"
        )
    return {
        "seriesuid": list(preds.groups),
        "coordX": coords[:, 0].tolist(),
        "coordY": coords[:, 1].tolist(),
        "coordZ": coords[:, 2].tolist(),
        "probability": preds.probs.astype(np.float64).tolist(),
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
                writer.writerow(list(columns))
                # repr() of a float round-trips exactly, so logits survive the text file.
                writer.writerows(zip(*columns.values(), strict=True))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def report(preds, args, out: Path, fmt: str, threshold: float, spec_value, shards: int) -> None:
    """Rank 0: write the file in the chosen format and say what it holds."""
    columns = rows_of(preds, threshold)
    write_rows(luna16_rows(preds) if args.format == "luna16" else columns, out, fmt)
    if preds.bad_records:
        log.warning("skipped %d unreadable records (data.on_error=skip)", preds.bad_records)
    kind = " (LUNA16 submission format)" if args.format == "luna16" else ""
    print(
        f"wrote {len(preds.ids)} predictions from {shards} shards to {out}{kind} "
        f"(threshold {spec_value} = {threshold:.6g}; "
        f"{sum(columns['predicted'])} predicted positive, "
        f"{columns['label'].count(None)} unlabelled)",
        flush=True,
    )


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
        problem = None
        if distributed.is_main():
            try:
                report(preds, args, out, fmt, threshold, spec_value, len(shards))
            except DataError as exc:
                problem = exc  # raised after the barrier, so no rank waits for rank 0
        distributed.barrier()  # rank 0 wrote the file; everyone leaves together
        if problem is not None:
            raise problem
    finally:
        distributed.shutdown()
    return 0
