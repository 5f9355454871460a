"""The embedding prior: Gaussian latent noise pushed through the causal-attention bijector (eq. 1, 11)."""

from __future__ import annotations

import torch
from pyro.distributions import Normal, TransformedDistribution
from torch import Tensor

from .linalg import slogdet
from .transform import CausalAttentionTransform

__all__ = ["EmbeddingPrior", "conditional_log_prob"]


class EmbeddingPrior(TransformedDistribution):
    r"""``x = T(z)``, ``z_t ~ N(0, sigma^2 I)`` i.i.d., with ``T`` a :class:`CausalAttentionTransform`.

    .. math::

        \log p(x) = -\frac{1}{2\sigma^2}\sum_t \|x_t - c_t\|^2 - \frac{Td}{2}\log(2\pi\sigma^2)
                    + \sum_t \log|\det(I - \Sigma_t A)|

    (eq. 11). The last sum is the margin barrier, :meth:`barrier`. Event shape ``(T, d)``; the prior
    is a Pyro distribution, usable in ``pyro.sample`` (``rsample`` solves ``z -> x``) and, through
    :meth:`barrier`, in ``pyro.factor`` for the paper's margin-only MAP objective.

    Args:
        transform: the attention bijector (holds the learnable parameters; register it with
            ``pyro.module``).
        seq_len: ``T``.
        sigma: latent noise scale, a float or a (learnable) scalar tensor.

    Example:
        >>> import torch
        >>> prior = EmbeddingPrior(CausalAttentionTransform(dim=3, coupling="repulsive"), seq_len=4)
        >>> x = prior.sample((2,))
        >>> x.shape, prior.log_prob(x).shape, prior.barrier(x).shape
        (torch.Size([2, 4, 3]), torch.Size([2]), torch.Size([2]))
    """

    def __init__(
        self,
        transform: CausalAttentionTransform,
        seq_len: int,
        sigma: float | Tensor = 1.0,
        validate_args: bool | None = None,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        ref = transform.w_k
        loc = torch.zeros(seq_len, transform.dim, dtype=ref.dtype, device=ref.device)
        scale = torch.as_tensor(sigma, dtype=ref.dtype, device=ref.device)
        base = Normal(loc, scale.expand_as(loc)).to_event(2)
        super().__init__(base, [transform], validate_args=validate_args)
        self.transform = transform
        self.sigma = scale

    def expand(self, batch_shape: torch.Size | tuple[int, ...], _instance: "EmbeddingPrior | None" = None) -> "EmbeddingPrior":
        """The prior with a batch shape (for ``pyro.plate``); the transform is shared, not copied."""
        new = _instance if _instance is not None else EmbeddingPrior.__new__(EmbeddingPrior)
        super().expand(batch_shape, _instance=new)
        new.transform, new.sigma = self.transform, self.sigma
        return new

    def barrier(self, x: Tensor) -> Tensor:
        """The margin barrier ``sum_t log|det J_tt|`` (eq. 11, 12), shape ``batch``."""
        return self.transform.log_abs_det_blocks(x)[0].sum(-1)

    def residual_log_prob(self, x: Tensor) -> Tensor:
        """The Gaussian term ``log N(x - c(x); 0, sigma^2 I)`` alone, shape ``batch``."""
        return self.base_dist.log_prob(self.transform.inv(x))

    def with_length(self, seq_len: int) -> "EmbeddingPrior":
        """The same prior over sequences of another length (the process is consistent, Theorem 2)."""
        return EmbeddingPrior(self.transform, seq_len, self.sigma, validate_args=self._validate_args)


def conditional_log_prob(transform: CausalAttentionTransform, prefix: Tensor, x_t: Tensor, sigma: float) -> Tensor:
    """``log p(x_t | x_{<t}) = log N(z_t; 0, sigma^2 I) + log|det J_tt|`` (the position-t factor of eq. 11).

    Args:
        prefix: the context ``x_{<t}``, shape ``(t, d)`` (``t >= 0``).
        x_t: candidate values for the next embedding, shape ``(n, d)``.

    Returns:
        shape ``(n,)``: one conditional log-density per candidate.
    """
    n = x_t.shape[0]
    seqs = torch.cat([prefix.unsqueeze(0).expand(n, -1, -1), x_t.unsqueeze(1)], dim=1)  # (n, t+1, d)
    state = transform.attend(seqs, start=seqs.shape[1] - 1)
    z_t = x_t - state.context[:, 0]
    base = Normal(torch.zeros_like(z_t), sigma).to_event(1).log_prob(z_t)
    return base + slogdet(transform.jacobian_blocks(state)[:, 0])[1]
