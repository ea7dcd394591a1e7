"""Real servers on 127.0.0.1 for remote-shard tests and scripts/bench_remote.py.

- `ShardServer`: a threaded HTTP server over a directory with HEAD and single-range GET
  (`Range: bytes=N-` / `N-M`, 206 + Content-Range), optional bandwidth throttle, a request
  log, and a fault plan (bursts of 503, slow responses, a connection dropped mid-body, a
  truncated body whose Content-Length lies).
- `s3_emulator()`: moto's threaded server, an S3 emulator for tests, reached through s3fs
  exactly as real S3 (AWS_ENDPOINT_URL + fake AWS_* keys).
Ports are chosen by the OS.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FAULTS = ("503", "slow", "drop", "truncate")


class _Handler(BaseHTTPRequestHandler):
    server: ShardHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet: tests read the request log instead
        pass

    def _file(self) -> Path | None:
        path = (self.server.root / self.path.split("?")[0].lstrip("/")).resolve()
        ok = path.is_file() and self.server.root.resolve() in path.parents
        return path if ok else None

    def do_HEAD(self) -> None:
        path = self._file()
        self.server.log("HEAD", self.path)
        if path is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        path = self._file()
        fault = self.server.next_fault(self.path) if path and path.suffix == ".tar" else None
        self.server.log("GET", self.path, fault, self.headers.get("Range", ""))
        if path is None:
            self.send_error(404)
            return
        if fault == "503":
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if fault == "slow":
            time.sleep(self.server.slow_s)
        data = path.read_bytes()
        start, end = 0, len(data)
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match and self.server.ranges:
            start = int(match.group(1))
            end = int(match.group(2)) + 1 if match.group(2) else len(data)
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:end]
        if fault == "truncate":
            body = body[: len(body) // 2]  # and Content-Length says so: only the tar end tells
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if fault == "drop":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(2)
            return
        self.server.send(self.wfile, body)
        self.server.count_bytes(len(body))


class ShardHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, bandwidth: float | None, ranges: bool) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = Path(root)
        self.bandwidth = bandwidth  # bytes/s over all connections, None = unthrottled
        self.ranges = ranges
        self.slow_s = 1.0
        self.faults: list[str] = []
        self.requests: list[tuple[str, str, str | None, str]] = []  # method, path, fault, Range
        self.bytes_sent = 0
        self._lock = threading.Lock()
        self._next_send = time.monotonic()

    def log(self, method: str, path: str, fault: str | None = None, range_: str = "") -> None:
        with self._lock:
            self.requests.append((method, path, fault, range_))

    def next_fault(self, path: str) -> str | None:
        with self._lock:
            return self.faults.pop(0) if self.faults else None

    def count_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes_sent += n

    def send(self, stream, body: bytes) -> None:
        """Write `body`; with a bandwidth, pace 256 KiB slices on one shared clock."""
        if not self.bandwidth:
            stream.write(body)
            return
        step = 1 << 18
        for at in range(0, len(body), step):
            piece = body[at : at + step]
            with self._lock:
                due = max(self._next_send, time.monotonic())
                self._next_send = due + len(piece) / self.bandwidth
            time.sleep(max(0.0, due - time.monotonic()))
            stream.write(piece)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def shard_gets(self) -> Counter:
        """GET requests per path (faulted ones included)."""
        return Counter(r[1] for r in self.requests if r[0] == "GET")


@contextlib.contextmanager
def shard_server(
    root: Path, bandwidth: float | None = None, ranges: bool = True
) -> Iterator[ShardHTTPServer]:
    server = ShardHTTPServer(root, bandwidth, ranges)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def s3_emulator() -> Iterator[dict[str, str]]:
    """moto's S3 emulator on 127.0.0.1; yields the environment a client needs to reach it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    # moto keeps its buckets in process-wide state: start every emulator empty, so a test
    # never sees what an earlier test (or module) in the same pytest run uploaded.
    import requests

    requests.post(f"http://{host}:{port}/moto-api/reset", timeout=10).raise_for_status()
    try:
        yield env
    finally:
        server.stop()


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_bucket(env: dict[str, str], bucket: str) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    client.create_bucket(Bucket=bucket)
