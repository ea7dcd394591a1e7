"""The benchmark scripts run (`--quick`), end with one JSON line holding the keys
scripts/gpu_check.sh reads, and write their tables into the BENCHMARKS.md they are given.
Speeds are not checked (they belong to a machine); what is checked could be wrong: sample
counts, shuffle statistics against their exact uniform values, page faults, the file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
    md = tmp_path / "BENCHMARKS.md"
    loader = _start("bench_loader.py", tmp_path, "--dims", "2", "--md", str(md))
    train = _start("bench_train.py", tmp_path, "--dims", "2")
    malloc = _start("bench_malloc.py", tmp_path, "--md", str(md))
    result = _last_json(loader)
    rates = result["samples_per_s"]
    assert set(rates) == {"project", "project_webdataset", "per_sample", "raw_read"}
    assert min(rates.values()) > 0
    head = result["per_dims"]["2d"]
    assert set(head["delivered"]) == {"fast_1w", "fast_1w_copy", "webdataset_1w", "per_sample_1w"}
    assert result["delivered_samples_per_s"] == head["delivered"]["fast_1w"] > 0
    shuffle = head["shuffle_sizes"]
    assert [s["shuffle_blocks"] for s in shuffle] == [1, 4]
    # 2048 samples in blocks of 256, batch 128: one block per batch with a 1-block buffer,
    # and then half of each batch's pairs meet again (the two halves of a block); with 4
    # blocks a batch draws from all 4, and the exact uniform references.
    one, four = shuffle
    assert one["blocks_per_batch"] == 1.0 and 0.45 < one["pairs_again"] < 0.55
    assert four["blocks_per_batch"] == 4.0 and four["pairs_again"] < one["pairs_again"] / 2
    assert one["uniform_pairs_again"] == 127 / 2047 and one["k"] == 256
    memory = head["memory"]
    assert [m["shuffle_blocks"] for m in memory] == [1, 4]
    assert all(m["worker_peak_rss_mib"] > 0 for m in memory)
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
    runs = result["runs"]
    assert all(run["minor_faults_per_step"] > 0 for variant in runs.values() for run in variant)
    # What the setting is for: freed activation buffers are not faulted back in each step.
    faults = result["minor_faults_per_step"]
    assert faults["kept"] < faults["default"], faults

    text = md.read_text()  # both scripts wrote their sections, with date, machine, command
    for name in ("loader-2d", "malloc"):
        section = text.split(f"<!-- bench:{name}:begin -->")[1].split(f"<!-- bench:{name}:end -->")[
            0
        ]
        assert (
            "Measured 20" in section
            and "-core " in section
            and "Command: `python scripts/" in section
        )
        assert section.count("|") > 10
    assert (
        "pairs again" in text
        and "**delivered to the trainer**: fast reader, 1 worker, shared-memory ring" in text
    )


@pytest.mark.slow
def test_bench_recipe_reports_every_row_and_fails_loudly_below_the_required_margin(tmp_path):
    # One seed of --quick on hard synthetic data. No preset can beat the defaults by 2 AUROC
    # points of 1: the margin check must fail the run (exit 1, after the JSON), not pass it.
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- recipes:begin -->\nstale table\n<!-- recipes:end -->\ntail\n")
    md = tmp_path / "BENCHMARKS.md"
    process = _start("bench_recipe.py", tmp_path, "--seeds", "1", "--require-margin", "2",
                     "--readme", str(readme), "--md", str(md))  # fmt: skip
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 1, stderr[-3000:]
    assert "bench_recipe: FAILED: preset minus defaults AUROC" in stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    rows = result["rows"]
    assert list(rows) == ["defaults", "augmentation", "balance", "ema", "focal loss", "tta",
                          "preset", "preset + tta"]  # fmt: skip
    for name in ("defaults", "augmentation"):  # keys every checkout has
        assert rows[name]["status"] == "ok", rows[name]
    for name, row in rows.items():
        if row["status"] == "ok":
            for metric in ("auroc", "cpm_candidate", "accuracy"):
                assert len(row[metric]["values"]) == 1, (name, metric)
                assert 0.0 <= row[metric]["mean"] <= 1.0 and row[metric]["std"] == 0.0
        else:  # not merged here yet: named, not crashed
            assert row["status"].startswith("unavailable (") and "unknown" in row["status"]
    assert result["data"]["difficulty"] == "hard" and result["seeds"] == 1
    table = readme.read_text()
    assert "stale table" not in table and table.endswith("<!-- recipes:end -->\ntail\n")
    assert "| defaults |" in table and "| augmentation |" in table
    assert "<!-- bench:recipes:begin -->" in md.read_text()


@pytest.mark.slow
def test_bench_tta_scores_one_checkpoint_three_ways_and_writes_its_table(tmp_path):
    # One real run scored with predict.tta=none|flips|dihedral: if the setting did not
    # reach `pipeline evaluate`, the three scorings would be the same.
    md = tmp_path / "BENCHMARKS.md"
    result = _last_json(_start("bench_tta.py", tmp_path, "--md", str(md)))
    scored = result["results"]
    for metric in ("auroc", "ap"):
        assert list(scored[metric]) == ["none", "flips", "dihedral"]
        assert all(0.0 <= value <= 1.0 for value in scored[metric].values())
    pairs = {(scored["auroc"][n], scored["ap"][n]) for n in ("none", "flips", "dihedral")}
    assert len(pairs) == 3, scored  # each view set changes the scores
    assert scored["steps"] == 10 and all(s > 0 for s in scored["seconds"].values())
    section = md.read_text().split("<!-- bench:tta:begin -->")[1].split("<!-- bench:tta:end -->")[0]
    assert "Command: `python scripts/bench_tta.py --quick`" in section
    assert "| dihedral |" in section
