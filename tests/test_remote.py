"""Shards from http(s)://, s3:// (an S3 emulator for tests) and pipe:, on real loopback servers.

Each test reads through the real reader (`read_blocks`, `EvalStream`, the CLI), compares
sample ids with the same shards read from local disk, and counts what the server saw.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.data import cache, remote
from pipeline.data.format import expand_shards, manifest_counts
from pipeline.data.loader import StreamSpec, read_blocks, worker_batches
from pipeline.data.problems import ProblemLog
from pipeline.errors import DataError
from tests import reliability
from tests.conftest import ROOT, cli_env, run_cli
from tests.faults import small_shards
from tests.remote_servers import environment, make_bucket, s3_emulator, shard_server


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return small_shards(tmp_path_factory.mktemp("remote_shards"), n_train=256, n_val=64)


@pytest.fixture
def cached(tmp_path):
    """The cache configured into a fresh folder for this test (retries fast)."""
    settings = cache.configure(DataConfig(cache_dir=str(tmp_path / "cache"), remote_retries=6))
    settings.backoff_s = 0.05
    yield settings
    cache.configure(DataConfig())


def _ids(urls: list[str], problems: ProblemLog | None = None) -> list[str]:
    blocks = read_blocks(urls, "skip", problems or ProblemLog())
    return [i for block in blocks for i in block.ids]


def _local_ids(shards: Path, split: str) -> list[str]:
    return _ids(expand_shards(f"{shards}/{split}-*.tar"))


def test_http_directory_url_lists_shards_from_the_manifest_with_counts(shards, cached):
    with shard_server(shards) as server:
        urls = expand_shards(server.url + "/", "data.train")
        assert [u.rsplit("/", 1)[1] for u in urls] == [f"train-00000{i}.tar" for i in range(4)]
        assert expand_shards(server.url + "/val-*.tar", "data.val")[0].endswith("val-000000.tar")
        counts = manifest_counts(urls)
        assert sum(info.samples for info in counts.values()) == 256
        assert _ids(urls) == _local_ids(shards, "train")


def test_faults_are_retried_resumed_at_the_offset_and_no_sample_is_lost_or_doubled(shards, cached):
    with shard_server(shards) as server:
        urls = expand_shards(server.url + "/train-{000000..000003}.tar", "data.train")
        server.slow_s = 0.3
        server.faults = ["503", "503", "503", "drop", "truncate", "slow", "drop"]
        before = remote.COUNTERS.retries
        problems = ProblemLog()
        ids = _ids(urls, problems)
        retries = remote.COUNTERS.retries - before
        faults = [r for r in server.requests if r[2]]
    assert sorted(ids) == sorted(_local_ids(shards, "train")), "a sample was lost or doubled"
    assert len(ids) == len(set(ids)) == 256
    assert problems.count == 0
    assert len(faults) == 7
    # Every fault but `slow` costs one retry; a dropped connection resumes with a Range.
    assert retries == 6
    dropped = [i for i, r in enumerate(server.requests) if r[2] == "drop"]
    resumed = [
        r for r in server.requests[dropped[0] + 1 :] if r[1] == server.requests[dropped[0]][1]
    ]
    assert resumed and resumed[0][3].startswith("bytes=") and resumed[0][3] != "bytes=0-"


def test_a_shard_that_keeps_failing_is_skipped_and_counted_or_fails_in_one_line(shards, cached):
    cached.retries, cached.prefetch = 2, 0  # no prefetch: the 503s meet the first shard
    with shard_server(shards) as server:
        urls = expand_shards(server.url + "/train-{000000..000001}.tar", "data.train")
        server.faults = ["503"] * 3  # the first shard: 1 try + 2 retries, all 503
        problems = ProblemLog()
        ids = _ids(urls, problems)
        assert problems.count == 1 and len(ids) == 64
        server.faults = ["503"] * 3
        cache.shard_cache().path(urls[0]).unlink(missing_ok=True)
        with pytest.raises(Exception, match=r"train-000000.tar: HTTP 503") as error:
            list(read_blocks(urls, "fail", ProblemLog()))
        assert "\n" not in str(error.value)


def _read_in_process(args: tuple[str, list[str]]) -> int:
    cache_dir, urls = args
    cache.configure(DataConfig(cache_dir=cache_dir))
    return sum(len(b) for b in read_blocks(urls, "fail", ProblemLog()))


def test_processes_on_one_node_download_each_shard_once_and_epoch_two_needs_no_network(
    shards, tmp_path
):
    cache_dir = str(tmp_path / "cache")
    # Throttled, so the four readers overlap while the first download is still running.
    with shard_server(shards, bandwidth=4e6) as server:
        urls = expand_shards(server.url + "/train-{000000..000003}.tar", "data.train")
        with multiprocessing.get_context("fork").Pool(4) as pool:
            counts = pool.map(_read_in_process, [(cache_dir, urls)] * 4)
        gets = server.shard_gets()
    assert counts == [256] * 4
    assert {path: n for path, n in gets.items() if path.endswith(".tar")} == {
        f"/train-00000{i}.tar": 1 for i in range(4)
    }
    # Epoch 2: the server is gone, the cache answers.
    assert _read_in_process((cache_dir, urls)) == 256
    assert not list(Path(cache_dir).glob("*.part"))


def test_cache_evicts_least_recently_used_shards_beyond_its_limit(shards, cached):
    size = (shards / "train-000000.tar").stat().st_size
    cached.cache_limit_gb = 2.5 * size / 2**30  # room for two shards
    cached.prefetch = 0  # downloads in reading order, so the order of use is known
    cache._caches.clear()
    with shard_server(shards) as server:
        urls = expand_shards(server.url + "/train-{000000..000003}.tar", "data.train")
        assert len(_ids(urls)) == 256
        kept = sorted(p.name.split("-", 1)[1] for p in Path(cached.cache_dir).glob("*.tar"))
        assert kept == ["train-000002.tar", "train-000003.tar"]
        assert len(_ids(urls[2:])) == 128  # hits: no new downloads
        assert server.shard_gets()["/train-000002.tar"] == 1


def test_a_partial_download_is_never_read_as_a_shard(shards, cached):
    with shard_server(shards) as server:
        (url,) = expand_shards(server.url + "/train-000000.tar", "data.train")
        target = cache.shard_cache().path(url)
        target.parent.mkdir(parents=True, exist_ok=True)
        # A crashed process's leftover: junk bytes under the temporary name.
        target.with_name(target.name + ".part").write_bytes(b"\0" * 4096)
        assert _ids([url]) == _ids(expand_shards(f"{shards}/train-000000.tar"))


def test_training_stream_from_http_equals_the_local_stream(shards, cached):
    with shard_server(shards) as server:
        urls = expand_shards(server.url + "/", "data.train")
        server.faults = ["503", "drop"]
        local = expand_shards(f"{shards}/train-*.tar")
        a = worker_batches(StreamSpec(local, 8, shuffle_blocks=2), 0, 1, 0)
        b = worker_batches(StreamSpec(urls, 8, shuffle_blocks=2), 0, 1, 0)
        for _ in range(70):  # past the end of epoch 1 (32 batches), into epochs 2 and 3
            x, y = next(a), next(b)
            assert np.array_equal(x["patch"], y["patch"])
            assert np.array_equal(x["label"], y["label"])


def test_webdataset_reader_reads_urls_too(shards, cached):
    with shard_server(shards) as server:
        urls = expand_shards(server.url + "/val-*.tar", "data.val")
        blocks = read_blocks(urls, "fail", ProblemLog(), reader="webdataset")
        assert [i for b in blocks for i in b.ids] == _local_ids(shards, "val")


def test_pipe_sources_expand_braces_and_read_like_files(shards, cached):
    urls = expand_shards(f"pipe:cat {shards}/train-00000{{0..1}}.tar", "data.train")
    assert len(urls) == 2
    assert _ids(urls) == _ids(expand_shards(f"{shards}/train-00000{{0..1}}.tar"))


def test_make_synthetic_uploads_to_the_s3_emulator_and_training_shards_read_back(
    shards, cached, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="werkzeug")  # the emulator's request log
    with s3_emulator() as env, environment(env):
        make_bucket(env, "data")
        made = subprocess.run(
            [sys.executable, "-m", "pipeline", "make-synthetic", "--out", "s3://data/ds",
             "--dims", "2", "--train", "256", "--val", "64", "--seed", "0", "--block-size",
             "16", "--shards", "4", "--workers", "1", "--no-progress"],
            env=cli_env(tmp_path, **env), cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr[-2000:]
        assert "s3://data/ds/manifest.json" in made.stdout
        puts = [m.split('"PUT /', 1)[1].split(" ")[0] for m in caplog.messages if '"PUT /' in m]
        puts = [p for p in puts if p.startswith("data/ds/")]  # not the bucket creation
        assert len(puts) == 4 + 2 + 1 and puts[-1] == "data/ds/manifest.json", puts
        urls = expand_shards("s3://data/ds/", "data.train")
        assert len(urls) == 4
        assert _ids(urls) == _local_ids(shards, "train")
        # Byte-identical to the local writer's shards, manifest included.
        import fsspec

        fs = fsspec.filesystem("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        assert fs.cat_file("data/ds/train-000002.tar") == (shards / "train-000002.tar").read_bytes()
        assert fs.cat_file("data/ds/manifest.json") == (shards / "manifest.json").read_bytes()


def test_credentials_never_reach_messages():
    url = "https://alice:s3cret@example.org/x/train-0.tar?X-Amz-Signature=abcd&n=1"
    error = remote.FetchError(url, "HTTP 404 Not Found", False)
    assert "s3cret" not in str(error) and "abcd" not in str(error)
    assert "example.org/x/train-0.tar" in str(error)
    tree = remote.scrub_tree({"data": {"train": url, "dims": 2}})
    assert "s3cret" not in str(tree) and tree["data"]["dims"] == 2


# id -> (data.train, words the one line must contain, environment)
BAD = {
    "url that 404s": ("{http}/missing-{{0..1}}.tar", ["data.train", "missing-0.tar", "HTTP 404"], {}),
    "no such bucket": ("s3://no-such-bucket/ds/", ["data.train", "no-such-bucket", "not found"], "s3"),
    "missing credentials": ("s3://data/ds/", ["data.train", "s3://data/ds/", "credentials"], "nokeys"),
    "failing pipe command": ("pipe:exit 3", ["data.train", "pipe:exit 3", "status 3"], {}),
    "credentials in url": ("http://bob:hunter2@{hostport}/none.tar", ["data.train", "***@", "HTTP 404"], {}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_remote_sources_are_one_line_exit_2(case, shards, tmp_path):
    pattern, words, env_kind = BAD[case]
    with shard_server(shards) as server, s3_emulator() as s3:
        env = cli_env(tmp_path, AWS_ENDPOINT_URL=s3["AWS_ENDPOINT_URL"])
        if env_kind == "s3":
            env.update(s3)
        if env_kind == "nokeys":
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
                env.pop(key, None)
            env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
                       AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
        fill = {"http": server.url, "hostport": server.url.split("//")[1]}
        pattern = pattern.format(**fill)
        start = time.monotonic()
        done = run_cli(
            ["train", "--config", str(ROOT / "configs" / "tiny.yaml"), f"data.train={pattern}",
             f"run.dir={tmp_path / 'run'}", "data.remote_retries=1"],
            env, timeout=120,
        )  # fmt: skip
    lines = done.stderr.strip().splitlines()
    reliability.record(
        f"remote source: {case}",
        exit_code=done.returncode,
        seconds=round(time.monotonic() - start, 1),
        lines=len(lines),
        checkpoint_ok=None,
        launcher="cli",
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1, done.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    assert "hunter2" not in done.stderr + done.stdout


def test_convert_images_out_s3_matches_the_local_output_and_needs_overwrite(
    tmp_path, cached, capsys
):
    from tests.test_convert import S, cli, dot_image, read_split, save_image, write_csv

    rows = []
    for i in range(8):
        save_image(tmp_path / f"im{i}.png", dot_image(24, 24, 3 + 2 * i, 20 - 2 * i))
        rows.append([f"im{i}.png", 3 + 2 * i, 20 - 2 * i, i % 2, f"g{i // 2}"])
    write_csv(tmp_path / "labels.csv", ["path", "x", "y", "label", "g"], rows)
    argv = ["convert", "images", "--csv", str(tmp_path / "labels.csv"), "--out", "s3://data/cv",
            "--x-col", "x", "--y-col", "y", "--group-col", "g", "--size", str(S),
            "--val-fraction", "0.25", "--workers", "1", "--shard-size", "2", "--block-size", "1"]  # fmt: skip
    local = [*argv[:5], str(tmp_path / "local"), *argv[6:]]
    with s3_emulator() as env, environment(env):
        make_bucket(env, "data")
        assert cli(argv) == 0
        assert cli(local) == 0
        import fsspec

        fs = fsspec.filesystem("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        names = sorted(p.rsplit("/", 1)[1] for p in fs.ls("data/cv"))
        assert names == sorted(p.name for p in (tmp_path / "local").iterdir() if p.is_file())
        for split in ("train", "val"):
            urls = expand_shards(f"s3://data/cv/{split}-*.tar", f"data.{split}")
            assert sorted(_ids(urls)) == sorted(read_split(tmp_path / "local", split))
        capsys.readouterr()
        assert cli(argv) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert "s3://data/cv" in line and "--overwrite" in line


@pytest.mark.slow
def test_training_through_a_faulty_server_completes_and_counts_each_retry(shards, tmp_path):
    with shard_server(shards) as server:
        server.slow_s = 0.5
        server.faults = ["503", "503", "drop", "truncate", "slow", "503"]
        done = run_cli(
            ["train", "--config", str(ROOT / "configs" / "tiny.yaml"),
             f"data.train={server.url}/", f"data.val={server.url}/val-*.tar",
             f"run.dir={tmp_path / 'run'}", "train.max_steps=12", "train.batch_size=8",
             "train.eval_every=12", "data.num_workers=2", f"data.cache_dir={tmp_path / 'c'}"],
            cli_env(tmp_path), timeout=300,
        )  # fmt: skip
        faults = [r for r in server.requests if r[2]]
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(faults) == 6
    retries = [line for line in done.stderr.splitlines() if "remote: " in line and "retry" in line]
    assert len(retries) == 5, "\n".join(retries)  # every fault but `slow`
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    logged = [e for e in events if "train/bad_records" in e or "val/bad_records" in e]
    assert logged and all(
        e.get("train/bad_records", 0) == 0 and e.get("val/bad_records", 0) == 0 for e in logged
    ), "a shard was lost to the faults"


def test_gs_urls_go_through_fsspec_and_name_the_missing_extra(cached):
    # No GCS server or emulator runs here: this checks only the path up to the client.
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401

        pytest.skip("gcsfs is installed; without network there is nothing more to check")
    except ImportError:
        pass
    with pytest.raises(DataError, match=r"gs://bucket/ds/train-0.tar: .*pipeline\[gcs\]"):
        expand_shards("gs://bucket/ds/train-{0..1}.tar", "data.train")


@pytest.mark.slow
def test_bench_remote_prints_every_row_and_judges_the_planted_slow_case(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_remote.py"), "--quick", "--dims", "2"],
        cwd=ROOT, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    seen = {(r["source"], r["cache"], r["prefetch"]) for r in result["rows"]}
    for kind in ("http", "s3"):
        assert {(kind, "cold", 0), (kind, "cold", 2), (kind, "warm", 2)} <= seen
    assert {("local", "-", None), ("throttled", "cold", 2), ("planted_slow", "cold", 0)} <= seen
    assert all(r["samples_per_s"] > 0 for r in result["rows"])
    # Numbers belong to the machine; the verdicts must follow from them.
    for row in result["rows"]:
        if "fraction_of_bandwidth" in row:
            assert row["goal_met"] == (row["fraction_of_bandwidth"] >= 0.8)
    assert "machine" in result and "planted_slow_detected" in result


@pytest.mark.slow
def test_url_credentials_reach_no_file_of_the_run_and_no_wandb_record(shards, tmp_path):
    # Training from URLs with user:password@ and a signed query, W&B offline logging the
    # checkpoints: neither secret may be in config.yaml, a checkpoint (an artifact W&B
    # uploads), metrics.jsonl, the W&B run files or staging, or the output.
    data = {"WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
            "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache")}  # fmt: skip
    env = cli_env(tmp_path, **data)
    run = tmp_path / "run"
    with shard_server(shards) as server:
        host = server.url.split("//")[1]
        train = f"http://bob:hunter2@{host}/train-{{000000..000003}}.tar?X-Amz-Signature=abcd1234"
        done = run_cli(
            ["train", "--config", str(ROOT / "configs" / "tiny.yaml"), f"data.train={train}",
             f"data.val={shards}/val-*.tar", f"run.dir={run}", "train.max_steps=2",
             "train.eval_every=2", "wandb.mode=offline", "wandb.log_checkpoints=all"],
            env, timeout=240,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert server.shard_gets()  # the shards really came over HTTP, with the URL's query
        # The run dir's config.yaml keeps the *** form: reading it back is one clear line.
        again = run_cli(["train", "--config", str(run / "config.yaml"),
                         f"run.dir={tmp_path / 'again'}"], env, timeout=120)  # fmt: skip
    assert list(run.glob("wandb/offline-run-*")), "no W&B offline run"
    files = [p for p in tmp_path.rglob("*") if p.is_file() and "cache" not in p.parts]
    assert any(p.suffix == ".pt" for p in files) and (run / "config.yaml") in files
    leaked = [p for p in files for secret in (b"hunter2", b"abcd1234") if secret in p.read_bytes()]
    assert not leaked, leaked
    assert "hunter2" not in done.stdout + done.stderr and "abcd1234" not in done.stderr
    assert "***@" in (run / "config.yaml").read_text()
    lines = again.stderr.strip().splitlines()
    assert again.returncode == 2 and len(lines) == 1, again.stderr[-2000:]
    assert "data.train" in lines[0] and "credentials were removed" in lines[0], lines[0]
