"""The node-local shard cache: remote URL -> local file the fast tar reader can seek in.

- One download per shard per node: a per-shard lock file (flock, so it holds across the
  ranks and loader workers of one node, and across threads) serialises the download;
  everyone else waits, then finds the file.
- A download goes to `<name>.part` and is renamed into place only when whole (size
  checked, tar end marker checked), so a partial download is never read as a shard. A
  `.part` left by a dropped connection is resumed at its byte offset by the next attempt.
- Readers hold a shared lock while they read; eviction (least recently used first, by
  mtime, which every hit refreshes) takes only files nobody holds, until the cache fits
  `data.cache_limit_gb`.
- `prefetch` downloads the next shards in background threads while a worker reads.

Keep `data.cache_dir` on node-local disk: flock on some network filesystems is advisory
per node only. The cache is keyed by URL: rewrite a dataset under a new prefix, or clear
the cache, rather than overwriting shards in place.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from pipeline.data.remote import RemoteSettings, is_remote, scrub
from pipeline.data.transfer import download

log = logging.getLogger("pipeline")

_settings: RemoteSettings | None = None


def default_settings() -> RemoteSettings:
    from pipeline.config import default_cache_dir

    return RemoteSettings(cache_dir=str(default_cache_dir() / "shards"))


def configure(data_cfg) -> RemoteSettings:
    """Take the cache and fault settings from a DataConfig (inherited by forked loader workers)."""
    global _settings
    cache_dir = data_cfg.cache_dir or default_settings().cache_dir
    _settings = RemoteSettings(
        cache_dir=os.path.expandvars(os.path.expanduser(cache_dir)),
        cache_limit_gb=data_cfg.cache_limit_gb,
        prefetch=data_cfg.prefetch_shards,
        timeout_s=data_cfg.remote_timeout_s,
        retries=data_cfg.remote_retries,
    )
    _caches.clear()
    return _settings


def settings() -> RemoteSettings:
    return _settings or default_settings()


def cache_name(url: str) -> str:
    """A file name unique to `url` that still shows the shard's own name."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[-60:]
    if not tail.endswith(".tar"):
        tail += ".tar"
    return f"{digest}-{tail}"


class ShardCache:
    """Remote shards as local files under one directory, with LRU eviction and prefetch."""

    def __init__(self, config: RemoteSettings) -> None:
        self.config = config
        self.root = Path(config.cache_dir)
        self.limit = int(config.cache_limit_gb * 2**30)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future] = {}
        self._pid = os.getpid()

    def path(self, url: str) -> Path:
        return self.root / cache_name(url)

    def _lock(self, target: Path) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        return os.open(target.with_name(target.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)

    def _fill(self, url: str, target: Path, fd: int) -> None:
        """Download under the exclusive lock, unless someone finished it while we waited."""
        fcntl.flock(fd, fcntl.LOCK_EX)
        if target.exists():
            return
        part = target.with_name(target.name + ".part")
        download(url, part, self.config)
        os.replace(part, target)
        log.debug("cached %s as %s", scrub(url), target)

    def ensure(self, url: str) -> Path:
        """Make sure `url` is cached (download if needed); returns its path, no lock held."""
        target = self.path(url)
        fd = self._lock(target)
        try:
            if not target.exists():
                self._fill(url, target, fd)
        finally:
            os.close(fd)
        self.evict()
        return target

    @contextmanager
    def local(self, url: str) -> Iterator[str]:
        """The cached file of `url`, protected from eviction while the caller reads it."""
        target = self.path(url)
        fd = self._lock(target)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if not target.exists():
                fcntl.flock(fd, fcntl.LOCK_UN)
                self._fill(url, target, fd)
                fcntl.flock(fd, fcntl.LOCK_SH)  # downgrade: readers and other readers coexist
                self.evict(keep=target)
            else:
                os.utime(target)  # a hit makes it the most recently used
            yield str(target)
        finally:
            os.close(fd)

    def prefetch(self, urls: Sequence[str]) -> None:
        """Start background downloads of `urls` (the shards a worker reads next)."""
        if self.config.prefetch <= 0:
            return
        if self._pool is None or self._pid != os.getpid():  # a forked worker gets its own
            self._pool = ThreadPoolExecutor(self.config.prefetch, thread_name_prefix="prefetch")
            self._pending, self._pid = {}, os.getpid()
        for url in urls:
            if url in self._pending and not self._pending[url].done():
                continue
            if self.path(url).exists():
                continue
            future = self._pool.submit(self.ensure, url)
            # A failed prefetch is not an error: the reader retries and reports it itself.
            future.add_done_callback(lambda f: f.exception())
            self._pending[url] = future

    def evict(self, keep: Path | None = None) -> None:
        """Delete least recently used shards nobody is reading until the cache fits its limit."""
        if self.limit <= 0:
            return
        entries = []
        for entry in os.scandir(self.root):
            if entry.name.endswith(".tar") and entry.is_file():
                stat = entry.stat()
                entries.append((stat.st_mtime, stat.st_size, Path(entry.path)))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.limit:
                break
            if path == keep:
                continue
            fd = self._lock(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # being read or written
            try:
                path.unlink(missing_ok=True)
                total -= size
            finally:
                os.close(fd)


_caches: dict[tuple[int, str], ShardCache] = {}


def shard_cache() -> ShardCache:
    """This process's cache for the configured settings."""
    config = settings()
    key = (os.getpid(), config.cache_dir)
    if key not in _caches:
        _caches[key] = ShardCache(config)
    return _caches[key]


@contextmanager
def opened(shard: str) -> Iterator[str]:
    """A local path for `shard`: itself when local, the cached copy when remote."""
    if not is_remote(shard):
        yield shard
        return
    with shard_cache().local(shard) as path:
        yield path
