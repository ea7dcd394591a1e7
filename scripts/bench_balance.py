"""What `data.balance` costs a reader: batches/s with and without, and a resume's replay.

One reader (the training stream in-process, `worker_batches`, as one DataLoader worker
runs it) over 1:100 shards of the shipped configs' sample shapes. Rows are interleaved in
rounds (off, balance, off, ...) and medians taken, so the ratio holds on a noisy shared
machine (absolute numbers do not). `resume_s` times a resume's replay to its first batch
(about 3 epochs skipped: read, reservoir fed, nothing gathered). Prints one line per
measurement, then, as its last line, one JSON object.

    python scripts/bench_balance.py            # 2D and 3D, about 2 min on 2 cores
    python scripts/bench_balance.py --quick    # 2D, small
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.data.balance import reservoir_draws  # noqa: E402
from pipeline.data.format import write_split  # noqa: E402
from pipeline.data.loader import StreamSpec, worker_batches  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGET, POSITIVE = 0.25, 0.01
# dims: samples, stored dtype, batch, shuffle blocks, block size (the configs' choices).
PLANS = {2: (16384, np.uint8, 128, 48, 256), 3: (768, np.int16, 32, 16, 64)}


def _shards(root: Path, dims: int, n: int, dtype: type) -> list[str]:
    rng = np.random.default_rng(0)
    patch = rng.integers(0, 200, (n, 1) + (48,) * dims).astype(dtype)
    label = (rng.random(n) < POSITIVE).astype(np.uint8)
    block = PLANS[dims][4]
    write_split(root, "train", patch, label, [str(i) for i in range(n)], num_shards=4,
                block_size=block)  # fmt: skip
    return sorted(str(p) for p in root.glob("train-*.tar"))


def _spec(shards: list[str], dims: int, draws: int, consumed: int = 0) -> StreamSpec:
    from pipeline.data.format import manifest_counts

    counts = manifest_counts(shards)
    n, _, batch, blocks, _ = PLANS[dims]
    return StreamSpec(shards, batch, seed=0, shuffle_blocks=blocks,
                      counts=[counts[s].samples for s in shards], consumed=consumed,
                      balance_draws=draws)  # fmt: skip


def _rate(spec: StreamSpec, batches: int) -> tuple[float, float]:
    """(batches/s after the first, fraction of positives delivered)."""
    stream = worker_batches(spec, 0, 1, 0)
    next(stream)
    began, positives = time.perf_counter(), 0
    for _ in range(batches):
        positives += int(np.asarray(next(stream)["label"]).sum())
    return batches / (time.perf_counter() - began), positives / (batches * spec.batch_size)


def _resume(spec: StreamSpec) -> float:
    began = time.perf_counter()
    next(worker_batches(spec, 0, 1, spec.consumed))
    return time.perf_counter() - began


def run(dims: int, rounds: int, quick: bool) -> dict[str, Any]:
    n, dtype, batch, _, _ = PLANS[dims]
    n = n // 4 if quick else n
    with tempfile.TemporaryDirectory() as tmp:
        shards = _shards(Path(tmp), dims, n, dtype)
        from pipeline.data.format import manifest_counts

        positives = sum(c.positives for c in manifest_counts(shards).values())
        draws = reservoir_draws(TARGET, positives, n - positives, batch)
        epoch_batches = n // batch
        times: dict[str, list[float]] = {"off": [], "balance": []}
        resume: dict[str, list[float]] = {"off": [], "balance": []}
        fractions: dict[str, float] = {}
        for _ in range(rounds):
            for name, k in (("off", 0), ("balance", draws)):
                rate, fraction = _rate(_spec(shards, dims, k), 2 * epoch_batches)
                times[name].append(rate)
                fractions[name] = fraction
                consumed = 3 * n // (batch - k)  # ~3 epochs of the stream
                resume[name].append(_resume(_spec(shards, dims, k, consumed)))
                print(f"{dims}d {name}: {rate:.1f} batches/s, positives {fraction:.3f}, "
                      f"resume {resume[name][-1]:.2f} s", flush=True)  # fmt: skip
        med = {k: statistics.median(v) for k, v in times.items()}
        return {
            "samples": n,
            "batch": batch,
            "draws": draws,
            "batches_per_s": {k: round(v, 2) for k, v in med.items()},
            "balance_vs_off": round(med["balance"] / med["off"], 3),
            "positive_fraction": {k: round(v, 4) for k, v in fractions.items()},
            "resume_s": {k: round(statistics.median(v), 3) for k, v in resume.items()},
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2D, small, one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--md", help="write the table into this BENCHMARKS.md (default: the repo's, not --quick)")  # fmt: skip
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    from bench_loader import machine_info

    results = {f"{d}d": run(d, rounds, args.quick) for d in ((2,) if args.quick else (2, 3))}
    command = "python scripts/bench_balance.py" + (" --quick" if args.quick else "")
    out = {"results": results, "rounds": rounds, "command": command, "machine": machine_info()}
    if args.md or not args.quick:
        from benchmarks_md import machine_line, table, write_section

        rows = [
            [case, r["batch"], r["draws"], r["batches_per_s"]["off"], r["batches_per_s"]["balance"],
             r["balance_vs_off"], r["positive_fraction"]["off"], r["positive_fraction"]["balance"],
             r["resume_s"]["off"], r["resume_s"]["balance"]]
            for case, r in results.items()
        ]  # fmt: skip
        write_section(
            "balance",
            f"Class-balanced batches (data.balance={TARGET}) on 1:100 data, one reader",
            table(
                [
                    "case",
                    "batch",
                    "k",
                    "batches/s off",
                    "batches/s balance",
                    "ratio",
                    "positives off",
                    "positives balance",
                    "resume s off",
                    "resume s balance",
                ],
                rows,
            ),  # fmt: skip
            command=command,
            machine=machine_line(shared=True),
            notes=f"Medians of {rounds} interleaved rounds. A balanced batch holds B - k "
            "fresh samples, so it reads fewer per batch; the resume replays ~3 epochs.",
            path=args.md,
        )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
