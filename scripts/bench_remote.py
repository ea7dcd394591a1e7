"""Remote shards: delivered samples/s into the training process, local vs HTTP vs S3 emulator.

Every row drives the real training stream (TrainStream through a DataLoader with loader
workers, batches arriving in this process) over one epoch of the same shards:
- `local`: the shards on local disk;
- `http` / `s3`: a loopback HTTP server with Range support / moto's S3 emulator, each in
  its own process (so the server does not share this process's GIL), with a cold cache
  (first epoch: every shard downloads) and a warm one (second epoch: no network), with
  and without prefetch;
- `throttled`: the HTTP server paced to a fixed bandwidth, half the rate one worker reads
  local shards (at most 200 MB/s, and half what the unthrottled server delivered): the network is the bottleneck, and reading a shard
  takes about half as long as downloading it, the case prefetch exists for (without it a
  worker alternates). Goal: delivered >= 80 % of what that bandwidth allows.
- `planted_slow`: the same throttled server with prefetch off, which must fall below the
  goal: the check that this benchmark can see a missing prefetch at all.
Prints one line per row, then one JSON object (rows, goals, machine) as its last line.

    python scripts/bench_remote.py            # 2D and 3D, a few minutes on 2 cores
    python scripts/bench_remote.py --dims 2 --quick
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loader import machine_info  # noqa: E402

from pipeline.config import DataConfig  # noqa: E402
from pipeline.data import cache  # noqa: E402
from pipeline.data.format import expand_shards, write_split  # noqa: E402
from pipeline.data.loader import StreamSpec, TrainStream, build_loader  # noqa: E402

GOAL_FRACTION_OF_BANDWIDTH = 0.8
MAX_BANDWIDTH = 200e6
SHARDS = 16  # per worker and epoch, only the first download cannot overlap reading
PLANS = {
    2: {"samples": 32768, "dtype": "uint8", "k": 256, "batch": 256},
    3: {"samples": 512, "dtype": "int16", "k": 16, "batch": 32},
}


def write_data(root: Path, dims: int, quick: bool) -> tuple[list[str], int]:
    plan = PLANS[dims]
    n = plan["samples"] // (4 if quick else 1)
    rng = np.random.default_rng(0)
    patch = rng.integers(0, 255, (n, 1) + (48,) * dims, dtype=plan["dtype"])
    label = (rng.random(n) < 0.25).astype(np.uint8)
    write_split(root, "train", patch, label, [f"s{i}" for i in range(n)], num_shards=SHARDS,
                block_size=plan["k"])  # fmt: skip
    return sorted(str(p) for p in root.glob("train-*.tar")), n


def _serve(kind: str, root: str, bandwidth: float | None, queue, stop) -> None:
    from tests.remote_servers import environment, s3_emulator, shard_server

    if kind == "http":
        with shard_server(Path(root), bandwidth=bandwidth) as server:
            queue.put({"url": server.url})
            stop.wait()
        return
    with s3_emulator() as env, environment(env):
        import fsspec

        from tests.remote_servers import make_bucket

        make_bucket(env, "bench")
        fs = fsspec.filesystem("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        for path in sorted(Path(root).iterdir()):
            fs.put_file(str(path), f"bench/ds/{path.name}")
        queue.put({"url": "s3://bench/ds", "env": env})
        stop.wait()


class Server:
    """A shard server in a child process, for the duration of a `with` block."""

    def __init__(self, kind: str, root: Path, bandwidth: float | None = None) -> None:
        context = multiprocessing.get_context("spawn")
        self.queue, self.stop = context.Queue(), context.Event()
        self.process = context.Process(
            target=_serve, args=(kind, str(root), bandwidth, self.queue, self.stop), daemon=True
        )

    def __enter__(self) -> dict[str, Any]:
        self.process.start()
        return self.queue.get(timeout=120)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


def delivered(
    shards: list[str], batch: int, batches: int, workers: int, prefetch: int, cache_dir: Path
) -> float:
    """Samples/s arriving in this process from a fresh DataLoader over `batches` batches."""
    cache.configure(
        DataConfig(cache_dir=str(cache_dir), prefetch_shards=prefetch, cache_limit_gb=0)
    )
    spec = StreamSpec(shards, batch, num_workers=workers, shuffle_blocks=8)
    loader = build_loader(TrainStream(spec), workers, False, 4)
    start, samples = time.perf_counter(), 0
    for i, item in enumerate(loader):
        samples += len(item["label"])
        if i + 1 == batches:
            break
    seconds = time.perf_counter() - start
    del loader
    return samples / seconds


def bench(dims: int, quick: bool, workers: int, tmp: Path) -> list[dict[str, Any]]:
    import os

    root = tmp / f"shards{dims}d"
    local, n = write_data(root, dims, quick)
    batch = PLANS[dims]["batch"]
    batches = n // batch  # one epoch
    sample_bytes = sum(Path(s).stat().st_size for s in local) / n
    rows: list[dict[str, Any]] = []

    def row(source: str, cache_state: str, prefetch: int | None, rate: float, **extra) -> None:
        rows.append({"dims": dims, "source": source, "cache": cache_state,
                     "prefetch": prefetch, "workers": workers,
                     "samples_per_s": round(rate, 1), **extra})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)

    delivered(local, batch, batches, workers, 0, tmp / "unused")  # warm-up: page cache, imports
    local_rate = delivered(local, batch, batches, workers, 0, tmp / "unused")
    row("local", "-", None, local_rate)
    for kind in ("http", "s3"):
        with Server(kind, root) as served:
            os.environ.update(served.get("env", {}))
            urls = expand_shards(served["url"] + "/", "data.train")
            for prefetch in (0, 2):
                cache_dir = tmp / f"cache-{kind}-{dims}-{prefetch}"
                row(kind, "cold", prefetch, delivered(urls, batch, batches, workers, prefetch, cache_dir))  # fmt: skip
            row(kind, "warm", 2, delivered(urls, batch, batches, workers, 2, cache_dir))

    # Throttled: one worker, so download and read alternate unless prefetch overlaps them.
    one_worker = delivered(local, batch, batches, 1, 0, tmp / "unused")
    # Below what the unthrottled server managed too, or the pacing would not be the limit.
    served = next(r for r in rows if r["source"] == "http" and r["prefetch"] == 2)
    unthrottled = served["samples_per_s"] * sample_bytes
    bandwidth = min(MAX_BANDWIDTH, 0.5 * one_worker * sample_bytes, 0.5 * unthrottled)
    allowed = bandwidth / sample_bytes
    for name, prefetch in (("throttled", 2), ("planted_slow", 0)):
        with Server("http", root, bandwidth=bandwidth) as served:
            urls = expand_shards(served["url"] + "/", "data.train")
            rate = delivered(urls, batch, batches, 1, prefetch, tmp / f"cache-{name}-{dims}")
        fraction = rate / allowed
        row(name, "cold", prefetch, rate, bandwidth_mb_s=round(bandwidth / 1e6, 1),
            allowed_samples_per_s=round(allowed, 1), fraction_of_bandwidth=round(fraction, 3),
            goal_met=fraction >= GOAL_FRACTION_OF_BANDWIDTH, workers=1)  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, choices=(2, 3), action="append")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--quick", action="store_true", help="a quarter of the samples")
    parser.add_argument(
        "--md", help="write the table into this BENCHMARKS.md (default: the repo's, not --quick)"
    )
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for dims in args.dims or (2, 3):
            rows.extend(bench(dims, args.quick, args.workers, Path(tmp)))
    throttled = {r["dims"]: r for r in rows if r["source"] == "throttled"}
    planted = {r["dims"]: r for r in rows if r["source"] == "planted_slow"}
    result = {
        "benchmark": "bench_remote",
        "goals": {"throttled_fraction_of_bandwidth": GOAL_FRACTION_OF_BANDWIDTH},
        "goal_met": all(r["goal_met"] for r in throttled.values()),
        # The planted case must be caught: prefetch off under the same throttle misses.
        "planted_slow_detected": all(not r["goal_met"] for r in planted.values()),
        "rows": rows,
        "machine": machine_info(),
    }
    print(json.dumps(result))
    if args.md or not args.quick:
        write_markdown(result, args.md, args.quick)


def write_markdown(result: dict[str, Any], path: str | None, quick: bool) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchmarks_md import machine_line, table, write_section

    keys = ["dims", "source", "cache", "prefetch", "workers", "samples_per_s"]
    extra = sorted({k for r in result["rows"] for k in r} - set(keys))
    rows = [[r.get(k, "") for k in keys + extra] for r in result["rows"]]
    write_section(
        "remote",
        "Shards on object storage: delivered samples/s through the DataLoader",
        table(keys + extra, rows),
        command="python scripts/bench_remote.py" + (" --quick" if quick else ""),
        machine=machine_line(shared=True),
        notes=f"Throttled goal met: {result['goal_met']} (prefetch keeps >= "
        f"{GOAL_FRACTION_OF_BANDWIDTH} of the bandwidth); planted no-prefetch case detected: "
        f"{result['planted_slow_detected']}. The S3 server is moto's emulator on loopback.",
        path=path,
    )


if __name__ == "__main__":
    main()
