"""What the v2 record checksum costs per record: crc32 vs adler32, next to a whole decode.

    python scripts/bench_checksum.py [--repeat 50]

Prints JSON: per record shape, microseconds per record for zlib.crc32 and zlib.adler32
over the record's array bytes, for `decode_block(meta=False)` (training's decode, which
includes the crc32 check), and the checksum's share of that decode. Then the reader's
throughput (`read_blocks`, the training stream's reader) on the same 2D samples written
as v2 (checked) and as v1 (no checksum, unchecked), interleaved in rounds, medians.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import webdataset as wds

from pipeline.data.format import decode_block, encode_block
from pipeline.data.loader import read_blocks
from pipeline.data.problems import ProblemLog

SHAPES = {
    "2d uint8 256x1x48x48": ((256, 1, 48, 48), np.uint8),
    "3d int16 64x1x48x48x48": ((64, 1, 48, 48, 48), np.int16),
}


def per_record_us(fn, repeat: int) -> float:
    fn()  # warm
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return 1e6 * (time.perf_counter() - started) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    out = {"machine": platform.processor() or platform.machine(), "zlib": zlib.ZLIB_RUNTIME_VERSION}
    for name, (shape, dtype) in SHAPES.items():
        patch = rng.integers(0, 200, shape).astype(dtype)
        label = (rng.random(shape[0]) < 0.3).astype(np.uint8)
        record = encode_block("k", patch, label, [str(i) for i in range(shape[0])])
        data = record["patch.npy"] + record["label.npy"]
        crc = per_record_us(lambda data=data: zlib.crc32(data), args.repeat)
        adler = per_record_us(lambda data=data: zlib.adler32(data), args.repeat)
        decode = per_record_us(lambda record=record: decode_block(record, meta=False), args.repeat)
        out[name] = {
            "mb_per_record": round(len(data) / 1e6, 3),
            "crc32_us": round(crc, 1),
            "adler32_us": round(adler, 1),
            "crc32_gb_s": round(len(data) / crc / 1e3, 2),
            "decode_with_crc32_us": round(decode, 1),
            "crc32_share_of_decode": round(crc / decode, 2),
        }
    out["reader_2d"] = reader_cost(rng, args.repeat)
    print(json.dumps(out, indent=2))


def _write(path: Path, records: list[dict], version: int) -> None:
    with wds.TarWriter(str(path), mtime=0) as sink:
        for record in records:
            if version == 1:  # what a v1 writer stored: no crc32, so nothing to check
                meta = json.loads(record["meta.json"])
                meta = {"version": 1, **{k: v for k, v in meta.items() if k != "version"}}
                meta.pop("crc32")
                record = {**record, "meta.json": json.dumps(meta).encode()}
            sink.write(record)


def reader_cost(rng: np.random.Generator, rounds: int) -> dict:
    """Samples/s of read_blocks on v2 vs v1 shards of the same 2D records (page-cached)."""
    k, blocks = 256, 64
    records = []
    for b in range(blocks):
        patch = rng.integers(0, 256, (k, 1, 48, 48), dtype=np.uint8)
        label = (rng.random(k) < 0.3).astype(np.uint8)
        records.append(encode_block(f"b{b:04d}", patch, label, [f"{b}-{i}" for i in range(k)]))
    with tempfile.TemporaryDirectory() as tmp:
        paths = {v: Path(tmp) / f"v{v}.tar" for v in (1, 2)}
        for version, path in paths.items():
            _write(path, records, version)
        rates: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(max(3, rounds // 10)):
            for version, path in paths.items():
                started = time.perf_counter()
                n = sum(len(b) for b in read_blocks([str(path)], "fail", ProblemLog(), meta=False))
                rates[version].append(n / (time.perf_counter() - started))
    v1, v2 = statistics.median(rates[1]), statistics.median(rates[2])
    return {
        "record": f"{k}x1x48x48 uint8",
        "v1_unchecked_samples_per_s": round(v1),
        "v2_checked_samples_per_s": round(v2),
        "v2_over_v1": round(v2 / v1, 3),
    }


if __name__ == "__main__":
    main()
