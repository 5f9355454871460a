"""``prob-attention decode``: generate text from a trained run with per-character posterior uncertainty (Section 9).

Examples::

    prob-attention decode --run-dir runs/margin --prompt "The " --length 40
    prob-attention decode --run-dir runs/margin --prompt "In 1990 " --method svi --particles 64 --mi-threshold 0.02

Each generated character is printed with its posterior-predictive probability, the predictive entropy and
the mutual information between the character and the embedding trajectory (nats), the prior's log-det
margin at the position and, for SMC, the effective sample size. Characters whose mutual information
exceeds ``--mi-threshold`` are marked ``?``. ``sigma`` is estimated by empirical Bayes on training windows
unless ``--sigma`` is given (:mod:`inference.trajectory`).
"""

from __future__ import annotations

import argparse

import torch

from inference.decoding import DecodeConfig, generate
from inference.map import TrainedModel, load_trained
from inference.posterior import SVIConfig
from inference.smc import ParticleCollapse
from inference.trajectory import TrajectoryModel
from prob_attention.corpus import CharVocab, load_corpus, random_windows

from .flags import add_device_flag, add_seed_flag, finite_float, float_in, nonempty_path, positive_float, positive_int
from .runs import resolve_device

HELP = "generate text with posterior-predictive uncertainty per character (SMC or SVI over the embeddings)"

SIGMA_WINDOWS = 64
"""Training windows the empirical-Bayes ``sigma`` is estimated from."""

SIGMA_RANGE = (1e-30, 1e6)
"""The ``--sigma`` accepted: far beyond any embedding scale on either side, and a scale whose square the float32
prior still holds (past it the prior's terms are NaN)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=nonempty_path, required=True, help="a trained run (prob-attention train)")
    parser.add_argument("--prompt", required=True, help="the text to continue (characters of the vocabulary)")
    parser.add_argument("--length", type=positive_int, default=40, help="characters to generate (default 40)")
    parser.add_argument("--particles", type=positive_int, default=32, help="SMC particles / SVI samples (default 32)")
    parser.add_argument("--method", choices=["smc", "svi"], default="smc", help="posterior method (default smc)")
    parser.add_argument("--mi-threshold", type=finite_float, default=0.05,
                        help="mark characters whose mutual information (nats) exceeds this (default 0.05)")
    add_trajectory_flags(parser)
    parser.add_argument("--svi-steps", type=positive_int, default=100,
                        help="SVI steps per generated character (default 100)")
    parser.add_argument("--sample", action="store_true", help="sample from the predictive instead of taking its mode")
    add_seed_flag(parser)
    add_device_flag(parser)


def add_trajectory_flags(parser: argparse.ArgumentParser) -> None:
    """``--sigma`` and ``--tau-ratio``: the trajectory model's scales (:func:`trajectory_model`)."""
    parser.add_argument("--sigma", type=float_in(*SIGMA_RANGE), default=None,
                        help=f"latent noise scale in [{SIGMA_RANGE[0]:g}, {SIGMA_RANGE[1]:g}] "
                             "(default: empirical Bayes)")
    parser.add_argument("--tau-ratio", type=positive_float, default=0.5,
                        help="emission scale tau / sigma (default 0.5)")


def encoded_splits(trained: TrainedModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The run's corpus (as configured), train / validation / test encoded with the run's own vocabulary."""
    tc = trained.config.train
    corpus = load_corpus(tc.corpus, seed=tc.corpus_seed)
    train, val, test = (corpus.encode_split(trained.vocab, split) for split in ("train", "val", "test"))
    return train, val, test


def trajectory_model(trained: TrainedModel, sigma: float | None, tau_ratio: float, seed: int = 0,
                     train: torch.Tensor | None = None) -> TrajectoryModel:
    """The run's trajectory model, with its barrier floor; without ``sigma``, empirical Bayes on
    :data:`SIGMA_WINDOWS` windows of the encoded training split ``train`` (loaded when not given).

    Raises ``ValueError`` for a run whose prior modelled layer-normalised embeddings (``input_norm``): the
    trajectory model's prior acts on the embeddings themselves.
    """
    if trained.config.prior.input_norm:
        raise ValueError("posterior decoding needs a prior over the embeddings themselves; this run's prior "
                         "modelled layer-normalised embeddings (input_norm)")
    reference = None
    if sigma is None:
        train = encoded_splits(trained)[0] if train is None else train
        generator = torch.Generator().manual_seed(seed)
        reference = random_windows(train, SIGMA_WINDOWS, trained.gpt_config.block_size, generator)[0]
    return TrajectoryModel.from_trained(trained.gpt, trained.transform, reference, sigma, tau_ratio,
                                        barrier_floor=trained.config.prior.barrier_floor)


def run(args: argparse.Namespace) -> int:
    if not args.prompt:
        raise ValueError("the prompt is empty: give at least one character")
    trained = load_trained(args.run_dir, map_location=resolve_device(args.device))
    strict = CharVocab(trained.vocab.chars, on_unknown="error")  # unknown characters are an error, not UNK
    prompt = strict.encode(args.prompt).to(trained.transform.w_k.device)
    model = trajectory_model(trained, args.sigma, args.tau_ratio, args.seed)
    config = DecodeConfig(args.method, args.particles, greedy=not args.sample, seed=args.seed,
                          svi=SVIConfig(steps=args.svi_steps, seed=args.seed))
    try:
        generated = generate(model, prompt, args.length, config)
    except ParticleCollapse as err:
        raise ValueError(f"{err}: the posterior collapsed (sigma {model.sigma:.3g}); a larger --sigma or more "
                         "--particles may help") from err
    source = "given" if args.sigma is not None else f"empirical Bayes, {SIGMA_WINDOWS} training windows"
    print(f"{args.method}, {args.particles} {'particles' if args.method == 'smc' else 'samples'}; "
          f"sigma {model.sigma:.4g} ({source}), tau {model.tau:.4g}; entropies in nats")
    print(f"{'pos':>4} {'char':>6} {'p':>6} {'entropy':>8} {'MI':>8} {'margin':>9} {'ESS':>6}")
    text = []
    for i, step in enumerate(generated):
        s, char = step.signals, trained.vocab.decode([step.token])
        flag = "?" if s.mutual_information > args.mi_threshold else ""
        ess = f"{s.ess:6.1f}" if s.ess is not None else f"{'-':>6}"
        print(f"{len(args.prompt) + i:>4} {char!r:>6} {float(s.probs[step.token]):6.3f} {s.entropy:8.4f} "
              f"{s.mutual_information:8.5f} {s.margin:+9.5f} {ess} {flag}")
        text.append(char + flag)
    print(f"text: {args.prompt}{''.join(text)}")
    print(f"('?' marks characters with mutual information > {args.mi_threshold:g} nats)")
    return 0

