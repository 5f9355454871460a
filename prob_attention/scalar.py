"""The scalar case of Section 3.4: ``d = 1``, ``q_t = a x_t``, ``k_s = b x_s``, coupling ``beta = a b``.

Here ``J_tt = 1 - beta Var_alpha(x)`` (Proposition 1, eq. 8) and the margin is
``m_t = 1 - beta sigma_t^2`` (eq. 9): positive coupling ``beta > 0`` has a degeneracy boundary,
negative coupling has none.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .transform import CausalAttentionTransform
from .weighted_moments import weighted_covariance

__all__ = ["scalar_transform", "scalar_attention", "scalar_margin"]


def scalar_transform(a: float, b: float, *, include_current: bool = False) -> CausalAttentionTransform:
    """The scalar attention bijector with ``W_q = a``, ``W_k = b`` (values = x), event shape ``(T, 1)``."""
    transform = CausalAttentionTransform(dim=1, n_heads=1, head_dim=1, include_current=include_current)
    with torch.no_grad():
        transform.w_q.fill_(a)
        transform.w_k.fill_(b)
    return transform


def scalar_attention(x: Tensor, beta: float) -> Tensor:
    """``alpha_ts = softmax_{s<t}(beta x_t x_s)`` for scalar sequences ``x`` of shape ``(..., T)``.

    Returns ``(..., T, T)``; the first row (empty context) is zero.
    """
    t_len = x.shape[-1]
    scores = beta * x.unsqueeze(-1) * x.unsqueeze(-2)  # (..., T, T)
    past = torch.ones(t_len, t_len, dtype=torch.bool, device=x.device).tril(-1)
    past[0, 0] = True  # keep row 0 finite; zeroed below
    alpha = torch.softmax(scores.masked_fill(~past, float("-inf")), dim=-1)
    alpha[..., 0, :] = 0.0
    return alpha


def scalar_margin(x: Tensor, beta: float) -> Tensor:
    """``m_t = 1 - beta Var_alpha(x)_t`` (eq. 8, 9) for scalar sequences ``(..., T)``; ``m_1 = 1``."""
    var = weighted_covariance(scalar_attention(x, beta), x.unsqueeze(-1))[..., 0, 0]
    return 1.0 - beta * var
