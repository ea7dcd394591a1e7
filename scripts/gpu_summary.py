"""gpu_check.sh's verdict: one JSON summary (stdout and OUT/summary.json), exit 1 unless all good.

    python scripts/gpu_summary.py OUT STATUS

OUT holds the files gpu_check.sh wrote; STATUS is its exit status so far (non-zero when a
step failed or timed out). The verdict fails when any CUDA test failed, errored or was
skipped (a skip proves nothing: without CUDA every test skips and pytest exits 0), when no
CUDA test ran, when the sync-debug test did not pass, or when a benchmark left no JSON.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

SYNC_TEST = "test_steady_state_training_steps_never_sync_with_the_host"


def cuda_tests(xml: Path) -> dict:
    """passed/failed/skipped counts and the sync-debug outcome, from pytest's JUnit XML."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "sync_debug": "not run"}
    try:
        cases = ET.parse(xml).getroot().iter("testcase")
    except (OSError, ET.ParseError) as exc:
        return {**counts, "error": f"{xml.name}: {exc}"}
    for case in cases:
        if case.find("skipped") is not None:
            outcome = "skipped"
        elif case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        else:
            outcome = "passed"
        counts[outcome] += 1
        if case.get("name", "").startswith(SYNC_TEST):
            found = [case.find(tag) for tag in ("skipped", "failure", "error")]
            element = next((e for e in found if e is not None), None)
            message = element.get("message", "") if element is not None else ""
            counts["sync_debug"] = outcome + (f": {message[:300]}" if message else "")
    return counts


def last_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text().strip().splitlines()[-1])
    except (OSError, IndexError, ValueError) as exc:  # a failed step leaves it empty
        return {"error": f"{path.name}: {exc}"}


def summarise(out: Path, status: int) -> dict:
    tests = cuda_tests(out / "cuda_tests.xml")
    loader, train = last_json(out / "bench_loader.json"), last_json(out / "bench_train.json")
    problems = []
    if status:
        problems.append(f"a step of gpu_check.sh failed or timed out (status {status})")
    if tests["skipped"]:
        problems.append(f"{tests['skipped']} CUDA tests skipped (see cuda_tests.txt)")
    if tests["failed"]:
        problems.append(f"{tests['failed']} CUDA tests failed (see cuda_tests.txt)")
    if tests["passed"] == 0:
        problems.append("no CUDA test passed")
    if not tests["sync_debug"].startswith("passed"):
        problems.append(f"sync-debug test: {tests['sync_debug']}")
    problems += [r["error"] for r in (loader, train) if "error" in r]
    summary = {
        "ok": not problems,
        "problems": problems,
        "cuda_tests": tests,
        "bf16_vs_fp32_3d": train.get("per_dims", {}).get("3d", {}).get("bf16_vs_fp32"),
        "data_wait_fraction": train.get("data_wait_fraction"),
        "loader_vs_compute": train.get("loader_vs_compute"),
        "loader": {
            k: loader.get(k)
            for k in ("delivered_samples_per_s", "delivered_vs_in_process", "meets_goals")
        },
        "gpu": train.get("machine", {}).get("gpu") or loader.get("machine", {}).get("gpu"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str]) -> int:
    summary = summarise(Path(argv[0]), int(argv[1]) if len(argv) > 1 else 0)
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
