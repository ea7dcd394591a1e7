"""BENCHMARKS.md, the one place for measured numbers: each benchmark script writes its tables.

API (for every script in scripts/ that measures something):

    from benchmarks_md import machine_line, table, write_section

    write_section(
        "loader-2d",                       # section name: letters, digits, '-'
        "Loader, 2D",                      # heading shown above the table
        table(["reader", "samples/s"], [["fast", 1234567], ...]),  # or any markdown text
        command="python scripts/bench_loader.py --dims 2",
        machine=machine_line(shared=True), # or your own one-line description
        notes="optional sentences below the table",
        path=args.md,                      # default: BENCHMARKS.md at the repository root
    )

A section lives between `<!-- bench:NAME:begin -->` and `<!-- bench:NAME:end -->`; writing it
again replaces only that section (its date, machine and command with it), so scripts can
run in any order and on different machines. A new name is appended at the end. The file
is rewritten atomically. Scripts call it only when asked (`--md PATH`, or by default when
not `--quick`), so tests never touch the repository's copy.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\n"
    "Written by the scripts in `scripts/` (each section: date, machine, command); do not edit "
    "by hand, rerun the command. Compare ratios within one run, not samples/s across "
    "machines or days.\n"
)
_NAME = re.compile(r"^[A-Za-z0-9-]+$")


def machine_line(shared: bool = True) -> str:
    """CPU model and cores, GPU (or none), torch version: one line for a table's caption."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        versions = f"torch {torch.__version__}"
    except ImportError:
        gpu, versions = "no GPU", "no torch"
    load = f", shared with other work (load {os.getloadavg()[0]:.1f})" if shared else ""
    return (
        f"{os.cpu_count()}-core {cpu}, {gpu}, {versions}, python {platform.python_version()}{load}"
    )


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # nan
            return "n/a"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; floats >= 100 get thousands separators, smaller ones 3 digits."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(
    name: str,
    title: str,
    body: str,
    *,
    command: str,
    machine: str,
    notes: str = "",
    date: str | None = None,
    path: str | os.PathLike | None = None,
) -> Path:
    """Replace (or append) section `name` of BENCHMARKS.md; returns the file written."""
    if not _NAME.match(name):
        raise ValueError(f"section name {name!r}: use letters, digits and '-'")
    target = Path(path) if path is not None else DEFAULT
    date = date or datetime.date.today().isoformat()
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    section = "\n".join(
        [
            begin,
            f"## {title}",
            "",
            f"Measured {date} on {machine}.  ",
            f"Command: `{command}`",
            "",
            body.strip(),
            *(["", notes.strip()] if notes.strip() else []),
            end,
        ]
    )
    text = target.read_text() if target.exists() else HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, target)
    return target
