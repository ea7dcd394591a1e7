"""What the v2 record checksum costs per record: crc32 vs adler32, next to a whole decode.

    python scripts/bench_checksum.py [--repeat 50]

Prints JSON: per record shape, microseconds per record for zlib.crc32 and zlib.adler32
over the record's array bytes, for `decode_block(meta=False)` (training's decode, which
includes the crc32 check), and the checksum's share of that decode.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import zlib

import numpy as np

from pipeline.data.format import decode_block, encode_block

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
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
