"""Atomic, resumable checkpoints: `last.pt`, `best.pt` and the last k step checkpoints.

A kill at any moment leaves the previous good file in place: we write a temp file in the
same directory, fsync it, rename it over the target and fsync the directory. Loading uses
`weights_only=True`, so a checkpoint can never run code.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import CheckpointError, PipelineError

log = logging.getLogger("pipeline")
FORMAT = 1


class DiskFullError(PipelineError):
    """No space left where a checkpoint goes (not the user's input: exit 1)."""

    exit_code = 1


def save_atomic(state: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        # torch.save wraps the write's OSError in a RuntimeError ("... failed writing").
        full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (
            "No space left" in str(exc) or "failed writing" in str(exc)
        )
        if not full:
            raise
        tmp.unlink(missing_ok=True)  # before measuring: the free space it held is back
        free = shutil.disk_usage(path.parent).free
        raise DiskFullError(
            f"no space left on device writing checkpoint {path} ({free / 2**20:.1f} MiB free "
            f"in {path.parent}); the previous checkpoint there is intact"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint safely; CheckpointError naming the file when it is unusable."""
    return load_with_digest(path)[0]


def load_with_digest(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """The checkpoint and a digest of its bytes (read once): ranks compare digests to be
    sure they loaded the same file, not one that merely has the same name."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()[:16]
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not ours: {reason}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a pipeline checkpoint (format {FORMAT})")
    return state, digest


def rng_state(augment: torch.Generator | None) -> dict[str, Any]:
    """Every random state that decides this rank's future, as weights_only-safe values."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "augment": augment.get_state() if augment is not None else None,
    }


def restore_rng(state: dict[str, Any], augment: torch.Generator | None) -> None:
    random.setstate(_as_tuple(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {
                "key": numpy_state["key"].numpy().astype(np.uint32),
                "pos": numpy_state["pos"],
            },
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if augment is not None and state["augment"] is not None:
        augment.set_state(state["augment"])


def _as_tuple(value: Any) -> Any:
    # weights_only loading may return lists where random.setstate needs tuples.
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    if isinstance(value, tuple):
        return tuple(_as_tuple(v) for v in value)
    return value


class CheckpointManager:
    """Owns `RUN_DIR/checkpoints/`: where to save, what to keep, what to resume from."""

    def __init__(self, run_dir: Path, keep_last: int) -> None:
        self.dir = run_dir / "checkpoints"
        self.keep_last = keep_last

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.dir / "best.pt"

    def save(self, state: dict[str, Any], best: bool = False) -> None:
        state = {"format": FORMAT, **state}
        # Temp files of a process killed mid-save (ours end in our pid): never renamed, so
        # never read, but each can be as large as a checkpoint.
        for stale in self.dir.glob(".*.tmp-*"):
            if not stale.name.endswith(f".tmp-{os.getpid()}"):
                stale.unlink(missing_ok=True)
        save_atomic(state, self.last)
        if self.keep_last > 0:
            save_atomic(state, self.dir / f"step-{state['step']:08d}.pt")
            for old in self.step_files()[: -self.keep_last]:
                old.unlink(missing_ok=True)
        if best:
            save_atomic(state, self.best)

    def step_files(self) -> list[Path]:
        return sorted(self.dir.glob("step-*.pt"))

    def choose(self, resume: str) -> tuple[Path, dict[str, Any], str] | None:
        """(path, state, digest) to resume from, per `checkpoint.resume` (auto | never | a
        path), or None for a fresh start.

        With `auto`, a corrupt `last.pt` falls back to the newest readable step checkpoint,
        with a warning, so a crash during a write never costs more than one interval.
        """
        if resume == "never":
            return None
        if resume != "auto":
            return (Path(resume), *load_with_digest(resume))
        candidates = [self.last] + list(reversed(self.step_files()))
        candidates = [p for p in candidates if p.exists()]
        for index, path in enumerate(candidates):
            try:
                state, digest = load_with_digest(path)
            except CheckpointError as exc:
                if index == len(candidates) - 1:
                    raise
                log.warning("%s; falling back to an older checkpoint", exc)
                continue
            if index > 0:
                log.warning("resuming from %s instead of %s", path, self.last)
            return path, state, digest
        return None
