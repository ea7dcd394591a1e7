"""Training throughput: samples/s and data-wait per precision and switch, real loader vs memory.

Each variant is the training step built from the project's own pieces (`build_model`,
`DeviceTransform`, `build_optimizer`/`build_scheduler`, `TrainStream` + `build_loader`,
`autocast`, GradScaler, BCEWithLogitsLoss, `wrap_ddp`), stepping with the real
`pipeline.step.train_step` that `Trainer.fit` calls. Variants take turns in rounds of
`--window` steps (default, compute, other precision, ..., default, ...), so a load swing
on a shared machine hits them alike; rates are medians over rounds. `compute_only`
repeats one real batch from memory: the upper bound the loader is measured against.
`data_wait_fraction` is time blocked in `next(batches)` over step time. Before each
measured window a variant with a real loader runs burn-in steps (prefetch_factor x
workers + 1) that drain what its workers prefetched while others ran, so the windows
(default 8 steps) see the steady state. The method checks itself: `slow_loader_planted`
is the real loader made 5x slower than a compute-only step inside its worker; its
data-wait must be >= 0.5, or the script prints an error and exits 1. torch.compile runs
in a child process (time-boxed), eager and compiled taking turns the same way. Under
`torchrun --nproc_per_node=1` every model is DDP-wrapped (NCCL on a GPU). The last printed
line is one JSON object with `loader_vs_compute` (default 2D config, precision auto: bf16
on CUDA, fp32 on CPU), `data_wait_fraction` and `slow_loader_data_wait`.

    python scripts/bench_train.py --dims 2           # minutes on 2 CPU cores (3D: longer)
    python scripts/bench_train.py --dims 2 --quick   # seconds: smoke test
    torchrun --standalone --nproc_per_node=1 scripts/bench_train.py --device cuda --ddp
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_loader import machine_info  # noqa: E402

from pipeline import config, distributed  # noqa: E402
from pipeline.data.loader import StreamSpec, TrainStream, build_loader  # noqa: E402
from pipeline.data.transforms import DeviceTransform  # noqa: E402
from pipeline.host_memory import keep_freed_memory  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.optim import build_optimizer, build_scheduler  # noqa: E402
from pipeline.runtime import autocast, resolve_precision  # noqa: E402
from pipeline.step import StepParts, train_step  # noqa: E402

TARGET_CPU = 0.9
DATA = {2: {"train": 16384, "val": 64, "shards": 16}, 3: {"train": 2048, "val": 64, "shards": 16}}
CONFIGS = {2: ROOT / "configs" / "default.yaml", 3: ROOT / "configs" / "volume3d.yaml"}


class SlowStream(TrainStream):
    """The real training stream, `delay` seconds slower per batch inside the worker: the
    planted slow loader whose data-wait the benchmark must see (or it fails)."""

    def __init__(self, spec: StreamSpec, delay: float) -> None:
        super().__init__(spec)
        self.delay = delay

    def __iter__(self):
        for batch in super().__iter__():
            time.sleep(self.delay)
            yield batch


class Variant:
    """One training setup: model, optimizer, scaler, transform and its own batch source."""

    def __init__(self, name: str, cfg: Any, device: torch.device, shards: list[str], **how: Any):
        self.name, self.cfg, self.device = name, cfg, device
        self.in_memory = how.get("in_memory", False)
        self.precision = resolve_precision(how.get("precision", cfg.train.precision), device)
        channels_last = how.get("channels_last", cfg.model.channels_last)
        torch.manual_seed(cfg.train.seed)  # the same initial weights in every variant
        model = build_model(
            dims=cfg.data.dims,
            in_channels=cfg.data.channels,
            scales=cfg.data.scales,
            width=cfg.model.width,
            depth=cfg.model.depth,
            features=cfg.model.features,
            hidden=cfg.model.hidden,
        )
        fmt = torch.channels_last if cfg.data.dims == 2 else torch.channels_last_3d
        model = model.to(device, memory_format=fmt if channels_last else torch.preserve_format)
        self.model = distributed.wrap_ddp(model, device, False)
        ddp = self.model if isinstance(self.model, nn.parallel.DistributedDataParallel) else None
        if how.get("compile"):
            self.model = torch.compile(self.model)
        self.optimizer = build_optimizer(model, cfg.optim, device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, 10**6)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.criterion = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(3.0, device=device))
        data = cfg.data
        self.transform = DeviceTransform(
            data.scales, data.window, data.mean, data.std, data.augment, channels_last
        )
        self.generator = torch.Generator(device).manual_seed(cfg.train.seed)
        env = distributed.env()
        spec = StreamSpec(
            shards,
            cfg.train.batch_size,
            cfg.train.seed,
            env.rank,
            env.world_size,
            data.num_workers,
            data.shuffle_blocks,
        )
        pin = device.type == "cuda"
        slow = how.get("slow_s")
        stream = SlowStream(spec, slow) if slow else TrainStream(spec)
        self.loader = iter(build_loader(stream, data.num_workers, pin, data.prefetch_factor))
        if self.in_memory:
            # The loader stays alive (its workers idle once prefetched): both kinds of
            # variant run the same processes and differ only in where batches come from.
            self.batches = itertools.repeat(next(self.loader))
        else:
            self.batches = self.loader
        self.parts = StepParts(
            self.model,
            ddp,
            self.optimizer,
            self.scheduler,
            self.scaler,
            self.criterion,
            self.transform,
            lambda: autocast(self.precision, device),
            self.generator,
            device,
            grad_accum=1,
            grad_clip=1.0,
            precision=self.precision,
        )
        self.rates: list[float] = []
        self.waits: list[float] = []
        self.first_steps_s = 0.0

    def step(self) -> float:
        """One optimizer step: the real `train_step`; returns seconds blocked on the loader."""
        return train_step(self.parts, self.batches).wait_s

    def window(self, steps: int, burn_in: int) -> None:
        for _ in range(0 if self.in_memory else burn_in):
            self.step()
        sync(self.device)
        started, waited = time.perf_counter(), 0.0
        for _ in range(steps):
            waited += self.step()
        sync(self.device)
        elapsed = time.perf_counter() - started
        self.rates.append(
            steps * self.cfg.train.batch_size * distributed.env().world_size / elapsed
        )
        self.waits.append(waited / elapsed)

    def result(self) -> dict[str, Any]:
        out = {
            "samples_per_s": statistics.median(self.rates),
            "data_wait_fraction": statistics.median(self.waits),
            "rounds_samples_per_s": [round(r, 1) for r in self.rates],
            "first_steps_s": round(self.first_steps_s, 2),
            "precision": self.precision,
        }
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleave(variants: list[Variant], args: argparse.Namespace, device: torch.device) -> dict:
    """Warm each variant up (timed: start-up, compilation), then run them in turns."""
    notes: dict[str, Any] = {}
    live = []
    for variant in variants:
        started = time.perf_counter()
        for _ in range(2):
            variant.step()
        sync(device)
        variant.first_steps_s = time.perf_counter() - started
        if variant.first_steps_s / 2 > args.max_step_s:
            notes[variant.name] = {
                "skipped": f"{variant.first_steps_s / 2:.1f} s per warm-up step > --max-step-s",
                "precision": variant.precision,
            }
        else:
            live.append(variant)
    for _ in range(args.rounds):
        for variant in live:
            burn_in = args.burn_in
            if burn_in < 0:  # drain what the workers prefetched while the others ran
                # (with no workers nothing is prefetched: batches are made on demand)
                workers = variant.cfg.data.num_workers
                burn_in = variant.cfg.data.prefetch_factor * workers + 1 if workers else 0
            variant.window(args.window, burn_in)
    results = {v.name: v.result() for v in live}
    results.update(notes)
    return results


SLOW, SLOW_FACTOR, SLOW_MIN_WAIT = "slow_loader_planted", 5.0, 0.5
REAL_MAX_WAIT = 0.05  # the real loader's goal: the step, not the data, sets the pace


def compute_step_s(variant: Variant, steps: int = 3) -> float:
    """Seconds per step from memory (after a warm-up step): the planted delay's unit."""
    variant.step()
    sync(variant.device)
    started = time.perf_counter()
    for _ in range(steps):
        variant.step()
    sync(variant.device)
    return (time.perf_counter() - started) / steps


def load_cfg(dims: int, data: Path, device: str, extra: list[str]) -> Any:
    return config.load(
        CONFIGS[dims],
        [
            f"data.train={data}/train-*.tar",
            f"data.val={data}/val-*.tar",
            f"train.device={device}",
            "wandb.mode=disabled",
            *extra,
        ],
    )


def variant_plan(device: torch.device, quick: bool) -> list[tuple[str, dict[str, Any]]]:
    best = "bf16" if device.type == "cuda" else "fp32"
    other = "fp32" if best == "bf16" else "bf16"
    plan = [("default", {}), ("compute_only", {"in_memory": True})]
    if quick:
        return plan
    plan += [(other, {"precision": other})]
    if device.type == "cuda":
        plan += [("fp16", {"precision": "fp16"})]
    plan += [(f"{best}_channels_last_off", {"precision": best, "channels_last": False})]
    return plan


def run_compile(spec: dict[str, Any]) -> dict[str, Any]:
    """Child process: eager vs torch.compile (best precision) taking turns."""
    args = argparse.Namespace(**spec["args"])
    device = torch.device(spec["device"])
    cfg = load_cfg(spec["dims"], Path(spec["data"]), spec["device"], spec["extra"])
    if cfg.train.keep_freed_memory:
        keep_freed_memory()
    shards = sorted(str(p) for p in Path(spec["data"]).glob("train-*.tar"))
    best = resolve_precision("auto", device)
    variants = [
        Variant(f"{best}_eager", cfg, device, shards, precision=best),
        Variant(f"{best}_compile", cfg, device, shards, precision=best, compile=True),
    ]
    if device.type == "cuda":
        variants.append(
            Variant(
                f"{best}_compile_compute_only",
                cfg,
                device,
                shards,
                precision=best,
                compile=True,
                in_memory=True,
            )
        )
    args.max_step_s = math.inf  # compilation happens in the warm-up steps
    results = interleave(variants, args, device)
    results[f"{best}_compile"]["compile_s"] = results[f"{best}_compile"]["first_steps_s"]
    return results


def compile_isolated(spec: dict[str, Any], timeout: float, ddp: bool) -> dict[str, Any]:
    launcher = [sys.executable]
    if ddp:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    command = [*launcher, str(Path(__file__).resolve()), "--compile-spec", json.dumps(spec)]
    command += ["--ddp"] if ddp else []
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"compile": {"skipped": f"did not finish within {timeout:.0f} s (time-boxed)"}}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"compile": {"skipped": f"failed (exit {done.returncode}): {tail[:300]}"}}
    return json.loads(lines[-1])


def make_data(root: Path, dims: int, quick: bool) -> Path:
    from pipeline.data.synthetic import make_synthetic

    size = {"train": 512, "val": 64, "shards": 2} if quick else DATA[dims]
    out = root / f"data{dims}d"
    make_synthetic(
        out,
        dims=dims,
        n_train=size["train"],
        n_val=size["val"],
        positive_fraction=0.25,
        seed=0,
        block_size=256 if dims == 2 else 64,
        train_shards=size["shards"],
        val_shards=2,
        progress=False,
    )
    return out


def bench_dims(dims: int, root: Path, args: argparse.Namespace, device: torch.device) -> dict:
    data = make_data(root, dims, args.quick)
    extra = list(args.override)
    if args.quick:
        extra += ["model.width=4", "model.depth=2", "model.features=16", "model.hidden=16"]
        extra += ["train.batch_size=32", "data.num_workers=0", "data.shuffle_blocks=2"]
    cfg = load_cfg(dims, data, device.type, extra)
    kept = cfg.train.keep_freed_memory and keep_freed_memory()  # as `pipeline train` does
    shards = sorted(str(p) for p in data.glob("train-*.tar"))
    variants = [
        Variant(name, cfg, device, shards, **how) for name, how in variant_plan(device, args.quick)
    ]
    # The method's own check: a loader planted 5x slower than the step must show.
    step_s = compute_step_s(variants[1])
    variants.append(Variant(SLOW, cfg, device, shards, slow_s=SLOW_FACTOR * step_s))
    results = interleave(variants, args, device)
    results[SLOW]["planted_delay_s"] = round(SLOW_FACTOR * step_s, 4)
    del variants  # stop their loader workers before the compile child starts
    if not args.quick and not args.no_compile:
        spec = {
            "dims": dims,
            "data": str(data),
            "device": device.type,
            "extra": extra,
            "args": {k: v for k, v in vars(args).items() if k != "compile_spec"},
        }
        results.update(compile_isolated(spec, args.compile_timeout, args.ddp))
    for name, result in results.items():
        line = result.get("skipped") or (
            f"{result['samples_per_s']:10,.1f} samples/s  data wait {result['data_wait_fraction']:.3f}"
            f"  warm-up {result['first_steps_s']:.1f} s  ({result['precision']})"
        )
        print(f"{dims}D {name:28s} {line}", file=sys.stderr, flush=True)
    out: dict[str, Any] = {
        "variants": results,
        "config": {
            "file": CONFIGS[dims].name,
            "batch": cfg.train.batch_size,
            "num_workers": cfg.data.num_workers,
            "prefetch_factor": cfg.data.prefetch_factor,
            "channels_last": cfg.model.channels_last,
            "width": cfg.model.width,
            "depth": cfg.model.depth,
            "keep_freed_memory": bool(kept),
        },
    }
    real, compute = results["default"], results["compute_only"]
    if "samples_per_s" in real and "samples_per_s" in compute:
        out["loader_vs_compute"] = real["samples_per_s"] / compute["samples_per_s"]
        out["data_wait_fraction"] = real["data_wait_fraction"]
    rate = {k: v.get("samples_per_s") for k, v in results.items()}
    best = resolve_precision("auto", device)
    rate[best] = rate["default"]
    if rate.get("bf16") and rate.get("fp32"):
        out["bf16_vs_fp32"] = rate["bf16"] / rate["fp32"]
    if rate.get(f"{best}_channels_last_off"):
        out["channels_last_speedup"] = rate[best] / rate[f"{best}_channels_last_off"]
    if rate.get(f"{best}_compile") and rate.get(f"{best}_eager"):
        out["compile_speedup"] = rate[f"{best}_compile"] / rate[f"{best}_eager"]
    if device.type == "cuda":
        out["gpu_peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    out["host_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def _round(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def command_line(args: dict[str, Any]) -> str:
    """The command that reproduces a table: its dims, window, rounds and switches."""
    words = ["python scripts/bench_train.py"]
    words += [f"--{k.replace('_', '-')}={args[k]}" for k in ("dims", "window", "rounds")]
    words += [f"--{k.replace('_', '-')}" for k in ("no_compile", "ddp") if args.get(k)]
    words += [f"--override={o}" for o in args.get("override") or []]
    return " ".join(words)


def write_markdown(result: dict, path: str | None) -> None:
    from benchmarks_md import machine_line, table, write_section

    for dims, per in result["per_dims"].items():
        variants = per.get("variants", {})
        keys = sorted(
            {k for v in variants.values() for k, x in v.items() if isinstance(x, (int, float))}
        )
        rows = [[name, *(v.get(k, "") for k in keys)] for name, v in variants.items()]
        write_section(
            f"train-{dims}",
            f"Training, {dims} ({result['device']}, {result['threads']} threads, world size "
            f"{result['world_size']})",
            table(["variant", *keys], rows),
            command=command_line(result["args"]),
            machine=machine_line(shared=True),
            notes=f"{result['headline']}. loader/compute {_round(per.get('loader_vs_compute'))}, "
            f"data-wait {_round(per.get('data_wait_fraction'))} (goal < {REAL_MAX_WAIT}); the "
            f"planted slow loader must show data-wait >= {SLOW_MIN_WAIT}: "
            f"{_round(result['slow_loader_data_wait'].get(dims))}.",
            path=path,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", choices=("2", "3", "both"), default="both")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--window", type=int, default=8, help="measured steps per turn")
    parser.add_argument("--rounds", type=int, default=3, help="turns per variant")
    parser.add_argument("--burn-in", type=int, default=-1, help="steps before each turn (-1: auto)")
    parser.add_argument("--max-step-s", type=float, default=60, help="drop slower variants")
    parser.add_argument("--compile-timeout", type=float, default=600, help="seconds, compile child")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument(
        "--ddp", action="store_true", help="under torchrun: DDP-wrap models even for one process"
    )
    parser.add_argument("--quick", action="store_true", help="tiny model and data (smoke test)")
    parser.add_argument(
        "--md", help="write the tables into this BENCHMARKS.md (default: the repo's, not --quick)"
    )
    parser.add_argument("--override", action="append", default=[], help="config key=value")
    parser.add_argument("--compile-spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    env = distributed.detect_env()
    requested = args.device if not args.compile_spec else json.loads(args.compile_spec)["device"]
    device = distributed.select_device(requested, env.local_rank)
    distributed.init("auto", 300.0, device, env)
    if args.ddp and env.launcher == "torchrun" and not torch.distributed.is_initialized():
        # distributed.init skips a group of one; the benchmark wants DDP and NCCL in the
        # loop anyway (as on every rank of a real multi-GPU job).
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(
            backend, device_id=device if device.type == "cuda" else None
        )
    ddp = torch.distributed.is_initialized()
    try:
        if args.compile_spec:  # child process: one JSON line
            print(json.dumps(run_compile(json.loads(args.compile_spec))))
            return 0
        if args.quick:
            args.window, args.rounds = 2, 2
        dims_list = [2, 3] if args.dims == "both" else [int(args.dims)]
        with tempfile.TemporaryDirectory() as tmp:
            per_dims = {f"{d}d": bench_dims(d, Path(tmp), args, device) for d in dims_list}
    finally:
        distributed.shutdown()
    head = per_dims[f"{dims_list[0]}d"]
    result = {
        "benchmark": "train",
        "headline": f"{dims_list[0]}D {CONFIGS[dims_list[0]].name}, real loader vs compute-only, "
        f"precision auto on {device.type}, medians of {args.rounds} interleaved rounds",
        "loader_vs_compute": head.get("loader_vs_compute"),
        "data_wait_fraction": head.get("data_wait_fraction"),
        "target_loader_vs_compute": TARGET_CPU,
        "per_dims": per_dims,
        "device": device.type,
        "world_size": env.world_size,
        "ddp": ddp,
        "threads": torch.get_num_threads(),
        "machine": machine_info(),
        "args": {k: v for k, v in vars(args).items() if k != "compile_spec"},
    }
    if result["loader_vs_compute"] is not None:
        result["meets_target"] = result["loader_vs_compute"] >= TARGET_CPU
        result["meets_data_wait_goal"] = result["data_wait_fraction"] < REAL_MAX_WAIT
    seen = {d: r["variants"].get(SLOW, {}).get("data_wait_fraction") for d, r in per_dims.items()}
    result["slow_loader_data_wait"] = seen
    result["method_sees_slow_loader"] = all(
        w is not None and w >= SLOW_MIN_WAIT for w in seen.values()
    )
    print(json.dumps(result))
    if distributed.is_main() and (args.md or not args.quick):
        write_markdown(result, args.md)
    if not result["method_sees_slow_loader"]:
        print(
            f"bench_train: error: the planted slow loader ({SLOW_FACTOR:g}x the step) shows "
            f"data-wait {seen}, below {SLOW_MIN_WAIT}: this measurement cannot see a slow loader",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
