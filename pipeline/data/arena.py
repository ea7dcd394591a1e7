"""Shuffle-buffer memory: the patches of one buffer's blocks, read back to back.

The training stream shuffles across `data.shuffle_blocks` blocks. Concatenating their
patches cost a full copy of every sample (a quarter of the loader's time on 48x48 uint8),
so instead the tar reader drops each block's patch payload straight into one arena, right
after the previous one (its .npy header goes to a small buffer of its own). When the
buffer is flushed, its blocks already form one contiguous array. Anything unexpected (a
record that failed to decode, mixed dtypes or shapes, a block too big for the arena)
simply falls back to np.concatenate, so the result never depends on the fast path.

Arena memory is recycled: the stream hands each flushed buffer's memory back once every
sample in it has been gathered into a batch, and the next buffer is read into it. Fresh
memory each time made the kernel zero every page first: a 3D buffer of 8 blocks is
113 MB, and the zeroing was a measurable share of the 3D reader's time.

Host memory per worker: one arena of shuffle_blocks x K x bytes per sample, plus the one
before it while its last samples finish a batch (more only when a batch spans several
buffers).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.data.format import npy_header_size

NPY_MAGIC = b"\x93NUMPY"


class Arena:
    """Hands out back-to-back payload slots for `patch.npy` members (a tar_records Placer)."""

    def __init__(self, blocks: int) -> None:
        self.blocks = blocks
        self.memory: np.ndarray | None = None
        self.used = 0
        self.largest = 0  # biggest payload seen: sizes the next arena
        self.spare: list[np.ndarray] = []  # released memories, ready to be read into again
        self.allocated = 0  # memories ever made (tests check that they are recycled)

    def _fresh(self) -> np.ndarray:
        size = self.blocks * self.largest
        while self.spare:
            memory = self.spare.pop()
            if len(memory) >= size:
                return memory
        self.allocated += 1
        return np.empty(size, np.uint8)

    def place(self, suffix: str, size: int, start: bytes) -> list[Any] | None:
        if suffix != "patch.npy" or len(start) < 12 or not start.startswith(NPY_MAGIC):
            return None
        header = npy_header_size(start)
        payload = size - header
        if payload <= 0:
            return None
        self.largest = max(self.largest, payload)
        if self.memory is None:
            # Aligned for any stored dtype: np.empty gives 16-byte alignment at offset 0,
            # and every slot starts at a whole number of samples.
            self.memory = self._fresh()
        if self.used + payload > len(self.memory):
            return None
        slot = self.memory[self.used : self.used + payload]
        self.used += payload
        return [bytearray(header), slot]

    def take(self, patches: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """(the patches as one array, the memory to `release` once they have been read).

        The array is a view of the arena when they lie back to back in it. The next block
        starts a new arena; the returned memory must not be released while the patches
        (or anything read into the arena with them) may still be read.
        """
        joined = self._view(patches)
        memory, self.memory, self.used = self.memory, None, 0
        return (np.concatenate(patches) if joined is None else joined), memory

    def release(self, memory: np.ndarray | None) -> None:
        """Memory from `take` whose samples have all been gathered: the next arena reuses it."""
        if memory is not None:
            self.spare.append(memory)

    def _view(self, patches: list[np.ndarray]) -> np.ndarray | None:
        if self.memory is None or not patches:
            return None
        first = patches[0]
        at = self.memory.ctypes.data
        for patch in patches:
            same = patch.dtype == first.dtype and patch.shape[1:] == first.shape[1:]
            if not (same and patch.flags.c_contiguous and patch.ctypes.data == at):
                return None
            at += patch.nbytes
        used = at - self.memory.ctypes.data
        flat = self.memory[:used].view(first.dtype)
        return flat.reshape(-1, *first.shape[1:])
