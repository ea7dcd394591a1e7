"""What W&B artifacts say about a run: digests and metadata, decided without importing wandb.

A model artifact is one collection per training run (`model-<first W&B id>`), so every
segment of a preempted and resumed run adds versions to the same collection. A dataset
artifact is a list of references (paths or URLs) with a digest of the shard list and of the
manifests: W&B records which data a model came from without any shard being uploaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.data.format import MANIFEST_NAME
from pipeline.data.remote import scrub

_REMOTE = ("s3://", "gs://", "http://", "https://")


def file_digest(path: Path) -> str:
    """md5 of a file, streamed (a checkpoint can be hundreds of MB)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def config_digest(config: dict[str, Any]) -> str:
    """Short digest of the resolved config (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def reference_uri(shard: str) -> str:
    """The URI W&B stores for a shard: URLs without their credentials (`scrub`), local
    paths as file:// URIs."""
    if shard.startswith(_REMOTE):
        return scrub(shard)
    return Path(shard).expanduser().resolve().as_uri()


def data_digest(shards: list[str]) -> str:
    """Digest of which shards (in order) and of their manifests' contents where readable.

    Renaming, adding or dropping a shard changes it, and so does rewriting a dataset in
    place (its manifest counts change), without reading the shards themselves.
    """
    digest = hashlib.sha256()
    manifests: set[Path] = set()
    for shard in shards:
        digest.update(shard.encode() + b"\n")
        if not shard.startswith(_REMOTE) and not shard.startswith("pipe:"):
            manifests.add(Path(shard).expanduser().resolve().parent / MANIFEST_NAME)
    for manifest in sorted(manifests):
        if manifest.is_file():
            digest.update(manifest.read_bytes())
    return digest.hexdigest()[:16]


def dataset_metadata(split: str, shards: list[str]) -> dict[str, Any]:
    return {"split": split, "shards": len(shards), "digest": data_digest(shards)}


def model_metadata(
    step: int,
    metrics: dict[str, float],
    config: dict[str, Any],
    data: dict[str, str],
    git_commit: str | None,
) -> dict[str, Any]:
    """What a model artifact version records: where it came from and how good it was."""
    return {
        "step": step,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "config_digest": config_digest(config),
        "data_digest": data,
        "git_commit": git_commit,
    }
