"""Records of one local tar shard, grouped by key, each member read with a single readinto.

webdataset's reader opens tars in streaming mode (`tarfile` "r|*"), which copies every
member through 10 KiB chunks and parses every header in Python: on 48x48 blocks that held
the training loader to about a fifth of the disk read rate. Our shards are always local
files (local shards, or the cache's copies of remote ones), so we seek instead, parse
the few header fields a shard needs (ustar, pax `path`/`size` records as written by `tarfile`, GNU long names),
and read each member's bytes into one writable bytearray that `decode_block` then views
as arrays without copying. Records look like webdataset samples (`__key__`, `__url__`,
one entry per suffix), so `decode_block` takes either.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import numpy as np
from webdataset.tariterators import tarfile_samples

BLOCK = 512
BIG = 1 << 16  # members at least this big are read into numpy buffers
REGULAR = (b"0", b"\0", b"7")


def split_name(name: str) -> tuple[str, str]:
    """'dir/key.patch.npy' -> ('dir/key', 'patch.npy'), webdataset's grouping rule."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


def _number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes beyond 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.rstrip(b"\0 ") or b"0", 8)


_ODD = bytes(value & 1 for value in range(256))


def byte_sum(header: bytes) -> int:
    """sum(header) for a 512-byte header, at C speed (sum() was a tenth of the reader's time).

    adler32's low half is 1 + the byte sum mod 65521. A header sums to at most
    512 x 255 = 130,560 < 2 x 65521, so the sum is r or r + 65521; 65521 is odd, so the
    parity of the count of odd bytes tells which.
    """
    low = ((zlib.adler32(header) & 0xFFFF) - 1) % 65521
    return low if low & 1 == header.translate(_ODD).count(1) & 1 else low + 65521


def _checksum_ok(header: bytes) -> bool:
    """The header sum, its checksum field counted as spaces, unsigned or signed (as tarfile)."""
    expected = _number(header[148:156])
    unsigned = byte_sum(header) - sum(header[148:156]) + 256
    if expected == unsigned:
        return True
    return expected == unsigned - 256 * sum(b > 127 for b in header[:148] + header[156:])


def _pax(data: bytes) -> dict[str, str]:
    """'<len> key=value\\n' records of a pax extended header."""
    out, at = {}, 0
    while at < len(data):
        space = data.index(b" ", at)
        end = at + int(data[at:space])
        key, _, value = data[space + 1 : end - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        at = end
    return out


def _members(stream: BinaryIO) -> Iterator[tuple[str, int]]:
    """(name, size) of each regular member, leaving `stream` at its first data byte."""
    override: dict[str, str] = {}
    at = 0  # tracked here: tell() on a buffered file can cost a system call
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK:
            # Every tar writer ends with zero blocks: stopping short means a cut file.
            empty = at == 0 and not header
            raise tarfile.ReadError("empty file" if empty else f"truncated at byte {at}")
        try:
            ok = _checksum_ok(header)
            kind, size = header[156:157], _number(header[124:136])
        except ValueError:
            ok = False
        if not ok:
            if header.count(0) == BLOCK:
                return  # end-of-archive marker
            raise tarfile.ReadError(f"invalid tar header at byte {at}")
        padded = -(-size // BLOCK) * BLOCK
        if kind in (b"x", b"L"):  # applies to the next member only
            data = stream.read(padded)[:size]
            if len(data) < size:
                raise tarfile.ReadError(f"truncated at byte {at}")
            if kind == b"x":
                override = _pax(data)
            else:
                override = {"path": data.rstrip(b"\0").decode("utf-8", "surrogateescape")}
            at += BLOCK + padded
            continue
        if "size" in override:
            size = int(override["size"])
            padded = -(-size // BLOCK) * BLOCK
        name = override.get("path")
        if name is None:
            name = header[:100].rstrip(b"\0").decode("utf-8", "surrogateescape")
            if header[257:263] == b"ustar\0" and header[345] != 0:  # POSIX, not GNU
                prefix = header[345:500].rstrip(b"\0").decode("utf-8", "surrogateescape")
                name = f"{prefix}/{name}"
        override = {}
        if kind in REGULAR:
            yield name, size
        at += BLOCK + padded
        stream.seek(at)


Placer = Callable[[str, int, bytes], "list[Any] | None"]
"""(suffix, size, first bytes) -> writable buffers to fill in order, or None for the default."""


def tar_records(path: str, place: Placer | None = None, skip: int = 0) -> Iterator[dict[str, Any]]:
    """Consecutive members sharing a key, as {suffix: writable buffer}; raises tar/OS errors.

    Small members are bytearrays (json.loads takes them), big ones uint8 arrays. `place`
    may route a member into caller-owned memory, split into parts (then the record holds
    the list of parts); the loader uses it to read patches straight into its shuffle buffer.
    The first `skip` records are passed over by their headers: their bytes are never read.
    """
    with open(path, "rb") as stream:
        record: dict[str, Any] = {}
        passed, last = 0, None
        for name, size in _members(stream):
            key, suffix = split_name(name)
            if not suffix:
                continue
            if skip:
                if key != last:
                    passed, last = passed + 1, key
                if passed <= skip:
                    continue
            if record and record["__key__"] != key:
                yield record
                record = {}
            if not record:
                record = {"__key__": key, "__url__": path}
            parts = place(suffix, size, stream.peek(16)[:16]) if place else None
            if parts is None:
                # Writable either way; np.empty skips bytearray's zero-fill of big members.
                parts = [np.empty(size, np.uint8) if size >= BIG else bytearray(size)]
            for part in parts:
                if stream.readinto(part) != len(part):
                    raise tarfile.ReadError(f"{name}: truncated member")
            record[suffix] = parts[0] if len(parts) == 1 else parts
        if record:
            yield record


def label_lengths(path: str) -> list[int]:
    """Samples per record (each `label.npy`'s length), in order, reading no other member."""
    lengths = []
    with open(path, "rb") as stream:
        for name, size in _members(stream):
            if split_name(name)[1] == "label.npy":
                data = stream.read(size)
                if len(data) < size:
                    raise tarfile.ReadError(f"{name}: truncated member")
                lengths.append(len(np.load(io.BytesIO(data), allow_pickle=False)))
    return lengths


def webdataset_records(path: str) -> Iterator[dict[str, Any]]:
    """The same records through webdataset's own reader (`tarfile_samples`, streaming tarfile).

    `data.reader=webdataset`: the reference path, slower per worker than `tar_records`
    (scripts/bench_loader.py, BENCHMARKS.md), kept selectable so results can
    be cross-checked against the library. Any failure inside webdataset (its handler
    re-raises with extra args) becomes a tarfile.ReadError naming the first cause, so both
    readers fail the same way.
    """
    try:
        yield from tarfile_samples([{"url": path}])
    except (OSError, tarfile.TarError, ValueError, AssertionError) as exc:
        # webdataset appends " @ <stream repr>" and the url to the first cause.
        cause = str(exc.args[0]).split(" @ ")[0] if exc.args else type(exc).__name__
        raise tarfile.ReadError(f"webdataset: {cause}") from None
