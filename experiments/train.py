"""``prob-attention train``: MAP training of SmallGPT with the embedding prior (Section 7.1).

Examples::

    prob-attention train --preset quick                       # about two minutes on a laptop CPU
    prob-attention train --lambda-m 0.02 --run-dir runs/margin
    prob-attention train --run-dir runs/margin --resume       # continue from the last checkpoint
    prob-attention train --run-dir runs/margin --overwrite    # replace the run there
    torchrun --nproc_per_node 4 -m experiments.train          # data parallel (DDP)

The run directory receives ``config.json``, ``history.json`` (per-epoch metrics), ``curves.png`` and
``checkpoint/`` (safetensors weights, JSON config and state, hashes, written atomically each epoch). It is
locked while the run trains, and a directory that already holds a run is refused unless ``--resume`` or
``--overwrite`` says what to do with it. Ctrl-C stops the run with exit status 130; ``--resume`` continues it
from its last checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from inference.map import PRESETS, MAPTrainer, PriorConfig, RunConfig, TrainConfig
from inference.map.trainer import CURVES_FILE
from prob_attention.gpt import GPTConfig

from .flags import add_dataclass_flags, add_progress_flag, nonempty_path, set_fields
from .plots import plot_epoch_curves
from .runs import RUNS_DIR, default_run_dir

HELP = "train SmallGPT with the embedding prior by MAP through Pyro (Section 7.1)"


def add_config_arguments(parser: argparse.ArgumentParser, skip_train: tuple[str, ...] = ()) -> None:
    """``--preset`` and one flag per field of the run's config sections (those in ``skip_train`` left out)."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="named sizes (quick: ~2 min on CPU; tiny: seconds); flags override it")
    add_dataclass_flags(parser, GPTConfig, "model (SmallGPT)", skip=("vocab_size",))
    add_dataclass_flags(parser, PriorConfig, "embedding prior", prefix="prior_")
    add_dataclass_flags(parser, TrainConfig, "training", skip=skip_train)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=nonempty_path, default=None,
                        help=f"output directory (default {RUNS_DIR}/<preset>-lambda<lambda_m>)")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    existing.add_argument("--overwrite", action="store_true", help="replace the run the run directory holds")
    parser.add_argument("--fresh-optimizer", action="store_true",
                        help="resume with a new optimiser and learning-rate schedule (for a checkpoint without "
                             "optimizer.pt)")
    add_progress_flag(parser)
    add_config_arguments(parser)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The preset with the flags given on the command line on top."""
    return RunConfig.preset(
        args.preset,
        gpt=set_fields(args, GPTConfig),
        prior=set_fields(args, PriorConfig, "prior_"),
        train=set_fields(args, TrainConfig),
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.fresh_optimizer and not args.resume:
        raise ValueError("--fresh-optimizer only applies with --resume")
    run_dir = args.run_dir or default_run_dir(RUNS_DIR, args.preset, config.train.lambda_m)
    trainer = MAPTrainer(config, run_dir, progress=not args.no_progress)
    try:
        trainer.fit(resume=args.resume, overwrite=args.overwrite, fresh_optimizer=args.fresh_optimizer)
    except BaseException as err:
        with contextlib.suppress(OSError):  # the curves so far, if the disk takes them: the error is the news
            plot_curves(trainer, run_dir)
        if isinstance(err, KeyboardInterrupt):
            raise KeyboardInterrupt("resume with --resume") from err
        raise
    plot_curves(trainer, run_dir)
    if trainer.rank == 0:
        print(f"run saved in {run_dir}")
    return 0


def plot_curves(trainer: MAPTrainer, run_dir: Path) -> None:
    """``curves.png`` of the epochs ``trainer`` has done (rank 0; nothing before the first epoch)."""
    if trainer.rank == 0 and trainer.history:
        plot_epoch_curves({"": trainer.history}, run_dir / CURVES_FILE, title=f"{trainer.data.corpus_name}, "
                             f"lambda_m = {trainer.config.train.lambda_m:g}")


def main(argv: list[str] | None = None) -> int:
    """``prob-attention train`` with ``argv`` (for ``torchrun -m experiments.train``)."""
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
