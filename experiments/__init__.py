"""Experiments: the paper's figures and tables, and studies beyond it, one command each.

Every experiment is a module with ``add_arguments(parser)`` and ``run(args)``, registered in
:mod:`experiments.cli`, and writes its numbers, figures and a markdown table under ``results/``.
"""
