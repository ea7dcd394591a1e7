"""Read back what W&B wrote offline: the records of `RUN_DIR/wandb/offline-run-*/run-*.wandb`.

wandb 0.31 ships no Python reader for its `.wandb` files, so the tests carry this one.
Format, checked against files written by wandb 0.31 on these machines:
- a 7-byte file header: b":W&B", magic uint16 0xBEE1 (little-endian), version uint8 0;
- then LevelDB-log-format chunks in 32 KiB blocks (the file header counts in block 0);
  each chunk has a 7-byte header: crc32 uint32, length uint16, type uint8
  (1 full, 2 first, 3 middle, 4 last); the crc is zlib's crc32 over type byte + payload;
  a block tail shorter than 7 bytes is zero padding;
- each reassembled payload is a `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
CHUNK = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_payloads(path: Path) -> list[bytes]:
    """The raw record payloads of one `.wandb` file, CRC-checked."""
    data = Path(path).read_bytes()
    if data[: len(HEADER)] != HEADER:
        raise ValueError(f"{path}: not a W&B 0.31 transaction log (header {data[:7]!r})")
    pos, payloads, pending = len(HEADER), [], None
    while pos < len(data):
        room = BLOCK - pos % BLOCK
        if room < CHUNK.size:  # block trailer: zero padding
            pos += room
            continue
        if pos + CHUNK.size > len(data):
            break
        crc, length, kind = CHUNK.unpack_from(data, pos)
        body = data[pos + CHUNK.size : pos + CHUNK.size + length]
        if crc == 0 and length == 0 and kind == 0:  # zero fill to the end of a block
            pos += room
            continue
        if len(body) < length:  # truncated tail (writer killed mid-record)
            break
        if zlib.crc32(bytes([kind]) + body) != crc:
            raise ValueError(f"{path}: bad checksum in chunk at byte {pos}")
        pos += CHUNK.size + length
        if kind == FULL:
            payloads.append(body)
        elif kind == FIRST:
            pending = body
        elif kind == MIDDLE and pending is not None:
            pending += body
        elif kind == LAST and pending is not None:
            payloads.append(pending + body)
            pending = None
        else:
            raise ValueError(f"{path}: unexpected chunk type {kind} at byte {pos}")
    return payloads


def read_records(path: Path, wait_s: float = 10.0) -> list[Any]:
    """Every `Record` of one `.wandb` file, in write order.

    wandb 0.31's offline `run.finish()` can return before its service has flushed the file
    (seen here: 235 of 299 history records right after finish, all of them 0.1 s later), so
    this waits up to `wait_s` for the closing `exit` record before returning what is there.
    """
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + wait_s
    while True:
        records = []
        for payload in read_payloads(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
        done = any(r.WhichOneof("record_type") == "exit" for r in records)
        if done or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def _start_time(path: Path) -> tuple[int, str]:
    for record in read_records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run.start_time.ToNanoseconds(), path.parent.name
    return 2**63, path.parent.name


def run_files(run_dir: Path) -> list[Path]:
    """The offline run files under RUN_DIR/wandb, oldest first.

    Ordered by the run record's start time: directory names have one-second resolution,
    and a resumed piece can start within the second its predecessor started.
    """
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"), key=_start_time)


def _pick(run_dir: Path, run_id: str | None) -> list[Path]:
    files = run_files(run_dir)
    if run_id is not None:
        files = [f for f in files if f.name == f"run-{run_id}.wandb"]
    if not files:
        raise FileNotFoundError(f"no offline W&B run file under {run_dir}/wandb (run_id={run_id})")
    return files


def _key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


def read_history(run_dir: Path, run_id: str | None = None) -> list[dict[str, Any]]:
    """History rows ({key: value}, with `_step`), of one run or of all pieces oldest first."""
    rows = []
    for path in _pick(run_dir, run_id):
        for record in read_records(path):
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {_key(item): json.loads(item.value_json) for item in record.history.item}
                )
    return rows


def read_config(run_dir: Path, run_id: str | None = None) -> dict[str, Any]:
    """The run's config (the run record's, updated by later config records) of the latest piece."""
    config: dict[str, Any] = {}
    for record in read_records(_pick(run_dir, run_id)[-1]):
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else ()
        if kind == "config":
            updates = record.config.update
        for item in updates:
            config[_key(item)] = json.loads(item.value_json)
    # wandb's own bookkeeping (chart specs, runtime) lives under "_wandb".
    return {k: v for k, v in config.items() if not k.startswith("_wandb")}


def read_run(run_dir: Path, run_id: str | None = None) -> Any:
    """The `RunRecord` (id, name, group, notes, tags...) of the latest piece."""
    for record in read_records(_pick(run_dir, run_id)[-1]):
        if record.WhichOneof("record_type") == "run":
            return record.run
    raise ValueError(f"no run record in the W&B file under {run_dir}")


def read_summary(run_dir: Path, run_id: str | None = None) -> dict[str, Any]:
    """The final summary of the latest piece (later updates win)."""
    summary: dict[str, Any] = {}
    for record in read_records(_pick(run_dir, run_id)[-1]):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary[_key(item)] = json.loads(item.value_json)
    return summary


def read_artifacts(run_dir: Path, run_id: str | None = None) -> list[dict[str, Any]]:
    """Artifacts logged by the run's pieces (oldest first): name, type, aliases, metadata,
    and each manifest entry as (path, reference URI, digest)."""
    found = []
    for path in _pick(run_dir, run_id):
        for record in read_records(path):
            if record.WhichOneof("record_type") != "artifact":
                continue
            art = record.artifact
            found.append(
                {
                    "run_file": path.name,
                    "name": art.name,
                    "type": art.type,
                    "aliases": set(art.aliases),
                    "metadata": json.loads(art.metadata or "{}"),
                    "entries": [(m.path, m.ref, m.digest) for m in art.manifest.contents],
                }
            )
    return found
