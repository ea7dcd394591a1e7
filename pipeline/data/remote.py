"""Remote shard sources: what counts as one, its settings and errors, and `scrub`.

The rest of the code never sees a network: `pipeline.data.cache` turns a URL into a
local file through `pipeline.data.transfer.download` (thin retry/range-resume loops over
requests, fsspec + s3fs / gcsfs and a shell for `pipe:`), and the fast seek-based tar
reader reads that file.

Credentials come only from each client's standard places (AWS_* variables, ~/.aws,
AWS_ENDPOINT_URL for S3-compatible stores, GOOGLE_APPLICATION_CREDENTIALS); every URL
that reaches a message goes through `scrub`, so user:password@ and signed query strings
never appear in logs, errors or the W&B config.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

HTTP = ("http://", "https://")
OBJECT_STORES = ("s3://", "gs://", "gcs://")
PIPE = "pipe:"
CHUNK = 1 << 20
# Query parameters that carry secrets in presigned / SAS URLs.
_SECRET_QUERY = re.compile(
    r"(?i)(x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|"
    r"access_token|x-goog-signature|x-goog-credential|key)=[^&]*"
)


def is_remote(url: str) -> bool:
    """True for http(s)://, s3://, gs:// and pipe: sources (everything that needs the cache)."""
    return url.startswith(HTTP + OBJECT_STORES) or url.startswith(PIPE)


def scrub(url: str) -> str:
    """`url` safe to print: no user:password@, no signatures or tokens in the query string."""
    if url.startswith(PIPE) or "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = _SECRET_QUERY.sub(lambda m: f"{m.group(1)}=***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def path_of(url: str) -> str:
    """`url` without an http(s) query: a presigned URL's signature (whose `?` is no
    wildcard, and whose values may hold slashes) is not part of the shard's path."""
    return url.split("?", 1)[0] if url.startswith(HTTP) else url


def was_scrubbed(url: str) -> bool:
    """Whether `url` is the *** form `scrub` wrote down (config.yaml, a checkpoint's config):
    its credentials are gone, and reading it would fail as an anonymous request."""
    return "***" in url and scrub(url) == url


@dataclass
class RemoteSettings:
    """How remote shards are fetched and cached (filled from `data.*` by `configure`)."""

    cache_dir: str
    cache_limit_gb: float = 50.0
    prefetch: int = 2
    timeout_s: float = 60.0
    retries: int = 5
    backoff_s: float = 0.5


class FetchError(OSError):
    """A remote read failed; `transient` faults are retried, the others are not."""

    def __init__(self, url: str, cause: str, transient: bool) -> None:
        super().__init__(f"{scrub(url)}: {cause}")
        self.transient = transient


class Counters:
    """Faults seen by this process: retried requests and shards that failed for good."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.retries = 0
        self.failed = 0
        self.downloads = 0
        self.bytes = 0

    def add(self, **amounts: int) -> None:
        with self.lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)


COUNTERS = Counters()
# A loader worker forked while a prefetch thread held the lock would wait on it forever.
os.register_at_fork(after_in_child=lambda: setattr(COUNTERS, "lock", threading.Lock()))


def scrub_arg(arg: str) -> str:
    """One command-line word safe to record: a URL, or `key=URL` (an override), scrubbed."""
    key, sep, value = arg.partition("=")
    if sep and "://" in value and "://" not in key:
        return f"{key}={scrub(value)}"
    return scrub(arg)


def scrub_tree(value):
    """A copy of a config tree (dicts, lists, strings) with every URL passed through `scrub`."""
    if isinstance(value, dict):
        return {k: scrub_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_tree(v) for v in value]
    if isinstance(value, str) and "://" in value:
        return scrub(value)
    return value
