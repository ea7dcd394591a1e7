"""Model size presets: parameters and CPU training samples/s, through the real train_step.

For each `model.preset` (small, base, large) in 2D (default config) and 3D (volume3d
config), the real model, optimizer, loss and device transform take optimizer steps with
`pipeline.step.train_step` on one in-memory batch (so the loader does not enter the
number). Variants take turns for `--rounds` rounds (load swings on a shared machine hit
each alike); we report the median samples/s. A planted slow variant, the base model with
a sleep of one base step (of the same round) inside its forward, must come out clearly
slower than base: if not, the method cannot see a slower model and the script fails.
Last stdout line: one JSON object.

    python scripts/bench_models.py            # a few minutes on 2 CPU cores
    python scripts/bench_models.py --quick --dims 2   # under a minute: smoke test
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_scaling import machine_info  # noqa: E402

from pipeline import config  # noqa: E402
from pipeline.data.transforms import DeviceTransform  # noqa: E402
from pipeline.losses import build_loss  # noqa: E402
from pipeline.runtime import autocast  # noqa: E402
from pipeline.step import StepParts, train_step  # noqa: E402
from pipeline.train_state import build_train_state  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {2: ROOT / "configs" / "default.yaml", 3: ROOT / "configs" / "volume3d.yaml"}
PRESETS = ("small", "base", "large")
PLANTED = "base + sleep (planted)"
GOAL_PLANTED_MIN = 1.5
"""The planted variant sleeps one base step per step: it must be at least this much slower."""
CPU = torch.device("cpu")


class Sleepy(nn.Module):
    """The planted slow model: `inner` with a sleep of `delay` seconds in every forward."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.delay = inner, 0.0

    def forward(self, *crops: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return self.inner(*crops)


class Variant:
    """One preset's real training setup, stepping on one fixed batch."""

    def __init__(self, dims: int, preset: str, batch: int) -> None:
        cfg = config.load(CONFIGS[dims], [f"model.preset={preset}", f"train.batch_size={batch}"])
        state = build_train_state(cfg, CPU, "fp32", rank=0)
        self.params = sum(p.numel() for p in state.model.parameters())
        self.shape = {k: getattr(cfg.model, k) for k in ("width", "depth", "features", "hidden")}
        self.model = state.model
        data = cfg.data
        self.parts = StepParts(
            self.model,
            None,
            state.optimizer,
            state.scheduler,
            state.scaler,
            build_loss(cfg.loss, 3.0),
            DeviceTransform(data.scales, data.window, data.mean, data.std, data.augment, True),
            lambda: autocast("fp32", CPU),
            state.augment_rng,
            CPU,
            grad_clip=cfg.optim.grad_clip,
        )
        generator = torch.Generator().manual_seed(0)
        patch = torch.randint(0, 256, (batch, *data.sample_shape), generator=generator)
        label = (torch.rand(batch, generator=generator) < 0.25).to(torch.uint8)
        self.batches = itertools.repeat({"patch": patch.to(torch.uint8), "label": label})
        self.batch, self.rates = batch, []

    def plant(self) -> Sleepy:
        self.model = self.parts.model = Sleepy(self.model)
        return self.model

    def window(self, steps: int) -> float:
        """Seconds per step over `steps` real train_steps (recorded as samples/s)."""
        started = time.perf_counter()
        for _ in range(steps):
            train_step(self.parts, self.batches)
        seconds = (time.perf_counter() - started) / steps
        self.rates.append(self.batch / seconds)
        return seconds


def bench_dims(dims: int, quick: bool, rounds: int) -> dict[str, Any]:
    batch = {2: 8 if quick else 64, 3: 1 if quick else 8}[dims]
    steps = 1 if quick else 3
    variants = {name: Variant(dims, name, batch) for name in PRESETS}
    variants[PLANTED] = Variant(dims, "base", batch)
    sleepy = variants[PLANTED].plant()
    for variant in variants.values():
        variant.window(1 if quick else 3)  # warm-up: the first steps are several times slower
        variant.rates.clear()
    delays = []
    for _ in range(rounds):  # interleaved; base runs just before the planted variant
        for name, variant in variants.items():
            seconds = variant.window(steps)
            if name == "base":  # the planted sleep: this round's base step (load drifts)
                sleepy.delay = seconds
                delays.append(seconds)
    rates = {n: statistics.median(v.rates) for n, v in variants.items()}
    return {
        "batch": batch,
        "presets": {
            n: {
                "params": variants[n].params,
                **variants[n].shape,
                "samples_per_s": round(rates[n], 1),
            }
            for n in PRESETS
        },
        "planted_samples_per_s": round(rates[PLANTED], 1),
        "planted_delay_s": round(statistics.median(delays), 4),
        "base_vs_planted": round(rates["base"] / rates[PLANTED], 2),
    }


def write_markdown(out: dict[str, Any], path: str | None) -> None:
    from benchmarks_md import machine_line, table, write_section

    res = out["results"]
    rows = [
        [name, *(res["2d"]["presets"][name][k] for k in ("width", "depth", "features", "hidden")),
         res["2d"]["presets"][name]["params"], res["3d"]["presets"][name]["params"],
         res["2d"]["presets"][name]["samples_per_s"], res["3d"]["presets"][name]["samples_per_s"]]
        for name in PRESETS
    ]  # fmt: skip
    rows.append([PLANTED, "", "", "", "", "", "", res["2d"]["planted_samples_per_s"],
                 res["3d"]["planted_samples_per_s"]])  # fmt: skip
    write_section(
        "models",
        f"Model size presets: parameters and CPU training samples/s (fp32, 2 threads; 2D "
        f"batch {res['2d']['batch']}, 3D batch {res['3d']['batch']})",
        table(
            [
                "preset",
                "width",
                "depth",
                "features",
                "hidden",
                "2D params",
                "3D params",
                "2D samples/s",
                "3D samples/s",
            ],
            rows,
        ),  # fmt: skip
        command=out["command"],
        machine=machine_line(shared=True),
        notes=f"Medians of {out['rounds']} interleaved rounds of the real `train_step` on one "
        f"in-memory batch (no loader). The planted variant (base, sleeping one base step per "
        f"forward) is {res['2d']['base_vs_planted']}x (2D) and {res['3d']['base_vs_planted']}x "
        f"(3D) slower than base (must be >= {GOAL_PLANTED_MIN}x, else the script fails).",
        path=path,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny batches, one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dims", default="2,3", help="comma-separated: 2, 3 or 2,3")
    parser.add_argument(
        "--md", help="write the table into this BENCHMARKS.md (default: the repo's, not --quick)"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    rounds = 1 if args.quick else args.rounds
    dims = [int(d) for d in args.dims.split(",")]
    results = {f"{d}d": bench_dims(d, args.quick, rounds) for d in dims}
    detected = all(r["base_vs_planted"] >= GOAL_PLANTED_MIN for r in results.values())
    out = {
        "benchmark": "models",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info("cpu"),
        "command": "python scripts/bench_models.py" + (" --quick" if args.quick else ""),
        "rounds": rounds,
        "results": results,
        "planted_detected": detected,
    }
    print(json.dumps(out))
    if (args.md or not args.quick) and set(results) == {"2d", "3d"}:
        write_markdown(out, args.md)
    if not detected and not args.quick:
        print(
            f"FAIL: the planted slow model is not {GOAL_PLANTED_MIN}x slower than base: "
            "this measurement cannot see a slower model",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
