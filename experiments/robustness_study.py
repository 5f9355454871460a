"""``prob-attention robustness-study``: does the margin barrier make the model more robust, with controls?

Each *arm* is one training setting (same architecture, optimiser, schedule and epochs; only the named
fields differ from the default run), trained with several seeds:

- ``ce``: cross-entropy only, the reference;
- ``margin-free-*``: the paper's margin-only loss with free coupling (our reproduction's runs), which ends
  in the negative-coupling, dispersion-promoting regime;
- ``margin-positive-*``: the paper's regime, positive coupling (``A = W_k^T W_k >= 0``, every
  ``log det J_tt <= 0``), kept from its trivial optimum ``A -> 0`` either by a coupling of fixed norm or by
  the full prior density (Gaussian residual, learned sigma); ``margin-positive-full-norm0.001-*`` is its
  ablation, the same density with the coupling held near zero (uniform attention, ``log det J_tt ~ 0``): what
  the Gaussian residual does without the barrier, and it is compared directly with the arm it ablates;
- ``margin-layernorm-*``: the margin barrier on layer-normalised embeddings, which growing the embeddings
  cannot raise (a scale-free barrier);
- ``noise-*`` and ``jacobian-*``: the peers, Gaussian noise injection into the decoded embeddings and
  Jacobian regularisation of the logits (Hoffman et al. 2019), at strengths tuned on validation to the
  clean cost of the margin model they are compared with (``Arm.matched_to``); where both are in ``--arms``,
  each peer is also compared directly with its margin arm, and the table says whether the costs match.

A user choosing between the settings that beat CE-only also wants them against each other: the pairs in
``--versus`` (by default :data:`HEAD_TO_HEAD`) are compared directly, the first arm against the second, in
the same way.

Every model is scored on whole validation and test splits, clean and under three perturbation families
(:mod:`experiments.perturbations`): absolute embedding noise, noise scaled to the model's embedding RMS,
and character substitutions, all paired across models. Each arm is compared with CE-only by a paired
bootstrap over seeds and windows (:mod:`experiments.intervals`); an arm with fewer than three finished
seeds is a screen, listed apart from the final table with point estimates and no verdict.

Robustness scored as the BPC of perturbed text rewards a less confident model, and CE-only is overconfident.
So every model is also scored with its confidence controlled (:mod:`experiments.calibrated_scores`): at a
temperature fitted on clean validation text, and CE-only also at the temperature that matches each arm's clean
validation BPC, on the test split's conditions, two text shifts no setting was tuned on (case flips and
deletions) and an out-of-domain English text (:mod:`experiments.out_of_domain`). Each arm is compared with
CE-only calibrated, at matched temperature and raw (:mod:`experiments.calibrated_comparisons`), and the
recommendation (the ``calibrated`` part of ``summary.json``) names, per family, the setting that beats a
temperature there, or says that none does. Label smoothing is the trained confidence peer.

The study resumes: training checkpoints every epoch, finished runs are reused (also committed runs under
``--reuse`` whose configuration matches exactly), and each model's scores are cached beside the results.
Run it once per arm and seed to spread the work (``--arms``, ``--seeds``), two processes at a time on two
cores; ``--no-train`` scores what is finished and lists the rest.

Example::

    prob-attention robustness-study --arms ce noise-0.02 --seeds 0 1 2
    prob-attention robustness-study --no-train
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from inference.checkpoint import find_checkpoint
from inference.map import CHECKPOINT_DIR, PRESETS, RunConfig, TrainedModel, device_name, load_trained
from prob_attention.corpus import window_batches

from .calibrated_comparisons import (
    calibration_table,
    compare_calibrated,
    model_calibration,
    plot_calibrated,
    recommendation,
    recommendation_table,
    verdict_table,
)
from .calibrated_scores import score_calibrated
from .evaluation import NOISE_SEED, embedding_rms
from .flags import add_device_flag, add_out_flag, add_progress_flag, add_seed_flag, nonnegative_int, positive_int
from .intervals import compare_levels
from .out_of_domain import OUT_OF_DOMAIN
from .perturbations import Perturbation, logit_jacobian_norm, window_bpc
from .plots import save
from .report import markdown_table, provenance, read_sealed_json, write_json, write_markdown, write_sealed_json
from .runs import Stopwatch, ensure_trained, find_finished_run, is_finished, resolve_device, split_windows

HELP = "robustness of the margin barrier against CE-only and peers, with seeds, controls and paired intervals"

MIN_SEEDS = 3
"""Seeds an arm needs (and CE-only with it) before it gets a verdict."""

MATCH_TOLERANCE_PERCENT = 0.5
"""A peer is at a margin model's clean cost when their validation BPC (seed means) differ by at most this."""


@dataclass(frozen=True)
class Arm:
    """One training setting: a method at a strength, as overrides of the default run's config."""

    name: str
    method: str
    strength: float
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    matched_to: str | None = None
    """For a peer: the margin arm whose clean validation BPC its strength is tuned to (within
    :data:`MATCH_TOLERANCE_PERCENT`), and with which it is compared directly. For the ablation: the arm it
    ablates, compared directly in the same way (its cost is checked, not tuned)."""
    screened_on: tuple[int, ...] | None = None
    """For a screen, kept out of the final table on purpose: the only seeds the study trains and expects of it.
    ``None`` for an arm of the final table, which needs every seed the study is run with."""

    def train_flags(self) -> str:
        """The ``prob-attention train`` flags that make this arm's run from the default one."""
        flags = []
        for section in ("prior", "train"):
            for name, value in self.overrides.get(section, {}).items():
                flag = "--" + ("prior-" if section == "prior" else "") + name.replace("_", "-")
                flags.append(flag if value is True else f"{flag} {value:g}" if isinstance(value, float)
                             else f"{flag} {value}")
        return " ".join(flags)

    def config(self, seed: int, preset: str = "default", epochs: int | None = None) -> RunConfig:
        """The run of this arm with ``seed``: the preset (the default 20-epoch run) with the arm's overrides."""
        train = {**self.overrides.get("train", {}), "seed": seed}
        if epochs is not None:
            train["epochs"] = epochs
        return RunConfig.preset(preset, prior=self.overrides.get("prior", {}), train=train)


def _margin(name: str, method: str, lambda_m: float, matched_to: str | None = None,
            screened_on: tuple[int, ...] | None = None, **prior: Any) -> Arm:
    return Arm(name, method, lambda_m, {"prior": prior, "train": {"lambda_m": lambda_m}}, matched_to=matched_to,
               screened_on=screened_on)


ARMS: dict[str, Arm] = {arm.name: arm for arm in [
    Arm("ce", "CE-only", 0.0),
    _margin("margin-free-lambda0.02", "margin, free coupling", 0.02),
    _margin("margin-free-lambda0.05", "margin, free coupling", 0.05),
    _margin("margin-positive-norm16-lambda0.05", "margin, positive coupling, |W_k| = 16", 0.05,
            screened_on=(0,), coupling="barrier", coupling_norm=16.0),
    _margin("margin-positive-full-lambda0.05", "full prior, positive coupling, learned sigma", 0.05,
            coupling="barrier", density="full", learn_sigma=True),
    _margin("margin-positive-full-lambda0.02", "full prior, positive coupling, learned sigma", 0.02,
            screened_on=(0,), coupling="barrier", density="full", learn_sigma=True),
    _margin("margin-positive-full-lambda0.1", "full prior, positive coupling, learned sigma", 0.1,
            screened_on=(0,), coupling="barrier", density="full", learn_sigma=True),
    _margin("margin-positive-full-norm0.001-lambda0.05", "full prior, coupling held at |W_k| = 0.001 (no barrier)",
            0.05, matched_to="margin-positive-full-lambda0.05", coupling="barrier", density="full", learn_sigma=True,
            coupling_norm=1e-3),
    _margin("margin-layernorm-lambda0.05", "margin on layer-normalised embeddings", 0.05, input_norm=True),
    Arm("noise-0.02", "noise injection", 0.02, {"train": {"embed_noise": 0.02}}, matched_to="margin-free-lambda0.02"),
    Arm("noise-0.03", "noise injection", 0.03, {"train": {"embed_noise": 0.03}}, matched_to="margin-free-lambda0.05"),
    Arm("noise-0.04", "noise injection", 0.04, {"train": {"embed_noise": 0.04}},
        matched_to="margin-positive-full-lambda0.05"),
    Arm("noise-0.037", "noise injection", 0.037, {"train": {"embed_noise": 0.037}},
        matched_to="margin-positive-full-lambda0.05"),
    Arm("jacobian-1e-05", "Jacobian regularisation", 1e-5, {"train": {"jacobian_reg": 1e-5}},
        matched_to="margin-free-lambda0.02"),
    Arm("jacobian-6e-05", "Jacobian regularisation", 6e-5, {"train": {"jacobian_reg": 6e-5}},
        matched_to="margin-free-lambda0.05"),
    Arm("jacobian-1e-04", "Jacobian regularisation", 1e-4, {"train": {"jacobian_reg": 1e-4}},
        matched_to="margin-positive-full-lambda0.05"),
    Arm("label-smoothing-0.05", "label smoothing", 0.05, {"train": {"label_smoothing": 0.05}},
        matched_to="margin-positive-full-lambda0.05"),
]}
"""The arms, by name. The peers' strengths are tuned on validation to a margin arm's clean cost: noise
injection costs +1.2% at 0.02 against lambda_m = 0.05's +2.0%; growing as sigma^2 it would cost +2.6% at 0.03,
growing linearly +1.7%, so 0.03 is the first try at the match (the study reports whether it is one). It
cost +2.0%, between the two, so the full density's +3.4% needs about 0.04 (0.039 by sigma^2, 0.045 by the power
the two measured costs give). 0.04 cost +4.4% (two seeds; three give the same), 0.9% past the full density;
the cost then grows as sigma^2.65 between 0.03 and 0.04, which puts +3.4% at 0.037, the second try.
The coupling of fixed norm |W_k| = 16 is a screen on one seed: it is rejected because its barrier switches off
(it ends at -0.0001 nats per position, the model CE-only in all but name), a property of the formulation that
its one run shows, not a difference in robustness that needs seeds to resolve.
Jacobian regularisation: at CE-only's logit Jacobian norm (``val_logit_jacobian_norm`` in the summary, about 4e6
per position) its penalty lambda_J / 2 ||J||_F^2 would be 2 nats at lambda_J = 1e-6, more than the cross-entropy,
so 1e-6 was the first guess at lambda_m = 0.05's cost. The model shrinks the norm instead: at 1e-5 it ends at
about 7e3 per position, a ninth of noise injection 0.02's (a penalty of 0.035 nats), for +0.5% validation
BPC (lambda_m = 0.02's cost), so 1e-6 would match no margin arm and was stopped untrained. A cost growing
linearly in lambda_J puts lambda_m = 0.05's +2.0% at 3.6e-5 and the full density's +3.4% at 6.2e-5; one growing
as sqrt(lambda_J) (as noise injection's cost grows between linearly and quadratically in sigma, that is between
sqrt(sigma^2) and sigma^2) puts them at 1.3e-4 and 3.8e-4. 6e-5 and 1.5e-4, near the geometric means, were the
first tries at the two. 6e-5 stayed within 0.5% of 1e-5's validation BPC from epoch 12 on and cost +1.1% (seed 0
against CE-only's seed 0), well below lambda_m = 0.05's +2.0%; 1e-4 cost +4.4%, 0.7% above the full density,
and 1.5e-4, above 1e-4 throughout its first 8 epochs, was stopped there. 6e-5 is kept against lambda_m = 0.05 (a
cheaper peer has to win at less clean BPC, which only strengthens a win) and 1e-4 against the full density (the
study reports whether each matches).
Label smoothing is the confidence peer: its optimum mixes ``epsilon`` of the uniform distribution into the model's
prediction, which costs at most ``-log2(1 - epsilon)`` bits per character, 0.074 at 0.05, 3.8% of CE-only's 1.93
test BPC, and less as it also corrects CE-only's overconfidence; 0.05 is the first try at the full density's
+3.3% (the study reports whether it matches).
The full density's path is screened on one seed at lambda_m = 0.02 and 0.1 around its three-seed point at 0.05."""

HEAD_TO_HEAD: tuple[tuple[str, str], ...] = (
    ("jacobian-1e-05", "noise-0.02"),
    ("jacobian-6e-05", "noise-0.03"),
    ("jacobian-6e-05", "jacobian-1e-05"),
    ("jacobian-6e-05", "margin-positive-full-lambda0.05"),
    ("jacobian-1e-04", "jacobian-6e-05"),
    ("margin-layernorm-lambda0.05", "noise-0.03"),
    ("margin-layernorm-lambda0.05", "margin-positive-full-lambda0.05"),
    ("margin-positive-full-lambda0.05", "margin-positive-full-norm0.001-lambda0.05"),
    ("margin-positive-full-lambda0.05", "label-smoothing-0.05"),
    ("jacobian-6e-05", "label-smoothing-0.05"),
)
"""The settings a user would choose between, compared directly (first against second): the Jacobian penalty
against noise injection at about the same clean cost or more (1e-5 costs +0.1% against 0.02's +1.2%; 6e-5 +0.8%
against 0.03's +1.9%, on test against CE-only), the stronger penalties against the weaker ones, and 6e-5
against the full prior density, the best of our settings under typos; and the scale-free barrier, our costliest
setting, against noise injection and the full density, both cheaper (noise injection at 0.03 is at the free
barrier's clean cost at the same lambda_m). With confidence controlled: the full density against its ablation
(does the barrier add anything on top of the Gaussian residual?) and against label smoothing, the confidence
peer at its clean cost, and the Jacobian penalty against label smoothing."""

PERTURBATIONS: tuple[Perturbation, ...] = (
    *(Perturbation("noise", s) for s in (0.01, 0.02, 0.03, 0.04)),
    *(Perturbation("relative_noise", s) for s in (0.125, 0.25, 0.375, 0.5)),
    *(Perturbation("substitution", r) for r in (0.02, 0.05, 0.10)),
)
"""The perturbation levels: the absolute grid of ``noise-robustness`` (largest 0.04, about half the CE-only
embeddings' RMS), the same as fractions of each model's RMS, and 2, 5 and 10% typos."""

TEXT_SHIFTS: tuple[Perturbation, ...] = tuple(Perturbation(kind, r) for kind in ("case", "deletion")
                                              for r in (0.02, 0.05, 0.10))
"""Text corruptions that no setting was tuned on, scored only with the confidence controls: 2, 5 and 10% of the
letters with their case flipped, and of the characters deleted."""

TEXT_SHIFTS_AND_PERTURBATIONS: tuple[Perturbation, ...] = (*PERTURBATIONS, *TEXT_SHIFTS)

CALIBRATED_STRIDE = 2
"""The calibrated scores take every second window of each test condition and of the out-of-domain text (945 and
385 windows a model, against 1890 and 769): one draw at up to 17 temperatures for 19 conditions fits the study's
CPU budget that way, and each comparison still pairs hundreds of windows over three seeds."""

CALIBRATED_CONDITIONS: tuple[str, ...] = ("clean", *(p.label for p in TEXT_SHIFTS_AND_PERTURBATIONS), OUT_OF_DOMAIN)
"""The test conditions of the calibrated scores, and the out-of-domain text."""

FAMILIES: dict[str, str] = {"noise": "embedding noise", "relative_noise": "RMS-relative embedding noise",
                            "substitution": "typos", "case": "case flips", "deletion": "deletions",
                            OUT_OF_DOMAIN: "out-of-domain text (The Tempest)"}
"""Each perturbation family (and the out-of-domain text) as a reader would name it."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), metavar="ARM",
                        help=f"arms to train and score (default: all): {', '.join(ARMS)}")
    parser.add_argument("--seeds", type=nonnegative_int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="the run every arm modifies (default: the paper's 20-epoch configuration)")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="epochs per run (default: the preset's; fewer for a cheaper screening study, in its own "
                             "--runs-dir and --out)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/robustness_study"),
                        help="where the study's runs are trained, one folder per arm and seed")
    parser.add_argument("--reuse", type=Path, nargs="*", default=[Path("results/train")],
                        help="folders of finished runs to reuse where the configuration matches exactly")
    parser.add_argument("--no-train", dest="train", action="store_false",
                        help="train nothing: score the finished runs and list the missing ones")
    parser.add_argument("--versus", type=arm_pair, nargs="*", default=None, metavar="ARM:REFERENCE",
                        help="pairs of arms of --arms (or ce) to compare directly (default: those of "
                             + " ".join(f"{a}:{b}" for a, b in HEAD_TO_HEAD) + " whose arms are both scored)")
    parser.add_argument("--draws", type=positive_int, default=3, help="draws per perturbation level")
    parser.add_argument("--max-windows", type=positive_int, default=None,
                        help="score only the first windows of each split")
    parser.add_argument("--bootstrap", type=positive_int, default=2000, help="bootstrap draws per interval")
    add_seed_flag(parser, "seed of the perturbations, shared by all models", "--noise-seed", NOISE_SEED)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    add_device_flag(parser)
    add_progress_flag(parser)
    add_out_flag(parser, Path("results/robustness_study"))


def arm_pair(text: str) -> tuple[str, str]:
    """``ARM:REFERENCE``, two different arms of :data:`ARMS`, as a pair (the ``--versus`` type)."""
    first, colon, second = text.partition(":")
    unknown = [name for name in (first, second) if name not in ARMS]
    if not colon or unknown or first == second:
        raise argparse.ArgumentTypeError(
            f"expected ARM:REFERENCE, two different arms of {', '.join(ARMS)}; got {text!r}")
    return first, second


# ------------------------------------------------------------------------------------------ runs
def run_dir_for(arm: Arm, seed: int, args: argparse.Namespace) -> Path:
    """Where ``arm`` with ``seed`` lives: a matching committed run, else its folder under ``--runs-dir``."""
    config = arm.config(seed, args.preset, args.epochs)
    return find_finished_run(config, args.reuse) or args.runs_dir / f"{arm.name}-seed{seed}"


# -------------------------------------------------------------------------------------- scoring
def regime(trained: TrainedModel, inputs: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """Which coupling regime the model's prior ends in: the distribution of ``log det J_tt`` over the windows'
    positions ``t >= 3`` (on what the prior models) and the eigenvalue range of ``sym(A)`` per head."""
    net = trained.net
    values = []
    with torch.no_grad():
        for idx, _ in window_batches(inputs, inputs, batch_size):
            values.append(net.barrier_terms(net.gpt.embed(idx))[0][:, 2:].flatten())
        log_det = torch.cat(values).double()
        a = net.transform.coupling_matrix.double()
        eig = torch.linalg.eigvalsh((a + a.transpose(-1, -2)) / 2)  # (H, d)
        w_k_norm = float(net.transform.w_k.double().flatten(1).norm(dim=1).max())
    quantiles = torch.quantile(log_det, torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64)).tolist()
    return {
        "log_det_mean": float(log_det.mean()),
        "log_det_quantiles": dict(zip(("q01", "q50", "q99"), quantiles)),
        "log_det_positive_fraction": float((log_det > 0).double().mean()),
        "sym_a_eigenvalues": [float(eig.min()), float(eig.max())],
        "w_k_norm": w_k_norm,
    }


def regime_name(regime_stats: dict[str, Any], lambda_m: float) -> str:
    """The regime a trained prior ends in, by the sign of its mean ``log det J_tt`` (a prior that was not
    trained, ``lambda_m = 0``, has none: its weights are the initialisation's)."""
    if lambda_m == 0:
        return "prior not trained"
    mean = regime_stats["log_det_mean"]
    return "negative coupling (dispersion)" if mean > 0 else "positive coupling (barrier)" if mean < 0 else "neutral"


def score_model(run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Per-window BPC of one trained model on each split, clean and at every perturbation level (mean over
    the draws), with its embedding RMS, its regime and the sensitivity of its logits to its embeddings
    (:func:`~experiments.perturbations.logit_jacobian_norm` on the validation split)."""
    trained = load_trained(run_dir, map_location=resolve_device(args.device))
    out: dict[str, Any] = {"run": str(run_dir), "config": trained.config.to_dict(),
                           "training_device": trained.history[-1].get("device") if trained.history else None,
                           "splits": {}}
    windows = {split: split_windows(trained, split, args.max_windows) for split in ("val", "test")}
    for split, (inputs, targets) in windows.items():
        rms = embedding_rms(trained.net, inputs, args.batch_size)
        scores = {"clean": window_bpc(trained.net, inputs, targets, Perturbation("clean"),
                                      batch_size=args.batch_size).tolist()}
        for p in PERTURBATIONS:
            draws = [window_bpc(trained.net, inputs, targets, p, draw=k, seed=args.noise_seed, rms=rms,
                                batch_size=args.batch_size) for k in range(args.draws)]
            scores[p.label] = torch.stack(draws).mean(0).tolist()
        out["splits"][split] = {"windows": int(inputs.shape[0]), "embedding_rms": rms, "bpc": scores}
    out["regime"] = regime(trained, windows["val"][0], args.batch_size)
    out["logit_jacobian_norm"] = logit_jacobian_norm(trained.net, windows["val"][0], args.batch_size, args.noise_seed)
    return out


def weights_digest(run_dir: Path) -> str:
    """SHA-256 of the run's weights file: what a cache of its scores is valid for."""
    return hashlib.sha256((find_checkpoint(run_dir / CHECKPOINT_DIR) / "model.safetensors").read_bytes()).hexdigest()


def cached_scores(arm: Arm, seed: int, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`score_model`, cached under ``<out>/scores/`` as a sealed record
    (:func:`~experiments.report.write_sealed_json`): reused for the same weights and scoring settings,
    recomputed (saying why) when it is missing, stale, cut short or changed by hand."""
    settings = {"draws": args.draws, "max_windows": args.max_windows, "noise_seed": args.noise_seed,
                "batch_size": args.batch_size, "perturbations": [p.label for p in PERTURBATIONS]}
    path = args.out / "scores" / f"{arm.name}-seed{seed}.json"
    digest = weights_digest(run_dir)
    cached = read_sealed_json(path)
    if cached is not None and cached.get("settings") == settings and cached.get("weights_sha256") == digest:
        return cached
    scores = {**score_model(run_dir, args), "settings": settings, "arm": arm.name, "seed": seed,
              "weights_sha256": digest}
    write_sealed_json(path, scores)
    return scores


def cached_calibrated(arm: Arm, seed: int, run_dir: Path, args: argparse.Namespace,
                      matched_val_bpc: dict[str, float]) -> dict[str, Any]:
    """:func:`~experiments.calibrated_scores.score_calibrated`, cached under ``<out>/scores/`` beside the raw
    scores as a sealed record, like :func:`cached_scores`; the reference's record is also tied to the validation
    BPCs it matches (a new arm re-scores it)."""
    settings = {"max_windows": args.max_windows, "noise_seed": args.noise_seed, "batch_size": args.batch_size,
                "conditions": list(CALIBRATED_CONDITIONS), "window_stride": CALIBRATED_STRIDE,
                "matched_val_bpc": {k: round(v, 12) for k, v in sorted(matched_val_bpc.items())}}
    path = args.out / "scores" / f"{arm.name}-seed{seed}.calibrated.json"
    digest = weights_digest(run_dir)
    cached = read_sealed_json(path)
    if cached is not None and cached.get("settings") == settings and cached.get("weights_sha256") == digest:
        return cached
    trained = load_trained(run_dir, map_location=resolve_device(args.device))
    record = {**score_calibrated(trained, TEXT_SHIFTS_AND_PERTURBATIONS, settings["matched_val_bpc"],
                                 args.noise_seed, args.batch_size, args.max_windows, CALIBRATED_STRIDE),
              "settings": settings, "arm": arm.name, "seed": seed, "weights_sha256": digest}
    write_sealed_json(path, record)
    return record


# ---------------------------------------------------------------------------------- comparisons
def _matrix(models: list[dict[str, Any]], split: str, label: str) -> np.ndarray:
    return np.array([m["splits"][split]["bpc"][label] for m in models])  # (seeds, windows)


def _mean_bpc(models: list[dict[str, Any]], split: str, label: str) -> float:
    """The models' BPC at one level, over their seeds and windows."""
    return float(_matrix(models, split, label).mean())


def compare(arm_models: list[dict[str, Any]], reference_models: list[dict[str, Any]], split: str,
            draws: int, seed: int) -> dict[str, Any]:
    """The arm against a reference arm (CE-only, or a peer's matched margin arm) on one split, paired by seed:
    the clean cost and, per perturbation level, the difference in BPC and in relative degradation, each with
    a bootstrap interval and a verdict."""
    reference_by_seed = {m["seed"]: m for m in reference_models}
    paired = [(m, reference_by_seed[m["seed"]]) for m in arm_models if m["seed"] in reference_by_seed]
    ours, ref = [m for m, _ in paired], [c for _, c in paired]
    if len(paired) < MIN_SEEDS:
        return {"seeds": [m["seed"] for m in ours], "verdict": f"fewer than {MIN_SEEDS} paired seeds",
                **({"screening": screening(ours, ref, split)} if paired else {})}

    labels = ["clean", *(p.label for p in PERTURBATIONS)]
    result = {"seeds": [m["seed"] for m in ours],
              **compare_levels(lambda label: _matrix(ours, split, label), lambda label: _matrix(ref, split, label),
                               labels, draws, seed)}
    for family in ("noise", "relative_noise", "substitution"):
        verdicts = [v["bpc_verdict"] for k, v in result["levels"].items() if k.startswith(family + "=")]
        result[f"{family}_better_at_every_level"] = all(v == "better" for v in verdicts)
    return result


def compare_splits(arm_models: list[dict[str, Any]], reference_models: list[dict[str, Any]], draws: int,
                   seed: int) -> dict[str, dict[str, Any]]:
    """:func:`compare` on the validation and on the test split."""
    return {split: compare(arm_models, reference_models, split, draws, seed) for split in ("val", "test")}


def screening(ours: list[dict[str, Any]], ref: list[dict[str, Any]], split: str) -> dict[str, Any]:
    """Point estimates only, for an arm with too few seeds for an interval: its clean cost (percent) and its BPC
    minus the reference's at every level (means over the paired seeds and the windows). A bootstrap over the
    windows of one seed would leave out the seed-to-seed spread, so no interval and no verdict."""
    return {"clean_cost_percent": 100 * (_mean_bpc(ours, split, "clean") / _mean_bpc(ref, split, "clean") - 1),
            "bpc_difference": {p.label: _mean_bpc(ours, split, p.label) - _mean_bpc(ref, split, p.label)
                               for p in PERTURBATIONS}}


def matched_cost(peer_models: list[dict[str, Any]], margin_models: list[dict[str, Any]]) -> dict[str, Any]:
    """Is the peer at the margin arm's clean cost? Their clean validation BPC (means over seeds) and the
    peer's difference in percent, ``matched`` when within :data:`MATCH_TOLERANCE_PERCENT`."""
    peer, margin = _mean_bpc(peer_models, "val", "clean"), _mean_bpc(margin_models, "val", "clean")
    percent = 100 * (peer / margin - 1)
    return {"peer_val_clean_bpc": peer, "margin_val_clean_bpc": margin, "difference_percent": percent,
            "peer_seeds": len(peer_models), "margin_seeds": len(margin_models),
            "matched": abs(percent) <= MATCH_TOLERANCE_PERCENT}


def matched_comparisons(arms: list[Arm], scores: dict[str, list[dict[str, Any]]], draws: int,
                        seed: int) -> dict[str, dict[str, Any]]:
    """Each peer against the margin arm it is tuned to, where both were scored: the cost match and, per
    split, the paired comparison (``better``: the peer has the lower BPC)."""
    out = {}
    for arm in arms:
        if arm.matched_to and scores.get(arm.name) and scores.get(arm.matched_to):
            peer, margin = scores[arm.name], scores[arm.matched_to]
            out[arm.name] = {"margin_arm": arm.matched_to, "cost": matched_cost(peer, margin),
                             **compare_splits(peer, margin, draws, seed)}
    return out


def head_to_head(pairs: Sequence[tuple[str, str]], scores: dict[str, list[dict[str, Any]]], draws: int,
                 seed: int) -> dict[str, dict[str, Any]]:
    """Each pair's first arm against its second, where both were scored, per split (``better``: the first arm
    has the lower BPC)."""
    return {f"{first} vs {second}": compare_splits(scores[first], scores[second], draws, seed)
            for first, second in pairs if scores.get(first) and scores.get(second)}


# ------------------------------------------------------------------------------------------ output
def summary_record(scores: dict[str, Any], arm: Arm) -> dict[str, Any]:
    """One model's line of ``summary.json``."""
    lambda_m = scores["config"]["train"]["lambda_m"]
    record = {"arm": arm.name, "method": arm.method, "strength": arm.strength, "seed": scores["seed"],
              "run": scores["run"], "regime": {**scores["regime"], "name": regime_name(scores["regime"], lambda_m)},
              "val_logit_jacobian_norm": scores["logit_jacobian_norm"]}
    for split, s in scores["splits"].items():
        record[f"{split}_clean_bpc"] = float(np.mean(s["bpc"]["clean"]))
        record[f"{split}_embedding_rms"] = s["embedding_rms"]
        record[f"{split}_bpc"] = {label: float(np.mean(v)) for label, v in s["bpc"].items()}
    return record


def comparison_tables(comparisons: dict[str, dict[str, Any]], split: str, reference: str = "CE-only") -> str:
    """The final table, arms x perturbation levels (the verdict and the BPC difference against the reference with
    its interval), for the arms with at least :data:`MIN_SEEDS` paired seeds; below it, apart, the screens with
    fewer (point estimates only, no verdict)."""
    labels = ["clean cost %"] + [p.label for p in PERTURBATIONS]
    final, screens = [], []
    for name, by_split in comparisons.items():
        c = by_split[split]
        if "levels" in c:
            cost = c["clean_cost_percent"]
            cells = [f"{cost['estimate']:+.2f} [{cost['low']:+.2f}, {cost['high']:+.2f}]"]
            for p in PERTURBATIONS:
                lv = c["levels"][p.label]
                d = lv["bpc_difference"]
                cells.append(f"{lv['bpc_verdict']} {d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]")
            final.append([name] + cells)
        elif "screening" in c:
            seeds = len(c["seeds"])
            cells = [f"{c['screening']['clean_cost_percent']:+.2f}"]
            cells += [f"{c['screening']['bpc_difference'][p.label]:+.3f}" for p in PERTURBATIONS]
            screens.append([f"{name} ({seeds} seed{'s' if seeds > 1 else ''})"] + cells)
        else:
            screens.append([f"{name} ({c['verdict']})"] + [""] * len(labels))
    tables = [markdown_table([f"arm vs {reference}"] + labels, final)] if final else []
    if screens:
        tables += [f"Screens, fewer than {MIN_SEEDS} seeds paired with {reference}'s: point estimates (the mean over "
                   "their seeds minus the reference's over the same seeds), no interval and no verdict.",
                   markdown_table([f"screen vs {reference}"] + labels, screens)]
    return "\n\n".join(tables)


def matched_table(matched: dict[str, dict[str, Any]], split: str) -> str:
    """The peers (and the ablation) against their margin arms: the clean-cost match on validation, then
    :func:`comparison_tables`."""
    rows = [[peer, m["margin_arm"], m["cost"]["peer_val_clean_bpc"], m["cost"]["margin_val_clean_bpc"],
             f"{m['cost']['difference_percent']:+.2f}", "yes" if m["cost"]["matched"] else "no"]
            for peer, m in matched.items()]
    match = markdown_table(["peer or ablation", "margin arm", "its val BPC", "margin val BPC", "difference %",
                            f"matched (within {MATCH_TOLERANCE_PERCENT}%)"], rows)
    verdicts = comparison_tables({f"{peer} vs {m['margin_arm']}": m for peer, m in matched.items()}, split,
                                 reference="its margin arm")
    return match + "\n\n" + verdicts


LINESTYLES = {"noise injection": "--", "Jacobian regularisation": ":", "label smoothing": "-."}
"""A peer's line style on the plots; CE-only and every setting of the prior are drawn solid."""


def plot(records: list[dict[str, Any]], split: str, path: Path) -> Path:
    """BPC against the perturbation level, one column per family: each arm's seed mean with its seeds' range
    (top), and the seed mean's difference from CE-only's (bottom, where the typos' differences show). One
    colour per arm, one line style per kind of method (:data:`LINESTYLES`)."""
    families = ("noise", "relative_noise", "substitution")
    methods = {r["arm"]: r["method"] for r in records}
    tab20 = plt.get_cmap("tab20")
    colours = [tab20(i) for i in [*range(0, 20, 2), *range(1, 20, 2)]]  # the ten dark hues first
    styles = {arm: {"color": colours[k % len(colours)], "linestyle": LINESTYLES.get(method, "-"), "marker": "o"}
              for k, (arm, method) in enumerate(methods.items())}
    fig, axes = plt.subplot_mosaic([list(families), [f"{f} minus CE-only" for f in families], ["legend"] * 3],
                                   figsize=(15, 9.5), gridspec_kw={"height_ratios": (1, 1, 0.3)})
    for family in families:
        levels = [0.0] + [p.level for p in PERTURBATIONS if p.kind == family]
        labels = ["clean"] + [p.label for p in PERTURBATIONS if p.kind == family]
        top, bottom = axes[family], axes[f"{family} minus CE-only"]

        def bpc(arm: str) -> np.ndarray:
            return np.array([[r[f"{split}_bpc"][lab] for lab in labels] for r in records if r["arm"] == arm])

        reference = bpc("ce").mean(0)
        for arm, style in styles.items():
            ys = bpc(arm)
            top.plot(levels, ys.mean(0), label=f"{arm} ({len(ys)} seed{'s' * (len(ys) > 1)})", **style)
            top.fill_between(levels, ys.min(0), ys.max(0), color=style["color"], alpha=0.15)
            bottom.plot(levels, ys.mean(0) - reference, **style)
        bottom.axhline(0.0, color="black", linewidth=0.8)
        top.set(ylabel=f"{split} BPC", title=family)
        bottom.set(xlabel={"noise": "sigma (embedding units)", "relative_noise": "sigma / embedding RMS",
                           "substitution": "substitution rate"}[family], ylabel=f"{split} BPC minus CE-only's")
    axes["legend"].axis("off")
    axes["legend"].legend(*axes[families[0]].get_legend_handles_labels(), loc="center", ncol=4, fontsize=8)
    return save(fig, path)


def calibrated_records(arms: list[Arm], scores: dict[str, list[dict[str, Any]]], run_dirs: dict[tuple[str, int], Path],
                       args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Every scored model's calibrated record (:func:`cached_calibrated`), CE-only's last: each CE-only seed is
    matched to the clean validation BPC of every other arm's model with the same seed."""
    out: dict[str, list[dict[str, Any]]] = {arm.name: [] for arm in arms}
    val_bpc: dict[int, dict[str, float]] = {}
    for arm in sorted(arms, key=lambda a: a.name == "ce"):
        for s in scores[arm.name]:
            seed = s["seed"]
            matched = val_bpc.get(seed, {}) if arm.name == "ce" else {}
            out[arm.name].append(cached_calibrated(arm, seed, run_dirs[arm.name, seed], args, matched))
            if arm.name != "ce":
                val_bpc.setdefault(seed, {})[arm.name] = float(np.mean(s["splits"]["val"]["bpc"]["clean"]))
    return out


def confidence_controls(arms: list[Arm], calibrated: dict[str, list[dict[str, Any]]], records: list[dict[str, Any]],
                        pairs: Sequence[tuple[str, str]], args: argparse.Namespace) -> dict[str, Any]:
    """The ``calibrated`` part of ``summary.json``: each model's calibration, each arm against CE-only in every
    mode of :mod:`experiments.calibrated_comparisons`, the head-to-head pairs calibrated, and the
    recommendation."""
    conditions = list(CALIBRATED_CONDITIONS)
    jacobian = {(r["arm"], r["seed"]): r["val_logit_jacobian_norm"] for r in records}
    models = [model_calibration(r) | {"val_logit_jacobian_norm": jacobian[r["arm"], r["seed"]]}
              for rs in calibrated.values() for r in rs]
    comparisons = {arm.name: compare_calibrated(arm.name, calibrated[arm.name], calibrated["ce"], conditions,
                                                list(FAMILIES), MIN_SEEDS, args.bootstrap, args.noise_seed)
                   for arm in arms if arm.name != "ce" and calibrated[arm.name] and calibrated["ce"]}
    versus = {f"{a} vs {b}": compare_calibrated(a, calibrated[a], calibrated[b], conditions, list(FAMILIES),
                                                MIN_SEEDS, args.bootstrap, args.noise_seed, modes=("calibrated",))
              for a, b in pairs if calibrated.get(a) and calibrated.get(b)}
    advice = [row | ({"train_flags": ARMS[row["arm"]].train_flags()} if row["arm"] else {})
              for row in recommendation(comparisons, conditions, FAMILIES)]
    return {"conditions": conditions, "families": FAMILIES, "window_stride": CALIBRATED_STRIDE, "models": models,
            "comparisons": comparisons, "head_to_head": versus, "recommendation": advice}


def confidence_sections(confidence: dict[str, Any]) -> list[str]:
    """The study page's sections on confidence: the recommendation, calibration per arm, and the verdicts in
    each mode (calibrated, temperature-matched, raw) and head to head."""
    if not confidence["comparisons"]:
        return []
    conditions = confidence["conditions"][1:]
    return [
        "## Recommendation, with confidence controlled (test)\n\n" + recommendation_table(confidence["recommendation"]),
        "## Calibration of every arm\n\nTemperature fitted on the clean validation split; ECE: top-label expected "
        "calibration error (torchmetrics, 15 bins) on the clean test split and the out-of-domain text.\n\n"
        + calibration_table(confidence["models"]),
        *(f"## Against CE-only, {title} (test, draw 0)\n\n{text}\n\n"
          + verdict_table(confidence["comparisons"], mode, conditions)
          for mode, title, text in (
              ("calibrated", "both calibrated", "Each model at its own fitted temperature."),
              ("temperature_matched", "at matched confidence",
               "The arm as trained; CE-only at the temperature at which its clean validation BPC equals the arm's "
               "(per seed)."),
              ("raw", "both as trained", "Neither temperature-scaled."))),
        *(["## Head to head, both calibrated (test, draw 0)\n\n"
           + verdict_table(confidence["head_to_head"], "calibrated", conditions, reference="the other arm")]
          if confidence["head_to_head"] else []),
    ]


def run(args: argparse.Namespace) -> int:
    watch = Stopwatch()
    arms = [ARMS[name] for name in args.arms]
    outside = sorted({name for pair in args.versus or () for name in pair} - {"ce", *args.arms})
    if outside:
        raise SystemExit(f"--versus names arms not in --arms: {', '.join(outside)}")
    if "ce" not in args.arms:
        arms.insert(0, ARMS["ce"])  # the reference of every comparison
    scores: dict[str, list[dict[str, Any]]] = {arm.name: [] for arm in arms}
    run_dirs: dict[tuple[str, int], Path] = {}
    missing = []
    for arm in arms:
        for seed in (s for s in args.seeds if arm.screened_on is None or s in arm.screened_on):
            run_dir = run_dir_for(arm, seed, args)
            if args.train and not is_finished(run_dir):
                ensure_trained(arm.config(seed, args.preset, args.epochs), run_dir, progress=not args.no_progress)
            if not is_finished(run_dir):
                missing.append(f"{arm.name} seed {seed} ({run_dir})")
                continue
            scores[arm.name].append(cached_scores(arm, seed, run_dir, args))
            run_dirs[arm.name, seed] = run_dir
    calibrated = calibrated_records(arms, scores, run_dirs, args)
    records = [summary_record(s, ARMS[name]) for name, models in scores.items() for s in models]
    comparisons = {arm.name: compare_splits(scores[arm.name], scores["ce"], args.bootstrap, args.noise_seed)
                   for arm in arms if arm.name != "ce"}
    matched = matched_comparisons(arms, scores, args.bootstrap, args.noise_seed)
    pairs = HEAD_TO_HEAD if args.versus is None else args.versus
    versus = head_to_head(pairs, scores, args.bootstrap, args.noise_seed)
    confidence = confidence_controls(arms, calibrated, records, pairs, args)
    device = device_name(resolve_device(args.device))
    meta = provenance(device, watch.seconds, seeds=args.seeds, noise_seed=args.noise_seed, draws=args.draws,
                      missing=missing)
    write_json(args.out / "summary.json", {"models": records, "comparisons": comparisons, "matched": matched,
                                           "head_to_head": versus, "calibrated": confidence, "meta": meta,
                                           "perturbations": [p.label for p in PERTURBATIONS]})
    figures = [plot(records, split, args.out / f"robustness_{split}.png") for split in ("val", "test") if records]
    if confidence["comparisons"]:
        figures.append(plot_calibrated(confidence["comparisons"], CALIBRATED_CONDITIONS, FAMILIES,
                                       args.out / "robustness_calibrated.png"))
    sections = confidence_sections(confidence)
    sections += [f"## {split}\n\n" + comparison_tables(comparisons, split) for split in ("val", "test")]
    if matched:
        sections += [f"## Peers at matched clean cost and the ablation, {split}\n\n" + matched_table(matched, split)
                     for split in ("val", "test")]
    sections += [f"## Head to head, {split}\n\n" + comparison_tables(versus, split, reference="the other arm")
                 for split in ("val", "test") if versus]
    if missing:
        sections.append("Not finished: " + "; ".join(missing))
    write_markdown(args.out / "README.md", "Robustness study", sections, meta)
    print(f"wrote {args.out / 'summary.json'}" + "".join(f", {f}" for f in figures))
    if missing:
        print(f"{len(missing)} runs not finished: " + "; ".join(missing))
    return 0
