"""`pipeline <command>`: thin argument parsing that hands off to the modules.

User errors (PipelineError) become one line on stderr and exit code 2; anything else is
our bug and keeps its traceback, prefixed with the rank under torchrun/SLURM.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from pipeline.errors import PipelineError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, exit 2 (argparse's default prints the whole usage block first).
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from pipeline import check_shards, commands, doctor, export, predict, report
    from pipeline.convert import add_parser as add_convert
    from pipeline.data.synthetic import add_parser as add_synthetic

    parser = _Parser(prog="pipeline", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", parser_class=_Parser)
    commands.add_train_parser(subparsers)
    commands.add_evaluate_parser(subparsers)
    commands.add_sweep_parser(subparsers)
    commands.add_cv_parser(subparsers)
    add_synthetic(subparsers)
    add_convert(subparsers)
    report.add_parser(subparsers)
    predict.add_parser(subparsers)
    export.add_parser(subparsers)
    doctor.add_parser(subparsers)
    check_shards.add_parser(subparsers)
    return parser


def one_line(exc: PipelineError) -> str:
    """The user's message, also when a DataLoader worker re-raised it with its traceback."""
    message = str(exc).strip()
    if "Original Traceback" in message:  # "Caught X in DataLoader worker ...", then the trace
        message = message.splitlines()[-1].split(": ", 1)[-1]
    return message


def main(argv: list[str] | None = None) -> int:
    from pipeline.commands import agent_args_as_overrides

    parser = build_parser()
    args = parser.parse_args(agent_args_as_overrides(sys.argv[1:] if argv is None else argv))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
        return code
    except BrokenPipeError:
        return _closed_stdout()
    except PipelineError as exc:
        from pipeline.distributed import detect_env

        # Under torchrun/srun every rank may print the same error: say whose line it is.
        env = detect_env()
        rank = f"[rank {env.rank}] " if env.distributed else ""
        print(f"{rank}pipeline {args.command}: error: {one_line(exc)}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"pipeline {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        logging.getLogger("pipeline").exception("pipeline %s failed", args.command)
        return 1


def _closed_stdout() -> int:
    """The reader of our stdout went away (`| head`): exit quietly, as Unix tools do.

    Python's documented recipe: point stdout at /dev/null, so the flush at exit cannot
    fail a second time. 141 is what a shell reports for a tool ended by SIGPIPE.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
