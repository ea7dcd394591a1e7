"""Validation: every sample once across ranks, gathered, exact metrics on rank 0."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import distributed
from pipeline.data.format import manifest_counts
from pipeline.data.loader import EvalStream, StreamSpec, build_loader
from pipeline.data.transforms import DeviceTransform
from pipeline.errors import DataError
from pipeline.metrics import binary_metrics
from pipeline.model import as_logits, probabilities
from pipeline.tracking.progress import work_progress


@dataclass
class Predictions:
    labels: np.ndarray
    logits: np.ndarray
    ids: list[str]
    groups: list[str] | None
    bad_records: int = 0

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
        )


@torch.no_grad()
def predict_local(
    model: nn.Module,
    spec: StreamSpec,
    transform: DeviceTransform,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
    num_workers: int,
    progress: str | None = None,
) -> Predictions:
    """This rank's share of the shards, in eval mode, no augmentation.

    `progress` names a progress bar over this rank's samples (None: no bar).
    """
    was_training = model.training
    model.eval()
    mine = spec.shards[spec.rank :: spec.world_size]
    workers = min(num_workers, len(mine))
    loader = build_loader(EvalStream(spec), workers, device.type == "cuda", 2)
    labels, logits, ids, groups = [], [], [], []
    bad: dict[int, int] = {}
    have_groups = True
    total = _samples_in(mine) if progress is not None else None
    with work_progress(total, progress or "", enabled=progress is not None) as bar:
        for batch in loader:
            crops = transform(batch["patch"].to(device, non_blocking=True), train=False)
            with autocast:
                out = as_logits(model(*crops))
            logits.append(out.float().cpu().numpy())
            labels.append(batch["label"].numpy())
            ids.extend(batch["ids"])
            if batch["groups"] is None:
                have_groups = False
            else:
                groups.extend(batch["groups"])
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


def predict_shards(
    model: nn.Module,
    cfg: Any,
    shards: list[str],
    device: torch.device,
    allow_unknown: bool = False,
    progress: str | None = None,
) -> Predictions | None:
    """A trained model over `shards` with validation's transform, every rank's share gathered.

    What `pipeline evaluate` and `pipeline predict` share; `cfg` is the checkpoint's Config.
    `allow_unknown` (predict) admits unlabelled samples (label 255). `progress` names the
    bar rank 0 shows over its share. Rank 0 gets the predictions, other ranks None.
    """
    from pipeline.data import cache
    from pipeline.inference import eval_transform
    from pipeline.runtime import autocast, resolve_precision

    cache.configure(cfg.data)  # remote shards: the cache and retry settings of this run
    env = distributed.env()
    spec = StreamSpec(
        shards,
        cfg.train.batch_size,
        rank=env.rank,
        world_size=env.world_size,
        on_error=cfg.data.on_error,
        sample_shape=cfg.data.sample_shape,
        reader=cfg.data.reader,
        allow_unknown=allow_unknown,
    )
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
        )
