"""SLURM nodelists -> hostnames: `scontrol show hostnames` where it exists, else our parser."""

from __future__ import annotations

import functools
import itertools
import re
import shutil
import subprocess


def expand_nodelist(nodelist: str) -> list[str]:
    """Every hostname of a SLURM nodelist, in SLURM's order, without asking SLURM.

    `gpu[01-03,7]` -> gpu01 gpu02 gpu03 gpu7 (a range keeps the zero padding of its
    start), `rack[1-2]-node[01-02]` -> rack1-node01 rack1-node02 rack2-node01 ...
    (several brackets multiply, the last varies fastest), `gpu[01-02]-ib` keeps the
    suffix, and commas outside brackets separate entries.
    """
    hosts: list[str] = []
    for entry in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip()):
        # Alternating literal text and bracket bodies: "rack", "1-2", "-node", "01-02", "".
        parts = re.split(r"\[([^\]]*)\]", entry)
        choices: list[list[str]] = []
        for index, part in enumerate(parts):
            choices.append(_expand_ranges(part) if index % 2 else [part])
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def _expand_ranges(body: str) -> list[str]:
    out: list[str] = []
    for item in body.split(","):
        start, _, stop = item.partition("-")
        if not start.isdigit() or (stop and not stop.isdigit()):
            out.append(item)  # not a range SLURM writes: keep it as text rather than fail
            continue
        width = len(start) if start.startswith("0") else 1
        out.extend(f"{n:0{width}d}" for n in range(int(start), int(stop or start) + 1))
    return out


def hostnames(nodelist: str) -> list[str]:
    """The nodelist's hostnames: `scontrol show hostnames` where it exists (SLURM's own
    reading, site extensions included), else `expand_nodelist`."""
    return list(_hostnames(nodelist))


@functools.lru_cache(maxsize=8)  # detect_env runs more than once per process
def _hostnames(nodelist: str) -> tuple[str, ...]:
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=15,
            )
            if out.returncode == 0 and out.stdout.split():
                return tuple(out.stdout.split())
        except (OSError, subprocess.SubprocessError):
            pass  # a broken SLURM client: our own parser reads the same syntax
    return tuple(expand_nodelist(nodelist))


def first_host(nodelist: str) -> str:
    """First hostname of a SLURM nodelist such as `gpu[03-05,09],login1` -> `gpu03`."""
    names = hostnames(nodelist) if nodelist.strip() else []
    return names[0] if names else nodelist
