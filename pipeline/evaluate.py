"""Validation: every sample once across ranks, gathered, exact metrics on rank 0."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pipeline import distributed
from pipeline.data.format import manifest_counts
from pipeline.data.loader import EvalStream, StreamSpec, build_loader
from pipeline.data.transforms import DeviceTransform
from pipeline.errors import DataError
from pipeline.metrics import binary_metrics
from pipeline.model import probabilities
from pipeline.tracking.progress import work_progress
from pipeline.tta import tta_logits

if TYPE_CHECKING:
    from pipeline.froc import FrocResult, Marks


@dataclass
class Predictions:
    """One row per sample, in gathered order; traceable to its candidate by id/group/coords."""

    labels: np.ndarray
    logits: np.ndarray
    ids: list[str]
    groups: list[str] | None
    bad_records: int = 0
    coords: np.ndarray | None = None
    """[n, D] from the shard meta: world (x, y, z) mm for volumes, pixel (x, y) for images."""

    @property
    def probs(self) -> np.ndarray:
        return probabilities(torch.from_numpy(self.logits)).numpy()

    @staticmethod
    def concat(parts: list[Predictions]) -> Predictions:
        groups = None
        if all(p.groups is not None for p in parts):
            groups = [g for p in parts for g in p.groups]  # type: ignore[union-attr]
        return Predictions(
            np.concatenate([p.labels for p in parts]) if parts else np.zeros(0, np.uint8),
            np.concatenate([p.logits for p in parts]) if parts else np.zeros(0, np.float32),
            [i for p in parts for i in p.ids],
            groups,
            sum(p.bad_records for p in parts),
            _concat_coords([p.coords for p in parts if len(p.ids)]),
        )


def _concat_coords(parts: list[np.ndarray | None]) -> np.ndarray | None:
    """All parts' coordinates, or None unless every part has them with one width."""
    if not parts or any(c is None for c in parts) or len({c.shape[1] for c in parts}) != 1:
        return None
    return np.concatenate(parts)  # type: ignore[arg-type]


@torch.no_grad()
def predict_local(
    model: nn.Module,
    spec: StreamSpec,
    transform: DeviceTransform,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
    num_workers: int,
    progress: str | None = None,
    tta: str = "none",
) -> Predictions:
    """This rank's share of the shards, in eval mode, no augmentation.

    `progress` names a progress bar over this rank's samples (None: no bar). `tta`: the
    test-time augmentation, mean logit over its views (pipeline/tta.py; `none`: one pass).
    """
    was_training = model.training
    model.eval()
    mine = spec.shards[spec.rank :: spec.world_size]
    workers = min(num_workers, len(mine))
    loader = build_loader(EvalStream(spec), workers, device.type == "cuda", 2)
    labels, logits, ids, groups, coords = [], [], [], [], []
    bad: dict[int, int] = {}
    have_groups = True
    total = _samples_in(mine) if progress is not None else None
    with work_progress(total, progress or "", enabled=progress is not None) as bar:
        for batch in loader:
            patch = batch["patch"].to(device, non_blocking=True)
            out = tta_logits(model, patch, transform, autocast, tta)
            logits.append(out.cpu().numpy())
            labels.append(batch["label"].numpy())
            ids.extend(batch["ids"])
            if batch["groups"] is None:
                have_groups = False
            else:
                groups.extend(batch["groups"])
            where = batch.get("coords")
            coords.append(None if where is None else np.asarray(where, dtype=np.float64))
            worker, count = batch["bad_records"].tolist()
            bad[worker] = count
            bar.update(len(batch["label"]))
    model.train(was_training)
    return Predictions(
        np.concatenate(labels) if labels else np.zeros(0, np.uint8),
        np.concatenate(logits) if logits else np.zeros(0, np.float32),
        ids,
        groups if have_groups else None,
        sum(bad.values()),
        _concat_coords(coords),
    )


def _samples_in(shards: list[str]) -> int | None:
    """Samples in `shards` by their manifest, or None when any is unlisted (bar without total)."""
    try:
        listed = manifest_counts(shards)
    except (DataError, OSError):
        return None  # the bar is a nicety; the reader reports a bad manifest where it matters
    if len(listed) < len(shards):
        return None
    return sum(info.samples for info in listed.values())


def predict_all(*args, **kwargs) -> Predictions | None:
    """Every rank's predictions, concatenated in rank order, on rank 0 (None elsewhere)."""
    parts = distributed.gather_to_main(predict_local(*args, **kwargs))
    return None if parts is None else Predictions.concat(parts)


def metrics_of(preds: Predictions, threshold: float = 0.5) -> dict[str, float]:
    scan_ids = preds.groups if preds.groups is not None else None
    return binary_metrics(preds.labels, preds.probs, threshold=threshold, scan_ids=scan_ids)


def eval_spec(cfg: Any, shards: list[str], allow_unknown: bool = False) -> StreamSpec:
    """This rank's share of `shards`, read once, in order: validation, evaluate and predict."""
    env = distributed.env()
    return StreamSpec(
        shards,
        cfg.train.batch_size,
        rank=env.rank,
        world_size=env.world_size,
        on_error=cfg.data.on_error,
        sample_shape=cfg.data.sample_shape,
        reader=cfg.data.reader,
        allow_unknown=allow_unknown,
    )


def predict_shards(
    model: nn.Module,
    cfg: Any,
    shards: list[str],
    device: torch.device,
    allow_unknown: bool = False,
    progress: str | None = None,
) -> Predictions | None:
    """A trained model over `shards` with validation's transform, every rank's share gathered.

    What `pipeline evaluate` and `pipeline predict` share; `cfg` is the checkpoint's Config
    (with the command's overrides: `predict.tta` chooses the test-time augmentation).
    `allow_unknown` (predict) admits unlabelled samples (label 255). `progress` names the
    bar rank 0 shows over its share. Rank 0 gets the predictions, other ranks None.
    """
    from pipeline.data import cache
    from pipeline.inference import eval_transform
    from pipeline.runtime import autocast, resolve_precision

    cache.configure(cfg.data)  # remote shards: the cache and retry settings of this run
    env = distributed.env()
    spec = eval_spec(cfg, shards, allow_unknown)
    precision = resolve_precision(cfg.train.precision, device)
    with torch.no_grad():
        return predict_all(
            model,
            spec,
            eval_transform(cfg),
            device,
            autocast(precision, device),
            cfg.data.num_workers,
            progress if env.rank == 0 else None,
            cfg.predict.tta,
        )


def save_predictions(path: str | os.PathLike, preds: Predictions) -> None:
    """One evaluation's predictions as .npz (no pickle): what `pipeline report` reads.

    Arrays: labels, probs, logits, ids, and where the shards have them groups (scan ids)
    and coords ([n, D]); read back with `load_predictions_file`.
    """
    arrays: dict[str, np.ndarray] = {
        "labels": preds.labels,
        "probs": preds.probs,
        "logits": preds.logits,
        "ids": np.asarray(preds.ids, dtype=str),
    }
    if preds.groups is not None:
        arrays["groups"] = np.asarray(preds.groups, dtype=str)
    if preds.coords is not None:
        arrays["coords"] = preds.coords
    np.savez_compressed(path, **arrays)


@dataclass(frozen=True)
class LunaOptions:
    """What `pipeline evaluate --annotations ...` scores against (see pipeline.luna16)."""

    annotations: str
    excluded: str | None = None
    scans: str | None = None
    max_marks: int = 100
    bootstrap: int = 1000
    seed: int = 0


def _luna_score(marks: Marks, luna: LunaOptions) -> FrocResult:
    from pipeline import luna16

    return luna16.score_files(
        marks,
        luna.annotations,
        luna.excluded,
        luna.scans,
        luna.max_marks,
        luna.bootstrap,
        luna.seed,
    )


def score_submission(path: str, luna: LunaOptions) -> dict[str, Any]:
    """FROC/CPM of a LUNA16 submission CSV, whichever system wrote it (no checkpoint)."""
    from pipeline import luna16

    return _luna_score(luna16.read_marks(path), luna).summary()


def evaluate_checkpoint(
    checkpoint: str, overrides: list[str], out_dir: Path, luna: LunaOptions | None = None
) -> dict[str, Any] | None:
    """A checkpoint on its validation shards: candidate metrics (+ LUNA16 CPM), files in out_dir.

    Writes out_dir/{histogram,predictions}-<checkpoint stem>.{json,npz} and, with `luna`,
    froc-<stem>.json. Returns the metrics on rank 0, None on other ranks.
    """
    from pipeline import luna16
    from pipeline.data.sources import resolve
    from pipeline.inference import load_trained
    from pipeline.metrics import probability_histogram
    from pipeline.runtime import setup_logging

    env = distributed.detect_env()
    setup_logging(env.rank)
    if luna is not None:  # bad files fail here, on every rank, before any work
        luna16.read_findings(luna.annotations)
        if luna.excluded is not None:
            luna16.read_findings(luna.excluded, "--excluded")
        if luna.scans is not None:
            luna16.read_scans(luna.scans)
    cfg, _, _ = load_trained(checkpoint, overrides)
    device = distributed.select_device(cfg.train.device, env.local_rank)
    distributed.init(cfg.dist.backend, cfg.dist.timeout_s, device, env)
    metrics, problem = None, None
    try:
        cfg, model, _ = load_trained(checkpoint, overrides, device)
        val = resolve(cfg.data).val
        preds = predict_shards(model, cfg, val, device, progress="evaluate")
        if distributed.is_main():
            stem = Path(checkpoint).stem
            out_dir.mkdir(parents=True, exist_ok=True)
            metrics = metrics_of(preds)
            histogram = probability_histogram(preds.labels, preds.probs)
            (out_dir / f"histogram-{stem}.json").write_text(json.dumps(histogram))
            save_predictions(out_dir / f"predictions-{stem}.npz", preds)
            if luna is not None:
                try:
                    result = _luna_score(luna16.marks_of_predictions(preds), luna)
                    luna16.write_curve(out_dir / f"froc-{stem}.json", result)
                    metrics.update(result.summary())
                except DataError as exc:
                    problem = exc  # raised after the barrier: no rank waits for rank 0
        distributed.barrier()  # rank 0 scored and wrote; everyone leaves together
    finally:
        distributed.shutdown()
    if problem is not None:
        raise problem
    return metrics
