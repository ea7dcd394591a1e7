"""Remote transfers over maintained clients: requests (http/https), fsspec + s3fs/gcsfs
(s3://, gs://) and a shell for `pipe:` commands, with our retry loop on top.

`download` fetches a whole shard into a temporary file, retrying transient faults (HTTP
5xx/408/429, resets, timeouts, truncated bodies) with exponential backoff and asking
only for the missing bytes (HTTP Range, ranged object reads); `probe` is the cheap
start-up check, `read_small` fetches a manifest, `upload` writes one finished file.
Every message names the URL through `scrub`.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
import time
from pathlib import Path

from pipeline.data.remote import (
    CHUNK,
    COUNTERS,
    HTTP,
    PIPE,
    FetchError,
    RemoteSettings,
    scrub,
)

log = logging.getLogger("pipeline")
_local = threading.local()


def _session():
    """One requests.Session per thread and process (sessions are not fork- or thread-safe)."""
    import requests

    if getattr(_local, "pid", None) != os.getpid():
        _local.session, _local.pid = requests.Session(), os.getpid()
    return _local.session


def _http_status_error(url: str, response) -> FetchError:
    code = response.status_code
    # 5xx, 408 (timeout) and 429 (slow down) pass; 401/403/404 and the rest do not.
    transient = code >= 500 or code in (408, 429)
    return FetchError(url, f"HTTP {code} {response.reason or ''}".strip(), transient)


def _network_error(url: str, exc: Exception) -> FetchError:
    cause = str(exc).split("\n")[0]
    # requests puts the full URL (credentials included) into many of its messages.
    for secret in {url, url.split("?")[0]}:
        cause = cause.replace(secret, scrub(url))
    cause = re.sub(r"//[^/@\s]+:[^/@\s]+@", "//***@", cause)
    # urllib3 nests the root cause ("[Errno 111] Connection refused") deep in its repr.
    errno = re.findall(r"\[Errno -?\d+\] [^'\")]+", cause)
    if errno:
        cause = errno[-1]
    return FetchError(url, f"{type(exc).__name__}: {cause[:200]}", transient=True)


def _http_download(url: str, part: Path, settings: RemoteSettings) -> None:
    """Append the rest of `url` to `part`, asking only for the missing bytes (HTTP Range)."""
    import requests

    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with _session().get(
            url, stream=True, timeout=settings.timeout_s, headers=headers
        ) as response:
            if response.status_code == 416 and have:  # our partial file is already whole
                return
            if response.status_code not in (200, 206):
                raise _http_status_error(url, response)
            if response.status_code == 200 and have:
                have = 0  # no Range support: start over
            length = response.headers.get("Content-Length")
            expected = have + int(length) if length is not None else None
            with open(part, "ab" if have else "wb") as sink:
                # Small pieces: bytes of a piece cut by a dropped connection are lost.
                for chunk in response.iter_content(CHUNK // 16):
                    sink.write(chunk)
            got = part.stat().st_size
            if expected is not None and got != expected:
                raise FetchError(url, f"truncated body ({got} of {expected} bytes)", True)
    except requests.RequestException as exc:
        raise _network_error(url, exc) from None


def _filesystem(url: str, settings: RemoteSettings):
    """(fsspec filesystem, path) for s3:// or gs://; a missing extra is a one-line error."""
    try:
        import fsspec
    except ImportError:
        raise FetchError(url, "reading it needs `pip install 'pipeline[s3]'`", False) from None
    protocol = url.split("://", 1)[0]
    # Their INFO lines ("Found credentials in environment variables") are not ours to print.
    for name in ("aiobotocore", "botocore", "s3fs", "gcsfs", "fsspec"):
        logging.getLogger(name).setLevel(logging.WARNING)
    options: dict = {}
    if protocol == "s3":
        # retries here: ours resume at the byte offset; botocore's would restart the request.
        options["config_kwargs"] = {
            "connect_timeout": settings.timeout_s,
            "read_timeout": settings.timeout_s,
            "retries": {"max_attempts": 1},
        }
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError:
        extra = "s3" if protocol == "s3" else "gcs"
        raise FetchError(
            url, f"reading it needs `pip install 'pipeline[{extra}]'`", False
        ) from None
    return fs, path


def _object_error(url: str, exc: Exception) -> FetchError:
    if isinstance(exc, FileNotFoundError):
        return FetchError(url, "not found (no such bucket or object)", False)
    if isinstance(exc, PermissionError):
        return FetchError(url, f"access denied ({str(exc).splitlines()[0][:200]})", False)
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "ClientError") or "credential" in (
        str(exc).lower()
    ):
        return FetchError(url, f"no usable credentials ({name}: {str(exc)[:200]})", False)
    return _network_error(url, exc)


def _object_download(url: str, part: Path, settings: RemoteSettings) -> None:
    fs, path = _filesystem(url, settings)
    have = part.stat().st_size if part.exists() else 0
    try:
        size = fs.info(path)["size"]
        with fs.open(path, "rb", block_size=8 * CHUNK, cache_type="none") as source:
            source.seek(have)
            with open(part, "ab" if have else "wb") as sink:
                while chunk := source.read(8 * CHUNK):
                    sink.write(chunk)
    except FetchError:
        raise
    except Exception as exc:  # botocore/aiohttp/gcsfs errors have no common base class
        raise _object_error(url, exc) from None
    got = part.stat().st_size
    if got != size:
        raise FetchError(url, f"truncated body ({got} of {size} bytes)", True)


def _pipe_download(url: str, part: Path, settings: RemoteSettings) -> None:
    """Run webdataset's `pipe:COMMAND` with stdout into `part`; stderr feeds the error line."""
    command = url[len(PIPE) :]
    with open(part, "wb") as sink:
        try:
            done = subprocess.run(
                command, shell=True, stdout=sink, stderr=subprocess.PIPE, timeout=None
            )
        except OSError as exc:
            raise FetchError(url, str(exc), False) from None
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        detail = f": {said[-1][:200]}" if said else ""
        raise FetchError(url, f"command exited with status {done.returncode}{detail}", False)


def _tar_complete(path: Path) -> bool:
    """A finished tar ends in two zero blocks: a body cut anywhere else is caught here."""
    size = path.stat().st_size
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as stream:
        stream.seek(size - 1024)
        return stream.read(1024).count(0) == 1024


def download(url: str, part: Path, settings: RemoteSettings) -> None:
    """Fetch `url` completely into `part`, retrying transient faults with backoff.

    Raises FetchError (an OSError, so the loader's on_error handles it) once the retries
    are spent or at the first permanent fault.
    """
    fetch = (
        _pipe_download
        if url.startswith(PIPE)
        else _http_download
        if url.startswith(HTTP)
        else _object_download
    )
    # A `.part` from another, crashed process is not trusted: resume only our own bytes.
    part.unlink(missing_ok=True)
    for attempt in range(settings.retries + 1):
        try:
            fetch(url, part, settings)
            if not _tar_complete(part):
                part.unlink(missing_ok=True)  # no range can repair a body we cannot place
                raise FetchError(url, "body does not end like a tar (truncated?)", True)
            COUNTERS.add(downloads=1, bytes=part.stat().st_size)
            return
        except FetchError as exc:
            if not exc.transient or attempt == settings.retries or url.startswith(PIPE):
                COUNTERS.add(failed=1)
                raise
            delay = min(settings.backoff_s * 2**attempt, 30.0)
            COUNTERS.add(retries=1)
            log.warning(
                "remote: %s; retry %d/%d in %.1fs", exc, attempt + 1, settings.retries, delay
            )
            time.sleep(delay)


def read_small(url: str, settings: RemoteSettings) -> bytes | None:
    """A small remote file (manifest.json) in memory, None when it does not exist."""
    for attempt in range(settings.retries + 1):
        try:
            if url.startswith(HTTP):
                import requests

                try:
                    response = _session().get(url, timeout=settings.timeout_s)
                except requests.RequestException as exc:
                    raise _network_error(url, exc) from None
                if response.status_code == 404:
                    return None
                if response.status_code != 200:
                    raise _http_status_error(url, response)
                return response.content
            fs, path = _filesystem(url, settings)
            try:
                return fs.cat_file(path)
            except FileNotFoundError:
                return None
            except Exception as exc:
                raise _object_error(url, exc) from None
        except FetchError as exc:
            if not exc.transient or attempt == settings.retries:
                raise
            time.sleep(min(settings.backoff_s * 2**attempt, 30.0))
    return None


def probe(url: str, settings: RemoteSettings) -> None:
    """Raise FetchError when `url` is missing, forbidden or unreachable (start-up check).

    Cheap: HEAD for http(s), `info` for object stores. `pipe:` commands are not run here
    (the cache fetches the first one, which is the check). At most two retries: a
    start-up check should answer in seconds, and the loader retries fully later.
    """
    retries = min(settings.retries, 2)
    for attempt in range(retries + 1):
        try:
            if url.startswith(HTTP):
                import requests

                try:
                    response = _session().head(
                        url, timeout=settings.timeout_s, allow_redirects=True
                    )
                    if response.status_code == 405:  # HEAD not allowed: ask for one byte
                        response = _session().get(
                            url, timeout=settings.timeout_s, headers={"Range": "bytes=0-0"}
                        )
                        response.close()
                except requests.RequestException as exc:
                    raise _network_error(url, exc) from None
                if response.status_code >= 400:
                    raise _http_status_error(url, response)
                return
            fs, path = _filesystem(url, settings)
            try:
                fs.info(path)
            except Exception as exc:
                raise _object_error(url, exc) from None
            return
        except FetchError as exc:
            if not exc.transient or attempt == retries:
                raise
            time.sleep(min(settings.backoff_s * 2**attempt, 30.0))


def upload(local: Path, url: str, settings: RemoteSettings) -> None:
    """Copy one finished local file to an s3:// or gs:// URL (retried as downloads are)."""
    fs, path = _filesystem(url, settings)
    for attempt in range(settings.retries + 1):
        try:
            fs.put_file(str(local), path)
            return
        except Exception as exc:
            error = _object_error(url, exc)
            if not error.transient or attempt == settings.retries:
                raise error from None
            time.sleep(min(settings.backoff_s * 2**attempt, 30.0))
