"""``prob-attention decoding-study``: do posterior uncertainty signals predict the model's next-character errors?

Examples::

    prob-attention decoding-study --run-dirs runs/full-lambda0 runs/full-lambda0.02
    prob-attention decoding-study --run-dirs runs/tiny --quick --out /tmp/decoding
    prob-attention decoding-study --run-dirs runs/full-lambda0 --posteriors svi --svi-steps 10

On ``--windows`` evenly spaced held-out windows from each of the validation and test splits, each posterior of
``--posteriors`` reads each window and, at every position ``t``, gives the posterior predictive of the next
character from the characters up to ``t`` and the next characters before ``t``: ``smc``, the particle filter
(:mod:`inference.smc`), and ``svi``, the filtering variational posterior (:mod:`inference.svi_filter`: one Gaussian
guide grown by a position per character and refitted with ``--svi-steps`` warm-started SVI steps). Each signal
scores uncertainty (higher = "more likely wrong"):

* ``smc_entropy``, ``svi_entropy``: predictive entropy; ``smc_mi``, ``svi_mi``: mutual information (epistemic part);
* ``neg_margin``: minus the prior's log-det margin ``log det J_tt`` (near degeneracy = uncertain; SMC's weighted mean);
* ``neg_ess``: minus the SMC effective sample size;
* baselines from the MAP model (``decode(embed(y))``): ``map_neg_maxprob`` and ``map_entropy``;
* combinations (:data:`COMBINED`): MAP max-probability plus one posterior signal, by a logistic regression
  cross-fitted between the validation and the test windows, against MAP max-probability alone through
  the same fit: whether the posterior adds information beyond the point model's confidence.

The event predicted is that the MAP model's top-1 next character is wrong. Reported per signal: the AUROC
and the area under the risk-coverage curve (AURC; its floor ``oracle_aurc`` and the error rate, the AURC of
a random score, are given for scale). Reported per posterior: its own top-1 error rate and its cost per position
(seconds; for SVI also the steps). For the SVI filter, two diagnostics: whether each refit's ELBO had settled
(:func:`~inference.svi_filter.elbo_settling`: the median and 90th percentile of the drop within a refit, the fraction
of refits still falling beyond the ELBO's Monte Carlo noise), and ArviZ's bulk ESS and split R-hat across
``--svi-chains`` independently seeded filters through the first window, on the draws of each newest position
(:func:`~inference.svi_filter.filter_draws` says what they measure, and what not, for a variational posterior).
Outputs in ``--out``: ``results.json``, ``table.md`` and ``risk_coverage.png``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from inference.map import device_name, load_trained
from inference.posterior import PredictiveSignals, SVIConfig, convergence, to_inference_data
from inference.smc import TrajectorySMC
from inference.svi_filter import SVIFilter, filter_draws, settling_summary
from inference.trajectory import TrajectoryModel
from prob_attention.corpus import eval_windows
from prob_attention.weighted_moments import entropy

from .decode import add_trajectory_flags, encoded_splits, trajectory_model
from .flags import (
    add_device_flag,
    add_out_flag,
    add_progress_flag,
    add_seed_flag,
    nonnegative_int,
    positive_float,
    positive_int,
)
from .plots import plt
from .report import markdown_table, provenance, write_json, write_markdown
from .runs import Stopwatch, resolve_device
from .selective import aurc, auroc, cross_fitted_logistic, oracle_aurc, risk_coverage
from .shift_conditions import evenly_spaced

HELP = "AUROC / AURC of posterior uncertainty signals for predicting next-character errors (held-out windows)"

POSTERIORS = ("smc", "svi")

SIGNALS = {
    "smc_entropy": "SMC predictive entropy",
    "smc_mi": "SMC mutual information",
    "neg_margin": "minus log-det margin",
    "neg_ess": "minus SMC ESS",
    "svi_entropy": "SVI predictive entropy",
    "svi_mi": "SVI mutual information",
    "map_neg_maxprob": "MAP 1 - max-probability",
    "map_entropy": "MAP entropy",
}
"""Signal key -> description; every signal is oriented so that higher means more uncertain."""

POSTERIOR_SIGNALS = {"smc": ("smc_entropy", "smc_mi", "neg_margin", "neg_ess"), "svi": ("svi_entropy", "svi_mi")}
"""The signals each posterior gives."""

COMBINED = {
    "cf_map": "MAP 1 - max-probability alone, cross-fitted",
    "cf_map_smc_entropy": "MAP 1 - max-probability + SMC entropy",
    "cf_map_smc_mi": "MAP 1 - max-probability + SMC MI",
    "cf_map_neg_margin": "MAP 1 - max-probability + minus margin",
    "cf_map_neg_ess": "MAP 1 - max-probability + minus ESS",
    "cf_map_svi_entropy": "MAP 1 - max-probability + SVI entropy",
    "cf_map_svi_mi": "MAP 1 - max-probability + SVI MI",
}
"""Does a posterior signal add to the point model's confidence? Each is the log-odds of a logistic regression
on ``map_neg_maxprob`` and the signal, fitted on one split and scored on the other (``cf_map``: on
``map_neg_maxprob`` alone, the like-for-like baseline)."""

DIAGNOSTIC_DRAWS = 100
"""Guide draws per position and chain for ArviZ's diagnostics."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dirs", type=Path, nargs="+", required=True, help="trained runs to compare")
    parser.add_argument("--posteriors", nargs="+", choices=POSTERIORS, default=list(POSTERIORS),
                        help="posteriors to score (default: smc svi)")
    parser.add_argument("--windows", type=positive_int, default=8,
                        help="windows per split (validation, test; default 8)")
    parser.add_argument("--window-length", type=positive_int, default=64, help="characters per window (default 64)")
    parser.add_argument("--particles", type=positive_int, default=16,
                        help="SMC particles, and SVI guide draws per prediction (default 16)")
    svi = parser.add_argument_group("SVI filter")
    svi.add_argument("--svi-guide", choices=["normal", "lowrank"], default="normal",
                     help="mean-field or low-rank Gaussian guide (default normal)")
    svi.add_argument("--svi-steps", type=positive_int, default=5, help="SVI steps per position (default 5)")
    svi.add_argument("--svi-lr", type=positive_float, default=0.03,
                     help="Adam's learning rate, parameters in units of tau (default 0.03)")
    svi.add_argument("--svi-chains", type=nonnegative_int, default=4,
                     help="independently seeded filters through the first window for ArviZ's ESS and R-hat "
                          "(0: none; default 4)")
    add_trajectory_flags(parser)
    add_out_flag(parser, Path("results/decoding"))
    parser.add_argument("--quick", action="store_true",
                        help="seconds: 1 window of 16 characters per split, 8 particles, at most 2 SVI chains")
    add_seed_flag(parser)
    add_device_flag(parser)
    add_progress_flag(parser)


def held_out_windows(splits: tuple[torch.Tensor, ...], count: int,
                     length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` evenly spaced non-overlapping windows of ``length`` from each split: inputs and targets
    ``(n, L)`` and each window's split index ``(n,)``."""
    inputs, targets, split_of = [], [], []
    for index, split in enumerate(splits):
        x, y = evenly_spaced(*eval_windows(split, length), count)
        inputs.append(x)
        targets.append(y)
        split_of.append(torch.full((x.shape[0],), index))
    return torch.cat(inputs), torch.cat(targets), torch.cat(split_of)


def combined_scores(scores: dict[str, np.ndarray], errors: np.ndarray, folds: np.ndarray) -> dict[str, np.ndarray]:
    """The :data:`COMBINED` scores of the posterior signals in ``scores`` (per position; cross-fitted on ``folds``)."""
    base = scores["map_neg_maxprob"][:, None]
    out = {"cf_map": cross_fitted_logistic(base, errors, folds)}
    for key in (k for keys in POSTERIOR_SIGNALS.values() for k in keys if k in scores):
        out[f"cf_map_{key}"] = cross_fitted_logistic(np.hstack([base, scores[key][:, None]]), errors, folds)
    return out


@dataclass
class Arm:
    """One posterior's signals per position (:data:`POSTERIOR_SIGNALS`), its top-1 error rate, its cost (seconds
    per position, ...) and the facts it adds to the run's results."""

    columns: dict[str, list[float]]
    error_rate: float
    cost: dict[str, float]
    facts: dict[str, Any]


def smc_arm(model: TrajectoryModel, inputs: torch.Tensor, targets: torch.Tensor, args: argparse.Namespace,
            name: str) -> Arm:
    """The particle filter through every window (seed ``args.seed + window``)."""
    columns: dict[str, list[float]] = {k: [] for k in POSTERIOR_SIGNALS["smc"]}
    wrong, failures, started = [], 0, time.perf_counter()
    for i in tqdm(range(inputs.shape[0]), desc=f"{name} smc", unit="window", disable=args.no_progress):
        smc = TrajectorySMC(model, args.particles, seed=args.seed + i)
        signals = smc.run(inputs[i], targets[i])
        failures += smc.failures
        columns["smc_entropy"] += [s.entropy for s in signals]
        columns["smc_mi"] += [s.mutual_information for s in signals]
        columns["neg_margin"] += [-s.margin for s in signals]
        columns["neg_ess"] += [-s.ess for s in signals]
        wrong += _wrong(signals, targets[i])
    return Arm(columns, float(np.mean(wrong)), _cost(time.perf_counter() - started, len(wrong)),
               {"inversion_failures": failures})


def svi_arm(model: TrajectoryModel, inputs: torch.Tensor, targets: torch.Tensor, args: argparse.Namespace,
            name: str) -> Arm:
    """The SVI filter through every window (seed ``args.seed + window``), its ELBO settling and, over
    ``args.svi_chains`` more filters through the first window, ArviZ's diagnostics (not counted in the cost)."""
    config = SVIConfig(guide=args.svi_guide, steps=args.svi_steps, lr=args.svi_lr, seed=args.seed)
    columns: dict[str, list[float]] = {k: [] for k in POSTERIOR_SIGNALS["svi"]}
    wrong, losses, started = [], [], time.perf_counter()
    for i in tqdm(range(inputs.shape[0]), desc=f"{name} svi", unit="window", disable=args.no_progress):
        svi = SVIFilter(model, replace(config, seed=args.seed + i), num_samples=args.particles)
        signals = svi.run(inputs[i], targets[i])
        columns["svi_entropy"] += [s.entropy for s in signals]
        columns["svi_mi"] += [s.mutual_information for s in signals]
        wrong += _wrong(signals, targets[i])
        losses += svi.losses
    cost = {**_cost(time.perf_counter() - started, len(wrong)), "steps_per_position": config.steps}
    facts = {"guide": config.guide, "lr": config.lr,
             "elbo_particles": config.num_particles, "draws": args.particles, "elbo": settling_summary(losses),
             "arviz": _arviz(model, inputs[0], targets[0], config, args.svi_chains)}
    return Arm(columns, float(np.mean(wrong)), cost, {"svi": facts})


def _wrong(signals: list[PredictiveSignals], targets: torch.Tensor) -> list[bool]:
    """Whether each predictive's top-1 character misses its target."""
    return [int(s.probs.argmax()) != int(y) for s, y in zip(signals, targets)]


def _cost(seconds: float, positions: int) -> dict[str, float]:
    return {"seconds": seconds, "seconds_per_position": seconds / positions}


def _arviz(model: TrajectoryModel, idx: torch.Tensor, next_chars: torch.Tensor, config: SVIConfig,
           chains: int) -> dict[str, float] | None:
    """:func:`~inference.posterior.convergence` of ``chains`` seeded filters' draws of each newest position."""
    if chains == 0:
        return None
    started = time.perf_counter()
    draws = filter_draws(model, idx, next_chars, config, chains, DIAGNOSTIC_DRAWS)
    return {"window": 0, "chains": chains, "draws": DIAGNOSTIC_DRAWS, **convergence(to_inference_data(draws)),
            "seconds": time.perf_counter() - started}


ARMS = {"smc": smc_arm, "svi": svi_arm}


def score_run(run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Signals and error labels for every held-out position of one run, their metrics, and each posterior's facts."""
    started = time.perf_counter()
    trained = load_trained(run_dir, map_location=resolve_device(args.device))
    train, val, test = encoded_splits(trained)
    model = trajectory_model(trained, args.sigma, args.tau_ratio, args.seed, train)
    length = min(args.window_length, trained.gpt_config.block_size)
    inputs, targets, split_of = held_out_windows((val, test), args.windows, length)
    device = trained.transform.w_k.device
    inputs, targets = inputs.to(device), targets.to(device)
    with torch.no_grad():
        map_probs = torch.softmax(trained.gpt(inputs)[0].double(), dim=-1)  # (n, L, V)
    columns = {"map_neg_maxprob": (1.0 - map_probs.amax(-1)).reshape(-1).tolist(),
               "map_entropy": entropy(map_probs).reshape(-1).tolist()}
    posteriors = [p for p in POSTERIORS if p in args.posteriors]
    facts: dict[str, Any] = {"posteriors": posteriors, "cost": {}}
    for posterior in posteriors:
        arm = ARMS[posterior](model, inputs, targets, args, Path(run_dir).name)
        columns.update(arm.columns)
        facts.update({f"{posterior}_error_rate": arm.error_rate, **arm.facts})
        facts["cost"][posterior] = arm.cost
    errors = (map_probs.argmax(-1) != targets).reshape(-1).cpu().numpy()
    scores = {k: np.asarray(v) for k, v in columns.items()}
    scores.update(combined_scores(scores, errors, split_of.repeat_interleave(length).numpy()))
    metrics = {k: {"auroc": _safe_auroc(s, errors), "aurc": aurc(s, errors)} for k, s in scores.items()}
    return {
        "run_dir": str(run_dir), "corpus": trained.corpus, "lambda_m": trained.config.train.lambda_m,
        "positions": int(errors.size), "windows": int(inputs.shape[0]), "window_length": length,
        "particles": args.particles, "sigma": model.sigma, "tau": model.tau, "error_rate": float(errors.mean()),
        "oracle_aurc": oracle_aurc(errors), **facts, "metrics": metrics, "seconds": time.perf_counter() - started,
        "curves": {k: _thinned(risk_coverage(scores[k], errors)) for k in SIGNALS if k in scores},
    }


def _thinned(curve: tuple[np.ndarray, np.ndarray], points: int = 257) -> list[list[float]]:
    """``points`` evenly spaced points of a risk-coverage curve (both ends kept), for the JSON and the plot."""
    keep = np.unique(np.linspace(0, curve[0].size - 1, points).round().astype(np.int64))
    return [c[keep].tolist() for c in curve]


def _safe_auroc(scores: np.ndarray, errors: np.ndarray) -> float | None:
    """AUROC, or ``None`` when the labels hold one class only (e.g. a tiny ``--quick`` run)."""
    return auroc(scores, errors) if 0 < errors.sum() < errors.size else None


def signal_table(results: list[dict[str, Any]]) -> str:
    """One row per signal, AUROC and AURC per run (also the results page's table)."""
    headers = ["signal"] + [f"{Path(r['run_dir']).name} {m}" for r in results for m in ("AUROC", "AURC")]
    labels = {k: v for k, v in {**SIGNALS, **COMBINED}.items() if k in results[0]["metrics"]}
    rows = [[label] + [r["metrics"][k][m] for r in results for m in ("auroc", "aurc")] for k, label in labels.items()]
    return markdown_table(headers, rows)


def run_facts(results: list[dict[str, Any]]) -> str:
    """A line of facts per run: size, error rates, scales, each posterior's settings, cost and diagnostics, time."""
    return "\n".join(f"- {Path(r['run_dir']).name}: " + "; ".join(_facts(r)) for r in results)


def _facts(r: dict[str, Any]) -> list[str]:
    out = [(f"{r['positions']} positions ({r['windows']} windows x {r['window_length']}), MAP top-1 error rate "
            f"{r['error_rate']:.3f} (= AURC of a random score), oracle AURC {r['oracle_aurc']:.3f}, sigma "
            f"{r['sigma']:.4g}, tau {r['tau']:.4g}")]
    cost = r.get("cost", {})
    if "smc_error_rate" in r:
        out.append(f"SMC: {r['particles']} particles, top-1 error rate {r['smc_error_rate']:.3f}, "
                   f"{r['inversion_failures']} inversion failures{_per_position(cost.get('smc'))}")
    if "svi_error_rate" in r:
        s = r["svi"]
        line = (f"SVI: {s['guide']} guide, {cost['svi']['steps_per_position']} steps per position (lr {s['lr']:g} "
                f"tau), {s['draws']} draws, top-1 error rate {r['svi_error_rate']:.3f}{_per_position(cost['svi'])}")
        if s["elbo"] is not None:
            e = s["elbo"]
            line += (f", ELBO drop within a refit median {e['drop_median']:.3g} / 90% {e['drop_p90']:.3g} nats, "
                     f"{e['unsettled_fraction']:.0%} of refits still falling")
        if s["arviz"] is not None:
            a = s["arviz"]
            line += f", {a['chains']} chains x {a['draws']} draws on window 0: bulk ESS min {a['ess_bulk_min']:.0f}"
            if "rhat_max" in a:
                line += f", R-hat max {a['rhat_max']:.3f} (median {a['rhat_median']:.3f})"
        out.append(line)
    out.append(f"{r['seconds']:.0f} s")
    return out


def _per_position(cost: dict[str, float] | None) -> str:
    return "" if cost is None else f", {1000 * cost['seconds_per_position']:.0f} ms per position"


def plot_curves(results: list[dict[str, Any]], path: Path) -> None:
    """Risk-coverage curves, one panel per run."""
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        for k, (coverage, risk) in r["curves"].items():
            ax.plot(coverage, risk, label=f"{SIGNALS[k]} ({r['metrics'][k]['aurc']:.3f})")
        ax.set(xlabel="coverage", ylabel="risk (MAP top-1 error)", title=Path(r["run_dir"]).name)
        ax.legend(title="signal (AURC)", fontsize=7, title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.windows, args.window_length, args.particles = 1, 16, 8
        args.svi_chains = min(args.svi_chains, 2)
    if args.window_length < 2:
        raise ValueError("--window-length must be at least 2")
    clock = Stopwatch()
    results = []
    for run_dir in args.run_dirs:
        results.append(score_run(run_dir, args))
        print(f"{run_dir}: {results[-1]['positions']} positions in {results[-1]['seconds']:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = provenance(device_name(resolve_device(args.device)), clock.seconds, seed=args.seed,
                      corpus=", ".join(sorted({r["corpus"] for r in results})))
    write_json(args.out / "results.json", {"runs": results, "provenance": meta})
    table = signal_table(results) + "\n\n" + run_facts(results)
    plot_curves(results, args.out / "risk_coverage.png")
    write_markdown(args.out / "table.md", "Uncertainty signals for next-character errors", [table, "![risk-coverage](risk_coverage.png)"], meta)
    print(table)
    print(f"written to {args.out}")
    return 0

