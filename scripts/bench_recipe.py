"""Does the recipe help? Validation AUROC, CPM and accuracy per recipe feature, on hard data.

Generates `make-synthetic --difficulty hard` shards once (2D: 4,096 training and 4,096
validation candidates, 1:100 positives, centres 2-6 px off, 64-pixel patches), then trains
every row of ROWS with the real `pipeline.train.train(cfg)`: the same step budget, batch and
model for every row, one run per seed. TTA rows evaluate another row's checkpoints with
`pipeline.evaluate.evaluate_checkpoint` and `predict.tta`. A row whose config key this
checkout does not know yet is reported as `"status": "unavailable (key X unknown)"`.

`--require-margin X` fails (exit 1, after the JSON) unless the preset's mean AUROC beats
the defaults' by at least X: the claim "the recipe helps" is checked, not assumed.
Last stdout line: one JSON object.

    python scripts/bench_recipe.py                 # the 2D table, 3 seeds (README + BENCHMARKS.md)
    python scripts/bench_recipe.py --with-3d       # plus the 3D rows
    python scripts/bench_recipe.py --quick --seeds 1   # smoke run, writes nothing unless asked
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_scaling import machine_info  # noqa: E402
from benchmarks_md import machine_line, table, write_section  # noqa: E402

from pipeline.config import load  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- recipes:begin -->", "<!-- recipes:end -->"
METRICS = ("auroc", "cpm_candidate", "accuracy")

# The recipe's augmentation, sized for 48 crops from 64 stored (margin 8 >= translate 6).
AUGMENT = [
    "data.augment.translate=6",
    "data.augment.rotate=180",
    "data.augment.scale=[0.9,1.1]",
    "data.augment.intensity_scale=0.1",
    "data.augment.intensity_shift=0.1",
    "data.augment.noise_std=0.03",
]
# As both presets: balanced batches already reweight, so the loss does not weight again.
BALANCE = ["data.balance=0.25", "loss.pos_weight=1.0"]
EMA = ["model.ema_decay=0.99"]  # a ~100-step window: the bench runs are short
FOCAL = ["loss.name=focal"]
TTA = ["predict.tta=dihedral"]
# name -> what the row changes. `train`: overrides on top of the shared base; `tta_of`:
# evaluate that row's checkpoints instead of training; `eval`: overrides for that evaluation.
ROWS: dict[str, dict[str, Any]] = {
    "defaults": {"train": []},
    "augmentation": {"train": AUGMENT},
    "balance": {"train": BALANCE},
    "ema": {"train": EMA},
    "focal loss": {"train": FOCAL},
    "tta": {"tta_of": "defaults", "eval": TTA},
    # configs/images2d.yaml's choices on this data: augmentation + balance + EMA (+ TTA).
    "preset": {"train": AUGMENT + BALANCE + EMA},
    "preset + tta": {"tta_of": "preset", "eval": TTA},
}
ROWS_3D: dict[str, dict[str, Any]] = {
    "3d defaults": {"train": [], "dims": 3},
    # configs/nodules3d.yaml's choices (its window is for HU; these shards are uint8).
    "3d preset": {"train": AUGMENT + BALANCE + EMA, "dims": 3},
}


def _base(args: argparse.Namespace, data: Path, dims: int) -> list[str]:
    """What every row shares: today's defaults, the bench's data, steps, batch and model."""
    base = [
        f"data.dims={dims}",
        f"data.train={data}/train-*.tar",
        f"data.val={data}/val-*.tar",
        f"data.patch_size={args.size}",
        "data.num_workers=0",  # one process per run: the machine has 2 cores
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch if dims == 2 else max(4, args.batch // 4)}",
        "train.eval_every=0",  # validate once, at the end: the row's number
        f"checkpoint.every_steps={args.steps}",
        f"optim.warmup_steps={max(1, args.steps // 10)}",
        "wandb.mode=disabled",
        "train.device=cpu",
    ]
    return base + [f"model.{k}={v}" for k, v in MODEL.items()]


MODEL = {"width": 4, "depth": 2, "features": 32, "hidden": 32}
"""A small model for every row, so the whole table fits the time budget on 2 CPU cores."""


def unknown_key(overrides: list[str]) -> str | None:
    """The first key of `overrides` this checkout's config does not know, else None."""
    try:
        load(None, overrides)
    except ConfigError as exc:
        text = str(exc)
        if "unknown key" in text:
            return text.split("'")[1] if "'" in text else text
        raise
    return None


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    return {m: float(values.get(f"val/{m}", values.get(m, float("nan")))) for m in METRICS}


def _summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in METRICS:
        values = [r[m] for r in runs]
        out[m] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values,
        }
    return out


def _make_data(out: Path, dims: int, args: argparse.Namespace) -> Path:
    from pipeline.data.synthetic import make_synthetic

    n_train, n_val = (args.train, args.val) if dims == 2 else (args.train // 4, args.val // 4)
    make_synthetic(
        out,
        dims=dims,
        n_train=n_train,
        n_val=n_val,
        positive_fraction=None,  # the difficulty's default: hard 1:100
        seed=args.data_seed,
        block_size=64 if dims == 2 else 16,
        train_shards=4,
        val_shards=2,
        progress=False,
        size=args.size,
        difficulty=args.difficulty,
    )
    return out


def run_rows(rows: dict[str, dict[str, Any]], args: argparse.Namespace, work: Path) -> dict:
    from pipeline.evaluate import evaluate_checkpoint
    from pipeline.train import train

    data = {d: work / f"data-{d}d" for d in {row.get("dims", 2) for row in rows.values()}}
    for dims, path in data.items():
        _make_data(path, dims, args)
    results: dict[str, dict[str, Any]] = {}
    checkpoints: dict[str, list[Path]] = {}
    for name, row in rows.items():
        dims = row.get("dims", 2)
        start = time.perf_counter()
        source = row.get("tta_of")
        train_overrides = _base(args, data[dims], dims) + list(
            rows[source]["train"] if source else row["train"]
        )
        missing = unknown_key(train_overrides + list(row.get("eval", [])))
        if missing is None and source and source not in checkpoints:
            missing = f"row {source!r} unavailable"
        if missing is not None:
            why = missing if missing.startswith("row ") else f"key {missing} unknown"
            results[name] = {"status": f"unavailable ({why})"}
            continue
        runs = []
        if source:
            for seed, ckpt in zip(args.seed_list, checkpoints[source], strict=True):
                out = work / "eval" / f"{name}-s{seed}".replace(" ", "_")
                values = evaluate_checkpoint(str(ckpt), list(row["eval"]), out)
                runs.append(_metrics(values or {}))
        else:
            checkpoints[name] = []
            for seed in args.seed_list:
                run_dir = work / "runs" / f"{name}-s{seed}".replace(" ", "_")
                cfg = load(None, [*train_overrides, f"train.seed={seed}", f"run.dir={run_dir}"])
                result = train(cfg)
                runs.append(_metrics(result["metrics"]))
                checkpoints[name].append(run_dir / "checkpoints" / "last.pt")
        results[name] = {
            "status": "ok",
            "overrides": list(row.get("train", [])) + list(row.get("eval", [])),
            "seconds": round(time.perf_counter() - start, 1),
            **_summary(runs),
        }
    return results


def margin(results: dict[str, dict[str, Any]]) -> float | None:
    """Preset minus defaults, mean validation AUROC; None when either is missing."""
    ok = [results.get(n, {}).get("status") == "ok" for n in ("preset", "defaults")]
    if not all(ok):
        return None
    return results["preset"]["auroc"]["mean"] - results["defaults"]["auroc"]["mean"]


def render_table(results: dict[str, dict[str, Any]], seeds: int) -> str:
    def cell(row: dict[str, Any], m: str) -> str:
        if len(row[m]["values"]) == 1:  # one seed has no spread to show
            return f"{row[m]['mean']:.3f}"
        return f"{row[m]['mean']:.3f} ± {row[m]['std']:.3f}"

    rows = []
    for name, row in results.items():
        if row["status"] != "ok":
            rows.append([name, row["status"], "", ""])
        else:
            rows.append([name, *(cell(row, m) for m in METRICS)])
    head = f"row (mean ± std of {seeds} seeds)" if seeds > 1 else "row (1 seed)"
    return table([head, "AUROC", "CPM (candidate)", "accuracy at 0.5"], rows)


def write_readme(path: Path, text: str) -> None:
    """Replace what sits between the recipes markers (as scripts/reliability_table.py does)."""
    readme = path.read_text()
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} markers")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def publish(summary: dict[str, Any], readme: Path | None, md: Path | None) -> None:
    """The README's Recipes table and the BENCHMARKS.md section, from one run's JSON."""
    text = render_table(summary["rows"], summary["seeds"])
    m = summary["machine"]
    # Older JSON lines lack the one-line machine and the command: rebuild them.
    machine = summary.get("machine_line") or (
        f"{m['cpus']}-core {m['cpu_model']}, torch {m['torch']}, load {m['load_average'][0]}"
    )
    # Where this run wrote its files is no part of how to reproduce it.
    command = summary.get("command", "python scripts/bench_recipe.py")
    command = re.sub(r" --(readme|md) \S+", "", command)
    data = summary["data"]
    caption = (
        f"{summary['steps']} steps, batch {summary['batch_size']}, model {summary['model']}, "
        f"{data['difficulty']} synthetic data ({data['train']} training / {data['val']} "
        f"validation candidates, stored {data['size']} px); measured on "
        f"{machine}; `{command}`."
    )
    gap = summary["margin_auroc"]
    notes = "Preset minus defaults, mean validation AUROC: " + (
        "n/a (a row is unavailable)" if gap is None else f"{gap:+.3f}"
    )
    # At 1:100 the all-negative answer scores 0.99: accuracy says little here; AUROC and CPM do.
    ratio = "1 positive in 100" if data["difficulty"] == "hard" else "1 positive in 4"
    notes += f". Accuracy at threshold 0.5; {data['difficulty']} data has {ratio}"
    if readme is not None:
        write_readme(readme, f"{caption}\n\n{text}\n\n{notes}.")
    if md is not None:
        write_section(
            "recipes", "Training recipe on hard synthetic data", text,
            command=command, machine=machine, notes=notes, path=md,
        )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 200)")
    parser.add_argument("--batch", type=int, default=None, help="2D batch (3D: a quarter)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="stored patch size (margin)")
    parser.add_argument("--data-seed", type=int, default=2026)
    parser.add_argument("--with-3d", action="store_true", help="add the 3D rows")
    parser.add_argument("--rows", default=None, help="comma-separated subset of the rows")
    parser.add_argument(
        "--difficulty",
        choices=("easy", "hard"),
        default="hard",
        help="easy: the same rows on the demo data, for comparison",
    )
    parser.add_argument("--quick", action="store_true", help="tiny data and steps: smoke run")
    parser.add_argument("--require-margin", type=float, default=None, metavar="X")
    parser.add_argument("--md", type=Path, default=None, help="BENCHMARKS.md to write")
    parser.add_argument("--readme", type=Path, default=None, help="README.md to write")
    parser.add_argument(
        "--from-json", type=Path, default=None, metavar="FILE",
        help="write the README table and BENCHMARKS.md section from an earlier run's JSON line",
    )  # fmt: skip
    args = parser.parse_args()
    if args.from_json is not None:
        summary = json.loads(args.from_json.read_text().strip().splitlines()[-1])
        publish(summary, args.readme or ROOT / "README.md", args.md)
        return 0
    args.steps = args.steps or (6 if args.quick else 200)
    args.batch = args.batch or (16 if args.quick else 64)
    args.train, args.val = (512, 512) if args.quick else (4096, 4096)
    args.seed_list = list(range(args.seeds))
    rows = dict(ROWS, **(ROWS_3D if args.with_3d else {}))
    if args.rows:
        wanted = args.rows.split(",")
        unknown = [name for name in wanted if name not in rows]
        if unknown:
            parser.error(f"--rows: unknown {unknown}; rows: {', '.join(rows)}")
        rows = {name: rows[name] for name in wanted}
    started = time.perf_counter()
    measured_on = machine_line(shared=True)  # the load while it runs, not after
    with tempfile.TemporaryDirectory(prefix="bench-recipe-") as work:
        results = run_rows(rows, args, Path(work))
    gap = margin(results)
    summary = {
        "rows": results,
        "margin_auroc": gap,
        "steps": args.steps,
        "batch_size": args.batch,
        "seeds": args.seeds,
        "model": MODEL,
        "data_3d": {"train": args.train // 4, "val": args.val // 4} if args.with_3d else None,
        "data": {
            "difficulty": args.difficulty,
            "train": args.train,
            "val": args.val,
            "size": args.size,
        },
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine_info("cpu"),
        "machine_line": measured_on,
        "command": " ".join(["python scripts/bench_recipe.py", *sys.argv[1:]]),
    }
    # As every benchmark: the repository's files by default, but only for the whole table.
    whole = not args.quick and not args.rows and args.difficulty == "hard"
    readme = args.readme or (ROOT / "README.md" if whole else None)
    if readme is not None or args.md is not None:
        publish(summary, readme, args.md or (ROOT / "BENCHMARKS.md" if whole else None))
    print(json.dumps(summary))
    if args.require_margin is not None and (gap is None or gap < args.require_margin):
        print(
            f"bench_recipe: FAILED: preset minus defaults AUROC is "
            f"{'unavailable' if gap is None else f'{gap:+.3f}'}, required >= {args.require_margin}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
