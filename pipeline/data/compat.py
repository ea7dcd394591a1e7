"""Do the shards fit the config? Checked once before training, in one line when they do not.

Without this check, `data.dims=3` on 2D shards made every record a bad record: one warning
per record (hundreds of lines), then an empty stream. The manifest records each split's
patch shape and dtype, so a mismatch is found without reading a record; shards that no
manifest lists are judged by their first record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import DataConfig
from pipeline.data.format import ALLOWED_DTYPES, MANIFEST_NAME
from pipeline.data.problems import ProblemLog
from pipeline.errors import DataError


def _is_local(shard: str) -> bool:
    return "://" not in shard and not shard.startswith("pipe:")


def _manifest_shapes(directory: Path) -> dict[str, tuple[list[int], str, str]]:
    """shard name -> (patch shape, dtype, where) from `directory`'s manifest, if any."""
    path = directory / MANIFEST_NAME
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text())
        found = {}
        for split, entry in manifest.get("splits", {}).items():
            where = f"{path}, split {split}"
            for shard in entry.get("shards", []):
                found[shard["name"]] = (list(entry["patch_shape"]), str(entry["dtype"]), where)
        return found
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: malformed manifest ({exc})") from None


class _Quiet(ProblemLog):
    """Bad records are the loader's to report (data.on_error); this check only counts them."""

    def record(self, where: str, reason: str) -> None:
        self.count += 1


def _first_record(shard: str) -> tuple[list[int], str, str] | None:
    """Shape and dtype of the first readable record of `shard`; None if it has none."""
    from pipeline.data.loader import read_blocks

    block = next(read_blocks([shard], "skip", _Quiet(), meta=False), None)
    if block is None:
        return None
    return list(block.patch.shape[1:]), block.patch.dtype.name, f"first record of {shard}"


def mismatch(shape: list[int], dtype: str, cfg: DataConfig) -> str | None:
    """What is wrong with patches of `shape` ([C, S, S(, S)]) and `dtype` for `cfg`, or None."""
    dims, channels = len(shape) - 1, shape[0]
    if dims != cfg.dims:
        return f"data.dims={cfg.dims} but the shards hold {dims}D patches {shape}; set data.dims={dims}"
    if channels != cfg.channels:
        return (
            f"data.channels={cfg.channels} but the shards hold {channels}-channel patches "
            f"{shape}; set data.channels={channels}"
        )
    if len(set(shape[1:])) != 1:
        return f"the shards hold patches {shape}; they must be square or cubic"
    if shape[1] != cfg.stored_size:
        if cfg.patch_size is not None:
            return (
                f"data.patch_size={cfg.patch_size} but the shards hold patches {shape}; "
                f"set data.patch_size={shape[1]}"
            )
        return (
            f"data.scales={list(cfg.scales)}: the largest scale must equal the stored patch "
            f"size {shape[1]} (patches {shape}); end data.scales at {shape[1]}, or set "
            f"data.patch_size={shape[1]} to crop inside larger patches"
        )
    if dtype not in ALLOWED_DTYPES:
        return f"the shards hold {dtype} patches; allowed: {', '.join(ALLOWED_DTYPES)}"
    return None


def check_fit(sources: Any, cfg: DataConfig) -> None:
    """Raise DataError (one line) unless every split's patches fit data.dims/channels/scales.

    `sources` has `.train` and `.val` shard lists (pipeline.data.sources.Sources). One
    manifest entry per split decides; only unlisted shards cost a read of one record, and
    only the first readable such shard of each directory (a directory is one dataset).
    """
    manifests: dict[Path, dict[str, tuple[list[int], str, str]]] = {}
    for key, shards in (("data.train", sources.train), ("data.val", sources.val)):
        judged: set[tuple[Path, str]] = set()
        for shard in shards:
            if not _is_local(shard):
                continue  # remote shards: their records are checked as they are read
            directory = Path(shard).parent
            if directory not in manifests:
                manifests[directory] = _manifest_shapes(directory)
            listed = manifests[directory].get(Path(shard).name)
            where_key = (directory, listed[2] if listed else "")
            if where_key in judged:
                continue
            found = listed or _first_record(shard)
            if found is None:
                continue  # no readable record: the loader skips or fails it (data.on_error)
            judged.add(where_key)
            shape, dtype, where = found
            problem = mismatch(shape, dtype, cfg)
            if problem:
                raise DataError(f"{key}: {problem} (from {where})")
