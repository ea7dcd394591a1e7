"""`pipeline check-shards PATTERN...`: validate every record of every shard before training.

Each record goes through the loader's own reader (`read_blocks` -> `format.decode_block`),
so a shard that passes here is one that training reads without a skip. Per shard it
reports blocks, samples, positives, sample shape and dtype; it compares the counts with
`manifest.json` where one lists the shard, and flags shards whose sample shape differs
from the rest (they would break batching). Unlabelled samples (label 255) are counted, not
flagged, only in shards meant for `pipeline predict`: `predict-*.tar` (what `convert
--unlabelled` writes), or any shard with `--unlabelled`. Exit 0 when clean, 1 when any
problem is found, 2 when a pattern matches no file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.data.format import PREDICT_SPLIT, UNKNOWN_LABEL, expand_shards, manifest_counts
from pipeline.data.loader import read_blocks
from pipeline.data.problems import ProblemLog
from pipeline.errors import DataError


@dataclass
class ShardReport:
    path: str
    blocks: int = 0
    samples: int = 0
    positives: int = 0
    unlabelled: int = 0
    shapes: dict[str, int] = field(default_factory=dict)
    """Samples per sample shape, e.g. {"1x48x48": 256}."""
    dtypes: list[str] = field(default_factory=list)
    manifest: dict[str, int] | None = None
    """The manifest's counts for this shard, when a manifest lists it."""
    problems: list[str] = field(default_factory=list)


class _Collected(ProblemLog):
    """Keeps each problem for the report instead of logging it."""

    def __init__(self) -> None:
        super().__init__()
        self.reasons: list[str] = []

    def record(self, where: str, reason: str) -> None:
        self.count += 1
        self.reasons.append(reason)


def check_shard(path: str, unlabelled: bool = False) -> ShardReport:
    """Read every record of one shard; bad records become problems, never exceptions.

    Label 255 (unknown) is admitted with `unlabelled` or in a `predict-*.tar` shard only.
    """
    report, problems = ShardReport(path), _Collected()
    shapes: Counter[str] = Counter()
    dtypes: set[str] = set()
    allow_unknown = unlabelled or os.path.basename(path).startswith(f"{PREDICT_SPLIT}-")
    for block in read_blocks([path], "skip", problems, meta=True, allow_unknown=allow_unknown):
        report.blocks += 1
        report.samples += len(block)
        report.positives += int(np.count_nonzero(block.label == 1))
        report.unlabelled += int(np.count_nonzero(block.label == UNKNOWN_LABEL))
        shapes["x".join(map(str, block.patch.shape[1:]))] += len(block)
        dtypes.add(block.patch.dtype.name)
    report.shapes, report.dtypes, report.problems = dict(shapes), sorted(dtypes), problems.reasons
    return report


def check_shards(paths: list[str], unlabelled: bool = False) -> list[ShardReport]:
    """Reports for `paths`, cross-checked against manifests and against each other."""
    reports = [check_shard(path, unlabelled) for path in paths]
    try:
        listed = manifest_counts(paths)
    except DataError as exc:  # a malformed manifest is a problem of every shard it covers
        listed = {}
        for report in reports:
            report.problems.append(str(exc))
    for report in reports:
        info = listed.get(report.path)
        if info is None:
            continue
        report.manifest = {
            "samples": info.samples,
            "positives": info.positives,
            "blocks": info.blocks,
        }
        for key, found in (("samples", report.samples), ("positives", report.positives)):
            if report.manifest[key] != found:
                report.problems.append(
                    f"{report.path}: manifest.json says {report.manifest[key]} {key}, "
                    f"the shard holds {found} readable"
                )
    overall: Counter[str] = Counter()
    for report in reports:
        overall.update(report.shapes)
    if len(overall) > 1:
        usual = overall.most_common(1)[0][0]
        for report in reports:
            for shape, count in report.shapes.items():
                if shape != usual:
                    report.problems.append(
                        f"{report.path}: {count} samples of shape {shape}, where the other "
                        f"shards hold {usual}; training would refuse them"
                    )
    return reports


def _balance(labelled: int, positives: int) -> str:
    if labelled == 0:
        return "-"
    return f"{100 * positives / labelled:.1f}%"


def format_table(reports: list[ShardReport]) -> str:
    """The human-readable report: one row per shard, totals, class balance, problems."""
    base = os.path.commonpath([os.path.dirname(r.path) or "." for r in reports])
    names = [os.path.relpath(r.path, base) for r in reports]
    width = max(len("shard"), *(len(n) for n in names))
    shapes = [",".join(r.shapes) or "-" for r in reports]
    shape_width = max(len("shape"), *(len(s) for s in shapes))
    header = (
        f"{'shard':<{width}}  {'blocks':>7}  {'samples':>9}  {'positives':>9}  {'pos%':>6}  "
        f"{'shape':<{shape_width}}  {'dtype':<8}  problems"
    )
    lines = [f"shards in {base}", header, "-" * len(header)]
    for name, shape, r in zip(names, shapes, reports, strict=True):
        lines.append(
            f"{name:<{width}}  {r.blocks:>7}  {r.samples:>9}  {r.positives:>9}  "
            f"{_balance(r.samples - r.unlabelled, r.positives):>6}  {shape:<{shape_width}}  "
            f"{','.join(r.dtypes) or '-':<8}  {len(r.problems)}"
        )
    samples = sum(r.samples for r in reports)
    positives = sum(r.positives for r in reports)
    unlabelled = sum(r.unlabelled for r in reports)
    problems = [p for r in reports for p in r.problems]
    lines.append("-" * len(header))
    lines.append(
        f"{f'total ({len(reports)} shards)':<{width}}  {sum(r.blocks for r in reports):>7}  "
        f"{samples:>9}  {positives:>9}  {_balance(samples - unlabelled, positives):>6}"
    )
    negatives = samples - positives - unlabelled
    if positives + negatives or not unlabelled:
        ratio = f"1:{negatives / positives:.1f}" if positives else "no positives"
        lines.append(f"class balance: {positives} positive, {negatives} negative ({ratio})")
    if unlabelled:
        lines.append(
            f"{unlabelled} unlabelled samples (label {UNKNOWN_LABEL}): `pipeline predict` scores "
            "them; training and evaluation skip their records"
        )
    if problems:
        lines.append(f"problems ({len(problems)}):")
        lines.extend(f"  {p}" for p in problems)
    else:
        lines.append("no problems found")
    return "\n".join(lines)


def to_json(reports: list[ShardReport]) -> dict[str, Any]:
    samples = sum(r.samples for r in reports)
    positives = sum(r.positives for r in reports)
    unlabelled = sum(r.unlabelled for r in reports)
    return {
        "shards": [asdict(r) for r in reports],
        "total": {
            "shards": len(reports),
            "blocks": sum(r.blocks for r in reports),
            "samples": samples,
            "positives": positives,
            "negatives": samples - positives - unlabelled,
            "unlabelled": unlabelled,
        },
        "problems": sum(len(r.problems) for r in reports),
    }


def run(args: argparse.Namespace) -> int:
    paths: list[str] = []
    for pattern in args.patterns:
        paths.extend(expand_shards(pattern, "check-shards PATTERN"))
    reports = check_shards(list(dict.fromkeys(paths)), args.unlabelled)
    if args.json:
        json.dump(to_json(reports), sys.stdout, indent=2)
        print()
    else:
        print(format_table(reports))
    return 1 if any(r.problems for r in reports) else 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check-shards",
        help="validate every record of shards; per-shard counts, balance, problems",
        description=__doc__.splitlines()[0].split(": ", 1)[1],
    )
    parser.add_argument(
        "patterns",
        nargs="+",
        metavar="PATTERN",
        help="shard files: globs and brace ranges, e.g. 'shards/train-{000000..000099}.tar'",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON report instead")
    parser.add_argument(
        "--unlabelled",
        action="store_true",
        help="shards to score with `pipeline predict`: label 255 (unknown) is fine "
        "(always so for predict-*.tar)",
    )
    parser.set_defaults(func=run)
