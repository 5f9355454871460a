r"""A Pyro model over the embedding trajectory behind an observed text (Section 9, uncertainty-aware decoding).

Given the characters ``y_1..y_T`` read by a trained model, the embeddings ``x_1..x_T`` that the GPT decodes
are treated as latent. The generative story::

    z_t ~ N(0, sigma^2 I),   x = T(z)            i.e.  x ~ EmbeddingPrior(sigma)     (latent, event (T, d))
    embed(y)_t ~ N(x_t, tau^2 I)                 the character's embedding, an observed factor on x_t
    y_{t+1} ~ Categorical(softmax(decode(x)_t))  the GPT's next-character likelihood, t = 1..T'

``T`` is the causal-attention bijector (``x_t = z_t + c_t(x)``, eq. 4), ``embed(y)_t = wte[y_t] + wpe[t]``
and ``decode`` is the GPT above its embedding layer. ``T'`` is ``T - 1`` (the text's own next characters)
or ``T`` (the character after the text is known too, as in evaluation windows).

``sigma`` -- empirical Bayes. The margin-only training never fits ``sigma`` (the barrier alone does not
depend on it), so it is set from data: for embeddings ``x`` of a text, the prior's log-density is
``-|z|^2 / (2 sigma^2) - T d log sigma + const`` plus a barrier that does not involve ``sigma``, so its
maximiser is :func:`empirical_sigma`, ``sigma_hat^2 = mean_t |x_t - c_t(x)|^2 / d``. A user value may
replace it.

``tau`` -- how far the latent embedding may stray from its character's embedding. ``tau -> 0`` pins
``x`` to ``embed(y)`` (the MAP model, no posterior spread); large ``tau`` lets the prior and the
next-character likelihood dominate. :meth:`TrajectoryModel.from_trained` uses ``tau = tau_ratio * sigma`` (default
ratio 0.5); the uncertainty study fits the ratio by validation predictive likelihood
(:mod:`experiments.posterior_scores`).

The network's parameters are constants here: the model never calls ``pyro.module``, so Pyro's
inference (SVI, SMC) learns only guides; :func:`frozen` also turns off their gradients.

Example:
    >>> import torch
    >>> from prob_attention import CausalAttentionTransform
    >>> from prob_attention.gpt import GPTConfig, SmallGPT
    >>> gpt = SmallGPT(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=1, n_embd=4))
    >>> tm = TrajectoryModel(gpt, CausalAttentionTransform(4, coupling="repulsive"), sigma=1.0, tau=0.5)
    >>> idx = torch.tensor([1, 2, 3])
    >>> trace = pyro.poutine.trace(tm.model).get_trace(idx, idx[1:])
    >>> trace.nodes["x"]["value"].shape, trace.nodes["next_char"]["value"].shape
    (torch.Size([3, 4]), torch.Size([2]))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from prob_attention import CausalAttentionTransform, EmbeddingPrior
from prob_attention.gpt import SmallGPT

__all__ = ["TrajectoryModel", "empirical_sigma", "frozen"]


def empirical_sigma(transform: CausalAttentionTransform, x: Tensor) -> float:
    """The maximum-likelihood latent scale for embeddings ``x`` (``(..., T, d)``): ``sqrt(mean |z_t|^2 / d)``.

    ``z = x - c(x)`` is the prior's latent noise (eq. 4); the mean runs over every position of every sequence.
    """
    with torch.no_grad():
        z = transform.inv(x.reshape(-1, *x.shape[-2:]))
    return float(z.pow(2).mean().sqrt())


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` of the modules' parameters for the block, restoring it afterwards."""
    params = [p for m in modules for p in m.parameters()]
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)


@dataclass(frozen=True)
class TrajectoryModel:
    """The trajectory model of the module docstring for one trained GPT and its prior.

    Args:
        gpt: the observation model (``embed`` and ``decode``).
        transform: the prior's causal-attention bijector.
        sigma: latent noise scale of the prior.
        tau: scale of the emission ``embed(y)_t ~ N(x_t, tau^2 I)``.
        barrier_floor: the trained run's ``PriorConfig.barrier_floor``: the floor of the margins the posterior
            reports (:class:`PriorTerms`) and of the prior the model scores ``x`` with (:meth:`prior`).
    """

    gpt: SmallGPT
    transform: CausalAttentionTransform
    sigma: float
    tau: float
    barrier_floor: float = 1e-3

    def __post_init__(self) -> None:
        if not (self.sigma > 0 and self.tau > 0):
            raise ValueError(f"sigma and tau must be positive, got sigma={self.sigma}, tau={self.tau}")
        if not self.barrier_floor > 0:
            raise ValueError(f"barrier_floor must be positive, got {self.barrier_floor}")

    @classmethod
    def from_trained(cls, gpt: SmallGPT, transform: CausalAttentionTransform, reference: Tensor | None = None,
                     sigma: float | None = None, tau_ratio: float = 0.5,
                     barrier_floor: float = 1e-3) -> TrajectoryModel:
        """``sigma`` given, or :func:`empirical_sigma` of ``gpt.embed(reference)`` (token ids ``(n, T)``);
        ``tau = tau_ratio * sigma``."""
        if sigma is None:
            if reference is None:
                raise ValueError("give sigma, or reference text windows to estimate it from")
            with torch.no_grad():
                sigma = empirical_sigma(transform, gpt.embed(reference.to(transform.w_k.device)))
        return cls(gpt, transform, float(sigma), tau_ratio * float(sigma), barrier_floor)

    @property
    def dim(self) -> int:
        return self.transform.dim

    @property
    def anchor_ratio(self) -> float:
        """``r = sigma^2 / (sigma^2 + tau^2)``: where the context ``c_t`` does not depend on ``x_t``, the posterior of
        ``z_t = x_t - c_t`` given the anchor ``embed(y)_t`` is ``N(r (embed(y)_t - c_t), r tau^2 I)`` (the product of
        the prior ``N(0, sigma^2 I)`` and the emission ``N(x_t, tau^2 I)``)."""
        return self.sigma**2 / (self.sigma**2 + self.tau**2)

    def anchors(self, idx: Tensor) -> Tensor:
        """``embed(y)``: the observed characters' embeddings, ``(T,) -> (T, d)`` (no gradient)."""
        self.check_tokens(idx)
        with torch.no_grad():
            return self.gpt.embed(idx.unsqueeze(0))[0]

    def next_anchor(self, tokens: Sequence[int], token: int) -> Tensor:
        """``embed(y_t)`` of the character ``y_t = token`` read after ``tokens``, at position ``t = len(tokens)``:
        ``(d,)``. Raises ``ValueError`` when the GPT's context is already full (a filter's next position)."""
        if len(tokens) >= self.gpt.config.block_size:
            raise ValueError(f"the trajectory is full: the GPT reads at most {self.gpt.config.block_size} characters")
        return self.anchors(torch.tensor([*tokens, int(token)], device=self.transform.w_k.device))[-1]

    def check_tokens(self, idx: Tensor) -> None:
        """Raise ``ValueError`` unless ``idx`` is a 1-D sequence of ``1..block_size`` valid token ids."""
        cfg = self.gpt.config
        if idx.dim() != 1 or not 1 <= idx.shape[0] <= cfg.block_size:
            raise ValueError(f"need 1 to {cfg.block_size} characters (the GPT's context), got shape {tuple(idx.shape)}")
        if bool(((idx < 0) | (idx >= cfg.vocab_size)).any()):
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size})")

    def check_anchors(self, anchors: Tensor, length: int) -> Tensor:
        """``anchors`` if they are ``length`` finite embeddings ``(length, d)``; else ``ValueError``."""
        if anchors.shape != (length, self.dim):
            raise ValueError(f"anchors must have shape ({length}, {self.dim}), got {tuple(anchors.shape)}")
        if not bool(torch.isfinite(anchors).all()):
            raise ValueError("anchors must be finite")
        return anchors

    def prior(self, seq_len: int) -> EmbeddingPrior:
        """The embedding prior over ``seq_len`` positions with this model's ``sigma`` and ``barrier_floor``.

        Exact where every ``det J_tt > barrier_floor``; below the floor ``log det J_tt`` goes on along its tangent
        line, so a guide's draw inside a fold (outside the exact prior's support, where its density is zero) scores
        a finite, steep penalty instead of ``-inf``, and the ELBO's gradient pushes the guide out of the fold
        (an autoguide cannot be confined to the support). Draws from the prior itself stay on it.
        """
        return EmbeddingPrior(self.transform, seq_len, self.sigma, barrier_floor=self.barrier_floor)

    def margins(self, x: Tensor, start: int = 0) -> Tensor:
        """Safeguarded ``log det J_tt`` of positions ``start..`` of trajectories ``x`` ``(..., S, d)``."""
        return self.prior(x.shape[-2]).position_terms(x, start=start).log_det

    def next_char_logits(self, x: Tensor) -> Tensor:
        """``decode(x)``: ``(..., T, d) -> (..., T, V)``, any leading batch shape."""
        flat = x.reshape(-1, *x.shape[-2:])
        logits = self.gpt.decode(flat)
        return logits.reshape(*x.shape[:-2], *logits.shape[-2:])

    def emission(self, x: Tensor) -> dist.Distribution:
        """``N(x, tau^2 I)`` over ``embed(y)``, event shape ``(T, d)``."""
        return dist.Normal(x, self.tau).to_event(2)

    def model(self, idx: Tensor, next_chars: Tensor | None = None, anchors: Tensor | None = None) -> Tensor:
        """The Pyro model: sites ``x`` (latent, ``(T, d)``), ``embedding`` and ``next_char`` (observed).

        Args:
            idx: the characters ``y_1..y_T``, shape ``(T,)``.
            next_chars: ``y_2..y_{T'+1}``, shape ``(T',)`` with ``T' <= T``; default ``idx[1:]``.
            anchors: the embeddings read, ``(T, d)``; default ``embed(y)``. Give them when the embeddings the
                decoder reads are not the characters' own (e.g. with noise added, whose variance then belongs
                in ``tau^2``).

        Returns the sampled trajectory ``x``. Vectorised particles (an outer plate) add leading dims to ``x``.
        """
        anchors = self.anchors(idx) if anchors is None else self.check_anchors(anchors, idx.shape[0])
        next_chars = idx[1:] if next_chars is None else next_chars
        if next_chars.dim() != 1 or next_chars.shape[0] > idx.shape[0]:
            raise ValueError(f"next_chars must be 1-D with at most {idx.shape[0]} entries, got {tuple(next_chars.shape)}")
        x = pyro.sample("x", self.prior(idx.shape[0]))
        pyro.sample("embedding", self.emission(x), obs=anchors)
        if next_chars.shape[0] > 0:
            logits = self.next_char_logits(x)[..., : next_chars.shape[0], :]  # (..., T', V)
            pyro.sample("next_char", dist.Categorical(logits=logits).to_event(1), obs=next_chars)
        return x
