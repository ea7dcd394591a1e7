"""The loader's fast paths change speed, never results: `tar_records` reads what tarfile
reads, the shuffle arena gives the same stream as plain concatenation (also around bad
records and odd block sizes), and DataLoader workers die with their trainer."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from pipeline.data import arena as arena_module
from pipeline.data import loader as loader_module
from pipeline.data.format import encode_block, write_shard
from pipeline.data.loader import EvalStream, StreamSpec, worker_batches
from pipeline.data.tar_records import byte_sum, tar_records
from tests.conftest import ROOT


def _with_tarfile(path) -> list[dict]:
    records: list[dict] = []
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isreg():
                continue
            base, slash = member.name, member.name.rfind("/") + 1
            dot = base.find(".", slash)
            key, suffix = base[:dot], base[dot + 1 :]
            data = tar.extractfile(member).read()
            if records and records[-1]["__key__"] == key:
                records[-1][suffix] = data
            else:
                records.append({"__key__": key, "__url__": str(path), suffix: data})
    return records


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_records_read_what_tarfile_reads_in_every_tar_format(tmp_path, fmt):
    names = ["a.patch.npy", "a.meta.json", "dir/b.label.npy", "x" * 120 + ".patch.npy"]
    names += ["deep/" * 25 + "c.patch.npy", "ünï.meta.json"]
    if fmt == tarfile.USTAR_FORMAT:
        names = names[:3] + names[4:5]  # ustar has no long or non-ASCII names
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i, name in enumerate(names):
            data = os.urandom(700 * i + 1)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5  # a float mtime forces pax headers
            tar.addfile(info, io.BytesIO(data))
    ours = [
        {k: v if isinstance(v, str) else bytes(v) for k, v in r.items()}
        for r in tar_records(str(path))
    ]
    assert ours == _with_tarfile(path)


def test_cut_or_foreign_files_raise_instead_of_ending_quietly(tmp_path):
    good = tmp_path / "good.tar"
    write_shard(
        good,
        np.zeros((64, 1, 8, 8), np.uint8),
        np.zeros(64, np.uint8),
        list("x" * 64),
        block_size=16,
    )
    data = good.read_bytes()
    assert len(list(tar_records(str(good)))) == 4
    for cut in (0, 100, 700, len(data) // 2):
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        with pytest.raises(tarfile.ReadError):
            list(tar_records(str(tmp_path / "cut.tar")))
    (tmp_path / "junk.tar").write_bytes(os.urandom(3000))
    with pytest.raises(tarfile.ReadError, match="invalid tar header"):
        list(tar_records(str(tmp_path / "junk.tar")))


def test_byte_sum_is_the_plain_sum_of_any_header():
    rng = np.random.default_rng(0)
    headers = [rng.integers(0, 256, 512, dtype=np.uint8).tobytes() for _ in range(3000)]
    # The extremes of the 0..130,560 range, and sums on both sides of adler32's 65521.
    headers += [b"\xff" * 512, b"\0" * 512, b"\x01" + b"\0" * 511]
    headers += [b"\xff" * n + b"\0" * (512 - n) for n in (256, 257, 258, 511)]
    assert [byte_sum(h) for h in headers] == [sum(h) for h in headers]


def test_a_flipped_header_byte_is_caught_by_the_checksum(tmp_path):
    path = tmp_path / "good.tar"
    write_shard(path, np.zeros((32, 1, 8, 8), np.uint8), np.zeros(32, np.uint8), list("x" * 32))
    data = bytearray(path.read_bytes())
    data[3] ^= 0x04  # a letter of the first member's name
    path.write_bytes(bytes(data))
    with pytest.raises(tarfile.ReadError, match="invalid tar header at byte 0"):
        list(tar_records(str(path)))


def _odd_shards(tmp_path) -> list[str]:
    """Blocks of 16 and of 100 in different shards, and a record that fails to decode."""
    rng = np.random.default_rng(0)
    write_shard(
        tmp_path / "t-0.tar",
        rng.integers(0, 255, (80, 1, 8, 8), dtype=np.uint8),
        (rng.random(80) < 0.5).astype(np.uint8),
        [str(i) for i in range(80)],
        block_size=16,
    )
    write_shard(
        tmp_path / "t-1.tar",
        rng.integers(0, 255, (300, 1, 8, 8), dtype=np.uint8),
        (rng.random(300) < 0.5).astype(np.uint8),
        [str(i) for i in range(300)],
        block_size=100,
    )
    with open(tmp_path / "t-2.tar", "wb") as stream, wds.TarWriter(stream) as sink:
        for b in range(5):
            record = encode_block(
                f"k{b}",
                rng.integers(0, 255, (20, 1, 8, 8), dtype=np.uint8),
                np.zeros(20, np.uint8),
                [str(i) for i in range(20)],
            )
            if b == 2:
                record["patch.npy"] = record["patch.npy"][:-50]  # a cut patch: skipped
            sink.write(record)
    return [str(tmp_path / f"t-{i}.tar") for i in range(3)]


def _stream(shards: list[str], blocks: int, skip: int) -> list[bytes]:
    spec = StreamSpec(shards, 24, seed=1, shuffle_blocks=blocks)
    batches = worker_batches(spec, 0, 1, skip)
    return [next(batches)["patch"].numpy().tobytes() for _ in range(30)]


def test_arena_gives_the_same_stream_as_concatenating(tmp_path, monkeypatch):
    shards = _odd_shards(tmp_path)
    fast = {(b, s): _stream(shards, b, s) for b in (1, 3, 8) for s in (0, 7)}
    used = []
    monkeypatch.setattr(arena_module.Arena, "_view", lambda self, p: used.append(1))
    for (blocks, skip), batches in fast.items():
        assert _stream(shards, blocks, skip) == batches, (blocks, skip)
    assert used  # the slow path really ran


@pytest.mark.parametrize(("blocks", "most"), [(1, 3), (4, 2)])
def test_arena_memory_is_recycled_not_reallocated(tmp_path, monkeypatch, blocks, most):
    # A batch of 40 spans three 16-sample buffers (blocks=1), or at most two of 64. Each
    # epoch is 320 samples, 8 whole batches, so the counts are exact, not bounds.
    arenas: list = []

    class Counted(arena_module.Arena):
        def __init__(self, blocks: int) -> None:
            super().__init__(blocks)
            self.taken = 0
            arenas.append(self)

        def take(self, patches):
            self.taken += 1
            return super().take(patches)

    monkeypatch.setattr(loader_module, "Arena", Counted)
    rng = np.random.default_rng(0)
    shards = []
    for i in range(2):
        shards.append(str(tmp_path / f"u-{i}.tar"))
        patch = rng.integers(0, 255, (160, 1, 8, 8), dtype=np.uint8)
        write_shard(shards[-1], patch, np.zeros(160, np.uint8), list("x" * 160), block_size=16)
    batches = worker_batches(StreamSpec(shards, 40, seed=1, shuffle_blocks=blocks), 0, 1, 0)
    for _ in range(36):  # 4.5 epochs
        next(batches)
    (arena,) = arenas
    assert arena.taken >= 80 // blocks
    assert arena.allocated == most


def test_webdataset_reader_gives_the_same_train_and_eval_streams(tmp_path):
    # data.reader=webdataset is the library's own reader: identical batches, bad record
    # skipped the same way, only slower.
    shards = _odd_shards(tmp_path)
    spec = StreamSpec(shards, 24, seed=1, shuffle_blocks=3, reader="webdataset")
    batches = worker_batches(spec, 0, 1, 0)
    got = [next(batches)["patch"].numpy().tobytes() for _ in range(30)]
    assert got == _stream(shards, 3, 0)
    assert spec.problems.count > 0

    def evaluated(reader: str) -> list[tuple]:
        spec = StreamSpec(shards, 50, reader=reader)
        return [
            (b["patch"].numpy().tobytes(), b["label"].numpy().tobytes(), tuple(b["ids"]))
            for b in EvalStream(spec)
        ]

    assert evaluated("webdataset") == evaluated("fast")


def test_workers_exit_when_their_trainer_is_killed(tmp_path):
    shard_dir = tmp_path / "shards"
    rng = np.random.default_rng(0)
    for i in range(2):
        write_shard(
            shard_dir / f"t-{i}.tar",
            rng.integers(0, 255, (512, 1, 48, 48), dtype=np.uint8),
            np.zeros(512, np.uint8),
            [str(j) for j in range(512)],
            block_size=256,
        )
    script = f"""
import glob, os, sys, time
sys.path.insert(0, {str(ROOT)!r})
from pipeline.data.loader import StreamSpec, TrainStream, build_loader
shards = sorted(glob.glob({str(shard_dir / "*.tar")!r}))
batches = iter(build_loader(TrainStream(StreamSpec(shards, 256, num_workers=2)), 2, False, 4))
next(batches)
print(*[w.pid for w in batches._workers], flush=True)
time.sleep(60)
"""
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in trainer.stdout.readline().split()]
    time.sleep(2)  # let the workers fill their queues: batches bigger than a pipe's buffer
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    deadline = time.time() + 15
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.5)
        alive = [pid for pid in workers if _alive(pid)]
    assert not alive, f"orphaned loader workers {alive} outlived their trainer"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "zombie" not in status.read_text()
