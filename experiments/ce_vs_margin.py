"""``prob-attention ce-vs-margin``: Table 7.2 and Figure 7.4, CE-only against Margin-only training.

Two runs of the same configuration, seed and initialisation, differing only in ``lambda_m`` (0 and the
margin weight, 0.02 in the paper). Each run is trained once into its run directory (or reused when it
has finished there; resumed when it stopped part-way). Writes ``results.json``, ``table.md`` and
``curves.png`` (train and validation BPC per epoch) into ``--out``.

Example::

    prob-attention ce-vs-margin --preset quick --out results/ce_vs_margin
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from inference.map import RunConfig, TrainedModel, sequence_margin_of

from .flags import add_out_flag, add_progress_flag, nonnegative_float
from .plots import plot_epoch_curves
from .report import markdown_table, provenance, write_json, write_markdown
from .runs import RUNS_DIR, Stopwatch, default_run_dir, ensure_trained, training_device
from .train import add_config_arguments, config_from_args

HELP = "Table 7.2 / Figure 7.4: CE-only vs Margin-only training curves and final BPC"

PAPER = {"CE-only": {"train_bpc": 2.075, "val_bpc": 2.122}, "Margin-only": {"train_bpc": 2.118, "val_bpc": 2.158}}
"""Table 7.2 of the paper (real WikiText-2 training split, validation split)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lambda-m", type=nonnegative_float, default=0.02,
                        help="margin weight of the Margin-only run (paper: 0.02)")
    parser.add_argument("--runs-dir", type=Path, default=RUNS_DIR,
                        help="where the two runs live (<runs-dir>/<preset>-lambda0 and -lambda<lambda_m>)")
    parser.add_argument("--ce-run", type=Path, default=None, help="explicit run directory of the CE-only run")
    parser.add_argument("--margin-run", type=Path, default=None, help="explicit run directory of the Margin-only run")
    add_out_flag(parser, Path("results/ce_vs_margin"))
    add_progress_flag(parser)
    add_config_arguments(parser, skip_train=("lambda_m",))


def run_dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    """The CE-only and Margin-only run directories (named after the preset unless given)."""
    ce = args.ce_run or default_run_dir(args.runs_dir, args.preset, 0.0)
    margin = args.margin_run or default_run_dir(args.runs_dir, args.preset, args.lambda_m)
    return ce, margin


def train_pair(args: argparse.Namespace) -> dict[str, TrainedModel]:
    """The two trained models, keyed ``CE-only`` and ``Margin-only``."""
    base: RunConfig = config_from_args(args)
    ce_dir, margin_dir = run_dirs(args)
    progress = not args.no_progress
    return {
        "CE-only": ensure_trained(replace(base, train=replace(base.train, lambda_m=0.0)), ce_dir, progress),
        "Margin-only": ensure_trained(replace(base, train=replace(base.train, lambda_m=args.lambda_m)), margin_dir,
                                      progress),
    }


def summarize(models: dict[str, TrainedModel]) -> dict[str, Any]:
    """Final train / validation / test BPC of each model, the clean-BPC cost of the margin, and the paper's."""
    rows = {}
    for name, m in models.items():
        last = m.history[-1]
        rows[name] = {
            "train_bpc": last["train_bpc"], "val_bpc": last["val_bpc"], "test_bpc": last.get("test_bpc"),
            "val_barrier": last["val_barrier"], "val_seq_margin": sequence_margin_of(last),
            "epochs": last["epoch"], "train_seconds": sum(r["seconds"] for r in m.history),
            "lambda_m": m.config.train.lambda_m,
        }
    ce, margin = rows["CE-only"], rows["Margin-only"]
    return {
        "models": rows,
        "val_cost_percent": 100 * (margin["val_bpc"] / ce["val_bpc"] - 1),
        "paper": PAPER,
        "paper_val_cost_percent": 100 * (PAPER["Margin-only"]["val_bpc"] / PAPER["CE-only"]["val_bpc"] - 1),
        "corpus": next(iter(models.values())).corpus,
        "config": next(iter(models.values())).config.to_dict(),
    }


def run(args: argparse.Namespace) -> int:
    clock = Stopwatch()
    models = train_pair(args)
    summary = summarize(models)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_epoch_curves({name: m.history for name, m in models.items()}, args.out / "curves.png",
                      title=f"{summary['corpus']}: CE-only vs Margin-only (lambda_m = {args.lambda_m:g})")
    meta = provenance(training_device(models["CE-only"]), clock.seconds,
                      seed=summary["config"]["train"]["seed"], corpus=summary["corpus"],
                      runs=", ".join(str(d) for d in run_dirs(args)),
                      training_seconds=", ".join(f"{k} {v['train_seconds']:.0f}" for k, v in summary["models"].items()))
    write_json(args.out / "results.json", {**summary, "provenance": meta})
    rows = [
        [name, r["epochs"], r["train_bpc"], r["val_bpc"], r["test_bpc"], r["val_barrier"],
         PAPER[name]["train_bpc"], PAPER[name]["val_bpc"]]
        for name, r in summary["models"].items()
    ]
    table = markdown_table(
        ["mode", "epochs", "train BPC", "val BPC", "test BPC", "val mean log det J_tt", "paper train", "paper val"],
        rows)
    note = (f"Clean validation cost of the margin: {summary['val_cost_percent']:+.2f}% "
            f"(paper: {summary['paper_val_cost_percent']:+.2f}%). Our corpus is `{summary['corpus']}`; the paper's "
            f"numbers are on the real WikiText-2 split, so absolute BPC are not comparable, relative ones are.")
    write_markdown(args.out / "table.md", "CE-only vs Margin-only (Table 7.2, Figure 7.4)", [table, note, "![curves](curves.png)"],
                   meta)
    print(table)
    print(note)
    print(f"written to {args.out}")
    return 0

