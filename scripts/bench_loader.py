"""Loader throughput: the project's block reader vs a per-sample WebDataset vs raw tar reads.

All readers see the same generated samples in one run, and the per-worker comparison
interleaves them in rounds (raw, project, per-sample, raw, ...), taking medians, so the
ratios hold even on a noisy shared machine (absolute numbers do not). One worker = one
process running the reader, as a DataLoader worker does; rows with 1 and N DataLoader
workers add the cost of shipping batches to the trainer. Prints one line per
measurement, then, as its last line, one JSON object: `samples_per_s` per reader,
`speedup_vs_per_sample` and `fraction_of_raw_read` (2D, one worker, K=256, the config's
shuffle buffer), every row, the speed and peak RSS per worker for several shuffle buffers
and block sizes, and the machine.

    python scripts/bench_loader.py                 # 2D and 3D, about 2 min on 2 cores
    python scripts/bench_loader.py --dims 2 --quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.config import DataConfig  # noqa: E402
from pipeline.data.format import write_split  # noqa: E402
from pipeline.data.loader import StreamSpec, TrainStream, build_loader  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Issue 18: one worker delivers at least half of what its reader makes in-process.
GOALS = {"delivered_vs_in_process": 0.5}
SHARDS = 8
# Per dims: samples written, stored dtype, block sizes K to compare, the headline K, the
# shuffle buffers for the memory rows, and the batch (the shipped configs' batch in 3D).
PLANS = {
    2: {
        "samples": 65536,
        "dtype": "uint8",
        "blocks": (64, 256, 1024),
        "k": 256,
        "memory": (1, 16, 64),
        "shuffle": (8, 16, 32, 48, 64),
        "batch": 256,
    },
    3: {
        "samples": 1024,
        "dtype": "int16",
        "blocks": (16, 64),
        "k": 64,
        "memory": (1, 4, 16),
        "shuffle": (2, 8),
        "batch": 32,
    },
}


def machine_info() -> dict[str, Any]:
    """CPU, GPU, library versions, load and date: what a number needs beside it."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "webdataset": wds.__version__,
        "python": platform.python_version(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def write_data(root: Path, dims: int, n: int, dtype: str, blocks: tuple[int, ...]) -> dict:
    """The same random samples as block shards (one dir per K) and as one-sample records."""
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    shape = (n, 1) + (48,) * dims
    patch = rng.integers(max(info.min, -1024), min(info.max, 2048), shape, dtype=dtype)
    # The first 3 values of each sample spell its index (base 128): batches can be traced
    # back to samples and storage blocks for the shuffle-quality rows.
    flat = patch.reshape(n, -1)
    for digit in range(3):
        flat[:, digit] = (np.arange(n) >> (7 * digit)) & 127
    label = (rng.random(n) < 0.25).astype(np.uint8)
    ids = [f"s{i:07d}" for i in range(n)]
    out: dict[str, Any] = {"sample_bytes": int(patch[0].nbytes) + 1, "block": {}, "n": n}
    for k in blocks:
        write_split(root / f"k{k}", "train", patch, label, ids, num_shards=SHARDS, block_size=k)
        out["block"][k] = sorted(str(p) for p in (root / f"k{k}").glob("train-*.tar"))
    out["per_sample"] = []
    for shard, part in enumerate(np.array_split(np.arange(n), SHARDS)):
        path = root / "per_sample" / f"train-{shard:06d}.tar"
        path.parent.mkdir(parents=True, exist_ok=True)
        with wds.TarWriter(str(path), mtime=0) as sink:
            for i in part:
                sink.write(
                    {"__key__": ids[i], "patch.npy": patch[i], "label.npy": label[i : i + 1]}
                )
        out["per_sample"].append(str(path))
    return out


# --- readers ------------------------------------------------------------------------------


def project_stream(
    shards: list[str],
    batch: int,
    shuffle_blocks: int,
    workers: int = 0,
    reader: str = "fast",
    handover: str = "shared",
):
    """The training stream exactly as `Trainer.batches` builds it (`data.reader` = reader)."""
    spec = StreamSpec(
        shards,
        batch,
        seed=0,
        num_workers=workers,
        shuffle_blocks=shuffle_blocks,
        reader=reader,
        handover=handover,
    )
    if workers == 0:
        return iter(TrainStream(spec))
    return iter(build_loader(TrainStream(spec), workers, pin_memory=False, prefetch=4))


def per_sample_dataset(shards: list[str], batch: int, shuffle: int = 1000) -> IterableDataset:
    """The naive baseline: one record per sample, decoded and collated in Python."""
    return (
        wds.WebDataset(shards, resampled=True, shardshuffle=False, empty_check=False)
        .shuffle(shuffle)
        .decode()
        .to_tuple("patch.npy", "label.npy")
        .map_tuple(torch.from_numpy, torch.from_numpy)
        .batched(batch, partial=False)
    )


def per_sample_stream(shards: list[str], batch: int, workers: int = 0, shuffle: int = 1000):
    dataset = per_sample_dataset(shards, batch, shuffle)
    if workers == 0:
        return iter(dataset)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=4)
    return iter(loader)


def raw_reader(shards: list[str], samples: int) -> Callable[[float], tuple[float, float]]:
    """Tar bytes in 8 MiB chunks into one reused buffer (the ceiling), as samples/s."""
    per_sample = sum(os.path.getsize(p) for p in shards) / samples  # tar bytes per sample
    buffer = bytearray(8 << 20)

    def run(seconds: float) -> tuple[float, float]:
        total, wall, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - wall < seconds:
            for path in shards:
                with open(path, "rb", buffering=0) as stream:
                    while got := stream.readinto(buffer):
                        total += got
        n = total / per_sample
        return n / (time.perf_counter() - wall), n / max(time.process_time() - cpu, 1e-9)

    return run


def batch_len(batch: Any) -> int:
    return len(batch[1] if isinstance(batch, (tuple, list)) else batch["label"])


def stream_reader(batches: Iterator[Any]) -> Callable[[float], tuple[float, float]]:
    """Samples/s (wall, CPU of this process) of an iterator; its first batch is warm-up."""
    next(batches)

    def run(seconds: float) -> tuple[float, float]:
        samples, wall, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - wall < seconds:
            samples += batch_len(next(batches))
        return samples / (time.perf_counter() - wall), samples / max(
            time.process_time() - cpu, 1e-9
        )

    return run


def interleaved(readers: dict[str, Callable], rounds: int, seconds: float) -> dict[str, dict]:
    """Median rates over rounds that take turns, so load swings hit every reader alike."""
    wall: dict[str, list[float]] = {name: [] for name in readers}
    cpu: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(rounds):
        for name, run in readers.items():
            w, c = run(seconds)
            wall[name].append(w)
            cpu[name].append(c)
    return {
        name: {
            "samples_per_s": statistics.median(wall[name]),
            "cpu_samples_per_s": statistics.median(cpu[name]),
            "rounds": [round(x) for x in wall[name]],
        }
        for name in readers
    }


# --- shuffle quality ----------------------------------------------------------------------


def sample_index(patch: torch.Tensor) -> np.ndarray:
    flat = patch.reshape(len(patch), -1)[:, :3].numpy().astype(np.int64)
    return flat[:, 0] | (flat[:, 1] << 7) | (flat[:, 2] << 14)


def block_of(shards: list[str], n: int) -> np.ndarray:
    """Storage block number of every sample (the writer shuffles samples before blocking)."""
    from pipeline.data.loader import read_blocks
    from pipeline.data.problems import ProblemLog

    out = np.full(n, -1, np.int64)
    for number, block in enumerate(read_blocks(shards, "fail", ProblemLog())):
        out[[int(i[1:]) for i in block.ids]] = number
    return out


def shuffle_quality(shards: list[str], n: int, batch: int, shuffle_blocks: int) -> dict:
    """Blocks per batch, and the share of same-batch pairs that meet again next epoch.

    The stream's first two epochs, read in-process (one worker reads every shard). A
    uniform shuffle draws a batch from about min(batch, blocks) blocks, and a pair shares a
    batch again with probability (batch - 1) / (n - 1).
    """
    per_epoch = n // batch
    stream = project_stream(shards, batch, shuffle_blocks)
    epochs = [
        np.stack([sample_index(next(stream)["patch"]) for _ in range(per_epoch)]) for _ in range(2)
    ]
    blocks = block_of(shards, n)
    where_next = np.full(n, -1, np.int64)
    where_next[epochs[1].ravel()] = np.repeat(np.arange(per_epoch), batch)
    again = pairs = 0
    for members in epochs[0]:
        _, counts = np.unique(where_next[members], return_counts=True)
        again += int((counts * (counts - 1) // 2).sum())
        pairs += batch * (batch - 1) // 2
    k = n / (blocks.max() + 1)
    expected_blocks = (blocks.max() + 1) * (1 - (1 - 1 / (blocks.max() + 1)) ** batch)
    return {
        "shuffle_blocks": shuffle_blocks,
        "blocks_per_batch": float(np.mean([len(np.unique(blocks[b])) for b in epochs[0]])),
        "uniform_blocks_per_batch": round(float(expected_blocks), 1),
        "pairs_again": again / pairs,
        "uniform_pairs_again": (batch - 1) / (n - 1),
        "k": int(k),
    }


# --- DataLoader workers -------------------------------------------------------------------


def _worker_peak_rss(batches: Any) -> list[float]:
    """VmHWM (peak resident set) of each live DataLoader worker, in MiB."""
    peaks = []
    for worker in getattr(batches, "_workers", []):
        try:
            for line in Path(f"/proc/{worker.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]) / 1024)
        except OSError:
            pass
    return peaks


def through_loader(batches: Any, seconds: float) -> dict[str, Any]:
    """Samples/s delivered to this process by DataLoader workers (start-up excluded)."""
    start = time.perf_counter()
    next(batches)
    startup = time.perf_counter() - start
    samples, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < seconds:
        samples += batch_len(next(batches))
    rate = samples / (time.perf_counter() - begin)
    out = {"samples_per_s": rate, "startup_s": round(startup, 2)}
    peaks = _worker_peak_rss(batches)
    if peaks:
        out["worker_peak_rss_mb"] = round(max(peaks), 1)
    del batches
    return out


# --- one dims -----------------------------------------------------------------------------


def bench_dims(dims: int, root: Path, args: argparse.Namespace, rows: list[dict]) -> dict:
    plan = dict(PLANS[dims])
    if args.quick:
        plan.update(samples=2048 if dims == 2 else 128, blocks=(plan["k"],), shuffle=(1, 4))
    data = write_data(root / f"{dims}d", dims, plan["samples"], plan["dtype"], plan["blocks"])
    sample_bytes, k, n_workers = data["sample_bytes"], plan["k"], args.workers
    batch = args.batch or plan["batch"]
    if args.quick:
        batch = min(batch, 128)

    def record(reader: str, result: dict, **extra: Any) -> dict:
        row = {"dims": dims, "dtype": plan["dtype"], "batch": batch, "reader": reader, **extra}
        row.update(result)
        row["bytes_per_s"] = row["samples_per_s"] * sample_bytes
        rows.append(row)
        note = " ".join(f"{key}={value}" for key, value in extra.items())
        rss = (
            f"  worker peak RSS {row['worker_peak_rss_mb']:.0f} MiB"
            if "worker_peak_rss_mb" in row
            else ""
        )
        print(
            f"{dims}D {reader:18s} {note:34s} {row['samples_per_s']:12,.0f} samples/s "
            f"{row['bytes_per_s'] / 1e6:8,.0f} MB/s{rss}",
            flush=True,
        )
        return row

    # Host memory per worker is set by the shuffle buffer: growth over a 1-block buffer
    # should stay within one buffer when it holds whole batches (its memory is recycled as
    # its last batch leaves), else two (the one being filled + the one finishing a batch).
    # Measured first, while this process holds little that forked workers would inherit.
    memory = []
    for blocks in (1, 4) if args.quick else plan["memory"]:
        batches = project_stream(data["block"][k], batch, blocks, workers=1)
        row = record(
            "project",
            through_loader(batches, args.seconds / 2),
            workers=1,
            k=k,
            shuffle_blocks=blocks,
        )
        peak = row.get("worker_peak_rss_mb", 0.0)
        buffer_mib = blocks * k * sample_bytes / 2**20
        memory.append(
            {
                "shuffle_blocks": blocks,
                "buffer_mib": round(buffer_mib, 1),
                "worker_peak_rss_mib": peak,
                "growth_over_1_block_mib": round(peak - memory[0]["worker_peak_rss_mib"], 1)
                if memory
                else 0.0,
                "expected_growth_mib": round(
                    (1 if blocks * k % batch == 0 else 2) * (buffer_mib - memory[0]["buffer_mib"]),
                    1,
                )
                if memory
                else 0.0,
            }
        )
    # One worker's reader, interleaved with the raw read and the per-sample baseline.
    readers = {
        "raw_read": raw_reader(data["block"][k], data["n"]),
        "project": stream_reader(project_stream(data["block"][k], batch, args.shuffle_blocks)),
        # The same blocks, shuffle and batching, read by webdataset's tar reader instead.
        "project_webdataset": stream_reader(
            project_stream(data["block"][k], batch, args.shuffle_blocks, reader="webdataset")
        ),
        "per_sample": stream_reader(
            per_sample_stream(data["per_sample"], batch, shuffle=args.sample_shuffle)
        ),
    }
    per_worker = interleaved(readers, args.rounds, args.seconds)
    for name, result in per_worker.items():
        record(name, result, workers="1 (in-process)", k=k if name != "per_sample" else 1)
    headline = {name: result["samples_per_s"] for name, result in per_worker.items()}

    # Block size K: each against the raw read of its own files, interleaved.
    block_sizes = []
    for block in plan["blocks"]:
        pair = interleaved(
            {
                "raw_read": raw_reader(data["block"][block], data["n"]),
                "project": stream_reader(
                    project_stream(data["block"][block], batch, args.shuffle_blocks)
                ),
            },
            max(2, args.rounds // 2),
            args.seconds,
        )
        row = record("project", pair["project"], workers="1 (in-process)", k=block)
        block_sizes.append(
            {
                "k": block,
                "samples_per_s": row["samples_per_s"],
                "fraction_of_raw_read": pair["project"]["samples_per_s"]
                / pair["raw_read"]["samples_per_s"],
            }
        )

    # Shuffle buffer: speed in-process and delivered by one worker, and shuffle quality.
    shuffle_sizes = []
    rates = interleaved(
        {"raw_read": raw_reader(data["block"][k], data["n"])}
        | {
            f"shuffle_{blocks}": stream_reader(project_stream(data["block"][k], batch, blocks))
            for blocks in plan["shuffle"]
        },
        max(2, args.rounds // 2),
        args.seconds,
    )
    # Delivered by one worker per buffer size, in interleaved rounds too (a fresh loader each).
    shipped: dict[int, list[float]] = {blocks: [] for blocks in plan["shuffle"]}
    for _ in range(max(1, args.rounds // 2)):
        for blocks in plan["shuffle"]:
            batches = project_stream(data["block"][k], batch, blocks, 1)
            shipped[blocks].append(through_loader(batches, args.seconds)["samples_per_s"])
    for blocks in plan["shuffle"]:
        result = rates[f"shuffle_{blocks}"]
        row = record("project", result, workers="1 (in-process)", k=k, shuffle_blocks=blocks)
        delivered = record(
            "project",
            {"samples_per_s": statistics.median(shipped[blocks])},
            workers=1,
            k=k,
            shuffle_blocks=blocks,
        )
        quality = shuffle_quality(data["block"][k], data["n"], batch, blocks)
        print(
            f"{dims}D shuffle_blocks={blocks}: {quality['blocks_per_batch']:.1f} blocks per batch "
            f"(uniform {quality['uniform_blocks_per_batch']}), pairs again "
            f"{quality['pairs_again']:.4f} (uniform {quality['uniform_pairs_again']:.4f})",
            flush=True,
        )
        shuffle_sizes.append(
            {
                "shuffle_blocks": blocks,
                "buffer_mib": round(blocks * k * sample_bytes / 2**20, 1),
                "samples_per_s": row["samples_per_s"],
                "delivered_1w_samples_per_s": delivered["samples_per_s"],
                "fraction_of_raw_read": result["samples_per_s"]
                / rates["raw_read"]["samples_per_s"],
                **quality,
            }
        )

    # Delivered to the trainer through DataLoader workers, shipping included: both readers,
    # 1 and N workers, in interleaved rounds (a fresh loader each round, start-up excluded).
    # `copy` = the previous hand-over (pickled by value, or a fresh shm segment per tensor).
    variants = [
        (reader, w, hand)
        for reader in ("fast", "webdataset")
        for w in sorted({1, n_workers})
        for hand in ("shared", "copy")
        if hand == "shared" or reader == "fast"
    ]
    names = {v: f"{v[0]}_{v[1]}w" + ("_copy" if v[2] == "copy" else "") for v in variants}
    runs: dict[str, list[float]] = {name: [] for name in names.values()}
    for _ in range(max(1, args.rounds // 2)):
        for variant in variants:
            reader, workers, hand = variant
            batches = project_stream(
                data["block"][k], batch, args.shuffle_blocks, workers, reader, hand
            )
            runs[names[variant]].append(through_loader(batches, args.seconds)["samples_per_s"])
    delivered = {}
    for (reader, workers, hand), name in names.items():
        rate = statistics.median(runs[name])
        record(f"delivered_{reader}_{hand}", {"samples_per_s": rate}, workers=workers, k=k)
        delivered[name] = rate
    per_sample_loader = per_sample_stream(data["per_sample"], batch, 1, args.sample_shuffle)
    row = record("per_sample", through_loader(per_sample_loader, args.seconds), workers=1, k=1)
    delivered["per_sample_1w"] = row["samples_per_s"]

    return {
        "samples_per_s": headline,
        "cpu_samples_per_s": {n: r["cpu_samples_per_s"] for n, r in per_worker.items()},
        # Headline: what one worker delivers to the trainer, against the raw read ceiling
        # and against what the same reader makes in-process (the hand-over's share).
        "delivered_samples_per_s": delivered["fast_1w"],
        "fraction_of_raw_read": delivered["fast_1w"] / headline["raw_read"],
        "delivered_vs_in_process": delivered["fast_1w"] / headline["project"],
        "in_process_fraction_of_raw_read": headline["project"] / headline["raw_read"],
        # Format gain: block records vs one sample per record, both read by webdataset.
        "format_gain": headline["project_webdataset"] / headline["per_sample"],
        # Reader gain: our tar reader vs webdataset's on the same block records.
        "reader_gain_in_process": headline["project"] / headline["project_webdataset"],
        "reader_gain_delivered_1w": delivered["fast_1w"] / delivered["webdataset_1w"],
        "shared_vs_copy_1w": delivered["fast_1w"] / delivered["fast_1w_copy"],
        "k": k,
        "batch": batch,
        "sample_bytes": sample_bytes,
        "block_sizes": block_sizes,
        "shuffle_sizes": shuffle_sizes,
        "delivered": delivered,
        "memory": memory,
        "samples": plan["samples"],
    }


def delivered_label(key: str) -> str:
    """'fast_2w_copy' -> 'fast reader, 2 workers, copy hand-over'."""
    if key.startswith("per_sample"):
        return "one-sample-per-record WebDataset, 1 worker"
    reader, workers, *copy = key.split("_")
    n = int(workers.rstrip("w"))
    hand = "copy (by value / fresh shm per batch)" if copy else "shared-memory ring"
    return f"{reader} reader, {n} worker{'s' if n > 1 else ''}, {hand} hand-over"


def write_markdown(per_dims: dict, args: argparse.Namespace, command: str) -> None:
    from benchmarks_md import machine_line, table, write_section

    for name, r in per_dims.items():
        raw = r["samples_per_s"]["raw_read"]
        rates = [
            ("raw tar read (8 MiB chunks, the ceiling)", raw),
            ("in-process: our reader (`data.reader=fast`)", r["samples_per_s"]["project"]),
            ("in-process: `data.reader=webdataset`", r["samples_per_s"]["project_webdataset"]),
            ("in-process: one-sample-per-record WebDataset", r["samples_per_s"]["per_sample"]),
        ] + [
            (f"**delivered to the trainer**: {delivered_label(key)}", value)
            for key, value in r["delivered"].items()
        ]
        body = [
            table(
                ["samples/s", "value", "fraction of raw read"], [[a, b, b / raw] for a, b in rates]
            ),
            "",
            table(
                ["ratio", "value"],
                [
                    [
                        "format gain (block records / one sample per record, both webdataset)",
                        r["format_gain"],
                    ],
                    [
                        "reader gain in-process (fast / webdataset reader)",
                        r["reader_gain_in_process"],
                    ],
                    ["reader gain delivered, 1 worker", r["reader_gain_delivered_1w"]],
                    ["shared-memory hand-over / copy hand-over, 1 worker", r["shared_vs_copy_1w"]],
                    [
                        "**delivered / in-process read, 1 worker** (goal >= 0.5)",
                        r["delivered_vs_in_process"],
                    ],
                ],
            ),
            "",
            table(
                [
                    "shuffle_blocks",
                    "buffer MiB",
                    "in-process samples/s",
                    "delivered 1 worker",
                    "blocks per batch (uniform)",
                    "pairs again (uniform)",
                ],
                [
                    [
                        q["shuffle_blocks"],
                        q["buffer_mib"],
                        q["samples_per_s"],
                        q["delivered_1w_samples_per_s"],
                        f"{q['blocks_per_batch']:.1f} ({q['uniform_blocks_per_batch']})",
                        f"{q['pairs_again']:.4f} ({q['uniform_pairs_again']:.4f})",
                    ]
                    for q in r["shuffle_sizes"]
                ],
            ),
            "",
            table(
                ["block size K", "in-process samples/s", "fraction of raw read"],
                [[b["k"], b["samples_per_s"], b["fraction_of_raw_read"]] for b in r["block_sizes"]],
            ),
        ]
        write_section(
            f"loader-{name}",
            f"Loader, {name.upper()} ({r['sample_bytes'] - 1} bytes per sample, K={r['k']}, "
            f"batch {r['batch']}, shuffle_blocks {args.shuffle_blocks}, {r['samples']} samples)",
            "\n".join(body),
            command=command,
            machine=machine_line(shared=True),
            notes=(
                f"Medians of {args.rounds} interleaved rounds ({max(1, args.rounds // 2)} for the "
                "delivered and shuffle rows). Pairs again: of the sample pairs that share a batch in epoch "
                "0, the share that share one again in epoch 1."
            ),
            path=args.md,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", choices=("2", "3", "both"), default="both")
    parser.add_argument("--batch", type=int, help="default: 256 in 2D, 32 in 3D (the configs')")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="the N in N workers"
    )
    parser.add_argument(
        "--shuffle-blocks", type=int, default=DataConfig.shuffle_blocks, help="config default"
    )
    parser.add_argument("--seconds", type=float, default=1.0, help="timed slice per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per comparison")
    parser.add_argument("--quick", action="store_true", help="tiny data, one K, short slices")
    parser.add_argument("--dir", help="where to write the data (default: a temp dir)")
    parser.add_argument(
        "--md", help="write the tables into this BENCHMARKS.md (default: the repo's, not --quick)"
    )
    args = parser.parse_args(argv)
    command = "python scripts/bench_loader.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    args.sample_shuffle = 1000
    if args.quick:
        args.seconds, args.rounds = min(args.seconds, 0.1), 2
        args.workers, args.sample_shuffle = 1, 100
    dims_list = [2, 3] if args.dims == "both" else [int(args.dims)]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        per_dims = {f"{d}d": bench_dims(d, Path(tmp), args, rows) for d in dims_list}
    head = per_dims[f"{dims_list[0]}d"]
    result = {
        "benchmark": "loader",
        "headline": f"{dims_list[0]}D {PLANS[dims_list[0]]['dtype']}, delivered by one worker, "
        f"K={head['k']}, batch {head['batch']}, medians of {args.rounds} interleaved rounds",
        "samples_per_s": head["samples_per_s"],
        "delivered_samples_per_s": head["delivered_samples_per_s"],
        "fraction_of_raw_read": head["fraction_of_raw_read"],
        "delivered_vs_in_process": head["delivered_vs_in_process"],
        "format_gain": head["format_gain"],
        "reader_gain_in_process": head["reader_gain_in_process"],
        "goals": GOALS,
        "per_dims": per_dims,
        "rows": rows,
        "machine": machine_info(),
        "args": vars(args),
    }
    result["meets_goals"] = all(
        per_dims[d][key] >= goal for d in per_dims for key, goal in GOALS.items()
    )
    if args.md or not args.quick:
        write_markdown(per_dims, args, command.strip())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
