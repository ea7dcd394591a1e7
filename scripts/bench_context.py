"""Does the synthetic task need the context crops? Validation AUROC, 16 crop alone vs 16/32/48.

The same small CNN, data, seed and steps as `tests/test_synthetic.py` (whose helpers it
calls), at several step counts, so a plateau is measured rather than guessed. Prints one
JSON line and writes the `context` section of BENCHMARKS.md (`--md`, default the repo's).

    python scripts/bench_context.py                # 150, 300, 600 steps (~3 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from pipeline.data.synthetic import render_candidates  # noqa: E402
from tests.test_synthetic import _val_auroc  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[150, 300, 600])
    parser.add_argument("--md", help="BENCHMARKS.md to write (default: the repository's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # deterministic, as in the test
    patches, labels, _ = render_candidates(np.random.default_rng(2024), 5000, dims=2)
    train, val = (patches[:4000], labels[:4000]), (patches[4000:], labels[4000:])
    rows = []
    for steps in args.steps:
        centre = _val_auroc((16,), train, val, steps=steps, seed=0)
        three = _val_auroc((16, 32, 48), train, val, steps=steps, seed=0)
        rows.append({"steps": steps, "auroc_16_only": centre, "auroc_three_scales": three})
        print(f"{steps} steps: 16 only {centre:.3f}, three scales {three:.3f}", flush=True)
    sys.path.insert(0, str(ROOT / "scripts"))
    from benchmarks_md import machine_line, table, write_section

    write_section(
        "context",
        "Synthetic 2D task: the 16 crop alone vs three scales (validation AUROC)",
        table(
            ["steps (batch 64)", "16 crop only", "16 + 32 + 48"],
            [[r["steps"], r["auroc_16_only"], r["auroc_three_scales"]] for r in rows],
        ),
        command=("python scripts/bench_context.py " + " ".join(argv or sys.argv[1:])).strip(),
        machine=machine_line(shared=True),
        notes="4,000 training and 1,000 validation candidates (seed 2024), the small CNN "
        "of tests/test_synthetic.py, seed 0. AUROC does not depend on the machine's speed.",
        path=args.md,
    )
    print(json.dumps({"benchmark": "context", "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
