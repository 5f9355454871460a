"""Benchmarks of the embedding prior's cost: the margin barrier alone (:mod:`benchmarks.barrier`)
and a full MAP training step with and without the prior (:mod:`benchmarks.train_step`).

Run from the repository root, e.g. ``python -m benchmarks.barrier --help``; see ``benchmarks/README.md``.
"""
