"""Group-wise train/val split and K folds, reproducible from a seed.

A group (a patient, an image, a CT series) lands wholly in train or wholly in val, so
nothing the model saw in training leaks into validation. Groups holding any positive are
split separately from all-negative groups: with 1 positive per several hundred negatives
a plain random split can leave validation without a single positive.

The assignment depends only on the seed, the set of group names and which groups hold a
positive, never on the CSV's row order; `--folds K --val-fold i` for i = 0..K-1 uses
the same fold assignment, so K conversions form one proper cross-validation.
`--folds K` alone writes every fold at once, as splits `fold0` .. `fold{K-1}`
(`assign_folds`), for `pipeline cv`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.errors import ConfigError, DataError


def check_split_args(val_fraction: float, folds: int | None, val_fold: int | None) -> None:
    """ConfigError naming the flag when the split options do not make sense together."""
    if folds is None:
        if val_fold is not None:
            raise ConfigError("--val-fold needs --folds K")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
        return
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}")
    if val_fold is not None and not 0 <= val_fold < folds:
        raise ConfigError(f"--val-fold must be in 0..{folds - 1} with --folds {folds}")


def _stratum_order(names: list[str], rng: np.random.Generator) -> list[str]:
    return [names[i] for i in rng.permutation(len(names))]


def assign_val(
    groups: Sequence[str],
    labels: Sequence[int],
    val_fraction: float = 0.2,
    folds: int | None = None,
    val_fold: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Boolean mask over samples: True where the sample's group goes to validation."""
    check_split_args(val_fraction, folds, val_fold)
    if folds is not None and val_fold is None:
        raise ConfigError("--folds K without --val-fold writes every fold (assign_folds)")
    positive = {g for g, y in zip(groups, labels, strict=True) if y}
    names = sorted(set(groups))
    rng = np.random.default_rng(seed)
    strata = [
        _stratum_order([g for g in names if g in positive], rng),
        _stratum_order([g for g in names if g not in positive], rng),
    ]
    val_groups: set[str] = set()
    if folds is not None:
        # Round-robin over positives then negatives: every fold gets its share of both.
        ordered = strata[0] + strata[1]
        val_groups = {g for i, g in enumerate(ordered) if i % folds == val_fold}
    elif val_fraction > 0:
        for stratum in strata:
            n = len(stratum)
            # At least one group each side whenever a stratum has two, so both sides see it.
            count = min(n - 1, max(1, round(n * val_fraction))) if n >= 2 else 0
            val_groups.update(stratum[:count])
        if not val_groups and len(names) >= 2:
            # Two strata of one group each: still honour the request for a val split.
            val_groups.add(max(strata, key=len)[0])
    if (folds is not None or val_fraction > 0) and (not val_groups or val_groups == set(names)):
        raise DataError(
            f"cannot split {len(names)} group(s) into train and val; "
            "need more groups, or pass --val-fraction 0 to write train only"
        )
    return np.fromiter((g in val_groups for g in groups), dtype=bool, count=len(groups))


def assign_folds(
    groups: Sequence[str], labels: Sequence[int], folds: int, seed: int = 0
) -> np.ndarray:
    """Fold index (0..folds-1) per sample, by group: fold i is `--val-fold i`'s val split."""
    check_split_args(0.0, folds, None)
    names = sorted(set(groups))
    if len(names) < folds:
        raise DataError(f"cannot split {len(names)} group(s) into {folds} folds; need more groups")
    fold_of = {}
    for i in range(folds):
        mask = assign_val(groups, labels, folds=folds, val_fold=i, seed=seed)
        fold_of.update({g: i for g, m in zip(groups, mask.tolist(), strict=True) if m})
    return np.fromiter((fold_of[g] for g in groups), dtype=np.int64, count=len(groups))
