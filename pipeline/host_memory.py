"""Keep freed host memory in the process instead of handing it back to the kernel each step.

On CPU every forward and backward pass allocates and frees activation buffers of a few to
tens of MB. glibc serves blocks that big with mmap and returns them on free (or trims them
off the heap top), so the next step faults every page back in, zeroed by the kernel: the
demo spent a large share of its CPU time in the kernel on minor page faults. With fixed
thresholds glibc keeps those blocks for reuse: far fewer page faults and less kernel time,
a little more peak RSS; what that does to samples/s depends on the machine and its load
(scripts/bench_malloc.py writes the numbers into BENCHMARKS.md).
This is what `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` do from the environment,
and those win when set. Other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

# mallopt parameters from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit: smaller blocks use the heap
TRIM_THRESHOLD = 256 << 20  # free heap top kept before trimming
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def running_glibc() -> bool:
    """Whether this process runs on glibc: asked of the C library itself, not of the executable."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):  # no such name: not glibc
        return False


def glibc_defaults(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without malloc tuning: a child started with it begins from glibc's own defaults."""
    return {k: v for k, v in env.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (and processes it forks).

    Returns whether they were set: False off glibc, or when the environment already tunes
    glibc's malloc (the user's choice stands).
    """
    if not running_glibc():
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(name in os.environ for name in USER_SETTINGS) or "glibc.malloc." in tunables:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and (
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
