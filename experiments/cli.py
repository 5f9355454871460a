"""The ``prob-attention`` console command: one subcommand per job, each a module of ``experiments``.

A subcommand module defines ``HELP`` (one line), ``add_arguments(parser)`` (its flags, mapped onto a
config dataclass) and ``run(args)``. The CLI stays thin: it dispatches, and turns a user's error (a bad
value, a missing or damaged file, a run directory in use, a diverged run) into one line on stderr and a
non-zero exit status (130 after Ctrl-C); ``--debug`` shows the Python traceback instead.

Example::

    prob-attention train --preset quick
    prob-attention --debug decode --run-dir runs/quick-lambda0.02 --prompt "The "
    prob-attention --help
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType
from typing import NoReturn

from inference.checkpoint import DirectoryLockedError
from inference.map import TrainingDiverged
from inference.smc import ParticleCollapse

COMMANDS: dict[str, str] = {
    "train": "experiments.train",
    "ce-vs-margin": "experiments.ce_vs_margin",
    "noise-robustness": "experiments.noise_robustness",
    "regularization-path": "experiments.regularization_path",
    "support-tokens": "experiments.support_tokens",
    "reproduce": "experiments.reproduce",
    "results-page": "experiments.results_page",
    "scalar-geometry": "experiments.scalar_geometry",
    "decode": "experiments.decode",
    "decoding-study": "experiments.decoding_study",
    "robustness-study": "experiments.robustness_study",
    "uncertainty-study": "experiments.uncertainty_study",
}
"""Subcommand name -> module implementing it."""

USER_ERRORS = (ValueError, OSError, DirectoryLockedError, ParticleCollapse)
"""What a command reports in one line: bad values and configs (``ValueError``, which includes checkpoint
mismatches and corruption), missing or unwritable files, a run directory in use, a posterior that collapsed."""

EXIT_USAGE = 2
EXIT_DIVERGED = 1
EXIT_INTERRUPTED = 130
"""Ctrl-C, as a shell reports a process ended by SIGINT (128 + 2)."""


class UsageError(ValueError):
    """A command line its parser rejects; ``str()`` is what argparse would print (usage, then the reason)."""

    def __init__(self, usage: str, prog: str, reason: str) -> None:
        super().__init__(f"{usage}{prog}: error: {reason}")
        self.prog, self.reason = prog, reason


class _Parser(argparse.ArgumentParser):
    """An argument parser that raises :class:`UsageError` instead of exiting, so that a command line can be
    checked without running it (``reproduce`` checks all its steps' before the first one runs)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.format_usage(), self.prog, message)


def _load(name: str) -> ModuleType:
    return importlib.import_module(COMMANDS[name])


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = _Parser(
        prog="prob-attention",
        description="Causal self-attention as a generative model over embeddings (arXiv 2602.22271).",
    )
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = _load(name)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """``argv`` (the subcommand first) parsed and checked by its command's own parser.

    Raises:
        UsageError: an unknown command or flag, a missing or invalid value.
    """
    return build_parser().parse_args(argv)


def run_parsed(args: argparse.Namespace) -> int:
    """Run a parsed command; returns its exit status, a user's error or a Ctrl-C reported in one line on stderr
    (re-raised with ``args.debug``)."""
    try:
        return int(args._run(args) or 0)
    except TrainingDiverged as err:
        if args.debug:
            raise
        print(f"prob-attention {args.command}: training diverged: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"prob-attention {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as err:  # a command may say how to continue: KeyboardInterrupt("resume with --resume")
        if args.debug:
            raise
        print(f"prob-attention {args.command}: interrupted" + (f"; {err}" if str(err) else ""), file=sys.stderr)
        return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand; returns the process exit status."""
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        print(err, file=sys.stderr)
        return EXIT_USAGE
    return run_parsed(args)


if __name__ == "__main__":
    sys.exit(main())
