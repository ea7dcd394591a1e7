"""Shard format v2: block records of K samples, written and read without pickle.

A record is one tar member group `<key>.patch.npy`, `<key>.label.npy`, `<key>.meta.json`:
- `patch.npy`: [K, C, S, S] (2D) or [K, C, S, S, S] (3D), stored dtype as written;
- `label.npy`: [K], values 0/1 (uint8), or 255 = unknown (candidates to score with
  `pipeline predict`; training and evaluation refuse them);
- `meta.json`: {"version": 2, "crc32": N, "ids": [...], "groups": [...] | null,
  "coords": [...] | null}. `crc32` is zlib.crc32 over the bytes of patch.npy, then
  label.npy (headers included): a flipped bit in the pixels is a bad record, not a silent
  one. v1 records (no crc32) are still read, unchecked.

Only the largest crop is stored; the smaller scales are centre crops taken on the device.
Blocks keep per-sample Python work out of the hot loop: one decode yields K samples.
`manifest.json` beside the shards records per-shard sample and positive counts.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from numpy.lib import format as npformat

from pipeline.errors import DataError

FORMAT_VERSION = 2
SHARD_MTIME = 0  # member timestamps: fixed, so the same samples give the same shard bytes
MANIFEST_NAME = "manifest.json"
ALLOWED_DTYPES = ("uint8", "int8", "uint16", "int16", "float16", "float32")
_ALLOWED = frozenset(np.dtype(name) for name in ALLOWED_DTYPES)
# Members that would need pickle to decode; a shard carrying them is refused, never loaded.
PICKLE_SUFFIXES = (".pyd", ".pth", ".pt", ".pickle", ".pkl")
UNKNOWN_LABEL = 255
# The split of unlabelled samples (`convert --unlabelled`): read only by `pipeline predict`.
PREDICT_SPLIT = "predict"


@dataclass
class Block:
    """K decoded samples from one record."""

    patch: np.ndarray
    label: np.ndarray
    ids: list[str]
    groups: list[str] | None
    coords: list[list[float]] | None

    def __len__(self) -> int:
        return int(self.label.shape[0])


@dataclass
class ShardInfo:
    """One shard's line in the manifest."""

    name: str
    samples: int
    positives: int
    blocks: int


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_block(
    key: str,
    patch: np.ndarray,
    label: np.ndarray,
    ids: Sequence[str],
    groups: Sequence[str] | None = None,
    coords: Sequence[Sequence[float]] | None = None,
) -> dict[str, Any]:
    """One record, as a dict for `webdataset.TarWriter.write`; labels may be UNKNOWN_LABEL."""
    check_block_arrays(patch, label, source=key, allow_unknown=True)
    if len(ids) != len(label):
        raise DataError(f"{key}: {len(ids)} ids for {len(label)} samples")
    patch_bytes, label_bytes = _npy_bytes(patch), _npy_bytes(label.astype(np.uint8))
    meta = {
        # version and crc32 first: training reads them from the prefix without parsing ids.
        "version": FORMAT_VERSION,
        "crc32": zlib.crc32(label_bytes, zlib.crc32(patch_bytes)),
        "ids": [str(i) for i in ids],
        "groups": None if groups is None else [str(g) for g in groups],
        "coords": None if coords is None else [[float(c) for c in row] for row in coords],
    }
    return {
        "__key__": key,
        "patch.npy": patch_bytes,
        "label.npy": label_bytes,
        "meta.json": json.dumps(meta).encode(),
    }


def _zero_or_one(label: np.ndarray) -> bool:
    if label.dtype == np.uint8:  # what the writer stores: one reduction suffices
        return bool(label.max() <= 1)
    return bool(((label == 0) | (label == 1)).all())


def _known_or_unknown(label: np.ndarray) -> bool:
    return bool(((label == 0) | (label == 1) | (label == UNKNOWN_LABEL)).all())


def check_block_arrays(
    patch: np.ndarray, label: np.ndarray, source: str, allow_unknown: bool = False
) -> None:
    """Raise DataError naming `source` unless the arrays are a well-formed block.

    `allow_unknown` admits UNKNOWN_LABEL (writing, and reading for `pipeline predict`).
    """
    if patch.ndim not in (4, 5):
        raise DataError(f"{source}: patch must be [K,C,S,S] or [K,C,S,S,S], got {patch.shape}")
    spatial = patch.shape[2:]
    if len(set(spatial)) != 1:
        raise DataError(f"{source}: patch must be square/cubic, got spatial shape {spatial}")
    # dtype.name builds a string each call; the set lookup is the per-record fast path.
    if patch.dtype not in _ALLOWED and patch.dtype.name not in ALLOWED_DTYPES:
        raise DataError(f"{source}: patch dtype {patch.dtype} not in {ALLOWED_DTYPES}")
    if label.ndim != 1 or label.shape[0] != patch.shape[0]:
        raise DataError(f"{source}: label shape {label.shape} does not match {patch.shape[0]}")
    if label.size and not _zero_or_one(label):
        if not allow_unknown:
            unknown = bool((label == UNKNOWN_LABEL).any())
            hint = " (255 = unknown is only for `pipeline predict`)" if unknown else ""
            raise DataError(f"{source}: labels must be 0 or 1{hint}")
        if not _known_or_unknown(label):
            raise DataError(f"{source}: labels must be 0 or 1 (or {UNKNOWN_LABEL} = unknown)")
    if patch.dtype.kind == "f" and not np.isfinite(patch).all():
        raise DataError(f"{source}: patch holds NaN or Inf")


@functools.lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of a .npy header; cached, as blocks repeat their header."""
    stream = io.BytesIO(header)
    version = npformat.read_magic(stream)
    read = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
    shape, fortran, dtype = read(stream)
    if dtype.hasobject:
        raise ValueError("object arrays need pickle")
    return shape, fortran, dtype


def npy_header_size(start: bytes | memoryview) -> int:
    """Bytes before the payload of a .npy file, from its first 12 bytes."""
    prefix = 10 if start[6] == 1 else 12  # magic, version, then a 2- or 4-byte length
    return prefix + int.from_bytes(start[8:prefix], "little")


def _load_npy(data: Any, member: str) -> np.ndarray:
    """The .npy payload viewed in place: no copy, and writable when `data` is writable.

    np.load(BytesIO) parses the same header but copies the payload twice, which was a
    third of the training loader's time. Object arrays (pickle) are refused either way.
    `data` is the file's bytes, or [header, payload] when the reader placed them apart.
    """
    try:
        if isinstance(data, list):
            header, payload, offset = bytes(data[0]), data[1], 0
        else:
            view = memoryview(data)
            offset = npy_header_size(view)
            header, payload = bytes(view[:offset]), data
        if header[6] not in (1, 2):
            return np.load(io.BytesIO(header + bytes(payload)), allow_pickle=False)
        shape, fortran, dtype = _npy_header(header)
        array = np.frombuffer(payload, dtype, math.prod(shape), offset)
        return array.reshape(shape, order="F" if fortran else "C")
    except Exception as exc:  # ValueError for object arrays, others for truncation
        raise DataError(f"{member}: cannot decode .npy without pickle ({exc})") from None


_META_PREFIX = re.compile(rb'\{"version": (\d+)(?:, "crc32": (\d+))?')


def _member_crc(data: Any, crc: int = 0) -> int:
    """zlib.crc32 of one member's bytes, also when the reader placed header and payload apart."""
    for part in data if isinstance(data, list) else (data,):
        crc = zlib.crc32(part, crc)
    return crc


def _stored_crc(raw: Any) -> int | None:
    """The crc32 a record's meta.json holds (None for v1), read from its first bytes.

    Our writer puts version and crc32 first; anything else is parsed in full.
    """
    match = _META_PREFIX.match(bytes(memoryview(raw)[:64]))
    if match is not None and (match.group(2) or match.group(1) == b"1"):
        return None if match.group(2) is None else int(match.group(2))
    try:
        return json.loads(bytes(raw)).get("crc32")
    except (ValueError, AttributeError):
        return None  # reported by the full parse when ids are wanted


def verify_checksum(sample: dict[str, Any], stored: int | None, key: str) -> None:
    """DataError naming `key` when the arrays' bytes do not match meta.json's crc32 (v2)."""
    if stored is None:
        return
    found = _member_crc(sample["label.npy"], _member_crc(sample["patch.npy"]))
    if found != stored:
        raise DataError(
            f"{key}: checksum mismatch (crc32 {found:08x}, meta.json says {stored:08x}): "
            "corrupt patch or label bytes"
        )


def decode_block(sample: dict[str, Any], meta: bool = True, allow_unknown: bool = False) -> Block:
    """A webdataset sample dict (raw bytes per member) -> validated Block; DataError if bad.

    `meta=False` skips parsing meta.json (ids stay empty): training never reads ids, and
    the JSON of 256 ids and coordinates cost as much as decoding the patches.
    """
    key = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    for name in sample:
        if name.endswith(PICKLE_SUFFIXES) or name.split(".")[-1] in ("pyd", "pth", "pickle"):
            raise DataError(f"{key}: member '{name}' needs pickle; refusing to load it")
    for required in ("patch.npy", "label.npy", "meta.json"):
        if required not in sample:
            raise DataError(f"{key}: missing {required}")
    patch = _load_npy(sample["patch.npy"], f"{key}.patch.npy")
    label = _load_npy(sample["label.npy"], f"{key}.label.npy")
    check_block_arrays(patch, label, source=key, allow_unknown=allow_unknown)
    if not meta:
        verify_checksum(sample, _stored_crc(sample["meta.json"]), key)
        return Block(patch, label.astype(np.uint8), [], None, None)
    try:
        meta = json.loads(sample["meta.json"])
    except ValueError as exc:
        raise DataError(f"{key}: meta.json is not valid JSON ({exc})") from None
    verify_checksum(sample, meta.get("crc32") if isinstance(meta, dict) else None, key)
    ids = meta.get("ids") or [f"{sample.get('__key__', 'block')}/{i}" for i in range(len(label))]
    if len(ids) != len(label):
        raise DataError(f"{key}: meta.json has {len(ids)} ids for {len(label)} samples")
    return Block(patch, label.astype(np.uint8), ids, meta.get("groups"), meta.get("coords"))


def write_shard(
    path: str | os.PathLike,
    patch: np.ndarray,
    label: np.ndarray,
    ids: Sequence[str],
    groups: Sequence[str] | None = None,
    coords: Sequence[Sequence[float]] | None = None,
    block_size: int = 256,
) -> ShardInfo:
    """Write samples, in the given order, as block records into one tar (atomic rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = len(label)
    blocks = 0
    # A whole-second mtime keeps headers plain ustar: webdataset's default (time.time(), a
    # float) adds a pax header to every member, which made shards differ run to run and
    # doubled the headers the loader parses.
    with open(tmp, "wb") as stream, wds.TarWriter(stream, mtime=SHARD_MTIME) as sink:
        for start in range(0, n, block_size):
            stop = min(start + block_size, n)
            sink.write(
                encode_block(
                    f"{path.stem}-{blocks:06d}",
                    patch[start:stop],
                    np.asarray(label[start:stop]),
                    ids[start:stop],
                    None if groups is None else groups[start:stop],
                    None if coords is None else coords[start:stop],
                )
            )
            blocks += 1
    os.replace(tmp, path)
    return ShardInfo(path.name, n, int(np.count_nonzero(np.asarray(label) == 1)), blocks)


def write_split(
    out_dir: str | os.PathLike,
    split: str,
    patch: np.ndarray,
    label: np.ndarray,
    ids: Sequence[str],
    groups: Sequence[str] | None = None,
    coords: Sequence[Sequence[float]] | None = None,
    num_shards: int = 1,
    block_size: int = 256,
    seed: int = 0,
) -> list[ShardInfo]:
    """Shuffle samples, cut them into `num_shards` near-equal shards, write, update manifest.

    This is the public writer API for your own data: give it arrays (a memmap works) and
    it writes `<out_dir>/<split>-000000.tar ...` plus `manifest.json`.
    """
    n = len(label)
    if n == 0:
        raise DataError(f"{split}: no samples to write")
    order = np.random.default_rng(seed).permutation(n)
    infos = []
    for index, part in enumerate(np.array_split(order, min(num_shards, n))):
        part = np.sort(part) if isinstance(patch, np.memmap) else part
        part = np.random.default_rng([seed, index]).permutation(part)
        infos.append(
            write_shard(
                Path(out_dir) / f"{split}-{index:06d}.tar",
                patch[part],
                np.asarray(label)[part],
                [ids[i] for i in part],
                None if groups is None else [groups[i] for i in part],
                None if coords is None else [coords[i] for i in part],
                block_size=block_size,
            )
        )
    update_manifest(
        out_dir, split, infos, patch_shape=tuple(patch.shape[1:]), dtype=str(patch.dtype)
    )
    return infos


def update_manifest(
    out_dir: str | os.PathLike,
    split: str,
    infos: Iterable[ShardInfo],
    patch_shape: tuple[int, ...],
    dtype: str,
) -> Path:
    """Record `split`'s shards in `<out_dir>/manifest.json`, keeping other splits (atomic)."""
    path = Path(out_dir) / MANIFEST_NAME
    manifest: dict[str, Any] = {"format_version": FORMAT_VERSION, "splits": {}}
    if path.exists():
        manifest = json.loads(path.read_text())
    infos = sorted(infos, key=lambda info: info.name)
    manifest["splits"][split] = {
        "samples": sum(i.samples for i in infos),
        "positives": sum(i.positives for i in infos),
        "patch_shape": list(patch_shape),
        "dtype": dtype,
        "shards": [asdict(i) for i in infos],
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path)
    return path


def manifest_counts(shard_paths: Sequence[str]) -> dict[str, ShardInfo]:
    """ShardInfo per shard path, from the `manifest.json` in each shard's directory.

    Shards that no manifest lists are absent from the result; callers decide if that matters.
    Remote shards (URLs) are looked up in the manifest.json beside them on their server.
    """
    from pipeline.data.remote import is_remote
    from pipeline.data.urls import remote_manifest_counts

    remote = [s for s in shard_paths if is_remote(s)]
    if remote:
        found = remote_manifest_counts(remote)
        local = manifest_counts([s for s in shard_paths if not is_remote(s)])
        return {**found, **local}
    by_dir: dict[Path, dict[str, ShardInfo]] = {}
    found: dict[str, ShardInfo] = {}
    for shard in shard_paths:
        directory = Path(shard).parent
        if directory not in by_dir:
            by_dir[directory] = {}
            manifest_path = directory / MANIFEST_NAME
            if manifest_path.exists():
                try:
                    manifest = json.loads(manifest_path.read_text())
                    for split in manifest.get("splits", {}).values():
                        for entry in split.get("shards", []):
                            by_dir[directory][entry["name"]] = ShardInfo(**entry)
                except (ValueError, KeyError, TypeError) as exc:
                    raise DataError(f"{manifest_path}: malformed manifest ({exc})") from None
        info = by_dir[directory].get(Path(shard).name)
        if info is not None:
            found[shard] = info
    return found


def expand_shards(pattern: str, key: str = "shards") -> list[str]:
    """Shard paths from a pattern with brace expansion (`{000..009}`) and globs, sorted.

    Raises DataError naming `key` when nothing matches, before any heavy work starts.
    Remote patterns (http(s)://, s3://, gs://, pipe:) expand and are checked by
    `pipeline.data.urls.expand_remote`; sorted the same way.
    """
    import glob

    from braceexpand import braceexpand

    from pipeline.data.remote import is_remote

    if is_remote(pattern):
        from pipeline.data.urls import expand_remote

        return expand_remote(pattern, key)

    paths: list[str] = []
    for expanded in braceexpand(os.path.expanduser(pattern)):
        matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
        paths.extend(p for p in matches if os.path.isfile(p))
    if not paths:
        raise DataError(f"{key}: pattern '{pattern}' matches no shard files")
    return sorted(dict.fromkeys(paths))
