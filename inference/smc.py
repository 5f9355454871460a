r"""Sequential Monte Carlo over the embedding trajectory of :mod:`inference.trajectory` (a particle filter).

Step ``t`` extends every particle's prefix ``x_{<t}`` by one embedding, proposed through the prior's
``z -> x`` direction: draw ``z_t ~ q(z_t)`` and solve ``x_t - c_t(x_{<t}, x_t) = z_t``
(:meth:`CausalAttentionTransform.solve_position`). The proposal density of ``x_t`` is
``q(z_t) |det J_tt|`` and the prior's transition is ``N(z_t; 0, sigma^2 I) |det J_tt|``
(:func:`~prob_attention.conditional_log_prob`), so the determinants cancel in the incremental weight::

    log w_t += log N(z_t; 0, sigma^2 I) - log q(z_t) + log N(embed(y)_t; x_t, tau^2 I)     (extend)
    log w_t += log softmax(decode(x_{1:t})_t)[y_{t+1}]                                    (observe)

(exact where ``z_t -> x_t`` is one-to-one for the prefix, e.g. the repulsive coupling; where the map
folds, Newton's root is one of several and the weight is that of the branch found). ``q`` is the
Gaussian "guided" proposal that would be the exact conditional if the context ``c_t`` did not depend
on ``x_t``: with ``c~ = c_t(x_{<t}, embed(y)_t)``,
``q = N(r (embed(y)_t - c~), r tau^2 I)``, ``r = sigma^2 / (sigma^2 + tau^2)``.
Particles are resampled (systematic) before a step when the effective sample size
``ESS = 1 / sum_i w_i^2`` is below ``ess_threshold * P``. A particle whose solve fails
(no root found, at a fold) gets weight zero and is counted; the others are solved in the same batch.
The GPT's keys and values for every particle's decoded prefix are kept in a
:class:`~prob_attention.gpt.KVCache` (reordered with the particles), so a prediction decodes one
position, not the prefix.

Why not :class:`pyro.infer.SMCFilter`: (1) the state grows with ``t`` -- the GPT's likelihood of
``y_{t+1}`` needs the whole prefix ``x_{1:t}`` and the transition attends to it -- and SMCFilter's docs
warn that it costs ``O(len(state) T)`` and is meant for fixed-size states; (2) one failed ``z -> x``
solve must zero one particle, whereas an exception in a Pyro guide site aborts the whole step;
(3) decoding needs the weighted predictive *between* the transition and the next observation, and the
ESS of every step, while ``SMCFilter.step`` fuses proposal, weighting and resampling. The filter
below is small and keeps exactly these quantities.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .posterior import PredictiveSignals, SequentialFilter, predictive_signals
from .trajectory import TrajectoryModel

__all__ = ["ParticleCollapse", "TrajectorySMC", "smc_draws", "systematic_indices"]


def systematic_indices(weights: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` indices drawn by systematic resampling from normalised ``weights`` ``(P,)``: one uniform offset,
    ``n`` evenly spaced points through the cumulative weights."""
    u = (torch.rand((), generator=generator, device=weights.device) + torch.arange(n, device=weights.device)) / n
    return torch.searchsorted(torch.cumsum(weights, 0), u.to(weights.dtype)).clamp(max=weights.shape[0] - 1)


class ParticleCollapse(RuntimeError):
    """Every particle has weight zero (all ``z -> x`` solves failed, or the observations are impossible)."""


class TrajectorySMC(SequentialFilter):
    """A particle filter for one text, driven step by step (``extend``, ``predict``, ``observe``) or by :meth:`run`.

    Args:
        model: the trajectory model.
        num_particles: ``P``.
        ess_threshold: resample before a step when ``ESS < ess_threshold * P``; in ``(0, 1]``.
        seed: seeds the proposals and the resampling.

    Attributes:
        x: particle trajectories ``(P, t, d)``; ``log_weights``: ``(P,)`` (unnormalised);
        margins: each particle's ``log det J_ss`` (safeguarded at the run's floor, :meth:`TrajectoryModel.margins`) ``(P, t)``;
        ess: ESS of the weights at each :meth:`predict`; failures: particles lost to failed solves.

    Example:
        >>> import torch
        >>> from prob_attention import CausalAttentionTransform
        >>> from prob_attention.gpt import GPTConfig, SmallGPT
        >>> gpt = SmallGPT(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=1, n_embd=4))
        >>> tm = TrajectoryModel(gpt, CausalAttentionTransform(4, coupling="repulsive"), sigma=1.0, tau=0.5)
        >>> signals = TrajectorySMC(tm, num_particles=16).run(torch.tensor([1, 2, 3]))
        >>> len(signals), signals[-1].probs.shape
        (3, torch.Size([5]))
    """

    def __init__(self, model: TrajectoryModel, num_particles: int, ess_threshold: float = 0.5, seed: int = 0) -> None:
        if num_particles < 1:
            raise ValueError(f"num_particles must be positive, got {num_particles}")
        if not 0 < ess_threshold <= 1:
            raise ValueError(f"ess_threshold must be in (0, 1], got {ess_threshold}")
        self.model, self.num_particles, self.ess_threshold = model, num_particles, ess_threshold
        ref = model.transform.w_k
        self.generator = torch.Generator(device=ref.device).manual_seed(seed)
        self.x = ref.new_zeros(num_particles, 0, model.dim)
        self.margins = ref.new_zeros(num_particles, 0)
        self.log_weights = ref.new_zeros(num_particles)
        self.tokens: list[int] = []
        self.ess: list[float] = []
        self.failures = 0
        self._cache = model.gpt.new_cache()  # the GPT's keys and values for the decoded positions of every particle
        self._logits: Tensor | None = None  # decode(x)_t at the last decoded position, (P, V)

    # ----------------------------------------------------------------------------------- weights
    def weights(self) -> Tensor:
        """Normalised weights ``(P,)``."""
        return torch.softmax(self.log_weights, dim=0)

    def effective_sample_size(self) -> float:
        """``1 / sum_i w_i^2``, in ``[1, P]`` (clipped to ``P`` against rounding)."""
        return min(float(1.0 / self.weights().double().pow(2).sum()), float(self.num_particles))

    def _add_log_weights(self, delta: Tensor) -> None:
        self.log_weights = self.log_weights + torch.where(torch.isnan(delta), -math.inf, delta)
        if not bool(torch.isfinite(self.log_weights).any()):
            raise ParticleCollapse(f"every particle has weight zero at position {len(self.tokens)}")

    def _resample(self) -> None:
        """Systematic resampling to equal weights."""
        index = systematic_indices(self.weights(), self.num_particles, self.generator)
        self.x, self.margins = self.x[index], self.margins[index]
        self.log_weights = torch.zeros_like(self.log_weights)
        self._logits = None if self._logits is None else self._logits[index]
        self._cache.reorder(index)

    # ------------------------------------------------------------------------------------- steps
    @torch.no_grad()
    def extend(self, token: int, anchor: Tensor | None = None) -> None:
        """Propose ``x_t`` for the observed character ``y_t = token`` read as ``anchor`` (default ``embed(y)_t``) and
        weight it (module docstring)."""
        tm, t = self.model, len(self.tokens)
        default = tm.next_anchor(self.tokens, token)  # (d,)
        anchor = default if anchor is None else anchor.to(default)
        if self.effective_sample_size() < self.ess_threshold * self.num_particles:
            self._resample()
        guess = torch.cat([self.x, anchor.expand(self.num_particles, 1, -1)], dim=1)
        c_guess = tm.transform.attend(guess, start=t).context[:, 0]  # (P, d)
        loc, scale = tm.anchor_ratio * (anchor - c_guess), math.sqrt(tm.anchor_ratio) * tm.tau
        z = loc + scale * torch.randn(loc.shape, generator=self.generator, device=loc.device, dtype=loc.dtype)
        x_t, ok = self._solve(z, t, guess=z + c_guess)
        seqs = torch.cat([self.x, x_t.unsqueeze(1)], dim=1)  # (P, t+1, d)
        margin = tm.margins(seqs, start=t)  # (P, 1)
        normal = torch.distributions.Normal
        delta = (normal(0.0, tm.sigma).log_prob(z) - normal(loc, scale).log_prob(z)).sum(-1)
        delta = delta + normal(x_t, tm.tau).log_prob(anchor).sum(-1)
        self.x, self.margins = seqs, torch.cat([self.margins, margin], dim=1)
        self.tokens.append(int(token))
        self._add_log_weights(torch.where(ok, delta, torch.full_like(delta, -math.inf)))

    def _solve(self, z: Tensor, t: int, guess: Tensor) -> tuple[Tensor, Tensor]:
        """``x_t`` for every particle, from Newton's first start ``guess``, and a mask of the solves that succeeded;
        failures are counted."""
        x_t, ok = self.model.transform.solve_position(self.x, z, t, guess)
        self.failures += int((~ok).sum())
        return torch.where(ok[:, None], x_t, z), ok  # a failed particle keeps a finite stand-in; its weight is 0

    @torch.no_grad()
    def predict(self) -> PredictiveSignals:
        """The posterior predictive of ``y_{t+1}`` and its uncertainty signals, from the current particles."""
        if not self.tokens:
            raise ValueError("predict needs at least one observed character (call extend first)")
        weights = self.weights()
        self.ess.append(self.effective_sample_size())
        margin = float((weights * self.margins[:, -1]).sum())
        return predictive_signals(self._next_log_probs().exp(), weights, margin=margin, ess=self.ess[-1])

    def _next_log_probs(self) -> Tensor:
        """``log softmax(decode(x)_t)`` for every particle ``(P, V)``, decoding only the positions the cache lacks."""
        new = self.x[:, len(self._cache):]
        if new.shape[1] > 0:
            self._logits = self.model.gpt.decode(new, self._cache)[:, -1]
        assert self._logits is not None
        return torch.log_softmax(self._logits.to(self.log_weights.dtype), dim=-1)

    @torch.no_grad()
    def observe(self, next_char: int) -> None:
        """Weight the particles by the likelihood of the character ``y_{t+1}`` that follows."""
        if not self.tokens:
            raise ValueError("observe needs at least one observed character (call extend first)")
        self._add_log_weights(self._next_log_probs()[:, int(next_char)])

    def posterior_samples(self, num_samples: int) -> Tensor:
        """``num_samples`` trajectories ``(n, t, d)`` drawn (systematically) from the weighted particles."""
        return self.x[systematic_indices(self.weights(), num_samples, self.generator)]


def smc_draws(model: TrajectoryModel, idx: Tensor, next_chars: Tensor | None = None, num_particles: int = 500,
              chains: int = 4, draws: int = 200, seed: int = 0) -> Tensor:
    """``draws`` trajectories resampled from each of ``chains`` independent filters over the text (seeds
    ``seed + c``), shape ``(chains, draws, T, d)``: the input of :func:`~inference.posterior.to_inference_data`."""
    out = []
    for c in range(chains):
        smc = TrajectorySMC(model, num_particles, seed=seed + c)
        smc.run(idx, next_chars)
        out.append(smc.posterior_samples(draws))
    return torch.stack(out)
