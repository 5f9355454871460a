"""The ``prob-attention`` console command: one subcommand per job, each a module of ``experiments``.

A subcommand module defines ``HELP`` (one line), ``add_arguments(parser)`` (its flags, mapped onto a
config dataclass) and ``run(args)``. The CLI stays thin: it only dispatches.

Example::

    prob-attention train --preset quick
    prob-attention --help
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

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
}
"""Subcommand name -> module implementing it."""


def _load(name: str) -> ModuleType:
    return importlib.import_module(COMMANDS[name])


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="prob-attention",
        description="Causal self-attention as a generative model over embeddings (arXiv 2602.22271).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = _load(name)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand; returns the process exit status."""
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
