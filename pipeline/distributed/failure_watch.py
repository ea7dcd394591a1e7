"""A failure on one rank ends every rank, within seconds, saying which rank failed and why.

A rank that fails while the others wait in a collective would leave them waiting up to
dist.timeout_s. So the failing rank writes one key into the rendezvous store (torchrun's
agent store, or rank 0's TCPStore under srun), and every rank runs a watcher thread
that polls for it and ends its process at once, saying which rank failed and why.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from pipeline import distributed

log = logging.getLogger("pipeline")
_WATCH: dict[str, Any] = {}
POLL_S = 0.25
GRACE_S = 0.5  # for this rank's own error to arrive when all ranks raise it together
LINGER_S = 1.5  # the failing rank exits first, so launchers report it as the culprit


def _failure_key() -> str:
    # torchrun keeps one store across restarts: a dead attempt's key must not end the next.
    return f"pipeline/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _store_client(timeout_s: float) -> Any:
    return dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def start_failure_watch(command: str) -> None:
    """Every rank: end this process when another rank announces a failure."""
    if not dist.is_initialized() or _WATCH:
        return
    try:
        store = _store_client(30.0)
    except Exception as exc:  # noqa: BLE001 - a watcher we cannot start must not stop training
        log.warning("failure watcher not started (%s); a failing rank ends others late", exc)
        return
    done, failing = threading.Event(), threading.Event()
    _WATCH.update(store=store, done=done, failing=failing)
    me = distributed.env().rank

    def watch() -> None:
        lost = 0
        while not done.wait(POLL_S):
            try:
                if not store.check([_failure_key()]):
                    lost = 0
                    continue
                failed = json.loads(store.get(_failure_key()))
            except Exception:  # noqa: BLE001 - the store's host (rank 0 under srun) is gone
                lost += 1
                if lost < 4 or done.is_set():
                    continue
                failed = _store_gone()
            if failed["rank"] == me or done.is_set():
                continue
            # Ranks often raise the same error together (a config or data check they all
            # make): give this rank's own error a moment to arrive and speak for itself.
            if failing.wait(GRACE_S):
                return
            who = "" if failed["rank"] is None else f"rank {failed['rank']} failed: "
            print(
                f"[rank {me}] pipeline {command}: error: stopping: {who}{failed['message']}",
                file=sys.stderr,
                flush=True,
            )
            _WATCH["reported"] = int(failed["exit_code"])
            time.sleep(LINGER_S)
            os._exit(int(failed["exit_code"]))

    threading.Thread(target=watch, name="failure-watch", daemon=True).start()


def _store_gone() -> dict[str, Any]:
    """What a lost store means. Under srun rank 0 hosts it: rank 0 is gone. Under torchrun
    its agent does: the launcher died (killed, or its node lost), and every rank, rank 0
    included, must end rather than wait in a collective for peers that are ending too."""
    if distributed.env().launcher == "torchrun":
        message = "torchrun's agent (the rendezvous store) is gone"
        return {"rank": None, "message": message, "exit_code": 1}
    return {"rank": 0, "message": "the rendezvous store is gone", "exit_code": 1}


def stop_failure_watch() -> None:
    """Before a clean shutdown: rank 0's store goes away then, which is not a failure."""
    if _WATCH:
        _WATCH["done"].set()


def announce_failure(message: str, exit_code: int) -> dict[str, Any] | None:
    """This rank failed: tell the others (first failure wins). Returns the failure on
    record when another rank had already announced one (then this error is its echo)."""
    store = _WATCH.get("store")
    if store is None:
        return None
    if "reported" in _WATCH:  # the watcher already said which rank failed: this is its echo
        os._exit(_WATCH["reported"])
    _WATCH["failing"].set()
    record = json.dumps(
        {"rank": distributed.env().rank, "message": message, "exit_code": exit_code}
    )
    try:
        first = store.compare_set(_failure_key(), "", record)
        first = json.loads(first)
    except Exception:  # noqa: BLE001 - the store is gone: nobody left to tell
        return None
    if first["rank"] != distributed.env().rank:
        return first
    # The others' watchers see it (and print their line) before our sockets close.
    time.sleep(POLL_S + GRACE_S + 0.5)
    return None


def abandoned() -> bool:
    """Whether `abandon` ran: the process group must then be left as it is."""
    return bool(_WATCH.get("abandoned"))


def abandon(exit_code: int) -> None:
    """After a failure: leave the process group as it is and end the process with
    `exit_code` once the CLI has printed its line.

    Tearing the group down can block while a peer still waits in a collective, and gloo
    threads left running abort the interpreter's own teardown; so the process ends from
    an atexit hook (which runs before that teardown) with the exit code it meant.
    """
    if not dist.is_initialized():
        return
    first = not _WATCH.get("abandoned")
    _WATCH["abandoned"], _WATCH["exit_code"] = True, exit_code
    if not first:
        return
    import atexit

    def leave() -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(_WATCH["exit_code"])

    atexit.register(leave)
