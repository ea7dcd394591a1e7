"""Data-parallel scaling of the real `pipeline train`: samples/s with 1 vs N processes.

Each point is a real `torchrun --standalone --nproc_per_node=N -m pipeline train` run on
the same config; samples/s comes from the run's own metrics.jsonl (global samples between
the first and the last train record, so start-up, warm-up and the final save are left
out). Prints progress to stderr and, as its last stdout line, one JSON object:

    python scripts/bench_scaling.py                                  # CPU, gloo, tiny config
    python scripts/bench_scaling.py --device cuda --config configs/default.yaml --nproc 1 2 4 8

Efficiency for N processes is samples/s(N) / (N x samples/s(1)): 1.0 is perfect scaling.
On CPU every process gets `--threads` threads, so N processes use N x threads cores; on a
shared or small machine the numbers say more about the machine than about the code.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def machine_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "device": device,
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpus"] = torch.cuda.device_count()
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def measure(run_dir: Path) -> dict[str, Any]:
    """Global samples/s between the first and last train records of one run."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["event"] == "start")["system"]
    train = [r for r in records if r["event"] == "train"]
    if len(train) < 2:
        raise RuntimeError(f"{run_dir}: fewer than 2 train records; raise --steps")
    first, last = train[0], train[-1]
    samples = (last["step"] - first["step"]) * start["global_batch"]
    seconds = last["time"] - first["time"]
    return {
        "world_size": start["world_size"],
        "global_batch": start["global_batch"],
        "steps_timed": last["step"] - first["step"],
        "seconds": round(seconds, 3),
        "samples_per_s": round(samples / seconds, 1),
        "data_wait": round(sum(r["train/data_wait"] for r in train[1:]) / (len(train) - 1), 3),
    }


def run_point(nproc: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cuda = args.device == "cuda"
    run_dir = out / f"nproc{nproc}"
    overrides = [
        f"run.dir={run_dir}",
        f"train.max_steps={args.steps}",
        f"train.log_every={max(1, args.steps // 5)}",
        "train.eval_every=0",
        f"checkpoint.every_steps={args.steps}",  # no saves inside the timed window
        f"train.device={args.device}",
        f"dist.backend={'nccl' if cuda else 'gloo'}",
        "wandb.mode=disabled",
        *([] if cuda else [f"train.threads={args.threads}"]),
        *args.overrides,
    ]
    config = ["--config", str(args.config)] if args.config else []
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", "-m", "pipeline", "train", *config, *overrides,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), WANDB_MODE="disabled")
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    print(f"[bench] {nproc} process(es): {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-5:]
        return {"nproc": nproc, "error": f"exit {result.returncode}", "stderr_tail": tail}
    point = {"nproc": nproc, **measure(run_dir)}
    point["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"[bench] {json.dumps(point)}", file=sys.stderr, flush=True)
    return point


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--keep", help="keep the run directories here (default: a temp dir)")
    parser.add_argument(
        "--md", help="write the table into this BENCHMARKS.md (default: the repo's)"
    )
    parser.add_argument("--no-md", action="store_true", help="write no BENCHMARKS.md section")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args(argv)
    command = "python scripts/bench_scaling.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    if 1 not in args.nproc:
        parser.error("--nproc must include 1 (the baseline)")

    info = machine_info(args.device)
    if args.device == "cuda" and not info.get("gpus"):
        parser.error("--device cuda: torch sees no CUDA device here")
    points: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        out = Path(args.keep) if args.keep else Path(tmp)
        for nproc in sorted(set(args.nproc)):
            if args.device == "cuda" and nproc > info.get("gpus", 0):
                # NCCL refuses two ranks on one GPU.
                points.append({"nproc": nproc, "skipped": f"only {info.get('gpus', 0)} GPU(s)"})
                continue
            points.append(run_point(nproc, args, out))

    base = next((p for p in points if p["nproc"] == 1 and "samples_per_s" in p), None)
    for point in points:
        if base and "samples_per_s" in point:
            point["efficiency"] = round(
                point["samples_per_s"] / (point["nproc"] * base["samples_per_s"]), 3
            )
    summary = {
        "benchmark": "scaling",
        "config": args.config,
        "steps": args.steps,
        "threads_per_process": args.threads if args.device == "cpu" else None,
        "backend": "nccl" if args.device == "cuda" else "gloo",
        "overrides": args.overrides,
        "machine": info,
        "points": points,
        "scaling_efficiency": next((p.get("efficiency") for p in points if p["nproc"] == 2), None),
    }
    if not args.no_md:
        from benchmarks_md import machine_line, table, write_section

        rows = [
            [p["nproc"], p.get("samples_per_s", p.get("skipped")), p.get("efficiency", "")]
            for p in points
        ]
        write_section(
            f"scaling-{args.device}",
            f"Data-parallel scaling ({summary['backend']}, {args.steps} steps, {Path(args.config).name})",
            table(["processes", "samples/s", "efficiency"], rows),
            command=command.strip(),
            machine=machine_line(shared=True),
            path=args.md,
        )
    print(json.dumps(summary))
    return 0 if base is not None else 1


if __name__ == "__main__":
    sys.exit(main())
