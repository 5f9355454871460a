"""``prob-attention reproduce``: every experiment of the paper, in order, into one results folder.

The steps are the subcommands themselves, called with the flags below, so each can be rerun alone:

1. ``scalar-geometry`` (Figures 3.2, 3.3),
2. ``ce-vs-margin`` (Table 7.2, Figure 7.4) — trains the CE-only and Margin-only runs,
3. ``noise-robustness`` on those two runs (Figure 7.5), with absolute noise and with ``--relative`` noise
   (scaled to each model's embedding RMS) into ``noise_robustness_relative``,
4. ``regularization-path`` (Table 1, Figure 7.6) — trains one run per ``lambda_m`` (the two above are reused),
5. ``support-tokens`` on the two runs.

Every step's command line goes through that command's own parser before the first step runs, so a
flag a command no longer knows stops ``reproduce`` at once, not hours in. Trained runs go to
``--runs-dir`` and are reused by later invocations (a finished run is never retrained). ``--quick`` is
a smoke run of a few minutes on CPU: the ``tiny`` model, a few windows, three values of ``lambda_m``;
its numbers only show the pipeline works, so they go to their own folder (``runs/reproduce-quick``),
never over the committed full-size results in ``results/``.

Example::

    prob-attention reproduce --quick
    prob-attention reproduce                      # the paper's settings (hours on CPU; use a GPU)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import UsageError, parse, run_parsed
from .flags import add_progress_flag, nonnegative_float, positive_float
from .report import provenance, write_json
from .runs import RUNS_DIR, Stopwatch, default_run_dir

HELP = "run every reproduction (scalar geometry, CE vs margin, noise, regularization path, support tokens)"

RESULTS_DIR = Path("results")
"""Where the full reproduction writes (the committed results the results page reads)."""

QUICK_RESULTS_DIR = RUNS_DIR / "reproduce-quick"
"""Where ``--quick`` writes by default: scratch space, never the committed ``results/``."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a CPU smoke run of a few minutes (tiny model, few windows)")
    parser.add_argument("--preset", default=None, help="training preset (default: default; tiny with --quick)")
    parser.add_argument("--lambda-m", type=nonnegative_float, default=0.02, help="the Margin-only weight")
    parser.add_argument("--sigma-max", type=positive_float, default=None,
                        help="largest noise level of the robustness sweep (default: noise-robustness's)")
    parser.add_argument("--path-sigma", type=positive_float, default=None,
                        help="noise level of the regularization path (default: regularization-path's)")
    parser.add_argument("--runs-dir", type=Path, default=RUNS_DIR)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results folder (default {RESULTS_DIR}; {QUICK_RESULTS_DIR} with --quick)")
    add_progress_flag(parser)


def out_dir(args: argparse.Namespace) -> Path:
    """The results folder: ``--out``, else ``results/`` (full) or ``runs/reproduce-quick`` (``--quick``)."""
    return args.out or (QUICK_RESULTS_DIR if args.quick else RESULTS_DIR)


def steps(args: argparse.Namespace) -> list[list[str]]:
    """The subcommand invocations, in order."""
    preset = args.preset or ("tiny" if args.quick else "default")
    out, runs = out_dir(args), args.runs_dir
    pair = [str(default_run_dir(runs, preset, 0.0)), str(default_run_dir(runs, preset, args.lambda_m))]
    windows = ["--max-windows", "32"] if args.quick else []
    progress = ["--no-progress"] if args.no_progress else []
    draws = ["--draws", "2"] if args.quick else []
    noise = (["--sigma-max", str(args.sigma_max)] if args.sigma_max is not None else []) + draws
    path = (["--sigma", str(args.path_sigma)] if args.path_sigma is not None else []) + (
        ["--lambdas", "0", f"{args.lambda_m:g}", "0.2", "--draws", "2"] if args.quick else [])
    return [
        ["scalar-geometry", "--out", str(out / "scalar_geometry")] + (["--quick"] if args.quick else []),
        ["ce-vs-margin", "--preset", preset, "--lambda-m", f"{args.lambda_m:g}", "--runs-dir", str(runs),
         "--out", str(out / "ce_vs_margin")] + progress,
        ["noise-robustness", "--runs", *pair, "--out", str(out / "noise_robustness")] + noise + windows,
        ["noise-robustness", "--relative", "--runs", *pair, "--out", str(out / "noise_robustness_relative")]
        + draws + windows,
        ["regularization-path", "--preset", preset, "--runs-dir", str(runs), "--out", str(out / "regularization_path")]
        + path + windows + progress,
        ["support-tokens", "--runs", *pair, "--out", str(out / "support_tokens")]
        + (["--max-windows", "32", "--window", "0"] if args.quick else []),
    ]


def plan(args: argparse.Namespace) -> list[tuple[list[str], argparse.Namespace]]:
    """Each step's command line and its arguments, parsed by the step's own command parser.

    Raises:
        ValueError: a step's command line is not valid for its command (a renamed or removed flag, a bad value).
    """
    planned = []
    for argv in steps(args):
        try:
            step_args = parse(argv)
        except UsageError as err:
            raise ValueError(f"step `{' '.join(argv)}` is not a valid command line: {err.prog}: {err.reason}") from err
        step_args.debug = args.debug
        planned.append((argv, step_args))
    return planned


def run(args: argparse.Namespace) -> int:
    planned = plan(args)  # every step checked before the first one runs
    out = out_dir(args)
    clock = Stopwatch()
    done = []
    for argv, step_args in planned:
        print(f"\n=== prob-attention {' '.join(argv)}", flush=True)
        step = Stopwatch()
        status = run_parsed(step_args)
        done.append({"argv": argv, "status": status, "seconds": round(step.seconds, 1)})
        if status != 0:
            print(f"step {argv[0]} failed with status {status}; stopping", file=sys.stderr)
            break
    write_json(out / "reproduce.json", {"steps": done, "provenance": provenance("see each step", clock.seconds)})
    return max(step["status"] for step in done)
