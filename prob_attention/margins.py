"""Margins to degeneracy and support tokens (Section 3.2, eq. 9, 10, 25; Definition 3.1).

Every function takes a :class:`~prob_attention.transform.CausalAttentionTransform` and a batch of
embeddings ``x`` of shape ``batch x T x d`` and returns one value per position (``batch x T``), or
per head and position. The first position has an empty context: its block is ``J_11 = I``, so its
log-det margin is 0 and its spectral and singular margins are 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .transform import CausalAttentionTransform
from .weighted_moments import entropy, weighted_covariance

__all__ = [
    "log_det_margin",
    "spectral_margin",
    "singular_margin",
    "sequence_margin",
    "support_tokens",
    "safe_log_barrier",
    "attention_weights",
    "attention_entropy",
    "attention_covariance",
]


def _blocks(transform: CausalAttentionTransform, x: Tensor) -> Tensor:
    flat = x.reshape(-1, *x.shape[-2:])
    transform.validate_embeddings(flat)
    return transform.jacobian_blocks(transform.attend(flat)).reshape(*x.shape[:-2], *x.shape[-2:], x.shape[-1])


def log_det_margin(transform: CausalAttentionTransform, x: Tensor) -> Tensor:
    """Signed log-det margin ``log det J_tt`` (eq. 25); ``-inf`` where ``det J_tt <= 0`` (past the boundary).

    Its sum over ``t`` is the margin barrier ``sum_t log det(I - Sigma_t A)`` of eq. (11).
    """
    logabs, sign = transform.log_abs_det_blocks(x)
    return torch.where(sign > 0, logabs, torch.full_like(logabs, -math.inf))


def spectral_margin(transform: CausalAttentionTransform, x: Tensor) -> Tensor:
    """``m_t = 1 - rho(I - J_tt)``, i.e. ``1 - rho(Sigma_t A)`` for one head with values = x (Lemma B.4).

    A positive spectral margin is sufficient for ``det J_tt > 0``.
    """
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    return 1.0 - torch.linalg.eigvals(eye - _blocks(transform, x)).abs().amax(-1)


def singular_margin(transform: CausalAttentionTransform, x: Tensor) -> Tensor:
    """Smallest singular value of ``J_tt``: the distance of the block to the nearest singular matrix."""
    return torch.linalg.svdvals(_blocks(transform, x))[..., -1]


def sequence_margin(margins: Tensor) -> Tensor:
    """``m = min_t m_t`` (eq. 10), shape ``batch``."""
    if margins.shape[-1] == 0:
        raise ValueError("sequence_margin of an empty sequence")
    return margins.amin(-1)


def support_tokens(margins: Tensor, tol: float = 0.0) -> Tensor:
    """Support tokens (Definition 3.1): positions whose margin is within ``tol`` of the sequence margin.

    Returns a boolean mask of the margins' shape; ``tol = 0`` keeps the argmin positions only.
    """
    if tol < 0:
        raise ValueError(f"tol must be non-negative, got {tol}")
    return margins <= sequence_margin(margins).unsqueeze(-1) + tol


def safe_log_barrier(logabs: Tensor, sign: Tensor, floor: float = 1e-3) -> tuple[Tensor, Tensor]:
    """The per-position barrier ``log det J_tt`` with a safeguard at the degeneracy boundary.

    Where ``det J_tt > floor`` this is exactly ``log det J_tt``. At or past the boundary
    (``det J_tt <= floor``, including a negative determinant, where the map has folded) the log is
    replaced by its tangent line at ``floor`` (the "extended log-barrier"),
    ``log(floor) + (det - floor) / floor``: finite, continuously differentiable and still pushing the
    determinant up with slope ``1 / floor``, so a step that crosses zero never yields NaN or inf.

    Args:
        logabs, sign: ``log|det J_tt|`` and the sign of ``det J_tt``, as from
            :meth:`CausalAttentionTransform.log_abs_det_blocks`.
        floor: the determinant below which the extension takes over.

    Returns ``(terms, clamped)``: the barrier terms and a boolean mask of the safeguarded positions.
    """
    if floor <= 0:
        raise ValueError(f"floor must be positive, got {floor}")
    log_floor = math.log(floor)
    clamped = (sign <= 0) | (logabs <= log_floor)
    # |det| where clamped (bounded for numerical safety; the unclamped branch is not used)
    magnitude = torch.exp(torch.where(sign > 0, logabs.clamp(max=log_floor), logabs.clamp(max=30.0)))
    extended = log_floor + (sign * magnitude - floor) / floor
    return torch.where(clamped, extended, logabs), clamped


def attention_weights(transform: CausalAttentionTransform, x: Tensor) -> Tensor:
    """The prior's attention weights ``alpha^h_ts``, shape ``batch x H x T x T``."""
    flat = x.reshape(-1, *x.shape[-2:])
    transform.validate_embeddings(flat)
    alpha = transform.attend(flat).alpha
    return alpha.reshape(*x.shape[:-2], *alpha.shape[1:])


def attention_entropy(transform: CausalAttentionTransform, x: Tensor) -> Tensor:
    """Entropy of each head's attention row, in nats, shape ``batch x H x T`` (0 at the first position)."""
    return entropy(attention_weights(transform, x))


def attention_covariance(transform: CausalAttentionTransform, x: Tensor) -> Tensor:
    """``Sigma^h_t``, the attention-weighted covariance of the attended embeddings (eq. 13),
    shape ``batch x H x T x d x d``."""
    alpha = attention_weights(transform, x)
    return weighted_covariance(alpha, x.unsqueeze(-3))
