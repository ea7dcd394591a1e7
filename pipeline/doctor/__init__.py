"""`pipeline doctor`: is this machine, config, data and model ready to train? One line each.

Each check prints `✓` (fine), `!` (works, but probably not what you want) or `✗` (training
would fail or be wrong) with what it found and, for the last two, the fix. Exit 1 when any
check fails. Nothing here starts a process group, writes a run directory or contacts W&B,
so it is safe to run on a login node or inside a job before `srun`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

OK, WARN, FAIL = "✓", "!", "✗"


@dataclass
class Check:
    status: str
    name: str
    detail: str
    fix: str = ""

    def line(self, ascii_only: bool = False) -> str:
        fix = f" | fix: {self.fix}" if self.fix and self.status != OK else ""
        mark = {OK: "ok", WARN: "!", FAIL: "FAIL"}[self.status] if ascii_only else self.status
        return f"{mark} {self.name}: {self.detail}{fix}"


def diagnose(path: str | None, overrides: list[str]) -> list[Check]:
    """Every check, in the order training meets them."""
    from pipeline.doctor.machine import environment, wandb
    from pipeline.doctor.project import load_config, model, shards

    cfg, config_check = load_config(path, overrides)
    checks = list(environment(cfg)) + [config_check]
    if cfg is None:
        checks.append(
            Check(
                FAIL,
                "data, model, W&B",
                "not checked: the config did not load",
                "fix the config first",
            )
        )
        return checks
    checks += list(shards(cfg)) + list(model(cfg)) + [wandb(cfg)]
    return checks


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="check environment, config, shards, model and W&B before training",
        description="One line per check: ✓ fine, ! works but check it, ✗ broken (exit 1).",
    )
    parser.add_argument("--config", help="YAML config file (as for `pipeline train`)")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, as for `pipeline train`")
    parser.set_defaults(func=run_doctor)


def run_doctor(args: argparse.Namespace) -> int:
    checks = diagnose(args.config, args.overrides)
    # A latin-1 terminal cannot print the marks; fall back rather than crash.
    try:
        (OK + FAIL).encode(sys.stdout.encoding or "ascii")
        ascii_only = False
    except UnicodeEncodeError:
        ascii_only = True
    for check in checks:
        print(check.line(ascii_only), flush=True)
    failed = sum(c.status == FAIL for c in checks)
    print(f"doctor: {failed} problem(s)" if failed else "doctor: all checks passed", flush=True)
    return 1 if failed else 0
