"""The embedding prior: Gaussian latent noise pushed through the causal-attention bijector (eq. 1, 11)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from pyro.distributions import Normal, TransformedDistribution
from torch import Tensor
from torch.distributions import constraints

from .linalg import slogdet
from .margins import safe_log_barrier
from .transform import AttentionState, CausalAttentionTransform

__all__ = ["EmbeddingPrior", "PriorTerms", "conditional_log_prob"]


class PriorTerms(NamedTuple):
    """The prior's factors at each position ``t`` (eq. 11), shapes ``batch x T``.

    ``log p(x_t | x_{<t}) = residual_t + log_det_t``:

    - ``residual``: ``log N(z_t; 0, sigma^2 I)`` with ``z_t = x_t - c_t(x)``, the Gaussian term;
    - ``log_det``: ``log det J_tt``, the position's margin-barrier term: ``-inf`` where ``det J_tt <= 0`` (outside
      the support, where the map folds), or, when the prior has a ``barrier_floor``, continued by its tangent line
      below the floor (:func:`~prob_attention.safe_log_barrier`), finite everywhere;
    - ``clamped``: the positions where that continuation is used (``det J_tt <= barrier_floor``); without a
      floor, the positions outside the support (``det J_tt <= 0``).
    """

    residual: Tensor
    log_det: Tensor
    clamped: Tensor

    @property
    def log_density(self) -> Tensor:
        """``log p(x_t | x_{<t})`` per position."""
        return self.residual + self.log_det


class EmbeddingPrior(TransformedDistribution):
    r"""``x = T(z)``, ``z_t ~ N(0, sigma^2 I)`` i.i.d., with ``T`` a :class:`CausalAttentionTransform`.

    .. math::

        \log p(x) = -\frac{1}{2\sigma^2}\sum_t \|x_t - c_t\|^2 - \frac{Td}{2}\log(2\pi\sigma^2)
                    + \sum_t \log|\det(I - \Sigma_t A)|

    (eq. 11). The last sum is the margin barrier, :meth:`barrier`. Event shape ``(T, d)``; the prior
    is a Pyro distribution, usable in ``pyro.sample`` (``rsample`` solves ``z -> x``) and, through
    :meth:`barrier`, in ``pyro.factor`` for the paper's margin-only MAP objective.

    Support: the regular trajectories, ``det J_tt > 0`` at every position (the paper excludes configurations past
    the degeneracy boundary; :attr:`support`). Outside it the change-of-variables formula is no density, and the
    exact prior's :meth:`log_prob` is ``-inf`` there, or raises ``ValueError`` naming the batch element and position
    while validation is on (Pyro's and torch's default). Inside it, ``log_prob`` is eq. 11. It is normalised where
    the map is one-to-one on the support, guaranteed for the global diffeomorphism of
    :class:`CausalAttentionTransform` (repulsive coupling, one head, values ``= x``, strict causality); where the map
    folds, several regular ``x`` share one ``z`` and eq. 11 over the support integrates to more than one (one
    plus the mass of the latents with folded preimages), while :meth:`sample` returns one regular preimage per
    ``z`` (or raises :class:`~prob_attention.InversionError` where it finds none; :meth:`lost_mass` estimates how
    often).

    Args:
        transform: the attention bijector (holds the learnable parameters; register it with
            ``pyro.module``).
        seq_len: ``T``.
        sigma: latent noise scale, a float or a (learnable) scalar tensor.
        barrier_floor: ``None`` (default) for the exact density; a positive determinant below which every
            ``log det J_tt`` is continued by its tangent line (:func:`~prob_attention.safe_log_barrier`), so
            that :meth:`log_prob` stays finite and differentiable past the degeneracy boundary. That is the
            MAP training objective's prior (``PriorConfig.barrier_floor``), not a normalised density; its
            support is all of ``R^{T x d}`` (Pyro's autoguides can fit it).

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
        barrier_floor: float | None = None,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        if barrier_floor is not None and not barrier_floor > 0:
            raise ValueError(f"barrier_floor must be positive (or None for the exact density), got {barrier_floor}")
        ref = transform.w_k
        loc = torch.zeros(seq_len, transform.dim, dtype=ref.dtype, device=ref.device)
        scale = torch.as_tensor(sigma, dtype=ref.dtype, device=ref.device)
        base = Normal(loc, scale.expand_as(loc)).to_event(2)
        super().__init__(base, [transform], validate_args=validate_args)
        self.transform = transform
        self.sigma = scale
        self.barrier_floor = barrier_floor

    def expand(self, batch_shape: torch.Size | tuple[int, ...], _instance: "EmbeddingPrior | None" = None) -> "EmbeddingPrior":
        """The prior with a batch shape (for ``pyro.plate``); the transform is shared, not copied."""
        new = _instance if _instance is not None else EmbeddingPrior.__new__(EmbeddingPrior)
        super().expand(batch_shape, _instance=new)
        new.transform, new.sigma, new.barrier_floor = self.transform, self.sigma, self.barrier_floor
        return new

    @constraints.dependent_property(is_discrete=False, event_dim=2)
    def support(self) -> constraints.Constraint:  # type: ignore[override]
        """Where :meth:`log_prob` is finite: the transform's ``codomain`` for the exact prior (every ``det J_tt > 0``,
        or ``R^{T x d}`` for a global diffeomorphism), ``R^{T x d}`` with a ``barrier_floor``."""
        if self.barrier_floor is not None:
            return constraints.independent(constraints.real, 2)
        return self.transform.codomain

    def position_terms(self, x: Tensor, start: int = 0) -> PriorTerms:
        """The prior's factors of positions ``start..S-1`` of ``x`` (``batch x S x d``), one attention pass.

        Every other quantity of the prior (:meth:`log_prob`, :meth:`barrier`, the MAP objective's per-token
        terms, the posterior's margins) is a sum or a slice of these. ``start > 0`` scores only the last
        positions of a growing sequence (queries ``x_start..``, keys the whole prefix), as a particle
        filter does.
        """
        self.transform.validate_embeddings(x)
        flat = x.reshape(-1, *x.shape[-2:])
        state = self.transform.attend(flat, start=start)
        log_det, clamped = self.log_det_terms(flat, state)
        z = flat[:, start:] - state.context  # (N, S - start, d)
        residual = Normal(0.0, self.sigma).log_prob(z).sum(-1)
        batch = (*x.shape[:-2], -1)
        return PriorTerms(residual.reshape(batch), log_det.reshape(batch), clamped.reshape(batch))

    def log_det_terms(self, x: Tensor, state: AttentionState | None = None) -> tuple[Tensor, Tensor]:
        """``(log_det, clamped)`` of :class:`PriorTerms` alone (the margin barrier's terms), ``batch x T``.

        ``state``: an attention pass over ``x`` already made (flattened to ``(N, S, d)``), to reuse.
        """
        logabs, sign = self.transform.log_abs_det_blocks(x, state)
        if self.barrier_floor is None:
            folded = sign <= 0
            return logabs.masked_fill(folded, float("-inf")), folded
        return safe_log_barrier(logabs, sign, self.barrier_floor)

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x) = sum_t log p(x_t | x_{<t})`` (eq. 11), shape ``batch``: ``-inf`` outside the support for the
        exact prior, which raises ``ValueError`` there instead while validation is on; finite everywhere with a
        ``barrier_floor``. An ``x`` that does not end in the event shape ``(T, d)`` raises ``ValueError`` naming both
        shapes, validation on or off.

        Computed from one attention pass over ``x`` (no ``z`` is cached between calls, so the value always
        belongs to the transform's current parameters).
        """
        self._check_event_shape(x)
        if self._validate_args:
            self.base_dist._validate_sample(x)  # batch shape and finiteness; the support from the terms below
        terms = self.position_terms(x)
        if self._validate_args and self.barrier_floor is None and bool(terms.clamped.any()):
            *element, t = (int(i) for i in terms.clamped.nonzero()[0])
            where = f"x[{', '.join(map(str, element))}]" if element else "x"
            raise ValueError(
                f"{where} is outside the prior's support: det J_tt <= 0 at position t={t}, where the attention "
                f"map folds and the change-of-variables formula is no density (log_prob is -inf there with "
                f"validation off; an EmbeddingPrior with a barrier_floor continues it finitely)"
            )
        return terms.log_density.sum(-1)

    def _check_event_shape(self, x: Tensor) -> None:
        """Raise ``ValueError`` naming both shapes unless ``x`` ends in the event shape ``(T, d)``, validation on or
        off: the whole-sequence scores sum over exactly the prior's ``T`` positions."""
        if tuple(x.shape[-2:]) != tuple(self.event_shape):
            raise ValueError(f"x has shape {tuple(x.shape)}, but the prior's event shape is {tuple(self.event_shape)} "
                             f"(T = {self.event_shape[0]} positions of d = {self.event_shape[1]}): give (..., "
                             f"{self.event_shape[0]}, {self.event_shape[1]}), or score another length with "
                             f"prior.with_length(T)")

    def _check_base_matches_transform(self) -> None:
        """Raise ``ValueError`` where the base distribution's tensors (``loc``, ``scale``, made with the prior) no
        longer share the transform's dtype and device: the transform was converted (``.double()``, ``.to(...)``)
        after the prior was built, and its latents would not be the transform's."""
        base, ref = self.base_dist.base_dist.loc, self.transform.w_k
        if (base.dtype, base.device) != (ref.dtype, ref.device):
            raise ValueError(
                f"the prior's base distribution (its loc and scale tensors, made when the prior was built) is "
                f"{base.dtype} on {base.device} but its transform's parameters are {ref.dtype} on {ref.device}: the "
                f"transform was converted after the prior was built; build the prior again from it "
                f"(prior.with_length({self.event_shape[0]}) or EmbeddingPrior(transform, ...))"
            )

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> Tensor:
        """``x = T(z)`` for ``z`` drawn from the base distribution, without gradient (:meth:`rsample`)."""
        self._check_base_matches_transform()
        return super().sample(sample_shape)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> Tensor:
        """``x = T(z)``, ``z ~ N(0, sigma^2 I)``: the regular root of each position (class docstring), differentiable in
        ``z``, ``sigma`` and the transform's parameters; raises :class:`~prob_attention.InversionError` where none is
        found."""
        self._check_base_matches_transform()
        return super().rsample(sample_shape)

    def barrier(self, x: Tensor) -> Tensor:
        """The margin barrier ``sum_t log det J_tt`` (eq. 11, 12), shape ``batch`` (:class:`PriorTerms`: ``-inf``
        outside the support, or continued below the ``barrier_floor``)."""
        return self.log_det_terms(x)[0].sum(-1)

    @torch.no_grad()
    def lost_mass(self, num_samples: int) -> float:
        """The fraction of ``num_samples`` latent draws ``z ~ N(0, sigma^2 I)`` for which ``z -> x`` finds no root
        on the regular branch: a Monte Carlo estimate (standard error ``sqrt(p (1 - p) / n)``) of the prior mass
        that :meth:`sample` cannot deliver (it raises :class:`~prob_attention.InversionError` on such a ``z``).

        Zero for the global diffeomorphism (by theorem, without solving); under strict causality every ``z`` has a
        regular preimage almost surely, so what it counts are the solver's misses; with ``include_current=True``
        also the latents with no preimage at all.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self._check_base_matches_transform()
        z = self.base_dist.sample((num_samples,))
        return float((~self.transform.domain.check(z)).double().mean())

    def residual_log_prob(self, x: Tensor) -> Tensor:
        """The Gaussian term ``log N(x - c(x); 0, sigma^2 I)`` alone, shape ``batch``."""
        return self.position_terms(x).residual.sum(-1)

    def with_length(self, seq_len: int) -> "EmbeddingPrior":
        """The same prior over sequences of another length (the process is consistent, Theorem 2)."""
        return EmbeddingPrior(self.transform, seq_len, self.sigma, validate_args=self._validate_args,
                              barrier_floor=self.barrier_floor)


def conditional_log_prob(transform: CausalAttentionTransform, prefix: Tensor, x_t: Tensor, sigma: float) -> Tensor:
    """``log p(x_t | x_{<t}) = log N(z_t; 0, sigma^2 I) + log|det J_tt|`` (the position-t factor of eq. 11).

    This is the change-of-variables formula itself, also past the degeneracy boundary: a conditional density only
    where ``det J_tt > 0`` (the prior's support; :meth:`EmbeddingPrior.log_prob` is ``-inf`` elsewhere), kept finite
    beyond it to show how the formula overcounts where the map folds (Figure 3.2).

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
