"""The benchmark scripts run (`--quick`) and end with one JSON line holding the keys the
README and scripts/gpu_check.sh read. Numbers are not checked: they belong to a machine."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, cli_env


def _start(script: str, tmp_path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / script), "--quick", *args],
        cwd=ROOT,
        env=cli_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _last_json(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def test_the_benchmarks_print_json_with_the_required_keys(tmp_path):
    # All at once: each is mostly start-up and waiting, and the suite's time is precious.
    loader = _start("bench_loader.py", tmp_path, "--dims", "2")
    train = _start("bench_train.py", tmp_path, "--dims", "2")
    malloc = _start("bench_malloc.py", tmp_path)
    result = _last_json(loader)
    rates = result["samples_per_s"]
    assert set(rates) == {"project", "project_webdataset", "per_sample", "raw_read"}
    assert min(rates.values()) > 0
    assert result["speedup_vs_per_sample"] == rates["project"] / rates["per_sample"]
    assert result["fraction_of_raw_read"] == rates["project"] / rates["raw_read"]
    assert result["fast_vs_webdataset_reader"] == rates["project"] / rates["project_webdataset"]
    memory = result["per_dims"]["2d"]["memory"]
    assert [m["shuffle_blocks"] for m in memory] == [1, 4]
    assert all(m["worker_peak_rss_mib"] > 0 for m in memory)
    shuffle = result["per_dims"]["2d"]["shuffle_sizes"]
    assert [s["shuffle_blocks"] for s in shuffle] == [1, 4]
    assert all(s["fraction_of_raw_read"] > 0 for s in shuffle)
    for key in ("cpu_count", "cpu_model", "torch", "date"):
        assert result["machine"][key]

    result = _last_json(train)
    assert result["loader_vs_compute"] > 0 and 0 <= result["data_wait_fraction"] <= 1
    variants = result["per_dims"]["2d"]["variants"]
    assert variants["default"]["samples_per_s"] > 0
    assert variants["compute_only"]["data_wait_fraction"] < 0.01  # memory never keeps it waiting
    assert result["device"] == "cpu" and result["machine"]["torch"]

    result = _last_json(malloc)  # two real `pipeline train` runs, kept vs default
    assert set(result["samples_per_s"]) == {"kept", "default"}
    assert result["speedup"] == result["samples_per_s"]["kept"] / result["samples_per_s"]["default"]
    assert all(run["minor_faults_per_step"] > 0 for runs in result["runs"].values() for run in runs)
