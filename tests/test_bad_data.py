"""Bad shards: skipped and counted (never silent), or one-line fatal; `check-shards` finds them.

Every broken shard here is a real tar file broken the way real ones break: cut short, a
record without its label, another crop size, float64, NaN/Inf, a label of 2, empty, a
pickle member, a flipped bit in the pixels (format v2's checksum). Each also holds good records, so a skip must drop only the bad one.
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.format import ShardInfo, encode_block, update_manifest
from pipeline.data.loader import StreamSpec, read_blocks, worker_batches
from pipeline.data.problems import ProblemLog
from pipeline.errors import DataError
from tests.conftest import TINY, cli_env, run_cli, run_torchrun
from tests.faults import small_shards
from tests.reliability import record

K = 16  # samples per block


def _tar(path: Path, records: list[dict]) -> None:
    """Write records member by member, as given (no validation: that is the point)."""
    with tarfile.open(path, "w") as tar:
        for record in records:
            for suffix, data in record.items():
                if suffix == "__key__":
                    continue
                info = tarfile.TarInfo(f"{record['__key__']}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _good(key: str, rng: np.random.Generator) -> dict:
    patch = rng.integers(0, 256, (K, 1, 48, 48), dtype=np.uint8)
    label = (rng.random(K) < 0.25).astype(np.uint8)
    return encode_block(key, patch, label, [f"{key}/{i}" for i in range(K)])


def _with(record: dict, **members: bytes | None) -> dict:
    """`record` with members replaced or removed, checksum renewed: as a buggy writer wrote it."""
    record = dict(record)
    for suffix, data in members.items():
        name = suffix.replace("_", ".")
        if data is None:
            del record[name]
        else:
            record[name] = data
    if "patch.npy" in record and "label.npy" in record:
        meta = json.loads(record["meta.json"])
        meta["crc32"] = zlib.crc32(record["label.npy"], zlib.crc32(record["patch.npy"]))
        record["meta.json"] = json.dumps(meta).encode()
    return record


def _flipped(record: dict) -> dict:
    """`record` with one bit of one pixel flipped after writing (disk, copy or memory)."""
    patch = bytearray(record["patch.npy"])
    patch[-100] ^= 0x10
    return {**record, "patch.npy": bytes(patch)}


def _floats(rng: np.random.Generator, bad: float) -> bytes:
    patch = rng.random((K, 1, 48, 48)).astype(np.float32)
    patch[3, 0, 7, 7] = bad
    return _npy(patch)


def _bad_records(rng: np.random.Generator) -> dict[str, tuple[dict | None, str]]:
    """Shard name -> (its one bad record, words its problem must contain)."""
    base = _good("bad", rng)
    return {
        "missing-label": (_with(base, label_npy=None), "missing label.npy"),
        "wrong-shape": (
            _with(base, patch_npy=_npy(rng.integers(0, 256, (K, 1, 32, 32), dtype=np.uint8))),
            "1x32x32",
        ),
        "wrong-dtype": (_with(base, patch_npy=_npy(rng.random((K, 1, 48, 48)))), "float64"),
        "nan": (_with(base, patch_npy=_floats(rng, np.nan)), "NaN or Inf"),
        "inf": (_with(base, patch_npy=_floats(rng, np.inf)), "NaN or Inf"),
        "label-2": (
            _with(base, label_npy=_npy(np.full(K, 2, np.uint8))),
            "labels must be 0 or 1",
        ),
        "pickle": (_with(base, extra_pyd=b"\x80\x04K\x01."), "needs pickle"),
        "flipped-pixel": (_flipped(base), "checksum mismatch"),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Good shards with a manifest, plus one shard per kind of damage (train and val)."""
    root = small_shards(tmp_path_factory.mktemp("bad_data"), n_train=128, n_val=32)
    rng = np.random.default_rng(0)
    expected: dict[str, str] = {}
    for name, (bad, words) in _bad_records(rng).items():
        records = [
            _good(f"{name}-0", rng),
            {**bad, "__key__": f"{name}-1"},
            _good(f"{name}-2", rng),
        ]
        _tar(root / f"train-bad-{name}.tar", records)
        expected[f"train-bad-{name}.tar"] = words
    (root / "train-bad-empty-file.tar").write_bytes(b"")
    expected["train-bad-empty-file.tar"] = "empty file"
    _tar(root / "train-bad-no-records.tar", [])
    expected["train-bad-no-records.tar"] = "empty shard"
    # Cut short mid-record; the manifest still lists it whole, as after a failed copy.
    whole = (root / "train-000001.tar").read_bytes()
    (root / "train-bad-truncated.tar").write_bytes(whole[: len(whole) * 6 // 10])
    expected["train-bad-truncated.tar"] = "truncated"
    update_manifest(
        root, "copied", [ShardInfo("train-bad-truncated.tar", 32, 8, 2)], (1, 48, 48), "uint8"
    )
    _tar(
        root / "val-bad-label-2.tar",
        [_good("v0", rng), {**_bad_records(rng)["label-2"][0], "__key__": "v1"}],
    )
    return {"root": root, "expected": expected}


def _train_args(root: Path, run_dir: Path, train: str, *extra: str) -> list[str]:
    return [
        "train",
        "--config",
        str(TINY),
        f"data.train={root}/{train}",
        f"data.val={root}/val-*.tar",
        f"run.dir={run_dir}",
        "loss.pos_weight=3",  # the bad shards are not all in a manifest
        *extra,
    ]


def _events(run_dir: Path, kind: str) -> list[dict]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["event"] == kind]


def test_check_shards_prints_a_table_naming_every_bad_shard_and_exits_1(data, tmp_path):
    result = run_cli(["check-shards", f"{data['root']}/*.tar"], cli_env(tmp_path))
    assert result.returncode == 1, result.stderr
    table = [line.split() for line in result.stdout.splitlines()]
    rows = {cells[0]: cells for cells in table if cells and cells[0].endswith(".tar")}
    for name in data["expected"]:
        assert rows[name][-1] != "0", rows[name]  # problem count
    for name in ("train-000000.tar", "train-000002.tar", "val-000000.tar"):
        assert rows[name][-1] == "0"
    problems = result.stdout.split("problems (", 1)[1]
    for name, words in data["expected"].items():
        assert any(name in line and words in line for line in problems.splitlines()), name
    assert "class balance:" in result.stdout


def test_check_shards_json_counts_match_the_manifest_and_flag_the_mismatch(data, tmp_path):
    result = run_cli(["check-shards", "--json", f"{data['root']}/*.tar"], cli_env(tmp_path))
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    shards = {Path(s["path"]).name: s for s in report["shards"]}
    good = [s for name, s in shards.items() if "bad" not in name]
    assert len(good) == 6
    for shard in good:
        assert shard["problems"] == []
        assert shard["manifest"] == {k: shard[k] for k in ("samples", "positives", "blocks")}
    truncated = shards["train-bad-truncated.tar"]
    assert truncated["samples"] < 32
    assert any("manifest.json says 32 samples" in p for p in truncated["problems"])
    # The good records around each bad one still count.
    assert shards["train-bad-nan.tar"]["samples"] == 2 * K
    assert report["problems"] == sum(len(s["problems"]) for s in shards.values())


def test_check_shards_on_a_pattern_matching_nothing_exits_2(tmp_path):
    result = run_cli(["check-shards", str(tmp_path / "nope-*.tar")], cli_env(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "matches no shard files" in result.stderr


def test_skip_mode_trains_through_bad_shards_and_counts_every_skip(data, tmp_path):
    root, run_dir = data["root"], tmp_path / "run"
    # One epoch is ~460 samples: 16 steps of 32 read every shard at least once.
    args = _train_args(root, run_dir, "train-*.tar", "train.max_steps=16", "train.eval_every=0")
    result = run_cli(args, cli_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    skips = [line for line in result.stderr.splitlines() if "skipped bad record" in line]
    for name, words in data["expected"].items():
        # One line per kind of problem: NaN and Inf are one kind, logged for one shard.
        assert any(words in line for line in skips), name
        assert any(name in line for line in skips) or words == "NaN or Inf", name
    assert sum("NaN or Inf" in line for line in skips) == 1
    flipped = [line for line in skips if "train-bad-flipped-pixel.tar" in line]
    record("flipped bit in a patch, data.on_error=skip (record skipped, counted)",
           exit_code=result.returncode, seconds=None, lines=len(flipped), checkpoint_ok=None,
           launcher="cli")  # fmt: skip
    assert all("[rank 0]" in line and "main process" in line for line in skips)
    train = _events(run_dir, "train")
    assert train[-1]["step"] == 16
    assert train[-1]["train/bad_records"] >= len(data["expected"])
    evals = _events(run_dir, "eval")
    assert evals and all(e["val/bad_records"] == 1 for e in evals)


@pytest.mark.parametrize(("bad", "words"), [("nan", "NaN or Inf"),
                                            ("flipped-pixel", "checksum mismatch")])  # fmt: skip
def test_fail_mode_stops_with_one_line_naming_the_shard(data, tmp_path, bad, words):
    # A DataLoader worker raises: its traceback must not reach the user.
    args = _train_args(
        data["root"],
        tmp_path / "run",
        f"train-{{000000,bad-{bad}}}.tar",
        "data.on_error=fail",
        "data.num_workers=1",
        "train.batch_size=8",
        "train.max_steps=30",
    )
    result = run_cli(args, cli_env(tmp_path))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pipeline train: error: ")
    assert f"train-bad-{bad}.tar" in last and words in last


@pytest.mark.slow
def test_a_corrupt_shard_does_not_desynchronise_two_ranks(data, tmp_path):
    run_dir = tmp_path / "run"
    args = _train_args(
        data["root"],
        run_dir,
        "train-{000000,000001,000002,000003,bad-truncated,bad-label-2}.tar",
        "train.batch_size=16",
        "train.max_steps=12",
        "train.eval_every=0",
        "train.log_every=4",
    )
    result = run_torchrun(2, args, cli_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    end = _events(run_dir, "end")[-1]
    assert end["steps_per_rank"] == [12, 12]
    assert _events(run_dir, "train")[-1]["train/bad_records"] > 0


def _batches(spec, worker: int, workers: int, n: int) -> list:
    stream = worker_batches(spec, worker, workers, skip=0)
    return [next(stream) for _ in range(n)]


def test_a_reader_whose_only_shard_is_bad_skips_that_epoch_instead_of_failing(data):
    # As many shards as readers: each epoch one of the two workers is dealt the bad shard.
    root = data["root"]
    spec = StreamSpec([str(root / "train-000000.tar"), str(root / "train-bad-empty-file.tar")], 8)
    for worker in (0, 1):
        assert len(_batches(spec, worker, 2, 30)) == 30
    assert spec.problems.count > 0  # every skipped epoch is still counted


def test_a_reader_that_never_finds_a_sample_stops_with_a_clear_error(data):
    root = data["root"]
    bad = [str(root / "train-bad-empty-file.tar"), str(root / "train-bad-no-records.tar")]
    with pytest.raises(DataError, match="epochs in a row yielded no readable samples"):
        _batches(StreamSpec(bad, 8), 0, 1, 1)


@pytest.mark.slow
def test_resume_after_skipped_records_is_still_bit_exact(data, tmp_path):
    # The truncated shard's manifest entry overstates it, so epoch positions must come from
    # the samples actually read, not the manifest. 30 steps cross several epochs.
    train = "train-{000000,000001,bad-truncated}.tar"
    common = ["train.batch_size=8", "train.max_steps=30", "train.eval_every=0"]
    env = cli_env(tmp_path)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_cli(_train_args(data["root"], whole, train, *common), env).returncode == 0
    first = run_cli(_train_args(data["root"], parts, train, *common, "train.stop_at_step=25"), env)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(_train_args(data["root"], parts, train, *common), env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 25" in second.stderr
    a = torch.load(whole / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(parts / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


def test_webdataset_reader_skips_exactly_what_the_fast_reader_skips(data):
    for name in data["expected"]:
        counts = {}
        for reader in ("fast", "webdataset"):
            problems = ProblemLog()
            blocks = read_blocks(
                [str(data["root"] / name)],
                "skip",
                problems,
                sample_shape=(1, 48, 48),
                reader=reader,
            )
            counts[reader] = (sum(len(b) for b in blocks), problems.count)
        assert counts["webdataset"] == counts["fast"], name
        assert counts["fast"][1] == 1, name


def test_a_repeated_problem_is_summarised_not_logged_per_record(tmp_path, caplog):
    rng = np.random.default_rng(1)
    odd = _good("odd", rng)  # 48x48, where the config below wants 32x32
    _tar(tmp_path / "odd.tar", [{**odd, "__key__": f"odd-{i}"} for i in range(120)])
    problems = ProblemLog()
    with caplog.at_level("WARNING", logger="pipeline.data"):
        blocks = list(read_blocks([str(tmp_path / "odd.tar")], "skip", problems,
                                  sample_shape=(1, 32, 32)))  # fmt: skip
    assert blocks == [] and problems.count == 120  # every record still counted
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines  # the first in full, then at 10 and 100
    assert "odd.tar:odd-0: samples of shape 1x48x48" in lines[0]
    assert lines[1].startswith("skipped 10 bad records with the same problem")
    assert lines[2].startswith("skipped 100 bad records with the same problem (100 in all")
