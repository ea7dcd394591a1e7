"""gpu_check.sh's verdict cannot pass unless CUDA tests really ran and passed."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, cli_env

SUMMARY = [sys.executable, str(ROOT / "scripts" / "gpu_summary.py")]


def junit(cases: dict[str, str]) -> str:
    body = "".join(
        f'<testcase classname="tests.test_cuda" name="{name}">'
        + {"passed": "", "skipped": '<skipped message="needs a CUDA device"/>'}.get(
            outcome, f'<failure message="{outcome}"/>'
        )
        + "</testcase>"
        for name, outcome in cases.items()
    )
    return (
        f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{body}</testsuite></testsuites>'
    )


def benches(out) -> None:
    (out / "bench_train.json").write_text(
        json.dumps({"data_wait_fraction": 0.01, "per_dims": {"3d": {"bf16_vs_fp32": 2.5}}})
    )
    (out / "bench_loader.json").write_text(json.dumps({"delivered_vs_in_process": 0.6}))


def test_without_cuda_every_skip_makes_the_verdict_fail(tmp_path):
    # The real CUDA tests on this CPU machine: pytest exits 0 with everything skipped.
    tests = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "cuda",
            "tests/test_cuda.py",
            "-p",
            "no:cacheprovider",
            f"--junitxml={tmp_path / 'cuda_tests.xml'}",
        ],
        cwd=ROOT,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert tests.returncode == 0 and "skipped" in tests.stdout, tests.stdout[-2000:]
    benches(tmp_path)
    done = subprocess.run([*SUMMARY, str(tmp_path), "0"], capture_output=True, text=True)
    assert done.returncode == 1, done.stdout + done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] is False
    assert summary["cuda_tests"]["passed"] == 0 and summary["cuda_tests"]["skipped"] >= 8
    assert any("CUDA tests skipped" in p for p in summary["problems"])
    assert summary["cuda_tests"]["sync_debug"].startswith("skipped")


def test_all_passed_with_sync_debug_passes_and_reports_the_numbers(tmp_path):
    sync = "test_steady_state_training_steps_never_sync_with_the_host"
    (tmp_path / "cuda_tests.xml").write_text(junit({"test_a": "passed", sync: "passed"}))
    benches(tmp_path)
    done = subprocess.run([*SUMMARY, str(tmp_path), "0"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    assert summary["ok"] and summary["problems"] == []
    assert summary["cuda_tests"] == {"passed": 2, "failed": 0, "skipped": 0, "sync_debug": "passed"}
    assert summary["bf16_vs_fp32_3d"] == 2.5 and summary["data_wait_fraction"] == 0.01


def test_one_skip_one_failure_or_a_failed_step_each_fail_the_verdict(tmp_path):
    sync = "test_steady_state_training_steps_never_sync_with_the_host"
    benches(tmp_path)
    for cases, status, problem in (
        ({"test_a": "passed", "test_b": "skipped", sync: "passed"}, 0, "1 CUDA tests skipped"),
        ({"test_a": "boom", sync: "passed"}, 0, "1 CUDA tests failed"),
        ({"test_a": "passed", sync: "synced"}, 0, "sync-debug test: failed: synced"),
        ({"test_a": "passed", sync: "passed"}, 124, "status 124"),
    ):
        (tmp_path / "cuda_tests.xml").write_text(junit(cases))
        done = subprocess.run(
            [*SUMMARY, str(tmp_path), str(status)], capture_output=True, text=True
        )
        summary = json.loads(done.stdout)
        assert done.returncode == 1 and not summary["ok"], cases
        assert any(problem in p for p in summary["problems"]), (problem, summary["problems"])
    (tmp_path / "bench_train.json").write_text("")  # a benchmark that died
    (tmp_path / "cuda_tests.xml").write_text(junit({"test_a": "passed", sync: "passed"}))
    done = subprocess.run([*SUMMARY, str(tmp_path), "0"], capture_output=True, text=True)
    assert done.returncode == 1 and "bench_train.json" in done.stdout
