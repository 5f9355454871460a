"""Attention-weighted statistics of a sequence: the quantities eq. (7), (13) of the paper are built from.

Every function takes attention weights ``alpha`` of shape ``(..., T, S)`` (row ``t`` is a probability
vector over the attended positions ``s``, or all zeros where position ``t`` has no context) and
per-position features of shape ``(..., S, n)``, and returns one statistic per query position ``t``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["weighted_mean", "weighted_cross_covariance", "weighted_covariance", "weighted_variance", "attention_entropy"]


def weighted_mean(alpha: Tensor, a: Tensor) -> Tensor:
    """``mu_t = sum_s alpha_ts a_s`` (eq. 7). Shapes ``(..., T, S)``, ``(..., S, n)`` -> ``(..., T, n)``."""
    return alpha @ a


def weighted_cross_covariance(alpha: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``C_t = sum_s alpha_ts (a_s - abar_t)(b_s - bbar_t)^T`` with ``abar_t = sum_s alpha_ts a_s``.

    Shapes ``alpha (..., T, S)``, ``a (..., S, n)``, ``b (..., S, m)`` -> ``(..., T, n, m)``.
    Computed from second moments about the sequence mean (the covariance is shift-invariant, and the
    shift removes most of the cancellation of ``E[ab^T] - E[a]E[b]^T`` in float32). Rows of ``alpha``
    that are all zero (no context) give a zero matrix.
    """
    a = a - a.mean(dim=-2, keepdim=True)
    b = b - b.mean(dim=-2, keepdim=True)
    n, m = a.shape[-1], b.shape[-1]
    outer = (a.unsqueeze(-1) * b.unsqueeze(-2)).flatten(-2)  # (..., S, n*m)
    second = (alpha @ outer).unflatten(-1, (n, m))  # (..., T, n, m)
    abar, bbar = alpha @ a, alpha @ b  # (..., T, n), (..., T, m)
    return second - abar.unsqueeze(-1) * bbar.unsqueeze(-2)


def weighted_covariance(alpha: Tensor, a: Tensor) -> Tensor:
    """``Sigma_t = sum_s alpha_ts (a_s - mu_t)(a_s - mu_t)^T`` (eq. 13), shape ``(..., T, n, n)``."""
    return weighted_cross_covariance(alpha, a, a)


def weighted_variance(alpha: Tensor, a: Tensor) -> Tensor:
    """``tr(Sigma_t) = sum_s alpha_ts ||a_s - mu_t||^2``, the total attention-weighted variance, shape ``(..., T)``.

    The trace of :func:`weighted_covariance` without forming the ``n x n`` matrices (centred on the
    sequence mean first, as there).
    """
    a = a - a.mean(dim=-2, keepdim=True)
    return (alpha @ a.pow(2).sum(-1, keepdim=True)).squeeze(-1) - (alpha @ a).pow(2).sum(-1)


def attention_entropy(alpha: Tensor) -> Tensor:
    """Shannon entropy ``-sum_s alpha_ts log alpha_ts`` of each attention row, in nats; 0 for an empty row."""
    return -(alpha * torch.log(alpha.clamp_min(torch.finfo(alpha.dtype).tiny))).sum(-1)
