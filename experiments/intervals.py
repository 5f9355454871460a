"""Paired bootstrap intervals over training seeds and evaluation windows.

A comparison of two training settings has two sources of chance: the seeds the models were trained with
and the windows they are scored on. Per-window scores ``(seeds, windows)`` of the two settings are paired
by seed index (the same seed starts both from the same initialisation) and by window (the same text,
noise and corruption). Each bootstrap draw resamples seed indices and window indices independently, with
replacement, applies the same draw to every array, and recomputes the statistic; the interval is the
percentile interval of the draws.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = ["Interval", "compare_levels", "mean_difference", "paired_bootstrap", "verdict"]

Statistic = Callable[[Mapping[str, np.ndarray]], float]


@dataclass(frozen=True)
class Interval:
    """A point estimate (on the data as observed) and a bootstrap percentile interval."""

    estimate: float
    low: float
    high: float
    level: float

    def to_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level}


def paired_bootstrap(arrays: Mapping[str, np.ndarray], statistic: Statistic, draws: int = 2000,
                     level: float = 0.95, seed: int = 0) -> Interval:
    """The statistic of ``arrays`` (each ``(seeds, windows, ...)``, sharing their first two dimensions; any further
    dimensions, e.g. the positions of a window, travel with their window) with its interval.

    Raises ``ValueError`` for arrays of different or empty shapes, or a level outside ``(0, 1)``.
    """
    shapes = {a.shape[:2] for a in arrays.values()}
    if len(shapes) != 1 or any(a.ndim < 2 for a in arrays.values()):
        raise ValueError(f"the arrays must share their (seeds, windows) shape, got {sorted(shapes)}")
    n_seeds, n_windows = shapes.pop()
    if n_seeds < 1 or n_windows < 1:
        raise ValueError("need at least one seed and one window")
    if not 0.0 < level < 1.0 or draws < 1:
        raise ValueError(f"need 0 < level < 1 and draws >= 1, got level={level}, draws={draws}")
    rng = np.random.default_rng(seed)
    values = np.empty(draws)
    for i in range(draws):
        s = rng.integers(0, n_seeds, n_seeds)
        w = rng.integers(0, n_windows, n_windows)
        values[i] = statistic({k: a[np.ix_(s, w)] for k, a in arrays.items()})
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return Interval(float(statistic(arrays)), float(low), float(high), level)


def mean_difference(arrays: Mapping[str, np.ndarray]) -> float:
    """``mean(method) - mean(reference)``: the statistic for a difference in mean BPC."""
    return float(arrays["method"].mean() - arrays["reference"].mean())


def verdict(interval: Interval) -> Literal["better", "worse", "not distinguishable"]:
    """For a difference in a loss (lower is better): better when the whole interval is below 0, worse when
    it is above 0, otherwise not distinguishable."""
    if interval.high < 0.0:
        return "better"
    if interval.low > 0.0:
        return "worse"
    return "not distinguishable"


def compare_levels(method: Callable[[str], np.ndarray], reference: Callable[[str], np.ndarray], labels: Sequence[str],
                   draws: int, seed: int, degradation: bool = True) -> dict[str, Any]:
    """A method against a reference at every level in ``labels`` (the first, ``"clean"``, gives the clean cost):
    ``method(label)`` and ``reference(label)`` are the per-window BPC ``(seeds, windows)`` of the two, paired by
    row and column. Per level: the difference in mean BPC with its interval and verdict and, with
    ``degradation`` (all levels scored on the same windows), the difference in relative degradation from clean
    (percentage points)."""

    def interval(statistic: Statistic, **arrays: np.ndarray) -> Interval:
        return paired_bootstrap(arrays, statistic, draws=draws, seed=seed)

    clean = {"method": method(labels[0]), "reference": reference(labels[0])}
    result: dict[str, Any] = {
        "clean_cost_percent": interval(
            lambda a: 100 * (a["method"].mean() / a["reference"].mean() - 1), **clean).to_dict(),
        "levels": {},
    }
    for label in labels[1:]:
        noisy = {"method": method(label), "reference": reference(label)}
        bpc = interval(mean_difference, **noisy)
        level: dict[str, Any] = {"bpc_difference": bpc.to_dict(), "bpc_verdict": verdict(bpc)}
        if degradation:
            change = interval(
                lambda a: 100 * (a["m"].mean() / a["mc"].mean() - a["r"].mean() / a["rc"].mean()),
                m=noisy["method"], mc=clean["method"], r=noisy["reference"], rc=clean["reference"])
            level |= {"degradation_difference_points": change.to_dict(), "degradation_verdict": verdict(change)}
        result["levels"][label] = level
    return result
