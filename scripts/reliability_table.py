"""Write the README's reliability table from the rows the fault tests recorded.

    PIPELINE_RELIABILITY_JSONL=/tmp/rel.jsonl pytest tests/   # the tests record rows
    python scripts/reliability_table.py /tmp/rel.jsonl        # rewrites the README section

The table sits between the `reliability:begin` and `reliability:end` markers in README.md.
The last row recorded for each (fault, launcher) wins.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- reliability:begin -->", "<!-- reliability:end -->"


def render(rows: list[dict]) -> str:
    latest: dict[tuple[str, str], dict] = {}
    for row in rows:
        latest[(row["fault"], row.get("launcher", ""))] = row
    lines = [
        f"Recorded by the tests on {time.strftime('%Y-%m-%d')} ({platform.machine()}, "
        f"{platform.node() or 'unknown host'}); regenerate with `scripts/reliability_table.py`.",
        "",
        "| fault | launcher | exit code | seconds until every process exited | lines printed | last good checkpoint |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (fault, launcher), row in sorted(latest.items()):
        code = row["exit_code"]
        code = ", ".join(map(str, code)) if isinstance(code, list) else str(code)
        secs = "-" if row["seconds"] is None else f"{row['seconds']:.1f}"
        ckpt = {True: "kept", False: "LOST", None: "n/a (none yet)"}[row["checkpoint_ok"]]
        lines.append(f"| {fault} | {launcher or '-'} | {code} | {secs} | {row['lines']} | {ckpt} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=Path, help="JSON lines written by tests/reliability.py")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
    text = args.readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{args.readme}: no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    args.readme.write_text(f"{head}{BEGIN}\n{render(rows)}\n{END}{tail}")
    print(f"{args.readme}: {len(rows)} rows -> table")


if __name__ == "__main__":
    main()
