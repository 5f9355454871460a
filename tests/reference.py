"""Reference computations by autograd, for checking closed forms."""

import torch
from torch.autograd.functional import jacobian

from prob_attention import CausalAttentionTransform


def autograd_jacobian(transform: CausalAttentionTransform, x: torch.Tensor) -> torch.Tensor:
    """Full ``dz/dx`` of one sequence ``x`` (``T x d``), shape ``(T, d, T, d)``."""
    return jacobian(lambda xx: transform._inverse(xx), x)


def autograd_log_abs_det(transform: CausalAttentionTransform, x: torch.Tensor) -> torch.Tensor:
    """``log|det dz/dx|`` of each sequence of a batch ``(B, T, d)`` from the autograd Jacobian."""
    n = x.shape[-2] * x.shape[-1]
    flat = x.reshape(-1, *x.shape[-2:])
    out = [torch.linalg.slogdet(autograd_jacobian(transform, seq).reshape(n, n))[1] for seq in flat]
    return torch.stack(out).reshape(x.shape[:-2])
