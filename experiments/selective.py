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

__all__ = ["aurc", "auroc", "oracle_aurc", "risk_coverage"]


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
