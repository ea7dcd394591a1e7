"""Checkpoints never corrupt: a kill mid-save keeps the previous one, bad files fall back or
fail with one line naming the file, and `keep_last` prunes step checkpoints."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint
from tests.conftest import ROOT, cli_env, run_cli, train_args
from tests.faults import small_shards
from tests.reliability import record


def _args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return train_args(
        shards,
        run_dir,
        "train.batch_size=8",
        "train.max_steps=20",
        "train.eval_every=0",
        "train.log_every=5",
        "checkpoint.every_steps=5",
        "checkpoint.keep_last=2",
        *extra,
    )


def _step_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.pt"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return small_shards(tmp_path_factory.mktemp("ckpt_shards"), n_train=128, n_val=32)


@pytest.fixture(scope="module")
def killed(shards, tmp_path_factory):
    """A run SIGKILLed while its second save (step 10) sits between temp write and rename."""
    tmp = tmp_path_factory.mktemp("killed")
    run_dir = tmp / "run"
    ckpts = run_dir / "checkpoints"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.faults", "--slow-save", "120", "--", *_args(shards, run_dir)],
        env=cli_env(tmp),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 240
    in_flight: list[Path] = []
    sizes = [-1]
    while time.monotonic() < deadline and proc.poll() is None:
        # The first save created last.pt; a temp beside it is the second save, in flight.
        # Once its size stops changing it is fully written and waits for the rename.
        in_flight = list(ckpts.glob(".last.pt.tmp-*")) if (ckpts / "last.pt").exists() else []
        if in_flight:
            sizes.append(in_flight[0].stat().st_size)
            if sizes[-1] > 0 and sizes[-1] == sizes[-2]:
                break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    output = proc.communicate(timeout=60)[0]
    assert in_flight, f"no save was in flight before the deadline:\n{output[-3000:]}"
    return run_dir, in_flight[0], proc.returncode, tmp


@pytest.fixture(scope="module")
def resumed(killed, shards):
    """The killed run, rerun in its run dir to the end."""
    run_dir, _, _, tmp = killed
    result = run_cli(_args(shards, run_dir), cli_env(tmp))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result, tmp


def test_kill_during_save_keeps_the_previous_last_pt(killed):
    run_dir, temp, returncode, _ = killed
    assert returncode == -signal.SIGKILL
    # The step-10 state was fully written but never renamed over last.pt.
    assert torch.load(temp, weights_only=True)["step"] == 10
    last = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert last["step"] == 5
    previous = checkpoint.load(run_dir / "checkpoints" / "step-00000005.pt")
    for name, tensor in last["model"].items():
        assert torch.equal(tensor, previous["model"][name]), name


def test_rerun_after_the_kill_resumes_and_keeps_the_last_two_step_files(resumed):
    run_dir, result, _ = resumed
    assert "resumed from step 5" in result.stderr
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["step"] == 20
    assert _step_files(run_dir) == ["step-00000015.pt", "step-00000020.pt"]
    assert (run_dir / "checkpoints" / "best.pt").exists()
    # The dead process's temp file is cleaned up by the next save.
    assert not list((run_dir / "checkpoints").glob(".*.tmp-*"))


def test_corrupt_last_pt_falls_back_to_the_newest_readable_step_checkpoint(
    resumed, shards, tmp_path
):
    source, _, _ = resumed
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated
    (run_dir / "checkpoints" / "step-00000020.pt").write_bytes(b"not a checkpoint")
    result = run_cli(_args(shards, run_dir), cli_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert any(str(last) in line and "falling back" in line for line in warnings), warnings
    assert any("step-00000020.pt" in line and "falling back" in line for line in warnings)
    assert f"resumed from step 15 ({run_dir}/checkpoints/step-00000015.pt)" in result.stderr
    assert checkpoint.load(last)["step"] == 20


def _one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert errors == [lines[-1]], lines
    return lines[-1]


def test_resume_from_a_truncated_path_is_a_one_line_error_naming_it(resumed, shards, tmp_path):
    source, _, _ = resumed
    broken = tmp_path / "broken.pt"
    data = (source / "checkpoints" / "step-00000015.pt").read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    result = run_cli(
        _args(shards, tmp_path / "run", f"checkpoint.resume={broken}"), cli_env(tmp_path)
    )
    line = _one_line_error(result)
    assert f"checkpoint {broken} is corrupt" in line


def test_checkpoint_of_another_model_width_is_refused_naming_the_file(resumed, shards, tmp_path):
    source, _, _ = resumed
    other = source / "checkpoints" / "step-00000015.pt"
    # Accepted past the resume contract (which refuses it first): the weights do not fit.
    extra = (
        f"checkpoint.resume={other}",
        "model.width=8",
        "checkpoint.accept_changes=[model.width]",
    )
    result = run_cli(_args(shards, tmp_path / "run", *extra), cli_env(tmp_path))
    line = _one_line_error(result)
    assert f"checkpoint {other}: model does not fit" in line
    assert "size mismatch" in line


def test_another_channel_count_on_the_same_shards_is_refused_before_the_run_dir(
    resumed, shards, tmp_path
):
    # The shard check comes first (the checkpoint's own data.channels is the resume
    # contract's, tests/test_resume_contract.py): one line, and last.pt is left alone.
    source, _, _ = resumed
    last = source / "checkpoints" / "last.pt"
    before = last.read_bytes()
    result = run_cli(_args(shards, source, "data.channels=3"), cli_env(tmp_path))
    line = _one_line_error(result)
    assert "data.channels=3 but the shards hold 1-channel patches" in line
    assert last.read_bytes() == before


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB tmpfs (root only; skipped elsewhere), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_while_saving_is_one_line_and_keeps_the_last_good_checkpoint(
    shards, small_disk, tmp_path
):
    run_dir = small_disk / "run"
    args = ("checkpoint.keep_last=0", "train.eval_every=0", "checkpoint.every_steps=3")
    first = run_cli(_args(shards, run_dir, *args, "train.max_steps=3"), cli_env(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.pt"
    good = last.read_bytes()
    # Leave room for the log lines and eval files, not for a ~190 KB checkpoint.
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 64 * 1024))
    started = time.monotonic()
    result = run_cli(_args(shards, run_dir, *args, "train.max_steps=6"), cli_env(tmp_path))
    seconds = time.monotonic() - started
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if "error:" in line] == [lines[-1]], lines
    assert lines[-1].startswith(
        f"pipeline train: error: no space left on device writing checkpoint {last} ("
    )
    assert "MiB free in" in lines[-1]
    assert last.read_bytes() == good and checkpoint.load(last)["step"] == 3
    assert not list((run_dir / "checkpoints").glob(".*.tmp-*"))  # no temp file left
    record("disk full while checkpointing", exit_code=1, seconds=seconds, lines=1,
           checkpoint_ok=True, launcher="cli")  # fmt: skip
