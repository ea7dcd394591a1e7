"""Host allocator: the real `pipeline train` with `train.keep_freed_memory` on vs off.

The setting is process-wide (glibc's mallopt), so each variant is its own `pipeline train`
process on the same data and config; the two take turns for `--rounds` rounds and we
report medians, so a load swing on a shared machine hits both alike. Per run: samples/s
from its metrics.jsonl (between the first and last train records), and from the process's
own resource usage (os.wait4: it and its DataLoader workers) minor page faults per step
(start-up included), the share of CPU time spent in the kernel, and peak RSS (of the
largest single process). Last stdout line: one JSON object with `speedup` (kept / default
samples/s).

    python scripts/bench_malloc.py                 # default 2D config, ~3 min on 2 CPU cores
    python scripts/bench_malloc.py --quick         # seconds: smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_scaling import machine_info, measure  # noqa: E402

from pipeline.host_memory import glibc_defaults  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"kept": "true", "default": "false"}  # train.keep_freed_memory


def make_data(out: Path, quick: bool) -> Path:
    train, val = (512, 64) if quick else (8192, 1024)
    cmd = [sys.executable, "-m", "pipeline", "make-synthetic", "--out", str(out), "--dims", "2"]
    cmd += ["--train", str(train), "--val", str(val), "--positive-fraction", "0.25"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return out


def run_once(name: str, data: Path, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    overrides = [
        f"data.train={data}/train-*.tar",
        f"data.val={data}/val-*.tar",
        f"run.dir={run_dir}",
        f"train.max_steps={args.steps}",
        f"optim.warmup_steps={min(30, args.steps // 2)}",  # must end within the run
        f"train.log_every={max(1, args.steps // 6)}",
        "train.eval_every=0",
        f"checkpoint.every_steps={args.steps}",  # no saves inside the timed window
        "train.device=cpu",
        "wandb.mode=disabled",
        f"train.keep_freed_memory={VARIANTS[name]}",
        *args.overrides,
    ]
    cmd = [sys.executable, "-m", "pipeline", "train", "--config", str(args.config), *overrides]
    env = glibc_defaults(os.environ)  # both variants start from glibc's own defaults
    started = time.perf_counter()
    process = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    with process.stderr:  # type: ignore[union-attr]
        stderr = process.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = stderr.strip().splitlines()[-3:]
        raise SystemExit(f"{name}: pipeline train exited {process.returncode}: {tail}")
    cpu = usage.ru_utime + usage.ru_stime
    point = {
        **measure(run_dir),
        "wall_s": round(time.perf_counter() - started, 1),
        "minor_faults_per_step": round(usage.ru_minflt / args.steps),
        "kernel_cpu_fraction": round(usage.ru_stime / cpu, 3) if cpu else None,
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
    }
    print(f"[bench] {name}: {json.dumps(point)}", file=sys.stderr, flush=True)
    return point


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per variant, taking turns")
    parser.add_argument("--quick", action="store_true", help="tiny data and runs (smoke test)")
    parser.add_argument(
        "--md", help="write the table into this BENCHMARKS.md (default: the repo's, not --quick)"
    )
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args(argv)
    command = "python scripts/bench_malloc.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    if args.quick:
        args.steps, args.rounds = 4, 1
        args.overrides += ["train.batch_size=32", "model.width=4", "model.depth=2"]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-malloc-") as tmp:
        data = make_data(Path(tmp) / "data", args.quick)
        for round_index in range(args.rounds):
            for name in VARIANTS:
                run_dir = Path(tmp) / f"{name}-{round_index}"
                runs[name].append(run_once(name, data, run_dir, args))

    def median(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    keys = ("samples_per_s", "minor_faults_per_step", "kernel_cpu_fraction", "peak_rss_mib")
    medians = {key: {name: median(name, key) for name in VARIANTS} for key in keys}
    rates = medians["samples_per_s"]
    summary = {
        "benchmark": "malloc",
        "config": args.config,
        "steps": args.steps,
        "rounds": args.rounds,
        "overrides": args.overrides,
        **medians,
        "speedup": rates["kept"] / rates["default"],
        "runs": runs,
        "machine": machine_info("cpu"),
    }
    if args.md or not args.quick:
        from benchmarks_md import machine_line, table, write_section

        rows = [
            [key.replace("_", " "), medians[key]["kept"], medians[key]["default"]] for key in keys
        ]
        write_section(
            "malloc",
            f"Host allocator: `train.keep_freed_memory` (real `pipeline train`, {args.steps} steps)",
            table(
                ["median of " + str(args.rounds) + " rounds", "kept (default)", "glibc default"],
                rows,
            )
            + f"\n\nSpeed-up (kept / glibc default samples/s): **{summary['speedup']:.2f}x**.",
            command=command.strip(),
            machine=machine_line(shared=True),
            path=args.md,
        )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
