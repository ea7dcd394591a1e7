"""Effect of test-time augmentation: AUROC/AP of one trained tiny run with and without TTA.

Makes synthetic 2D shards, trains configs/tiny.yaml for `--steps` steps with the real
`pipeline train`, then scores the same checkpoint with `pipeline evaluate` under
`predict.tta=none|flips|dihedral`. Metrics do not depend on the machine's speed; the
seconds per evaluation do (views x the plain pass). Last stdout line: one JSON object.

    python scripts/bench_tta.py              # a few minutes on 2 CPU cores
    python scripts/bench_tta.py --quick      # small data, few steps: smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scaling import machine_info  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
SETTINGS = ("none", "flips", "dihedral")


def _pipeline(*args: str) -> str:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "pipeline", *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_tta: {' '.join(args[:1])} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    data = root / "data"
    train, val = (1024, 512) if args.quick else (8192, 2048)
    _pipeline("make-synthetic", "--out", str(data), "--dims", "2", "--train", str(train),
              "--val", str(val), "--seed", str(args.seed), "--no-progress")  # fmt: skip
    run_dir = root / "run"
    _pipeline("train", "--config", str(TINY), f"data.train={data}/train-*.tar",
              f"data.val={data}/val-*.tar", f"run.dir={run_dir}", f"train.max_steps={args.steps}",
              f"train.eval_every={args.steps}", "train.device=cpu")  # fmt: skip
    checkpoint = str(run_dir / "checkpoints" / "last.pt")
    out: dict[str, Any] = {"auroc": {}, "ap": {}, "seconds": {}}
    for name in SETTINGS:
        began = time.perf_counter()
        metrics = json.loads(
            _pipeline("evaluate", "--checkpoint", checkpoint, f"predict.tta={name}")
        )
        out["seconds"][name] = round(time.perf_counter() - began, 1)
        out["auroc"][name] = round(metrics["auroc"], 4)
        out["ap"][name] = round(metrics["ap"], 4)
    out.update(train=train, val=val, steps=args.steps, seed=args.seed)
    return out


def write_markdown(out: dict[str, Any], path: str | None) -> None:
    from benchmarks_md import machine_line, table, write_section

    r = out["results"]
    rows = [[n, r["auroc"][n], r["ap"][n], r["seconds"][n]] for n in SETTINGS]
    write_section(
        "tta",
        f"Test-time augmentation: one tiny 2D run ({r['steps']} steps, {r['train']} training "
        f"and {r['val']} validation candidates, seed {r['seed']}) scored three ways",
        table(["predict.tta", "AUROC", "AP", "evaluate seconds"], rows),
        command=out["command"],
        # The load when the run ended (the JSON's), not when this table is written.
        machine=machine_line(shared=False)
        + f", shared with other work (load {out['machine']['load_average'][0]:.1f})",
        notes="AUROC and AP do not depend on the machine; the seconds do (each view is one "
        "forward pass; they include the process start).",
        path=path,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data, 10 steps")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--md", help="write the table into this BENCHMARKS.md (default: the repo's, not --quick)"
    )
    args = parser.parse_args()
    if args.quick:
        args.steps = 10
    with tempfile.TemporaryDirectory(prefix="bench_tta-") as tmp:
        results = run(args, Path(tmp))
    command = "python scripts/bench_tta.py" + (" --quick" if args.quick else "")
    if not args.quick and args.steps != 150:
        command += f" --steps {args.steps}"
    out = {
        "benchmark": "tta",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info("cpu"),
        "command": command,
        "results": results,
    }
    print(json.dumps(out))
    if args.md or not args.quick:
        write_markdown(out, args.md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
