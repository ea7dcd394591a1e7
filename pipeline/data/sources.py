"""Which shards a run reads: the user's patterns, or the built-in synthetic demo."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import DataConfig, default_cache_dir
from pipeline.data import cache
from pipeline.data.format import MANIFEST_NAME, expand_shards, manifest_counts
from pipeline.errors import ConfigError

log = logging.getLogger("pipeline")


@dataclass
class Sources:
    train: list[str]
    val: list[str]
    train_counts: list[int] | None
    """Samples per training shard from the manifest, or None when any shard is unlisted."""
    positives: int | None
    negatives: int | None


def synthetic_dir(cfg: DataConfig) -> Path:
    from pipeline.data.synthetic import DIFFICULTIES, GENERATOR_VERSION

    syn = cfg.synthetic
    if syn.dir:
        return Path(syn.dir).expanduser()
    fraction = syn.positive_fraction
    if fraction is None:
        fraction = DIFFICULTIES[syn.difficulty].positive_fraction
    name = (
        f"synthetic-v{GENERATOR_VERSION}-{cfg.dims}d-s{syn.seed}-n{syn.train}-{syn.val}"
        f"-p{fraction:g}-k{syn.block_size}-x{syn.shards}"
    )
    # Suffixes only off the defaults, so the easy demo's cache keeps its name.
    if syn.difficulty != "easy":
        name += f"-{syn.difficulty}"
    if cfg.stored_size != 48:
        name += f"-S{cfg.stored_size}"
    return default_cache_dir() / name


def ensure_synthetic(cfg: DataConfig, is_main: bool) -> Path:
    """Generate the demo shards once (rank 0); other ranks wait at a barrier afterwards."""
    from pipeline.data.synthetic import make_synthetic

    out = synthetic_dir(cfg)
    if is_main and not (out / MANIFEST_NAME).exists():
        log.info("generating synthetic %dD demo shards into %s", cfg.dims, out)
        syn = cfg.synthetic
        make_synthetic(
            out,
            dims=cfg.dims,
            n_train=syn.train,
            n_val=syn.val,
            positive_fraction=syn.positive_fraction,
            seed=syn.seed,
            block_size=syn.block_size,
            train_shards=syn.shards,
            val_shards=max(2, syn.shards // 4),
            size=cfg.stored_size,  # data.patch_size > largest scale: a translation margin
            difficulty=syn.difficulty,
        )
    return out


def resolve(cfg: DataConfig) -> Sources:
    """Expand patterns and read manifest counts; errors name the key and pattern.

    Also sets up the remote-shard cache from `cfg` (loader workers inherit it).
    """
    cache.configure(cfg)
    if cfg.train is None:
        root = synthetic_dir(cfg)
        train_pattern = str(root / "train-*.tar")
        # data.val set alone validates the synthetic demo's model on the user's shards.
        val_pattern = cfg.val or str(root / "val-*.tar")
    else:
        train_pattern = cfg.train
        val_pattern = cfg.val
    train = expand_shards(train_pattern, "data.train")
    val = expand_shards(val_pattern, "data.val") if val_pattern else []
    counts = manifest_counts(train)
    if len(counts) == len(train):
        train_counts = [counts[s].samples for s in train]
        positives = sum(counts[s].positives for s in train)
        negatives = sum(train_counts) - positives
    else:
        train_counts, positives, negatives = None, None, None
    return Sources(train, val, train_counts, positives, negatives)


def auto_pos_weight(sources: Sources, cap: float) -> float:
    """negatives / positives from the manifest, capped so rare positives cannot blow up steps."""
    if sources.positives is None or sources.negatives is None:
        raise ConfigError(
            f"loss.pos_weight=auto needs {MANIFEST_NAME} listing every training shard; "
            "set a number instead"
        )
    if sources.positives == 0:
        raise ConfigError("loss.pos_weight=auto: the training shards hold no positives")
    return min(sources.negatives / sources.positives, cap)
