"""``prob-attention decoding-study``: do posterior uncertainty signals predict the model's next-character errors?

Examples::

    prob-attention decoding-study --run-dirs runs/full-lambda0 runs/full-lambda0.02
    prob-attention decoding-study --run-dirs runs/tiny --quick --out /tmp/decoding

On ``--windows`` evenly spaced held-out windows from each of the validation and test splits, the particle
filter (:mod:`inference.smc`) reads each window and, at every position, gives the posterior predictive
of the next character. Each signal scores uncertainty (higher = "more likely wrong"):

* ``smc_entropy``: predictive entropy; ``smc_mi``: mutual information (epistemic part);
* ``neg_margin``: minus the prior's log-det margin ``log det J_tt`` (near degeneracy = uncertain);
* ``neg_ess``: minus the SMC effective sample size;
* baselines from the MAP model (``decode(embed(y))``): ``map_neg_maxprob`` and ``map_entropy``;
* combinations (:data:`COMBINED`): MAP max-probability plus one posterior signal, by a logistic regression
  cross-fitted between the validation and the test windows, against MAP max-probability alone through
  the same fit: whether the posterior adds information beyond the point model's confidence.

The event predicted is that the MAP model's top-1 next character is wrong. Reported per signal: the AUROC
and the area under the risk-coverage curve (AURC; its floor ``oracle_aurc`` and the error rate, the AURC of
a random score, are given for scale). Outputs in ``--out``: ``results.json``, ``table.md`` and
``risk_coverage.png``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from inference.map import device_name, load_trained
from inference.smc import TrajectorySMC
from prob_attention.corpus import eval_windows
from prob_attention.weighted_moments import entropy

from .decode import add_trajectory_flags, encoded_splits, trajectory_model
from .flags import add_device_flag, add_out_flag, add_progress_flag, add_seed_flag, positive_int
from .plots import plt
from .report import markdown_table, provenance, write_json, write_markdown
from .runs import Stopwatch, resolve_device
from .selective import aurc, auroc, cross_fitted_logistic, oracle_aurc, risk_coverage

HELP = "AUROC / AURC of posterior uncertainty signals for predicting next-character errors (held-out windows)"

SIGNALS = {
    "smc_entropy": "SMC predictive entropy",
    "smc_mi": "SMC mutual information",
    "neg_margin": "minus log-det margin",
    "neg_ess": "minus SMC ESS",
    "map_neg_maxprob": "MAP 1 - max-probability",
    "map_entropy": "MAP entropy",
}
"""Signal key -> description; every signal is oriented so that higher means more uncertain."""

COMBINED = {
    "cf_map": "MAP 1 - max-probability alone, cross-fitted",
    "cf_map_smc_entropy": "MAP 1 - max-probability + SMC entropy",
    "cf_map_smc_mi": "MAP 1 - max-probability + SMC MI",
    "cf_map_neg_margin": "MAP 1 - max-probability + minus margin",
    "cf_map_neg_ess": "MAP 1 - max-probability + minus ESS",
}
"""Does a posterior signal add to the point model's confidence? Each is the log-odds of a logistic regression
on ``map_neg_maxprob`` and the signal, fitted on one split and scored on the other (``cf_map``: on
``map_neg_maxprob`` alone, the like-for-like baseline)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dirs", type=Path, nargs="+", required=True, help="trained runs to compare")
    parser.add_argument("--windows", type=positive_int, default=8,
                        help="windows per split (validation, test; default 8)")
    parser.add_argument("--window-length", type=positive_int, default=64, help="characters per window (default 64)")
    parser.add_argument("--particles", type=positive_int, default=16, help="SMC particles (default 16)")
    add_trajectory_flags(parser)
    add_out_flag(parser, Path("results/decoding"))
    parser.add_argument("--quick", action="store_true", help="seconds: 1 window of 16 characters per split, 8 particles")
    add_seed_flag(parser)
    add_device_flag(parser)
    add_progress_flag(parser)


def held_out_windows(splits: tuple[torch.Tensor, ...], count: int,
                     length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` evenly spaced non-overlapping windows of ``length`` from each split: inputs and targets
    ``(n, L)`` and each window's split index ``(n,)``."""
    inputs, targets, split_of = [], [], []
    for index, split in enumerate(splits):
        x, y = eval_windows(split, length)
        pick = torch.from_numpy(np.linspace(0, x.shape[0] - 1, min(count, x.shape[0])).round().astype(np.int64))
        inputs.append(x[pick])
        targets.append(y[pick])
        split_of.append(torch.full((pick.numel(),), index))
    return torch.cat(inputs), torch.cat(targets), torch.cat(split_of)


def combined_scores(scores: dict[str, np.ndarray], errors: np.ndarray, folds: np.ndarray) -> dict[str, np.ndarray]:
    """The :data:`COMBINED` scores from the per-position ``scores`` (cross-fitted over ``folds``)."""
    base = scores["map_neg_maxprob"][:, None]
    out = {"cf_map": cross_fitted_logistic(base, errors, folds)}
    for key in ("smc_entropy", "smc_mi", "neg_margin", "neg_ess"):
        out[f"cf_map_{key}"] = cross_fitted_logistic(np.hstack([base, scores[key][:, None]]), errors, folds)
    return out


@torch.no_grad()
def score_run(run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Signals and error labels for every held-out position of one run, and their metrics."""
    started = time.perf_counter()
    trained = load_trained(run_dir, map_location=resolve_device(args.device))
    train, val, test = encoded_splits(trained)
    model = trajectory_model(trained, args.sigma, args.tau_ratio, args.seed, train)
    length = min(args.window_length, trained.gpt_config.block_size)
    inputs, targets, split_of = held_out_windows((val, test), args.windows, length)
    device = trained.transform.w_k.device
    inputs, targets = inputs.to(device), targets.to(device)
    map_probs = torch.softmax(trained.gpt(inputs)[0].double(), dim=-1)  # (n, L, V)
    columns: dict[str, list[float]] = {k: [] for k in SIGNALS}
    smc_wrong, failures = [], 0
    for i in tqdm(range(inputs.shape[0]), desc=Path(run_dir).name, unit="window", disable=args.no_progress):
        smc = TrajectorySMC(model, args.particles, seed=args.seed + i)
        signals = smc.run(inputs[i], targets[i])
        failures += smc.failures
        columns["smc_entropy"] += [s.entropy for s in signals]
        columns["smc_mi"] += [s.mutual_information for s in signals]
        columns["neg_margin"] += [-s.margin for s in signals]
        columns["neg_ess"] += [-s.ess for s in signals]
        smc_wrong += [int(s.probs.argmax()) != int(y) for s, y in zip(signals, targets[i])]
    columns["map_neg_maxprob"] = (1.0 - map_probs.amax(-1)).reshape(-1).tolist()
    columns["map_entropy"] = entropy(map_probs).reshape(-1).tolist()
    errors = (map_probs.argmax(-1) != targets).reshape(-1).cpu().numpy()
    scores = {k: np.asarray(v) for k, v in columns.items()}
    scores.update(combined_scores(scores, errors, split_of.repeat_interleave(length).numpy()))
    metrics = {k: {"auroc": _safe_auroc(s, errors), "aurc": aurc(s, errors)} for k, s in scores.items()}
    return {
        "run_dir": str(run_dir), "corpus": trained.corpus, "lambda_m": trained.config.train.lambda_m, "positions": int(errors.size), "windows": int(inputs.shape[0]),
        "window_length": length, "particles": args.particles, "sigma": model.sigma, "tau": model.tau,
        "error_rate": float(errors.mean()), "smc_error_rate": float(np.mean(smc_wrong)),
        "oracle_aurc": oracle_aurc(errors), "inversion_failures": failures, "metrics": metrics,
        "seconds": time.perf_counter() - started,
        "curves": {k: _thinned(risk_coverage(scores[k], errors)) for k in SIGNALS},
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
    """A line of facts per run: size, error rates, scales, failures, time."""
    return "\n".join(
        f"- {Path(r['run_dir']).name}: {r['positions']} positions ({r['windows']} windows x {r['window_length']}), "
        f"MAP top-1 error rate {r['error_rate']:.3f} (= AURC of a random score), oracle AURC "
        f"{r['oracle_aurc']:.3f}, SMC top-1 error rate {r['smc_error_rate']:.3f}, sigma {r['sigma']:.4g}, "
        f"tau {r['tau']:.4g}, {r['particles']} particles, {r['inversion_failures']} inversion failures, "
        f"{r['seconds']:.0f} s" for r in results)


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

