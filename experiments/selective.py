"""Selective-prediction metrics in numpy: AUROC of an uncertainty score for errors, and risk-coverage / AURC.

Convention: a *score* is an uncertainty, higher meaning "more likely wrong"; ``errors`` is a boolean array.
Ties are handled exactly in expectation over a random order of the tied items: AUROC by mid-ranks
(Mann-Whitney U), the risk-coverage curve by spreading each tie group's errors evenly over it.

Example:
    >>> import numpy as np
    >>> auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True]))
    0.75
    >>> round(aurc(np.array([1.0, 2.0, 3.0]), np.array([False, True, False])), 4)
    0.2778
"""

from __future__ import annotations

import numpy as np

__all__ = ["aurc", "auroc", "cross_fitted_logistic", "oracle_aurc", "risk_coverage"]


def _groups(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(group index of each item, size of each group)`` for the distinct values of ``scores``, ascending."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    return inverse.reshape(-1), counts


def _check(scores: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, errors = np.asarray(scores, dtype=float).reshape(-1), np.asarray(errors, dtype=bool).reshape(-1)
    if scores.shape != errors.shape or scores.size == 0:
        raise ValueError(f"need equally long, non-empty scores and errors, got {scores.shape} and {errors.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return scores, errors


def auroc(scores: np.ndarray, errors: np.ndarray) -> float:
    """``P(score of an error > score of a correct item) + P(tie) / 2``, by mid-ranks.

    Raises ``ValueError`` when ``errors`` holds only one class (the AUROC is undefined).
    """
    scores, errors = _check(scores, errors)
    n_pos = int(errors.sum())
    n_neg = errors.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both errors and correct items")
    group, counts = _groups(scores)
    ends = np.cumsum(counts)
    mid_ranks = (ends - (counts - 1) / 2.0)[group]  # ranks 1..n, ties share their mean rank
    return float((mid_ranks[errors].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def risk_coverage(scores: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(coverage, risk)`` keeping the ``k = 1..n`` least uncertain items: ``coverage = k / n`` and
    ``risk = E[errors among them] / k`` (ties in random order)."""
    scores, errors = _check(scores, errors)
    n = scores.size
    group, counts = _groups(scores)
    group_errors = np.bincount(group, weights=errors.astype(float), minlength=counts.size)
    ends, errors_to_end = np.cumsum(counts), np.cumsum(group_errors)
    k = np.arange(1, n + 1)
    g = np.searchsorted(ends, k, side="left")  # the tie group holding the k-th item
    before = ends[g] - counts[g]
    expected = errors_to_end[g] - group_errors[g] + (k - before) * group_errors[g] / counts[g]
    return k / n, expected / k


def aurc(scores: np.ndarray, errors: np.ndarray) -> float:
    """Area under the risk-coverage curve, ``(1/n) sum_k risk(k)`` (lower is better)."""
    return float(risk_coverage(scores, errors)[1].mean())


def oracle_aurc(errors: np.ndarray) -> float:
    """The AURC of a score that ranks every error last: the best any score can reach."""
    errors = np.asarray(errors, dtype=bool).reshape(-1)
    k = np.arange(1, errors.size + 1)
    return float((np.maximum(0, k - (errors.size - errors.sum())) / k).mean())


def cross_fitted_logistic(features: np.ndarray, errors: np.ndarray, folds: np.ndarray, l2: float = 1e-3,
                          iterations: int = 50) -> np.ndarray:
    """Combine uncertainty scores: the log-odds of an error under a logistic regression on ``features``
    ``(n, k)``, each item scored by the model fitted on the *other* folds (``folds`` ``(n,)`` labels), so
    that no item scores itself. Features are standardised on the fitting folds; the fit is Newton's method
    (IRLS) on the summed log-likelihood with a small ``l2`` ridge, which keeps it finite on separable data
    and on folds with one class only.
    """
    features, errors = np.asarray(features, dtype=float), np.asarray(errors, dtype=float).reshape(-1)
    folds = np.asarray(folds).reshape(-1)
    if features.ndim != 2 or features.shape[0] != errors.size or folds.size != errors.size:
        raise ValueError(f"need features (n, k), errors (n,) and folds (n,), got {features.shape}, "
                         f"{errors.shape} and {folds.shape}")
    if np.unique(folds).size < 2:
        raise ValueError("cross-fitting needs at least two folds")
    out = np.empty(errors.size)
    for fold in np.unique(folds):
        fit, held = folds != fold, folds == fold
        mean, std = features[fit].mean(0), features[fit].std(0) + 1e-12

        def design(rows: np.ndarray) -> np.ndarray:
            return np.hstack([np.ones((int(rows.sum()), 1)), (features[rows] - mean) / std])

        x, y, w = design(fit), errors[fit], np.zeros(features.shape[1] + 1)
        ridge = l2 * np.eye(w.size)
        for _ in range(iterations):
            p = 1.0 / (1.0 + np.exp(-(x @ w)))
            step = np.linalg.solve(x.T @ (x * (p * (1 - p))[:, None]) + ridge, x.T @ (y - p) - ridge @ w)
            w = w + step
            if np.abs(step).max() < 1e-10:
                break
        out[held] = design(held) @ w
    return out
