"""Attention-weighted moments of a sequence, the quantities eq. (7), (13) of the paper are built from, and the
entropy of a probability vector.

Every function takes attention weights ``alpha`` of shape ``(..., T, S)`` (row ``t`` is a probability
vector over the attended positions ``s``, or all zeros where position ``t`` has no context) and
per-position features of shape ``(..., S, n)``, and returns one statistic per query position ``t``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["weighted_mean", "weighted_cross_covariance", "weighted_covariance", "weighted_variance", "entropy"]


def weighted_mean(alpha: Tensor, a: Tensor) -> Tensor:
    """``mu_t = sum_s alpha_ts a_s`` (eq. 7). Shapes ``(..., T, S)``, ``(..., S, n)`` -> ``(..., T, n)``."""
    return alpha @ a


def weighted_cross_covariance(alpha: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``C_t = sum_s alpha_ts (a_s - abar_t)(b_s - bbar_t)^T`` with ``abar_t = sum_s alpha_ts a_s``.

    Shapes ``alpha (..., T, S)``, ``a (..., S, n)``, ``b (..., S, m)`` -> ``(..., T, n, m)`` (leading
    dimensions broadcast). Computed from second moments about the sequence mean (the covariance is
    shift-invariant, and the shift removes most of the cancellation of ``E[ab^T] - E[a]E[b]^T`` in
    float32), with the closed-form backward of :class:`_CrossSecondMoments`. Rows of ``alpha`` that are
    all zero (no context) give a zero matrix.
    """
    a = a - a.mean(dim=-2, keepdim=True)
    b = b - b.mean(dim=-2, keepdim=True)
    batch = torch.broadcast_shapes(alpha.shape[:-2], a.shape[:-2], b.shape[:-2])

    def flat(t: Tensor) -> Tensor:  # (*batch, r, c) -> (prod(batch), r, c); a copy only where t broadcasts
        return t.expand(*batch, *t.shape[-2:]).reshape(-1, *t.shape[-2:])

    cov = _CrossSecondMoments.apply(flat(alpha), flat(a), flat(b))[0]
    return cov.view(*batch, *cov.shape[-3:])


class _CrossSecondMoments(torch.autograd.Function):
    r"""``C_t = sum_s alpha_ts a_s b_s^T - abar_t bbar_t^T`` (eq. 13 before centring), with its backward in closed form.

    Shapes ``alpha (B, T, S)``, ``a (B, S, n)``, ``b (B, S, m)`` -> ``(B, T, n, m)``. Forward: one GEMM
    ``alpha @ [a_s b_s^T]_s`` over the flattened per-key outer products. Backward, with ``G_t = dL/dC_t``,
    ``u_t = G_t bbar_t``, ``w_t = G_t^T abar_t`` and ``P_s = sum_t alpha_ts G_t``::

        dL/dalpha_ts = a_s^T G_t b_s - a_s . u_t - b_s . w_t
        dL/da_s      = P_s b_s   - sum_t alpha_ts u_t
        dL/db_s      = P_s^T a_s - sum_t alpha_ts w_t

    two GEMMs of the forward's size (``G @ outer^T``, ``alpha^T @ G``) and small ones, and no temporary
    larger than ``(B, T, n m)``: autograd through the broadcast outer product allocates and reduces several
    such gradients. First-order only.
    """

    @staticmethod
    def forward(alpha: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # type: ignore[override]
        """``(C, [a_s b_s^T]_s, abar, bbar)``: the covariances and the intermediates the backward reads (outputs too,
        not differentiable, so that :meth:`setup_context` can keep them: the form ``torch.func`` transforms need)."""
        n, m = a.shape[-1], b.shape[-1]
        outer = (a.unsqueeze(-1) * b.unsqueeze(-2)).flatten(-2)  # (B, S, n*m)
        abar, bbar = alpha @ a, alpha @ b  # (B, T, n), (B, T, m)
        second = (alpha @ outer).unflatten(-1, (n, m))  # (B, T, n, m)
        return second.addcmul_(abar.unsqueeze(-1), bbar.unsqueeze(-2), value=-1.0), outer, abar, bbar

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: tuple[Tensor, ...]) -> None:
        _, outer, abar, bbar = output
        ctx.save_for_backward(*inputs, outer, abar, bbar)
        ctx.mark_non_differentiable(outer, abar, bbar)

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[int | None, ...], alpha: Tensor, a: Tensor, b: Tensor
    ) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        """``torch.func.vmap``'s rule: the vmapped dimension folded into the batch dimension ``B``, one call."""
        size = info.batch_size
        flat = [(t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)).flatten(0, 1)
                for t, dim in zip((alpha, a, b), in_dims)]
        out = _CrossSecondMoments.apply(*flat)
        return tuple(o.unflatten(0, (size, -1)) for o in out), (0, 0, 0, 0)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad: Tensor, *_intermediates: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        alpha, a, b, outer, abar, bbar = ctx.saved_tensors
        grad = grad.contiguous()  # (B, T, n, m)
        u = (grad @ bbar.unsqueeze(-1)).squeeze(-1)  # G_t bbar_t, (B, T, n)
        w = (abar.unsqueeze(-2) @ grad).squeeze(-2)  # G_t^T abar_t, (B, T, m)
        grad_alpha = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            uw, ab = torch.cat([u, w], dim=-1), torch.cat([a, b], dim=-1)  # a_s . u_t + b_s . w_t in one GEMM
            grad_alpha = torch.baddbmm(grad.flatten(-2) @ outer.mT, uw, ab.mT, alpha=-1.0)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            p = (alpha.mT @ grad.flatten(-2)).unflatten(-1, grad.shape[-2:])  # P_s, (B, S, n, m)
            grad_a = torch.baddbmm((p @ b.unsqueeze(-1)).squeeze(-1), alpha.mT, u, alpha=-1.0)
            grad_b = torch.baddbmm((a.unsqueeze(-2) @ p).squeeze(-2), alpha.mT, w, alpha=-1.0)
        return grad_alpha, grad_a, grad_b


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


def entropy(p: Tensor) -> Tensor:
    """Shannon entropy ``-sum_v p_v log p_v`` over the last dim, in nats (``0 log 0 = 0``, so an all-zero row,
    e.g. an attention row without context, has entropy 0): of attention rows or of predictive distributions."""
    return -torch.special.xlogy(p, p).sum(-1)
