"""The path both converters share: rows -> split -> parallel tasks -> shards -> summary.

A converter supplies how to parse one row and a picklable worker that turns one task
(one image batch, one CT scan) into chunk files; everything about skip/fail, progress,
splitting, shard writing and the closing summary lives here, once.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.convert import split as splitting
from pipeline.convert.store import (
    PREDICT_SPLIT,
    REPORT_NAME,
    TMP_NAME,
    Chunk,
    prepare_out,
    write_splits,
)
from pipeline.convert.table import (
    ON_ERROR,
    Candidate,
    LabelRule,
    Problem,
    RowError,
    cell,
    read_rows,
)
from pipeline.errors import ConfigError, DataError
from pipeline.tracking.progress import work_progress

UNCERTAIN = "uncertain label"
DEFAULT_VAL_FRACTION = 0.2
# The report lists this many problems per reason (counts stay exact): a LUNA16 list run
# against one downloaded subset would otherwise list ~680k "missing scan" rows.
REPORT_PER_REASON = 1000


@dataclass
class TaskResult:
    """What a worker sends back: where its patches went, and the rows it could not convert."""

    chunks: list[Chunk] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(len(c.rows) for c in self.chunks) + len(self.problems)


def require(*modules: str) -> None:
    """One-line ConfigError instead of a traceback when the optional readers are missing."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(
                f"pipeline convert needs the '{module}' package: pip install 'pipeline[convert]'"
            ) from None


def default_workers() -> int:
    # The CPUs this process may use (SLURM/cgroup aware), not the machine's total.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def check_common_args(
    on_error: str, size: int, workers: int | None, shard_size: int | None, block_size: int
) -> None:
    if on_error not in ON_ERROR:
        raise ConfigError(f"--on-error must be one of {ON_ERROR}, got {on_error!r}")
    for flag, value in (
        ("--size", size),
        ("--block-size", block_size),
        ("--shard-size", shard_size),
        ("--workers", workers),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")


def check_label_args(
    label_col: str | None,
    label_threshold: float | None,
    drop_uncertain: tuple[float, float] | None,
    val_fraction: float | None,
    folds: int | None,
    val_fold: int | None,
) -> None:
    """Unlabelled candidates (label_col None) have no labels to threshold and no split."""
    if label_col is not None:
        return
    for flag, value in (
        ("--label-threshold", label_threshold),
        ("--drop-uncertain", drop_uncertain),
        ("--val-fraction", val_fraction),
        ("--folds", folds),
        ("--val-fold", val_fold),
    ):
        if value is not None:
            raise ConfigError(
                f"{flag} does not apply to --unlabelled candidates: they have no labels and "
                "all go to predict-*.tar"
            )


def label_parser(
    label_col: str | None, label_threshold: float | None, drop_uncertain: tuple[float, float] | None
) -> Callable[[dict[str, str]], int | None]:
    """Row -> 0/1, None to drop as uncertain; UNKNOWN_LABEL for every row when unlabelled."""
    if label_col is None:
        from pipeline.data.format import UNKNOWN_LABEL

        return lambda row: UNKNOWN_LABEL
    rule = LabelRule(label_threshold, drop_uncertain)
    return lambda row: rule.parse(cell(row, label_col))


class Conversion:
    """One run: collects candidates, problems and drops, runs tasks, writes shards."""

    def __init__(
        self,
        csv_path: str | Path,
        out: str | Path,
        on_error: str,
        overwrite: bool,
        labelled: bool = True,
    ) -> None:
        self.csv_path = Path(csv_path)
        if not self.csv_path.is_file():  # before OUT is created: a typo leaves nothing behind
            raise DataError(f"{self.csv_path}: CSV file not found")
        self.labelled = labelled
        self.on_error = on_error
        self.out = Path(out)
        self.replaced = prepare_out(self.out, overwrite)
        self.tmp = self.out / TMP_NAME
        self.rows_read = 0
        self.candidates: dict[int, Candidate] = {}
        self.problems: list[Problem] = []
        self.dropped: Counter[str] = Counter()

    def __enter__(self) -> Conversion:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Chunk files are scratch: gone whether the run finished, failed or was interrupted.
        shutil.rmtree(self.tmp, ignore_errors=True)

    def report(self, problems: Iterable[Problem]) -> None:
        """Record problems; under --on-error fail the first one (by row) stops the run."""
        problems = sorted(problems, key=lambda p: p.row)
        if problems and self.on_error == "fail":
            raise DataError(
                problems[0].message(self.csv_path) + " (pass --on-error skip to drop such rows)"
            )
        self.problems.extend(problems)
        self.dropped.update(p.reason for p in problems)

    def collect(
        self,
        required: Sequence[str | None],
        parse: Callable[[int, dict[str, str]], Candidate | None],
    ) -> None:
        """Parse every row; `parse` returns None for an uncertain label, raises RowError if bad."""
        for line, row in read_rows(self.csv_path, required):
            self.rows_read += 1
            try:
                candidate = parse(line, row)
            except RowError as exc:
                self.report([Problem(line, exc.reason, exc.detail)])
                continue
            if candidate is None:
                self.dropped[UNCERTAIN] += 1
            else:
                self.candidates[line] = candidate
        if not self.candidates:
            raise DataError(
                f"{self.csv_path}: no usable rows ({self.rows_read} read, dropped: {dict(self.dropped)})"
            )

    def split(
        self,
        val_fraction: float | None,
        folds: int | None,
        val_fold: int | None,
        seed: int,
        extra_groups: Sequence[str] = (),
    ) -> dict[int, str]:
        """Split name per row: train/val (or fold0..fold{K-1}) by group; `predict` if unlabelled.

        `extra_groups` (scans without candidates) are split with the rest as negative-only
        groups; `self.group_split` then names every group's split, theirs included.
        """
        rows = list(self.candidates)
        if not self.labelled:
            self.group_split = {self.candidates[r].group: PREDICT_SPLIT for r in rows}
            return dict.fromkeys(rows, PREDICT_SPLIT)
        groups = [self.candidates[r].group for r in rows] + list(extra_groups)
        labels = [self.candidates[r].label for r in rows] + [0] * len(extra_groups)
        if folds is not None and val_fold is None:
            names = [f"fold{i}" for i in splitting.assign_folds(groups, labels, folds, seed)]
        else:
            mask = splitting.assign_val(
                groups,
                labels,
                val_fraction=DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction,
                folds=folds,
                val_fold=val_fold,
                seed=seed,
            )
            names = ["val" if val else "train" for val in mask.tolist()]
        self.group_split = dict(zip(groups, names, strict=True))
        return dict(zip(rows, names[: len(rows)], strict=True))

    def run(
        self, worker: Callable[[Any], TaskResult], tasks: Sequence[Any], workers: int, desc: str
    ) -> list[Chunk]:
        """Run tasks (in this process when workers == 1), with a progress bar over rows."""
        chunks: list[Chunk] = []
        total = len(self.candidates)
        # closing(): on --on-error fail the pool is shut down before the error propagates.
        with (
            work_progress(total, desc) as bar,
            closing(_results(worker, tasks, min(workers, len(tasks)))) as results,
        ):
            for result in results:
                self.report(result.problems)
                chunks.extend(result.chunks)
                bar.update(result.count)
        return chunks

    def finish(
        self,
        chunks: Sequence[Chunk],
        split_of: dict[int, str],
        shard_size: int | None,
        block_size: int,
        seed: int,
    ) -> dict[str, Any]:
        """Write shards and manifest, print and save the summary, remove the chunk files."""
        if not chunks:
            raise DataError(
                f"{self.csv_path}: every row failed ({dict(self.dropped)}); see the rows above"
            )
        for path in self.replaced:
            path.unlink(missing_ok=True)
        written = write_splits(
            self.out, chunks, self.candidates, split_of, shard_size, block_size, seed
        )
        summary = self._summary(written, chunks, split_of)
        (self.out / REPORT_NAME).write_text(json.dumps(summary, indent=2))
        print_summary(summary)
        return summary

    def _summary(
        self, written: dict[str, Any], chunks: Sequence[Chunk], split_of: dict[int, str]
    ) -> dict[str, Any]:
        kept = [r for c in chunks for r in c.rows]
        splits = {}
        for name, infos in written.items():
            samples = sum(i.samples for i in infos)
            positives = sum(i.positives for i in infos)
            groups = {self.candidates[r].group for r in kept if split_of[r] == name}
            splits[name] = {
                "samples": samples,
                "positives": positives,
                "negatives": samples - positives if self.labelled else 0,
                "unlabelled": 0 if self.labelled else samples,
                "groups": len(groups),
                "shards": len(infos),
            }
        return {
            "csv": str(self.csv_path),
            "out": str(self.out),
            "rows": self.rows_read,
            "patch_shape": list(chunks[0].shape),
            "dtype": chunks[0].dtype,
            "splits": splits,
            "dropped": dict(sorted(self.dropped.items())),
            "problems": [asdict(p) for p in _first_per_reason(self.problems)],
        }


def _first_per_reason(problems: Sequence[Problem]) -> list[Problem]:
    seen: Counter[str] = Counter()
    kept = []
    for problem in sorted(problems, key=lambda p: p.row):
        seen[problem.reason] += 1
        if seen[problem.reason] <= REPORT_PER_REASON:
            kept.append(problem)
    return kept


def _results(
    worker: Callable[[Any], TaskResult], tasks: Sequence[Any], workers: int
) -> Iterable[TaskResult]:
    if workers <= 1:
        yield from map(worker, tasks)
        return
    # The platform's default start method: fork on Linux, so scripts without a
    # `if __name__ == "__main__":` guard still work; nothing here has touched CUDA.
    executor = ProcessPoolExecutor(max_workers=workers)
    try:
        pending = {executor.submit(worker, task) for task in tasks}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
    finally:
        # On --on-error fail (or Ctrl-C) drop queued scans instead of finishing them first.
        executor.shutdown(wait=True, cancel_futures=True)


def print_summary(summary: dict[str, Any]) -> None:
    kept = sum(s["samples"] for s in summary["splits"].values())
    shape = "x".join(str(n) for n in summary["patch_shape"])
    print(
        f"converted {kept} of {summary['rows']} rows from {summary['csv']} -> {summary['out']} (patches {shape} {summary['dtype']})"
    )
    for name, s in summary["splits"].items():
        if s.get("unlabelled"):
            print(
                f"  {name:5s} {s['samples']:8d} samples  unlabelled (score them with pipeline predict)"
                f"  {s['groups']} groups  {s['shards']} shard(s)"
            )
            continue
        ratio = f"1:{s['negatives'] / s['positives']:.0f}" if s["positives"] else "no positives"
        print(
            f"  {name:5s} {s['samples']:8d} samples  {s['positives']} positive / {s['negatives']} negative ({ratio})"
            f"  {s['groups']} groups  {s['shards']} shard(s)"
        )
    if summary["dropped"]:
        reasons = ", ".join(f"{reason} {n}" for reason, n in summary["dropped"].items())
        print(f"  dropped {sum(summary['dropped'].values())} rows: {reasons}")
    for p in summary["problems"][:10]:
        print(f"    row {p['row']}: {p['reason']}: {p['detail']}")
    hidden = sum(summary["dropped"].values()) - summary["dropped"].get(UNCERTAIN, 0) - 10
    if hidden > 0:
        print(f"    ... {hidden} more; see {Path(summary['out']) / REPORT_NAME}")
