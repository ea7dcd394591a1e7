"""One job per run directory: `RUN_DIR/run.lock` names its holder for the whole run.

A second job on the same run dir (a double `sbatch`, an overlapping requeue) would resume
from the first one's checkpoints while it still runs and interleave `metrics.jsonl`. So
rank 0 takes the lock before anything reads or writes the run dir, and the other ranks
learn the outcome through a broadcast: they never touch the lock themselves.

Shared filesystems decide the protocol. `flock` is absent or node-local on some NFS and
Lustre mounts, so the lock is a plain file:
- taking it: the holder record is written to a private temp file, then `os.link`ed to
  `run.lock`. link() is atomic on NFS too: exactly one contender creates the name (a lost
  reply is caught by the temp file's link count). Where hard links are not supported,
  `open(O_CREAT | O_EXCL)` creates it instead;
- its lease: a background thread touches the lock's mtime every LEASE_S / 6 seconds;
- a stale lock is moved aside (rename is atomic) and taken, with a warning. Stale means:
  the same SLURM job id with another restart count (a requeued job takes over its own
  lock); on the same host, a dead pid (or one reused by another process); on another
  host, a lease older than LEASE_S. Its age is the lock's mtime against the mtime of the
  temp file just written, both set by the filesystem, so clock skew between hosts does
  not matter.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline import distributed
from pipeline.errors import ConfigError

log = logging.getLogger("pipeline")
LOCK_NAME = "run.lock"
LEASE_S = 90.0
"""A lock on another host whose mtime is older than this is stale (its holder renews it)."""
_ATTEMPTS = 5
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}


class RunDirInUse(ConfigError):
    """Another live job holds the run dir's lock."""


def _pid_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (tells a live holder from a reused pid), if known."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: starttime, in clock ticks


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def holder_record() -> dict[str, Any]:
    """Who we are, as the lock file records it."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _pid_start(os.getpid()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "lease_s": LEASE_S,
        "token": uuid.uuid4().hex,
    }


def describe(record: dict[str, Any]) -> str:
    """`pid 12 on node1 (SLURM job 34, restart 0), started ...` for one-line messages."""
    if not record:
        return "an unknown holder (unreadable lock file)"
    job = record.get("slurm_job_id")
    slurm = f" (SLURM job {job}, restart {record.get('slurm_restart', 0)})" if job else ""
    return (
        f"pid {record.get('pid')} on {record.get('host')}{slurm}, started {record.get('started')}"
    )


def _read(path: Path) -> dict[str, Any] | None:
    """The record in `path`; {} when unreadable, None when the file is gone."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def stale_reason(record: dict[str, Any], age_s: float, me: dict[str, Any]) -> str | None:
    """Why the lock of `record` (mtime `age_s` old) may be taken over, or None if it is live."""
    job = record.get("slurm_job_id")
    if job and job == me["slurm_job_id"] and record.get("slurm_restart") != me["slurm_restart"]:
        return f"SLURM job {job} was requeued (restart {me['slurm_restart']})"
    if record and record.get("host") == me["host"]:
        pid = int(record.get("pid", -1))
        if not _pid_alive(pid):
            return f"pid {pid} is not running"
        start = record.get("pid_start")
        if start is not None and start != _pid_start(pid):
            return f"pid {pid} now belongs to another process"
        return None
    lease = float(record.get("lease_s", LEASE_S))
    if age_s > lease:
        return f"its lease expired {age_s - lease:.0f} s ago (not renewed for {age_s:.0f} s)"
    return None


class RunLock:
    """The lock on one run dir, held by this process; `release()` on every exit path."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.record = holder_record()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock or raise RunDirInUse naming the live holder (one line)."""
        tmp = self.path.with_name(f".{LOCK_NAME}.{self.record['token']}")
        tmp.write_text(json.dumps(self.record))
        try:
            for _ in range(_ATTEMPTS):
                if self._link(tmp):
                    self._start_lease()
                    return
                held = _read(self.path)
                if held is None:  # released between our link and our read: try again
                    continue
                with contextlib.suppress(FileNotFoundError):
                    age = tmp.stat().st_mtime - self.path.stat().st_mtime
                    reason = stale_reason(held, age, self.record)
                    if reason is None:
                        raise RunDirInUse(
                            f"run.dir {self.path.parent} is in use by {describe(held)} "
                            f"(lock {self.path}); wait for it, stop it, or use another run.dir"
                        )
                    if self._move_aside(held):
                        log.warning(
                            "run.dir %s: taking over the lock of %s: %s",
                            self.path.parent,
                            describe(held),
                            reason,
                        )
            raise RunDirInUse(f"run.dir {self.path.parent}: could not take {self.path} (contended)")
        finally:
            tmp.unlink(missing_ok=True)

    def _link(self, tmp: Path) -> bool:
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            # NFS: the link may have been made while the reply was lost; the count tells.
            if tmp.stat().st_nlink == 2:
                return True
            if exc.errno not in _NO_LINKS:
                raise
        # A filesystem without hard links (some FUSE mounts): exclusive create instead. A
        # reader may see it empty for a moment, which counts as a live, unknown holder.
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as stream:
            stream.write(json.dumps(self.record))
            stream.flush()
            os.fsync(stream.fileno())
        return True

    def _move_aside(self, held: dict[str, Any]) -> bool:
        """Remove the stale lock `held`, unless another contender replaced it meanwhile."""
        aside = self.path.with_name(f".{LOCK_NAME}.stale.{self.record['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False  # another contender moved it first
        moved = _read(aside) or {}
        if held and moved.get("token") != held.get("token"):
            # A fresh lock replaced the stale one after we read it: put it back.
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def _start_lease(self) -> None:
        self._thread = threading.Thread(target=self._renew, name="run-lock-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_S / 6):
            held = _read(self.path)
            if not held or held.get("token") != self.record["token"]:
                log.error(
                    "run.dir %s: lost the run lock to %s; another job may now write here",
                    self.path.parent,
                    describe(held or {}),
                )
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Stop renewing and remove the lock, if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = _read(self.path)
        if held and held.get("token") == self.record["token"]:
            self.path.unlink(missing_ok=True)


_HELD: RunLock | None = None


def acquire(run_cfg: Any) -> None:
    """Resolve `run_cfg.dir` (all ranks agree on it) and take its lock on rank 0.

    Raises RunDirInUse on every rank when another live job holds it. Pair with `release()`.
    """
    global _HELD
    from pipeline.runtime import resolve_run_dir

    run_dir = resolve_run_dir(run_cfg.dir)
    run_cfg.dir = str(run_dir)
    problem = None
    if distributed.is_main():
        lock = RunLock(run_dir)
        try:
            lock.acquire()
            _HELD = lock
        except RunDirInUse as exc:
            problem = str(exc)
        except OSError as exc:  # rank 0 must still answer the broadcast, or the others hang
            problem = f"run.dir {run_dir}: cannot write {LOCK_NAME} ({exc.strerror or exc})"
    problem = distributed.broadcast_object(problem)
    if problem:
        raise RunDirInUse(problem)


def check_free(run_dir: Path) -> None:
    """Raise RunDirInUse if a live job holds `run_dir`'s lock; take and write nothing.

    `pipeline train --preflight` (the SLURM scripts, before torchrun) calls it, so a second
    job on a live run dir fails in one line before any training process starts. The lock
    is still taken by the run itself: this check only answers early, it does not reserve.
    """
    path = Path(run_dir) / LOCK_NAME
    held = _read(path)
    if held is None or not path.parent.is_dir():
        return
    me = holder_record()
    probe = path.with_name(f".{LOCK_NAME}.{me['token']}")
    try:  # "now" as the filesystem sees it, as in RunLock.acquire
        probe.write_text("")
        age = probe.stat().st_mtime - path.stat().st_mtime
    except FileNotFoundError:
        return  # released while we looked
    except OSError:
        age = time.time() - path.stat().st_mtime  # read-only here: the run itself will tell
    finally:
        probe.unlink(missing_ok=True)
    if stale_reason(held, age, me) is None:
        raise RunDirInUse(
            f"run.dir {path.parent} is in use by {describe(held)} "
            f"(lock {path}); wait for it, stop it, or use another run.dir"
        )


def release() -> None:
    """Release this process's run lock (a no-op when it holds none); safe to call twice."""
    global _HELD
    if _HELD is not None:
        _HELD.release()
        _HELD = None
