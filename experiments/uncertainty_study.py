"""``prob-attention uncertainty-study``: does the latent posterior know when the model is wrong, under shift?

Examples::

    prob-attention uncertainty-study                                  # the committed runs, from the caches
    prob-attention uncertainty-study --arms ce jacobian-6e-05 --seeds 0 1 2 --out /tmp/uncertainty

For each arm (a training setting of the robustness study, three seeds each, runs reused from ``--reuse``) and each
condition of :data:`~experiments.shift_conditions.CONDITIONS` (clean test text, typos, embedding noise absolute and
RMS-relative, case flips, deletions and out-of-domain text: the robustness study's shifts), every method predicts
the next character at the same positions (``--windows`` windows of ``--window-length`` characters):

- ``map``: the trained model's softmax (the point estimate);
- ``temperature``: the same at the temperature fitted on validation, the one the robustness study reports;
- ``laplace``: a last-layer KFAC Laplace approximation, prior precision fitted on validation
  (:mod:`experiments.laplace`);
- ``ensemble``: the deep ensemble of the arm's seeds (their softmaxes averaged);
- ``smc``, ``svi``: the latent posterior over the embedding trajectory, the particle filter (and, on some arms and
  conditions, the SVI filter) at the ``tau`` fitted on validation, knowing nothing of the shift, as no baseline does
  (:mod:`experiments.posterior_scores`, cached per model). Under embedding noise the particle filter also runs told
  the noise level (its emission matched to it): Bayesian denoising, compared with decoding the noisy embeddings.

Each method is scored by its predictive (bits per character, top-1 error, ECE, Brier score:
:mod:`experiments.uncertainty_metrics`) and each of its uncertainty signals (predictive entropy, ``1 - max p``,
mutual information, minus the ESS, minus the log-det margin) by how well it detects the method's own top-1 errors
(AUROC, AURC) and, averaged over a window, how well it tells the condition's windows from clean ones (AUROC). The
verdict of each arm, condition and criterion compares the posterior with the best baseline, by a paired bootstrap
over seeds and windows (:mod:`experiments.intervals`); a method's cost is its seconds per position.

Outputs in ``--out``: ``summary.json``, ``README.md`` (tables, provenance) and figures (the tau curves, reliability
diagrams, risk-coverage curves). The methods are in :mod:`experiments.uncertainty_methods`, the metrics and verdicts
in :mod:`experiments.uncertainty_verdicts`, the tables, figures and headline in :mod:`experiments.uncertainty_report`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from inference.checkpoint import find_checkpoint, read_config
from inference.map import CHECKPOINT_DIR, HISTORY_FILE, device_name, load_trained
from inference.map.config import PRESETS

from .flags import add_device_flag, add_out_flag, add_progress_flag, positive_int
from .posterior_scores import MATCHED, PosteriorSettings, SVISettings, cached_posterior, cached_svi
from .report import provenance, write_json, write_markdown
from .robustness_study import ARMS, run_dir_for, weights_digest
from .runs import Stopwatch, is_finished, resolve_device
from .shift_conditions import CONDITIONS, condition_windows
from .uncertainty_methods import (
    LAPLACE_SAMPLES,
    LAPLACE_TRAIN_WINDOWS,
    LAPLACE_VAL_WINDOWS,
    METHODS,
    ArmScores,
    Scores,
    baseline_scores,
    ensemble_scores,
    fitted_laplace,
    fitted_temperature,
    posterior_as_scores,
)
from .uncertainty_report import (
    SELECTION,
    cost_table,
    denoising_table,
    fitted_baselines_table,
    headline,
    metrics_table,
    plot_reliability,
    plot_risk_coverage,
    plot_tau,
    posterior_verdict_table,
    summary_markdown,
    tau_table,
    wins_table,
)
from .uncertainty_verdicts import STRONGEST, denoising, family_verdicts, point_metrics, posterior_wins, verdicts

HELP = "calibration, error and shift detection of the latent posterior against MAP, temperature, Laplace, ensembles"

STUDY_ARMS = ("ce", "jacobian-1e-05", "jacobian-6e-05", "noise-0.03", "margin-positive-full-lambda0.05",
              "margin-free-lambda0.02")
"""CE-only, the robust arms of the robustness study (Jacobian regularisation at both strengths, noise injection at
the free barrier's cost), the full prior density (the one arm whose prior is a fitted generative model of its
embeddings) and the paper's margin barrier at 0.02."""

SVI_ARMS = ("ce", "margin-positive-full-lambda0.05")
"""The arms the SVI filter reads by default: CE-only and the full prior density."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arms", nargs="+", default=list(STUDY_ARMS), choices=list(ARMS), metavar="ARM",
                        help=f"arms to score (default: {' '.join(STUDY_ARMS)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training seeds of each arm (at least 2: the ensemble is made of them)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default", help="the runs' preset")
    parser.set_defaults(epochs=None)  # the preset's epochs: the runs of the robustness study's final table
    parser.add_argument("--reuse", type=Path, nargs="*", default=[Path("results/train")],
                        help="folders of finished runs to reuse where the configuration matches exactly")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/robustness_study"),
                        help="where the robustness study trains the runs (looked in after --reuse)")
    parser.add_argument("--windows", type=positive_int, default=12, help="windows per condition (default 12)")
    parser.add_argument("--window-length", type=positive_int, default=64, help="characters per window (default 64)")
    parser.add_argument("--particles", type=positive_int, default=32, help="particles of the filter (default 32)")
    parser.add_argument("--svi-arms", nargs="*", default=list(SVI_ARMS), choices=list(ARMS), metavar="ARM",
                        help=f"arms the SVI filter also reads (default: {' '.join(SVI_ARMS)})")
    parser.add_argument("--svi-conditions", nargs="+", default=list(SVISettings().conditions),
                        choices=[c.label for c in CONDITIONS], metavar="CONDITION",
                        help=f"conditions the SVI filter reads (default: {' '.join(SVISettings().conditions)})")
    parser.add_argument("--bootstrap", type=positive_int, default=500, help="bootstrap draws per interval")
    parser.add_argument("--temperatures", type=Path, default=Path("results/robustness_study/scores"),
                        help="the robustness study's calibrated score caches, whose fitted temperatures are reused "
                             "(fitted again on validation where a cache is missing)")
    add_device_flag(parser)
    add_progress_flag(parser)
    add_out_flag(parser, Path("results/uncertainty_study"))


def _stack(per_seed: Sequence[Scores], attribute: str) -> dict[str, dict[str, np.ndarray]]:
    first = getattr(per_seed[0], attribute)
    return {label: {k: np.stack([getattr(s, attribute)[label][k] for s in per_seed]) for k in first[label]}
            for label in first}


def finished_runs(args: argparse.Namespace) -> dict[tuple[str, int], Path]:
    """The finished run of every arm and seed asked for; ``ValueError`` naming the first that is missing, or a
    window longer than a run's context."""
    runs = {}
    for arm in args.arms:
        for seed in args.seeds:
            run_dir = run_dir_for(ARMS[arm], seed, args)
            if not is_finished(run_dir):
                raise ValueError(f"no finished run of arm {arm!r} with seed {seed} (looked in "
                                 f"{', '.join(map(str, args.reuse))} and {run_dir}): train it with "
                                 f"`prob-attention robustness-study --arms {arm} --seeds {seed}`")
            block = read_config(find_checkpoint(run_dir / CHECKPOINT_DIR))["gpt_config"]["block_size"]
            if args.window_length > block:
                raise ValueError(f"--window-length {args.window_length} exceeds the context of {run_dir} ({block})")
            runs[arm, seed] = run_dir
    return runs


def learned_sigma_path(run_dir: Path, epochs: int = 2) -> list[float] | None:
    """The prior's learned sigma at the end of the run's last ``epochs`` epochs (its history), or ``None`` for a run
    that did not learn it."""
    record = json.loads((run_dir / HISTORY_FILE).read_text())
    if not record["config"]["run"]["prior"]["learn_sigma"]:
        return None
    return [row["sigma"] for row in record["history"][-epochs:]]


def score_arm(arm: str, runs: dict[int, Path], args: argparse.Namespace) -> ArmScores:
    """Every method of ``arm`` on every condition, one model per seed (``runs``: seed -> run), the ensemble made of
    all of them."""
    settings = PosteriorSettings(windows=args.windows, length=args.window_length, particles=args.particles)
    device = resolve_device(args.device)
    per_method: dict[str, list[Scores]] = {k: [] for k in METHODS}
    matched: list[Scores] = []
    members, facts = [], []
    window_sets = []
    for seed, run_dir in runs.items():
        name, digest = f"{arm}-seed{seed}", weights_digest(run_dir)
        post_facts, arrays = cached_posterior(run_dir, args.out / "posterior" / name, settings, digest, str(device),
                                              progress=args.progress)
        trained = load_trained(run_dir, map_location=device)
        windows = {c.label: condition_windows(trained, c, settings.windows, settings.length, settings.seed)
                   for c in CONDITIONS if c.label in settings.conditions}
        temperature, source = fitted_temperature(trained, args.temperatures / f"{name}.calibrated.json")
        laplace, delta_curve = fitted_laplace(trained)
        baselines, member = baseline_scores(trained, temperature, laplace, windows, settings.seed)
        for key, s in baselines.items():
            per_method[key].append(s)
        per_method["smc"].append(posterior_as_scores(arrays, post_facts, list(windows)))
        matched.append(posterior_as_scores(arrays, post_facts, [label + MATCHED for label in windows]))
        if arm in args.svi_arms:
            svi_facts, svi_arrays = cached_svi(run_dir, args.out / "posterior" / f"{name}.svi", settings,
                                               SVISettings(tuple(args.svi_conditions)), post_facts["tau"], digest,
                                               str(device), progress=args.progress)
            per_method["svi"].append(posterior_as_scores(svi_arrays, svi_facts, list(windows)))
            post_facts = {**post_facts, "svi": svi_facts}
        members.append(member)
        window_sets.append(windows)
        facts.append({"seed": seed, "run_dir": str(run_dir), "learned_sigma_last_epochs": learned_sigma_path(run_dir),
                      "temperature": temperature,
                      "temperature_from": source, "laplace_prior_precision": laplace.prior_precision,
                      "laplace_curve": {f"{k:g}": v for k, v in delta_curve.items()}, **post_facts})
    ensemble = ensemble_scores(members, window_sets[0], sum(s.seconds_per_position for s in per_method["map"]))
    per_method["ensemble"] = [ensemble] * len(runs)  # one ensemble, repeated per seed row (paired by window)
    per_method = {k: v for k, v in per_method.items() if v}
    return ArmScores({k: _stack(v, "records") for k, v in per_method.items()},
                     {k: _stack(v, "signals") for k, v in per_method.items()}, facts,
                     {k: float(np.mean([s.seconds_per_position for s in v])) for k, v in per_method.items()},
                     {label.removesuffix(MATCHED): r for label, r in _stack(matched, "records").items()})


def run(args: argparse.Namespace) -> int:
    if len(args.seeds) < 2:
        raise ValueError("the deep ensemble needs at least two seeds (--seeds)")
    args.progress = not args.no_progress
    clock = Stopwatch()
    labels = [c.label for c in CONDITIONS]
    runs = finished_runs(args)
    arms: dict[str, dict[str, Any]] = {}
    scored: dict[str, ArmScores] = {}
    for arm in tqdm(args.arms, desc="arms", unit="arm", disable=args.no_progress):
        scores = score_arm(arm, {seed: runs[arm, seed] for seed in args.seeds}, args)
        metrics = point_metrics(scores)
        arms[arm] = {"facts": scores.facts, "cost": scores.cost, "metrics": metrics,
                     "verdicts": verdicts(scores, metrics, labels, args.bootstrap),
                     "denoising": denoising(scores, args.bootstrap)}
        scored[arm] = scores
    summary = {"settings": {**PosteriorSettings(args.windows, args.window_length, args.particles).to_dict(),
                            "seeds": list(args.seeds), "bootstrap": args.bootstrap,
                            "svi": {"arms": list(args.svi_arms), **SVISettings(tuple(args.svi_conditions)).to_dict()},
                            "laplace": {"train_windows": LAPLACE_TRAIN_WINDOWS, "val_windows": LAPLACE_VAL_WINDOWS,
                                        "samples": LAPLACE_SAMPLES}},
               "arms": arms, "families": family_verdicts(arms), "posterior_wins": posterior_wins(arms)}
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    first = args.arms[0]
    figures = [plot_tau(arms, out / "tau_fit.png"),
               plot_reliability(scored[first], ["clean", STRONGEST["noise"], STRONGEST["tempest"]], first,
                                out / "reliability.png"),
               plot_risk_coverage(scored[first], ["clean", STRONGEST["substitution"], STRONGEST["noise"],
                                                  STRONGEST["tempest"]], first, out / "risk_coverage.png")]
    summary["provenance"] = provenance(device_name(resolve_device(args.device)), clock.seconds)
    write_json(out / "summary.json", summary)
    sections = [summary_markdown(summary),
                "## Fitting tau\n\n" + tau_table(arms) + "\n\n![tau fit](tau_fit.png)",
                "## The fitted baselines\n\n" + fitted_baselines_table(arms),
                "## The posterior against the best baseline (strongest level of each shift)\n\n"
                "Difference posterior - best baseline, oriented so that negative favours the posterior (BPC, ECE "
                "and AURC as they are, shift AUROC negated), paired bootstrap over seeds and windows. " + SELECTION
                + "\n\n"
                + posterior_verdict_table(arms),
                "## Bayesian denoising: the posterior against decoding the noisy embeddings (MAP)\n\n"
                "Difference posterior (SMC) - MAP, negative favours the posterior, paired bootstrap over seeds and "
                "windows.\n\n" + denoising_table(arms),
                "## Where the posterior beats the best baseline\n\n" + (wins_table(summary["posterior_wins"])
                                                                        if summary["posterior_wins"] else "Nowhere."),
                "## Cost per position\n\n" + cost_table(arms),
                "## Figures\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in figures[1:]),
                *(f"## {arm}\n\n" + metrics_table(rec, labels) for arm, rec in arms.items())]
    write_markdown(out / "README.md", "Uncertainty under shift: the latent posterior against the standard baselines",
                   sections, summary["provenance"])
    print("\n".join(headline(summary)))
    print(f"written to {out}")
    return 0
