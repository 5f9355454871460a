"""``prob-attention train``: MAP training of SmallGPT with the embedding prior (Section 7.1).

Examples::

    prob-attention train --preset quick                       # about two minutes on a laptop CPU
    prob-attention train --lambda-m 0.02 --run-dir runs/margin
    prob-attention train --run-dir runs/margin --resume       # continue from the last checkpoint
    torchrun --nproc_per_node 4 -m experiments.train          # data parallel (DDP)

The run directory receives ``config.json``, ``history.json`` (per-epoch metrics), ``curves.png`` and
``checkpoint/`` (safetensors weights, JSON config and state, written atomically each epoch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from inference.map import PRESETS, MAPTrainer, PriorConfig, RunConfig, TrainConfig, TrainingDiverged
from prob_attention.gpt import GPTConfig

from .flags import add_dataclass_flags, set_fields
from .plots import plot_epoch_curves

HELP = "train SmallGPT with the embedding prior by MAP through Pyro (Section 7.1)"


def add_config_arguments(parser: argparse.ArgumentParser, skip_train: tuple[str, ...] = ()) -> None:
    """``--preset`` and one flag per field of the run's config sections (those in ``skip_train`` left out)."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="named sizes (quick: ~2 min on CPU; tiny: seconds); flags override it")
    add_dataclass_flags(parser, GPTConfig, "model (SmallGPT)", skip=("vocab_size",))
    add_dataclass_flags(parser, PriorConfig, "embedding prior", prefix="prior_")
    add_dataclass_flags(parser, TrainConfig, "training", skip=skip_train)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="output directory (default runs/<preset>-lambda<lambda_m>)")
    parser.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    run_dir = args.run_dir or Path("runs") / f"{args.preset}-lambda{config.train.lambda_m:g}"
    trainer = MAPTrainer(config, run_dir, progress=not args.no_progress)
    try:
        trainer.fit(resume=args.resume)
    except TrainingDiverged as err:
        print(f"training diverged: {err}", file=sys.stderr)
        return 1
    finally:
        if trainer.rank == 0 and trainer.history:
            plot_epoch_curves({"": trainer.history}, run_dir / "curves.png", title=f"{trainer.data.corpus_name}, "
                                 f"lambda_m = {config.train.lambda_m:g}")
    if trainer.rank == 0:
        print(f"run saved in {run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prob-attention train", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
