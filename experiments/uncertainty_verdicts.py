"""The uncertainty study's metrics and verdicts: per condition and method, the predictive's metrics and each signal's
error and shift detection; the posterior against the best baseline, and against decoding noisy embeddings, by a
paired bootstrap over seeds and windows (:mod:`experiments.intervals`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .calibration import ECE_BINS
from .intervals import Interval, paired_bootstrap, verdict
from .selective import aurc, auroc
from .shift_conditions import CONDITIONS
from .uncertainty_methods import BASELINES, METHODS, POSTERIORS, ArmScores, available
from .uncertainty_metrics import (
    expected_calibration_error,
    record_metrics,
    shift_detection_auroc,
)

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

NOISE_LABELS = tuple(c.label for c in CONDITIONS if c.family in ("noise", "relative_noise"))
"""The embedding-noise conditions, where the particle filter also runs told the noise level (its emission matched to
it): Bayesian denoising, its best case, asked against decoding the noisy embeddings."""


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
            entry: dict[str, Any] = record_metrics(record)
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


def paired_difference(stat: Callable[[dict[str, np.ndarray]], float], first: dict[str, np.ndarray],
                      second: dict[str, np.ndarray], sign: float, draws: int, seed: int) -> Interval:
    """``sign * (stat(first) - stat(second))`` with its paired bootstrap interval: both contenders' arrays
    ``(seeds, windows, ...)`` resampled by the same seeds and windows."""
    arrays = {f"a:{k}": v for k, v in first.items()} | {f"b:{k}": v for k, v in second.items()}

    def difference(a: dict[str, np.ndarray]) -> float:
        return sign * (stat({k[2:]: v for k, v in a.items() if k.startswith("a:")})
                       - stat({k[2:]: v for k, v in a.items() if k.startswith("b:")}))

    return paired_bootstrap(arrays, difference, draws=draws, seed=seed)


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
            interval = paired_difference(statistic(criterion, label),
                                         contender_arrays(scores, criterion, label, post[0], post[1]),
                                         contender_arrays(scores, criterion, label, base[0], base[1]),
                                         sign, draws, seed)
            out[label][criterion] = {"posterior": _contender(post), "best_baseline": _contender(base),
                                     "difference": interval.to_dict(), "verdict": verdict(interval)}
    return out


def denoising(scores: ArmScores, draws: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Under each embedding-noise condition: does the posterior predictive of the particle filter told the noise
    level (its emission matched to it) beat decoding the noisy embeddings directly (MAP)? The difference posterior -
    MAP in BPC and ECE, paired bootstrap."""
    out: dict[str, dict[str, Any]] = {}
    for label in NOISE_LABELS:
        out[label] = {}
        for criterion in ("bpc", "ece"):
            interval = paired_difference(statistic(criterion, label),
                                         {k: scores.matched[label][k] for k in ("nll", "confidence", "correct")},
                                         contender_arrays(scores, criterion, label, "map", None), 1.0, draws, seed)
            out[label][criterion] = {"difference": interval.to_dict(), "verdict": verdict(interval)}
    return out


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


def posterior_wins(arms: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every (arm, condition, criterion) where the posterior beats the best baseline, interval and all."""
    return [{"arm": arm, "condition": label, "criterion": criterion, **cell}
            for arm, rec in arms.items() for label, cells in rec["verdicts"].items()
            for criterion, cell in cells.items() if cell["verdict"] == "better"]
