"""Writing shards to object storage: write locally, upload each finished shard, manifest last.

`convert ... --out s3://bucket/prefix` and `make-synthetic --out s3://...` write into a
local staging folder exactly as for a local `--out`. The writers finish every shard with
an atomic rename, so a watcher thread uploads each `*.tar` as soon as it appears; when the
writer is done, the other files follow and `manifest.json` goes last. A reader that finds
the manifest therefore finds every shard it lists, and a reader of a prefix without a
manifest gets a one-line error instead of half a dataset.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.data import cache
from pipeline.data.remote import OBJECT_STORES, FetchError, scrub
from pipeline.data.transfer import probe, read_small, upload
from pipeline.errors import DataError

MANIFEST_NAME = "manifest.json"


def is_upload_target(out: str | Path) -> bool:
    return str(out).startswith(OBJECT_STORES)


class _Uploader(threading.Thread):
    """Uploads finished shards from the staging folder while the writer works."""

    def __init__(self, staging: Path, url: str) -> None:
        super().__init__(name="shard-upload", daemon=True)
        self.staging, self.url = staging, url.rstrip("/") + "/"
        self.done: set[str] = set()
        self.stop = threading.Event()
        self.error: Exception | None = None

    def upload_ready(self, everything: bool = False) -> None:
        for path in sorted(self.staging.iterdir()):
            name = path.name
            if not path.is_file() or name in self.done or name.startswith("."):
                continue
            if name == MANIFEST_NAME or name.endswith(".tmp"):
                continue
            if not everything and not name.endswith(".tar"):
                continue
            upload(path, self.url + name, cache.settings())
            self.done.add(name)

    def run(self) -> None:
        try:
            while not self.stop.wait(0.5):
                self.upload_ready()
        except Exception as exc:  # reported by finish(); the writer keeps going meanwhile
            self.error = exc

    def finish(self) -> None:
        self.stop.set()
        self.join()
        if self.error is not None:
            raise self.error
        self.upload_ready(everything=True)
        manifest = self.staging / MANIFEST_NAME
        if manifest.exists():
            upload(manifest, self.url + MANIFEST_NAME, cache.settings())


def _check_target(url: str, overwrite: bool) -> None:
    """The bucket exists and answers; an existing dataset there needs `overwrite`."""
    bucket = url.split("://", 1)[0] + "://" + url.split("://", 1)[1].split("/", 1)[0]
    try:
        probe(bucket, cache.settings())
        existing = read_small(url.rstrip("/") + "/" + MANIFEST_NAME, cache.settings())
    except FetchError as exc:
        raise DataError(f"--out: {exc}") from None
    if existing is not None and not overwrite:
        raise DataError(
            f"--out: {scrub(url)} already holds a dataset ({MANIFEST_NAME}); "
            "pass --overwrite to replace it"
        )


@contextmanager
def output_dir(out: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """The folder a writer should write into: `out` itself, or a staging folder for a URL.

    For a URL, finished shards are uploaded while the writer runs and the rest (manifest
    last) when the block exits without an error; the staging folder is then removed.
    """
    if not is_upload_target(out):
        yield Path(out)
        return
    url = str(out)
    _check_target(url, overwrite)
    staging = Path(tempfile.mkdtemp(prefix="pipeline-upload-"))
    uploader = _Uploader(staging, url)
    uploader.start()
    try:
        yield staging
        try:
            uploader.finish()
        except FetchError as exc:
            raise DataError(f"--out: upload failed: {exc}") from None
    finally:
        uploader.stop.set()
        shutil.rmtree(staging, ignore_errors=True)
