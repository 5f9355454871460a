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
diagrams, risk-coverage curves).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from inference.checkpoint import find_checkpoint, read_config
from inference.map import CHECKPOINT_DIR, TrainedModel, device_name, load_trained
from inference.map.config import PRESETS

from .calibrated_scores import logits_of
from .calibration import ECE_BINS, fit_temperature
from .flags import add_device_flag, add_out_flag, add_progress_flag, positive_int
from .intervals import paired_bootstrap, verdict
from .laplace import PRIOR_PRECISION_GRID, LastLayerLaplace, fit_prior_precision
from .plots import plt, save
from .posterior_scores import MATCHED, PosteriorSettings, SVISettings, cached_posterior, cached_svi
from .report import markdown_table, provenance, read_sealed_json, write_json, write_markdown
from .robustness_study import ARMS, run_dir_for, weights_digest
from .runs import Stopwatch, is_finished, resolve_device, split_windows
from .selective import aurc, auroc, risk_coverage
from .shift_conditions import CONDITIONS, condition_windows, evenly_spaced
from .uncertainty_metrics import (
    RECORD_FIELDS,
    expected_calibration_error,
    mutual_information,
    predictive_record,
    record_metrics,
    shift_detection_auroc,
)

HELP = "calibration, error and shift detection of the latent posterior against MAP, temperature, Laplace, ensembles"

STUDY_ARMS = ("ce", "jacobian-1e-05", "jacobian-6e-05", "noise-0.03", "margin-positive-full-lambda0.05",
              "margin-free-lambda0.02")
"""CE-only, the robust arms of the robustness study (Jacobian regularisation at both strengths, noise injection at
the free barrier's cost), the full prior density (the one arm whose prior is a fitted generative model of its
embeddings) and the paper's margin barrier at 0.02."""

TOTAL = {"neg_maxprob": "1 - max p", "entropy": "entropy"}
BAYESIAN = {**TOTAL, "mi": "mutual information"}
METHODS: dict[str, tuple[str, dict[str, str]]] = {
    "map": ("MAP", TOTAL),
    "temperature": ("temperature", TOTAL),
    "laplace": ("last-layer Laplace", BAYESIAN),
    "ensemble": ("deep ensemble", BAYESIAN),
    "smc": ("latent posterior (SMC)", {**BAYESIAN, "neg_ess": "minus ESS", "neg_margin": "minus log-det margin"}),
    "svi": ("latent posterior (SVI)", {**BAYESIAN, "neg_margin": "minus log-det margin"}),
}
"""Each method's name and its uncertainty signals (key -> name; higher = more uncertain)."""

BASELINES = ("map", "temperature", "laplace", "ensemble")

POSTERIORS = ("smc", "svi")
"""The latent posterior's two filters; the SVI filter reads only some arms and conditions (``--svi-arms``,
``--svi-conditions``): it costs about ten particle filters per position."""

STRONGEST: dict[str, str] = {"clean": "clean", "substitution": "substitution=0.1", "noise": "noise=0.04",
                             "relative_noise": "relative_noise=0.5", "case": "case=0.1", "deletion": "deletion=0.1",
                             "tempest": "tempest"}
"""Each family's strongest level: where the verdict table looks."""

FAMILY_NAMES = {"clean": "clean text", "substitution": "typos", "noise": "embedding noise",
                "relative_noise": "RMS-relative embedding noise", "case": "case flips", "deletion": "deletions",
                "tempest": "out-of-domain text (The Tempest)"}

CRITERIA: dict[str, tuple[str, bool]] = {"bpc": ("bits per character", True), "ece": ("calibration (ECE)", True),
                                         "aurc": ("error detection (AURC)", True),
                                         "shift_auroc": ("shift detection (window AUROC)", False)}
"""Criterion -> (name, lower is better)."""

SVI_ARMS = ("ce", "margin-positive-full-lambda0.05")
"""The arms the SVI filter reads by default: CE-only and the full prior density."""

LAPLACE_TRAIN_WINDOWS = 64
"""Evenly spaced training windows (of the run's context) the Laplace curvature's factors are estimated on: 8192
positions (the curvature is then scaled to the whole training split)."""

LAPLACE_VAL_WINDOWS = 32
"""Validation windows the Laplace prior precision is fitted on."""

LAPLACE_SAMPLES = 32
"""Monte Carlo logit draws of the Laplace predictive (as many as the particle filter's particles)."""


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


# ------------------------------------------------------------------------------------------ methods
@dataclass
class Scores:
    """One method on one model (or one ensemble): per condition, its record and signals ``(windows, L)``, and its
    cost in seconds per position."""

    records: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    signals: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    seconds_per_position: float = 0.0


def _scored(probs: torch.Tensor, targets: torch.Tensor, **signals: torch.Tensor) -> tuple[dict, dict]:
    record = predictive_record(probs, targets)
    out = {"neg_maxprob": 1.0 - record["confidence"], "entropy": record["entropy"]}
    out |= {k: v.detach().double().cpu().numpy() for k, v in signals.items()}
    return record, out


def fitted_temperature(trained: TrainedModel, cache: Path) -> tuple[float, str]:
    """The temperature the robustness study fitted for this model (its calibrated cache), else fitted the same way
    (every validation window); and where it came from."""
    record = read_sealed_json(cache, log=lambda _: None) if cache.exists() else None
    if record is not None and "temperature" in record:
        return float(record["temperature"]), "robustness study"
    inputs, targets = split_windows(trained, "val")
    return fit_temperature(logits_of(trained.net, inputs), targets.flatten()), "fitted here"


@torch.no_grad()
def baseline_scores(trained: TrainedModel, temperature: float, laplace: LastLayerLaplace, windows: dict[str, Any],
                    seed: int) -> tuple[dict[str, Scores], dict[str, torch.Tensor]]:
    """MAP, temperature and Laplace on every condition's windows, and the MAP softmax (the ensemble's member)."""
    gpt = trained.gpt.eval()
    out = {k: Scores() for k in ("map", "temperature", "laplace")}
    member: dict[str, torch.Tensor] = {}
    decoding, sampling, positions = 0.0, 0.0, 0
    for label, w in windows.items():
        started = time.perf_counter()
        phi = gpt.features(w.embeddings)
        logits = gpt.lm_head(phi).double()
        probs = torch.softmax(logits, dim=-1)
        decoding += time.perf_counter() - started
        started = time.perf_counter()
        mean, draws = laplace.predictive(phi, samples=LAPLACE_SAMPLES, seed=seed)
        sampling += time.perf_counter() - started
        member[label] = probs
        targets = w.targets.to(probs.device)
        for key, p, extra in (("map", probs, {}), ("temperature", torch.softmax(logits / temperature, -1), {}),
                              ("laplace", mean, {"mi": mutual_information(draws)})):
            out[key].records[label], out[key].signals[label] = _scored(p, targets, **extra)
        positions += targets.numel()
    out["map"].seconds_per_position = out["temperature"].seconds_per_position = decoding / positions
    out["laplace"].seconds_per_position = (decoding + sampling) / positions  # it needs the features too
    return out, member


def ensemble_scores(members: Sequence[dict[str, torch.Tensor]], windows: dict[str, Any],
                    member_seconds: float) -> Scores:
    """The deep ensemble of the members' MAP softmaxes, per condition."""
    out = Scores(seconds_per_position=member_seconds)
    for label, w in windows.items():
        stack = torch.stack([m[label] for m in members])
        out.records[label], out.signals[label] = _scored(stack.mean(0), w.targets, mi=mutual_information(stack))
    return out


def posterior_as_scores(arrays: dict[str, np.ndarray], facts: dict[str, Any], labels: Sequence[str]) -> Scores:
    """A filter's cached scores of one model (the conditions of ``labels`` it read) as a method's :class:`Scores`."""
    out = Scores(seconds_per_position=facts["seconds_per_position"])
    for label in (lab for lab in labels if f"{lab}/nll" in arrays):
        rec = {f: arrays[f"{label}/{f}"].astype(np.float64 if f != "correct" else bool) for f in RECORD_FIELDS}
        out.records[label] = rec
        out.signals[label] = {"neg_maxprob": 1.0 - rec["confidence"], "entropy": rec["entropy"],
                              "mi": arrays[f"{label}/mi"].astype(np.float64),
                              "neg_margin": -arrays[f"{label}/margin"].astype(np.float64)}
        if f"{label}/ess" in arrays:
            out.signals[label]["neg_ess"] = -arrays[f"{label}/ess"].astype(np.float64)
    return out


# ------------------------------------------------------------------------------------------- an arm
@dataclass
class ArmScores:
    """Every method of one arm, stacked over seeds: ``records[method][condition][field]`` and
    ``signals[method][condition][signal]`` are ``(seeds, windows, L)``; ``facts`` per seed; costs per method."""

    records: dict[str, dict[str, dict[str, np.ndarray]]]
    signals: dict[str, dict[str, dict[str, np.ndarray]]]
    facts: list[dict[str, Any]]
    cost: dict[str, float]
    matched: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    """Under each embedding-noise condition, the record of the particle filter told the noise level (its emission
    matched to it: :data:`~experiments.posterior_scores.MATCHED`), ``(seeds, windows, L)`` per field."""


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
        name = f"{arm}-seed{seed}"
        post_facts, arrays = cached_posterior(run_dir, args.out / "posterior" / name, settings, weights_digest(run_dir),
                                              str(device), progress=args.progress)
        trained = load_trained(run_dir, map_location=device)
        windows = {c.label: condition_windows(trained, c, settings.windows, settings.length, settings.seed)
                   for c in CONDITIONS if c.label in settings.conditions}
        temperature, source = fitted_temperature(trained, args.temperatures / f"{name}.calibrated.json")
        laplace, delta_curve = _laplace(trained)
        baselines, member = baseline_scores(trained, temperature, laplace, windows, settings.seed)
        for key, s in baselines.items():
            per_method[key].append(s)
        per_method["smc"].append(posterior_as_scores(arrays, post_facts, list(windows)))
        matched.append(posterior_as_scores(arrays, post_facts, [label + MATCHED for label in windows]))
        if arm in args.svi_arms:
            svi_facts, svi_arrays = cached_svi(run_dir, args.out / "posterior" / f"{name}.svi", settings,
                                               SVISettings(tuple(args.svi_conditions)), post_facts["tau"],
                                               weights_digest(run_dir), str(device), progress=args.progress)
            per_method["svi"].append(posterior_as_scores(svi_arrays, svi_facts, list(windows)))
            post_facts = {**post_facts, "svi": svi_facts}
        members.append(member)
        window_sets.append(windows)
        facts.append({"seed": seed, "run_dir": str(run_dir), "temperature": temperature,
                      "temperature_from": source, "laplace_prior_precision": laplace.prior_precision,
                      "laplace_curve": {f"{k:g}": v for k, v in delta_curve.items()}, **post_facts})
    ensemble = ensemble_scores(members, window_sets[0], sum(s.seconds_per_position for s in per_method["map"]))
    per_method["ensemble"] = [ensemble] * len(runs)  # one ensemble, repeated per seed row (paired by window)
    per_method = {k: v for k, v in per_method.items() if v}
    return ArmScores({k: _stack(v, "records") for k, v in per_method.items()},
                     {k: _stack(v, "signals") for k, v in per_method.items()}, facts,
                     {k: float(np.mean([s.seconds_per_position for s in v])) for k, v in per_method.items()},
                     {label.removesuffix(MATCHED): r for label, r in _stack(matched, "records").items()})


def _laplace(trained: TrainedModel) -> tuple[LastLayerLaplace, dict[float, float]]:
    """The last-layer Laplace of the run (its curvature estimated on training windows and scaled to every position
    of the training split, the likelihood the model was fitted to), its prior precision fitted on validation."""
    train_inputs, _ = split_windows(trained, "train")
    sample, _ = evenly_spaced(train_inputs, train_inputs, LAPLACE_TRAIN_WINDOWS)
    laplace = LastLayerLaplace.fit(trained.gpt, sample.to(trained.transform.w_k.device),
                                   positions=train_inputs.numel())
    val_inputs, val_targets = split_windows(trained, "val", LAPLACE_VAL_WINDOWS)
    with torch.no_grad():
        phi = trained.gpt.features(trained.gpt.embed(val_inputs.to(trained.transform.w_k.device)))
    delta, curve = fit_prior_precision(laplace, phi, val_targets.to(phi.device), samples=LAPLACE_SAMPLES)
    return laplace.with_prior_precision(delta), curve


# ------------------------------------------------------------------------------------------ metrics
def available(scores: ArmScores, label: str) -> list[str]:
    """The methods that scored condition ``label`` for this arm."""
    return [m for m in METHODS if label in scores.records.get(m, {})]


def contenders(scores: ArmScores, criterion: str, label: str) -> list[tuple[str, str | None]]:
    """The (method, signal) pairs a criterion compares on ``label``: methods alone for the predictive's criteria."""
    methods = available(scores, label)
    if criterion in ("bpc", "ece"):
        return [(m, None) for m in methods]
    return [(m, s) for m in methods for s in METHODS[m][1] if s in scores.signals[m][label]]


def statistic(criterion: str, label: str) -> Callable[[dict[str, np.ndarray]], float]:
    """The criterion's value from arrays ``(seeds, windows, ...)`` of one contender (keys below), pooled over seeds
    and windows (shift detection: the AUROC per seed, averaged)."""
    def value(a: dict[str, np.ndarray]) -> float:
        if criterion == "bpc":
            return float(a["nll"].mean()) / math.log(2.0)
        if criterion == "ece":
            return expected_calibration_error(a["confidence"], a["correct"], ECE_BINS)
        if criterion == "aurc":
            return aurc(a["signal"].reshape(-1), ~a["correct"].reshape(-1))
        clean, shifted = a["clean_signal"].mean(-1), a["signal"].mean(-1)
        return float(np.mean([shift_detection_auroc(c, s) for c, s in zip(clean, shifted)]))
    return value


def contender_arrays(scores: ArmScores, criterion: str, label: str, method: str,
                     signal: str | None) -> dict[str, np.ndarray]:
    """What :func:`statistic` reads for one contender."""
    record = scores.records[method][label]
    if criterion in ("bpc", "ece"):
        return {"nll": record["nll"], "confidence": record["confidence"], "correct": record["correct"]}
    if criterion == "aurc":
        return {"signal": scores.signals[method][label][signal], "correct": record["correct"]}
    return {"signal": scores.signals[method][label][signal], "clean_signal": scores.signals[method]["clean"][signal]}


def point_metrics(scores: ArmScores) -> dict[str, dict[str, Any]]:
    """Per condition and method: the predictive's metrics and, per signal, error AUROC / AURC and shift AUROC."""
    out: dict[str, dict[str, Any]] = {}
    for label in scores.records["map"]:
        out[label] = {}
        for method in available(scores, label):
            record = scores.records[method][label]
            entry: dict[str, Any] = record_metrics({k: v for k, v in record.items()})
            errors = ~record["correct"]
            entry["signals"] = {}
            for s, sig in scores.signals[method][label].items():
                row = {"error_auroc": _auroc_or_none(sig.reshape(-1), errors.reshape(-1)),
                       "aurc": aurc(sig.reshape(-1), errors.reshape(-1))}
                if label != "clean":
                    row["shift_auroc"] = statistic("shift_auroc", label)(
                        contender_arrays(scores, "shift_auroc", label, method, s))
                entry["signals"][s] = row
            out[label][method] = entry
    return out


def _auroc_or_none(scores: np.ndarray, errors: np.ndarray) -> float | None:
    return auroc(scores, errors) if 0 < errors.sum() < errors.size else None


def _value(metrics: dict[str, Any], criterion: str, method: str, signal: str | None) -> float | None:
    entry = metrics[method]
    if signal is None:
        return entry[criterion]
    return entry["signals"][signal].get(criterion)


def verdicts(scores: ArmScores, metrics: dict[str, dict[str, Any]], labels: Sequence[str], draws: int,
             seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per condition and criterion: the best baseline and the best posterior contender (by point estimate) and the
    paired bootstrap interval of their difference, oriented so that negative favours the posterior."""
    out: dict[str, dict[str, Any]] = {}
    for label in labels:
        out[label] = {}
        for criterion, (_, lower_better) in CRITERIA.items():
            if criterion == "shift_auroc" and label == "clean":
                continue
            ranked = [(m, s, _value(metrics[label], criterion, m, s)) for m, s in contenders(scores, criterion, label)]
            ranked = [r for r in ranked if r[2] is not None]
            sign = 1.0 if lower_better else -1.0

            def best(pool: list[tuple[str, str | None, float]]) -> tuple[str, str | None, float]:
                return min(pool, key=lambda r: sign * r[2])

            base = best([r for r in ranked if r[0] in BASELINES])
            post = best([r for r in ranked if r[0] in POSTERIORS])
            stat = statistic(criterion, label)
            arrays = {f"p:{k}": v for k, v in contender_arrays(scores, criterion, label, post[0], post[1]).items()}
            arrays |= {f"b:{k}": v for k, v in contender_arrays(scores, criterion, label, base[0], base[1]).items()}

            def difference(a: dict[str, np.ndarray]) -> float:
                p = stat({k[2:]: v for k, v in a.items() if k.startswith("p:")})
                b = stat({k[2:]: v for k, v in a.items() if k.startswith("b:")})
                return sign * (p - b)

            interval = paired_bootstrap(arrays, difference, draws=draws, seed=seed)
            out[label][criterion] = {"posterior": _contender(post), "best_baseline": _contender(base),
                                     "difference": interval.to_dict(), "verdict": verdict(interval)}
    return out


NOISE_LABELS = tuple(c.label for c in CONDITIONS if c.family in ("noise", "relative_noise"))
"""The embedding-noise conditions, where the posterior reads the noisy embeddings with its emission matched to the
noise: Bayesian denoising, its best case."""


def denoising(scores: ArmScores, draws: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Under each embedding-noise condition: does the posterior predictive of the particle filter told the noise
    level (its emission matched to it) beat decoding the noisy embeddings directly (MAP)? The difference posterior -
    MAP in BPC and ECE, paired bootstrap."""
    out: dict[str, dict[str, Any]] = {}
    for label in NOISE_LABELS:
        out[label] = {}
        for criterion in ("bpc", "ece"):
            stat = statistic(criterion, label)
            arrays = {f"p:{k}": scores.matched[label][k] for k in ("nll", "confidence", "correct")}
            arrays |= {f"m:{k}": v for k, v in contender_arrays(scores, criterion, label, "map", None).items()}

            def difference(a: dict[str, np.ndarray]) -> float:
                return (stat({k[2:]: v for k, v in a.items() if k.startswith("p:")})
                        - stat({k[2:]: v for k, v in a.items() if k.startswith("m:")}))

            interval = paired_bootstrap(arrays, difference, draws=draws, seed=seed)
            out[label][criterion] = {"difference": interval.to_dict(), "verdict": verdict(interval)}
    return out


def denoising_table(arms: dict[str, dict[str, Any]]) -> str:
    """Posterior - MAP under embedding noise, per arm and level (BPC, ECE)."""
    rows = []
    for label in NOISE_LABELS:
        for criterion in ("bpc", "ece"):
            cells = []
            for rec in arms.values():
                c = rec["denoising"][label][criterion]
                d = c["difference"]
                cells.append(f"{VERDICT_MARKS[c['verdict']]} {d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]")
            rows.append([label, CRITERIA[criterion][0], *cells])
    return markdown_table(["condition", "criterion", *arms], rows)


def _contender(entry: tuple[str, str | None, float]) -> dict[str, Any]:
    method, signal, value = entry
    return {"method": method, "signal": signal, "value": value}


def contender_name(entry: dict[str, Any]) -> str:
    name, signals = METHODS[entry["method"]]
    return name if entry["signal"] is None else f"{name}, {signals[entry['signal']]}"


def family_verdicts(arms: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per family (at its strongest level) and criterion, per arm: the best baseline and the posterior's verdict
    against it (``better`` / ``worse`` / ``not distinguishable``)."""
    out: dict[str, dict[str, Any]] = {}
    for family, label in STRONGEST.items():
        out[family] = {}
        for criterion in CRITERIA:
            cells = {arm: rec["verdicts"][label][criterion] for arm, rec in arms.items()
                     if criterion in rec["verdicts"].get(label, {})}
            if cells:
                out[family][criterion] = {"label": label,
                                          "best_baseline": {arm: c["best_baseline"] for arm, c in cells.items()},
                                          "posterior": {arm: c["verdict"] for arm, c in cells.items()}}
    return out


def family_table(families: dict[str, dict[str, Any]]) -> str:
    """Per family and criterion: the baselines that are best (with the number of arms where each is), and how the
    posterior fared against the best one over the arms."""
    rows = []
    for family in (f for f in STRONGEST if f in families):  # the study's order (the JSON keeps keys sorted)
        criteria = families[family]
        row = [f"{FAMILY_NAMES[family]} ({STRONGEST[family]})"]
        for criterion in CRITERIA:
            if criterion not in criteria:
                row.append("")
                continue
            cell = criteria[criterion]
            names = [contender_name(b) for b in cell["best_baseline"].values()]
            best = ", ".join(f"{n} ({names.count(n)})" for n in sorted(set(names), key=lambda n: -names.count(n)))
            verdicts = list(cell["posterior"].values())
            row.append(f"{best}; posterior: {verdicts.count('better')} better, "
                       f"{verdicts.count('not distinguishable')} n.d., {verdicts.count('worse')} worse")
        rows.append(row)
    return markdown_table(["shift (strongest level)", *(name for name, _ in CRITERIA.values())], rows)


def posterior_wins(arms: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every (arm, condition, criterion) where the posterior beats the best baseline, interval and all."""
    return [{"arm": arm, "condition": label, "criterion": criterion, **cell}
            for arm, rec in arms.items() for label, cells in rec["verdicts"].items()
            for criterion, cell in cells.items() if cell["verdict"] == "better"]


# ------------------------------------------------------------------------------------------- report
def tau_table(arms: dict[str, dict[str, Any]]) -> str:
    """The fitted tau per arm: validation NLL of the posterior predictive at each tau / sigma, relative to the
    ``tau -> 0`` limit (the MAP predictive), mean over seeds."""
    ratios = list(next(iter(arms.values()))["facts"][0]["tau_curve"])
    headers = ["arm", "sigma (empirical Bayes)", "sigma (learned in training)",
               *[f"tau = {r} sigma" for r in ratios[1:]], "best tau / sigma (per seed)", "MAP limit best"]
    rows = []
    for arm, rec in arms.items():
        facts = rec["facts"]
        deltas = [np.mean([(f["tau_curve"][r] - f["tau_curve"]["0"]) / math.log(2.0) for f in facts])
                  for r in ratios[1:]]
        learned = [f["learned_sigma"] for f in facts if f["learned_sigma"] is not None]
        rows.append([arm, np.mean([f["sigma"] for f in facts]), np.mean(learned) if learned else "-",
                     *[f"{d:+.4f}" for d in deltas],
                     "/".join(f"{f['tau_ratio']:g}" for f in facts),
                     f"{sum(f['map_limit_best'] for f in facts)} of {len(facts)} seeds"])
    return markdown_table(headers, rows, digits=4)


def fitted_baselines_table(arms: dict[str, dict[str, Any]]) -> str:
    """Per arm and seed: the fitted temperature and the Laplace prior precision fitted on validation (at the top
    of its grid the Laplace predictive is the MAP softmax)."""
    top = max(PRIOR_PRECISION_GRID)
    rows = [[arm, " / ".join(f"{f['temperature']:.3f}" for f in rec["facts"]),
             " / ".join(f"{f['laplace_prior_precision']:.3g}" for f in rec["facts"]),
             f"{sum(f['laplace_prior_precision'] >= top for f in rec['facts'])} of {len(rec['facts'])} seeds"]
            for arm, rec in arms.items()]
    return markdown_table(["arm", "temperature (per seed)", "Laplace prior precision (per seed)",
                           f"prior precision at the grid's top ({top:g})"], rows)


def metrics_table(arm: dict[str, Any], labels: Sequence[str]) -> str:
    """One arm: per condition and method, BPC, top-1 error, ECE, Brier, and its best signal's error AURC and shift
    AUROC (pooled over seeds)."""
    headers = ["condition", "method", "BPC", "top-1 error", "ECE", "Brier", "best error signal (AURC)",
               "best shift signal (AUROC)"]
    rows = []
    for label in labels:
        for method, m in arm["metrics"][label].items():
            name, signals = METHODS[method]
            err = min(m["signals"], key=lambda s: m["signals"][s]["aurc"])
            row = [label, name, m["bpc"], m["top1_error"], m["ece"], m["brier"],
                   f"{signals[err]} ({m['signals'][err]['aurc']:.3f})"]
            if label == "clean":
                row.append("")
            else:
                sh = max(m["signals"], key=lambda s: m["signals"][s]["shift_auroc"])
                row.append(f"{signals[sh]} ({m['signals'][sh]['shift_auroc']:.3f})")
            rows.append(row)
    return markdown_table(headers, rows)


SELECTION = ("On each side the contender is the best by its point estimate on these windows (for error and shift "
             "detection, the best of the method's signals): the posterior's best filter and signal against the best "
             "baseline and signal, a selection both sides share.")

VERDICT_MARKS = {"better": "**better**", "worse": "worse", "not distinguishable": "n.d."}


def posterior_verdict_table(arms: dict[str, dict[str, Any]]) -> str:
    """Per family (strongest level) and criterion: the posterior against the best baseline, per arm (n.d.: not
    distinguishable)."""
    names = list(arms)
    headers = ["shift", "criterion", *names]
    rows = []
    for family, label in STRONGEST.items():
        for criterion, (cname, _) in CRITERIA.items():
            if criterion == "shift_auroc" and label == "clean":
                continue
            cells = []
            for arm in names:
                c = arms[arm]["verdicts"][label][criterion]
                d = c["difference"]
                cells.append(f"{VERDICT_MARKS[c['verdict']]} {d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] "
                             f"vs {contender_name(c['best_baseline'])}")
            rows.append([f"{FAMILY_NAMES[family]} ({label})", cname, *cells])
    return markdown_table(headers, rows)


def cost_table(arms: dict[str, dict[str, Any]]) -> str:
    headers = ["method", *arms, "against the ensemble (mean)"]
    rows = []
    for method, (name, _) in METHODS.items():
        costs = [arms[a]["cost"].get(method) for a in arms]
        ratio = cost_ratio(arms, method)
        rows.append([name, *[f"{1000 * c:.3g} ms" if c is not None else "-" for c in costs],
                     f"{ratio:.3g}x" if ratio is not None else "-"])
    return markdown_table(headers, rows)


def cost_ratio(arms: dict[str, dict[str, Any]], method: str) -> float | None:
    """The method's cost per position over the deep ensemble's, mean over the arms it scored (``None``: none)."""
    ratios = [rec["cost"][method] / rec["cost"]["ensemble"] for rec in arms.values() if method in rec["cost"]]
    return float(np.mean(ratios)) if ratios else None


def plot_tau(arms: dict[str, dict[str, Any]], path: Path) -> Path:
    """Validation NLL (bits) of the posterior predictive against tau / sigma, relative to the MAP limit."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, rec in arms.items():
        ratios = [r for r in rec["facts"][0]["tau_curve"] if r != "0"]
        y = [np.mean([(f["tau_curve"][r] - f["tau_curve"]["0"]) / math.log(2.0) for f in rec["facts"]]) for r in ratios]
        ax.plot([float(r) for r in ratios], y, marker="o", label=arm)
    ax.axhline(0.0, color="k", lw=0.8, ls="--", label="tau -> 0 (MAP)")
    ax.set(xscale="log", xlabel="tau / sigma", ylabel="validation NLL - MAP's (bits per character)",
           title="Fitting tau: the posterior predictive against its MAP limit")
    ax.legend(fontsize=7)
    return save(fig, path)


def plot_reliability(scores: ArmScores, labels: Sequence[str], arm: str, path: Path) -> Path:
    """Reliability diagrams (accuracy against confidence, :data:`ECE_BINS` bins, pooled over seeds) of every
    method on ``labels``."""
    fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 4), squeeze=False)
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    for ax, label in zip(axes[0], labels):
        for method in available(scores, label):
            name, rec = METHODS[method][0], scores.records[method][label]
            conf, hit = rec["confidence"].reshape(-1), rec["correct"].reshape(-1)
            which = np.clip(np.digitize(conf, edges[1:-1]), 0, ECE_BINS - 1)
            keep = [b for b in range(ECE_BINS) if (which == b).any()]
            ax.plot([conf[which == b].mean() for b in keep], [hit[which == b].mean() for b in keep], marker=".",
                    label=name)
        ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--")
        ax.set(xlabel="confidence (max p)", ylabel="accuracy", title=f"{arm}: {label}")
    axes[0][0].legend(fontsize=7)
    return save(fig, path)


def plot_risk_coverage(scores: ArmScores, labels: Sequence[str], arm: str, path: Path) -> Path:
    """Risk-coverage curves of every method's predictive entropy (and MAP's max-probability) on ``labels``."""
    fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 4), squeeze=False)
    for ax, label in zip(axes[0], labels):
        for method, signal in [*((m, "entropy") for m in available(scores, label)), ("map", "neg_maxprob")]:
            errors = ~scores.records[method][label]["correct"].reshape(-1)
            coverage, risk = risk_coverage(scores.signals[method][label][signal].reshape(-1), errors)
            ax.plot(coverage, risk, lw=1, ls="--" if signal == "neg_maxprob" else "-",
                    label=f"{METHODS[method][0]}, {METHODS[method][1][signal]}")
        ax.set(xlabel="coverage", ylabel="risk (top-1 error)", title=f"{arm}: {label}")
    axes[0][0].legend(fontsize=6)
    return save(fig, path)


def headline(summary: dict[str, Any]) -> list[str]:
    """What the posterior is good for, from the summary: generated, never written by hand."""
    arms, wins = summary["arms"], summary["posterior_wins"]
    cells = sum(len(c) for rec in arms.values() for c in rec["verdicts"].values())
    map_best = sum(f["map_limit_best"] for rec in arms.values() for f in rec["facts"])
    models = sum(len(rec["facts"]) for rec in arms.values())
    smallest = sum(f["tau_ratio"] == min(summary["settings"]["tau_ratios"]) for rec in arms.values()
                   for f in rec["facts"])
    tau_line = (f"- Fitting tau on validation: the `tau -> 0` limit (the MAP predictive) is at least as good as every "
                f"positive tau for {map_best} of {models} models; the best positive tau is the grid's smallest for "
                f"{smallest} of {models}.")
    lines = []
    if wins:
        family_of = {c.label: c.family for c in CONDITIONS}
        groups: dict[str, dict[str, set[str]]] = {}
        for w in wins:
            groups.setdefault(family_of[w["condition"]], {}).setdefault(w["criterion"], set()).add(w["arm"])
        where = "; ".join(f"{FAMILY_NAMES[f]}: " + ", ".join(f"{CRITERIA[c][0]} in {len(a)} of {len(arms)} arms"
                                                              for c, a in crits.items())
                          for f, crits in groups.items())
        lines.append(f"- The latent posterior beats the best baseline in {len(wins)} of {cells} (arm, condition, "
                     f"criterion) cells, under {where} (at some level of the family).")
    else:
        lines.append(f"- The latent posterior beats the best baseline in none of {cells} (arm, condition, criterion) "
                     "cells.")
    worse = sum(c["verdict"] == "worse" for rec in arms.values() for cs in rec["verdicts"].values()
                for c in cs.values())
    lines.append(f"- It is worse than the best baseline in {worse} of them, not distinguishable in the rest.")
    gap = max(abs(rec["metrics"]["clean"]["smc"]["bpc"] - rec["metrics"]["clean"]["map"]["bpc"])
              for rec in arms.values())
    ensemble_best = sum(c["bpc"]["best_baseline"]["method"] == "ensemble" for rec in arms.values()
                        for c in rec["verdicts"].values())
    lines.append(f"- Why: fitted by validation likelihood, the posterior hardly spreads beyond the point estimate "
                 f"(tau below), so on clean text its BPC is within {gap:.4f} of MAP's in every arm and it inherits "
                 f"MAP's confidence; the deep ensemble (three models) is the best baseline in BPC in {ensemble_best} "
                 f"of {sum(len(rec['verdicts']) for rec in arms.values())} (arm, condition) cells.")
    lines.append(tau_line)
    per_arm = {arm: sum(c["bpc"]["verdict"] == "better" for c in rec["denoising"].values())
               for arm, rec in arms.items()}
    where = ", ".join(f"{arm} at {n} of {len(arms[arm]['denoising'])} levels" for arm, n in per_arm.items() if n)
    lines.append(f"- Bayesian denoising: under embedding noise, the posterior told the noise level (its emission "
                 f"matched to it) predicts better than decoding the noisy embeddings directly (BPC) in "
                 f"{sum(per_arm.values())} of {sum(len(rec['denoising']) for rec in arms.values())} (arm, level) "
                 f"cells{': ' + where if where else ''}.")
    costs = [f"{cost_ratio(arms, m):.0f} times ({METHODS[m][0]})" for m in POSTERIORS if cost_ratio(arms, m)]
    lines.append(f"- The latent posterior costs {' and '.join(costs)} the deep ensemble per position (mean over the "
                 "arms).")
    svi = summary["settings"]["svi"]
    read = [arm for arm in svi["arms"] if "svi" in arms.get(arm, {}).get("cost", {})]
    if read:
        ratio = np.mean([arms[a]["cost"]["svi"] / arms[a]["cost"]["smc"] for a in read])
        lines.append(f"- The SVI filter ({svi['steps']} steps per position) read only {', '.join(read)}, on "
                     f"{', '.join(svi['conditions'])}: it costs {ratio:.0f} times the particle filter per position.")
    return lines


def wins_table(wins: list[dict[str, Any]]) -> str:
    """Every cell where the posterior beats the best baseline, with its interval."""
    rows = [[w["arm"], w["condition"], CRITERIA[w["criterion"]][0], contender_name(w["posterior"]),
             contender_name(w["best_baseline"]),
             f"{w['difference']['estimate']:+.3f} [{w['difference']['low']:+.3f}, {w['difference']['high']:+.3f}]"]
            for w in wins]
    return markdown_table(["arm", "condition", "criterion", "posterior", "best baseline", "difference"], rows)


def summary_markdown(summary: dict[str, Any]) -> str:
    """The headline and, per shift family, the best baselines and the posterior's verdicts: what README shows."""
    return ("\n".join(headline(summary)) + "\n\nPer shift family (strongest level), per criterion: the best baseline "
            "in each arm (how many arms) and the latent posterior against it over the arms (95% paired bootstrap "
            "over seeds and windows; n.d.: not distinguishable).\n\n" + family_table(summary["families"]))


# ---------------------------------------------------------------------------------------------- run
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
