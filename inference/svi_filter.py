r"""A filtering variational posterior over the embedding trajectory: a Gaussian guide grown and refitted per character.

At its prediction of ``y_{t+1}`` the filter holds a Gaussian guide ``q(x_{1:t})`` fitted to the posterior the particle
filter (:mod:`inference.smc`) holds at the same point of the same text::

    p(x_{1:t} | y)  propto  p(x_{1:t}) prod_{s<=t} N(embed(y)_s; x_s, tau^2 I) prod_{s<t} softmax(decode(x)_s)[n_s]

i.e. ``TrajectoryModel.model(y_{1:t}, n_{1:t-1})`` (:mod:`inference.trajectory`), where ``n_s`` is the character
observed after position ``s`` (``y_{s+1}`` when the text runs on). The predictive of ``y_{t+1}`` averages
``softmax(decode(x)_t)`` over guide draws (:func:`~inference.posterior.samples_signals`).

The steps mirror :class:`~inference.smc.TrajectorySMC`: :meth:`SVIFilter.extend` appends position ``t``'s block to
the guide; :meth:`SVIFilter.observe` records ``n_t``; :meth:`SVIFilter.predict` first refits the guide if a character
was read since the last fit: ``SVIConfig.steps`` Adam steps on the negative ELBO (``Trace_ELBO``, ``num_particles``
vectorised draws), starting where the previous fit ended. Each position's parameters are their own tensors, so a new
position starts its own Adam moments and step count while every earlier position keeps its optimiser state: a refit
continues the previous optimisation rather than restarting it. Every step scores the whole prefix, so filtering a
text of ``T`` characters costs ``O(steps T^2)``, as the particle filter costs ``O(P T^2)``.

A new block starts at its anchor ``embed(y)_t`` (as :func:`~inference.posterior.fit_svi` starts), with scale
``sqrt(r) tau``, ``r = sigma^2 / (sigma^2 + tau^2)``: the posterior scale of ``x_t`` given its anchor where the context
``c_t`` does not depend on ``x_t`` (exact at the first position, where ``c_1 = 0``; the particle filter's proposal
scale). ``fit_svi``'s ``tau / 2`` is narrower than that, and a filter taking a few steps per character would carry
the deficit for many characters. The guide's means and scales are parametrised in units of ``tau``, so Adam's
learning rate (a step size per parameter) means the same for models whose embeddings differ in scale.

Guides (``SVIConfig.guide``): ``"normal"``, the mean-field family of ``AutoNormal``, ``prod_t N(m_t, diag s_t^2)``;
``"lowrank"``, that of ``AutoLowRankMultivariateNormal`` with Pyro's parametrisation
``N(m, (F * s)(F * s)^T + diag s^2)``, ``F`` stacked from per-position rows and of a fixed rank (``SVIConfig.rank``,
default Pyro's ``round(sqrt(T d))`` for the longest text the GPT reads). Why not the autoguides themselves: their
parameter shapes are fixed by their first call, and their parameters live in Pyro's global parameter store, where
Pyro's optimiser keys Adam's state by name; growing ``x`` from ``(t, d)`` to ``(t + 1, d)`` would take a new guide and
a fresh optimiser at every character. The filter never touches the parameter store, so filters can coexist.

Scales are positive through Pyro's ``softplus_positive`` constraint, as in the autoguides. Constructing a filter
seeds Pyro's (global) random number generators with ``SVIConfig.seed``, as :func:`~inference.posterior.fit_svi` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO
from torch import Tensor
from torch.distributions import biject_to
from torch.distributions.transforms import ReshapeTransform

from .posterior import PredictiveSignals, SequentialFilter, SVIConfig, samples_signals
from .trajectory import TrajectoryModel, frozen

__all__ = ["SVIFilter", "elbo_settling", "filter_draws", "settling_summary"]


class SVIFilter(SequentialFilter):
    """A filtering SVI posterior for one text, driven by ``extend``, ``observe``, ``predict`` or by :meth:`run`
    (module docstring).

    Args:
        model: the trajectory model.
        config: the guide, Adam's learning rate, the ELBO's particles, the seed; ``steps`` is the number of SVI
            steps of each refit (one refit per prediction after new characters).
        num_samples: guide draws per prediction.

    Attributes:
        tokens: the characters read (``y_1..y_t``); observed: the characters observed after them (``n_1..``).
        losses: the negative ELBO (nats) at every step of every refit, one list per refit.
        filtered: at every prediction, the draws ``(num_samples, d)`` of the newest position ``x_t`` it used.

    Example:
        >>> import torch
        >>> from prob_attention import CausalAttentionTransform
        >>> from prob_attention.gpt import GPTConfig, SmallGPT
        >>> gpt = SmallGPT(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=1, n_embd=4))
        >>> tm = TrajectoryModel(gpt, CausalAttentionTransform(4, coupling="repulsive"), sigma=1.0, tau=0.5)
        >>> svi = SVIFilter(tm, SVIConfig(guide="normal", steps=5), num_samples=8)
        >>> signals = svi.run(torch.tensor([1, 2, 3]))
        >>> len(signals), signals[-1].probs.shape, [len(fit) for fit in svi.losses]
        (3, torch.Size([5]), [5, 5, 5])
    """

    def __init__(self, model: TrajectoryModel, config: SVIConfig | None = None, num_samples: int = 32) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.model, self.config, self.num_samples = model, SVIConfig() if config is None else config, num_samples
        full = model.gpt.config.block_size * model.dim
        self.rank = 0 if self.config.guide == "normal" else (self.config.rank or round(math.sqrt(full)))
        self.tokens: list[int] = []
        self.observed: list[int] = []
        self.losses: list[list[float]] = []
        self.filtered: list[Tensor] = []
        self._anchors: list[Tensor] = []  # the embedding read, (d,) per position
        self._locs: list[Tensor] = []  # (d,) per position
        self._scales: list[Tensor] = []  # (d,) per position, unconstrained
        self._factors: list[Tensor] = []  # (d, rank) per position ("lowrank" only)
        self._optimizer: torch.optim.Adam | None = None
        self._elbo = Trace_ELBO(num_particles=self.config.num_particles, vectorize_particles=True, max_plate_nesting=0)
        self._positive = biject_to(constraints.softplus_positive)
        self._stale = False  # a character was read since the last fit
        pyro.set_rng_seed(self.config.seed)

    # ----------------------------------------------------------------------------------- the guide
    @property
    def data(self) -> tuple[Tensor, Tensor, Tensor]:
        """The model's arguments ``(idx, next_chars, anchors)``: what the guide is (or is about to be) fitted to."""
        device = self.model.transform.w_k.device
        return (torch.tensor(self.tokens, device=device), torch.tensor(self.observed, dtype=torch.long, device=device),
                torch.stack(self._anchors))

    def distribution(self) -> dist.Distribution:
        """The guide ``q(x)``, event shape ``(t, d)``."""
        tau = self.model.tau
        loc, scale = tau * torch.stack(self._locs), tau * self._positive(torch.stack(self._scales))  # (t, d) each
        if not self.rank:
            return dist.Normal(loc, scale).to_event(2)
        flat = scale.reshape(-1)
        joint = dist.LowRankMultivariateNormal(loc.reshape(-1), torch.cat(self._factors) * flat[:, None], flat**2)
        return dist.TransformedDistribution(joint, ReshapeTransform(flat.shape, loc.shape))

    def guide(self, idx: Tensor, next_chars: Tensor, anchors: Tensor) -> Tensor:
        """The Pyro guide of ``TrajectoryModel.model(idx, next_chars, anchors)``: site ``x`` drawn from
        :meth:`distribution`."""
        return pyro.sample("x", self.distribution())

    # ------------------------------------------------------------------------------------- steps
    def extend(self, token: int, anchor: Tensor | None = None) -> None:
        """Read ``y_t = token`` as ``anchor`` (default ``embed(y)_t``): append position ``t`` to the guide, at its anchor
        with scale ``sqrt(r) tau`` (module docstring)."""
        tm = self.model
        default = tm.next_anchor(self.tokens, token)  # (d,)
        anchor = default if anchor is None else anchor.to(default)
        self._anchors.append(anchor)
        scale = math.sqrt(tm.anchor_ratio)  # in units of tau
        scale *= math.sqrt(0.5) if self.rank else 1.0  # "lowrank": the marginal scale starts there (as the autoguides)
        block = [anchor / tm.tau, self._positive.inv(torch.full_like(anchor, scale))]
        if self.rank:
            block.append(anchor.new_empty(tm.dim, self.rank).normal_(0.0, self.rank**-0.5))
        block = [p.requires_grad_() for p in block]
        self._locs.append(block[0])
        self._scales.append(block[1])
        self._factors += block[2:]
        if self._optimizer is None:
            self._optimizer = torch.optim.Adam(block, lr=self.config.lr, foreach=True)
        else:
            self._optimizer.param_groups[0]["params"] += block  # one group: one fused update; state stays per tensor
        self.tokens.append(int(token))
        self._stale = True

    def observe(self, next_char: int) -> None:
        """Observe the character ``n_t`` after the last one read (a factor of the next fit)."""
        if len(self.observed) >= len(self.tokens):
            raise ValueError("observe needs a character read after the last observation (call extend first)")
        self.observed.append(int(next_char))
        self._stale = True

    def fit(self) -> None:
        """``config.steps`` SVI steps from the current guide; the losses go to :attr:`losses`."""
        if self._optimizer is None:
            raise ValueError("fit needs at least one character read (call extend first)")
        data = self.data
        losses = []
        with torch.enable_grad(), frozen(self.model.gpt, self.model.transform):
            for _ in range(self.config.steps):
                self._optimizer.zero_grad()
                loss = self._elbo.differentiable_loss(self.model.model, self.guide, *data)
                loss.backward()
                self._optimizer.step()
                losses.append(float(loss.detach()))
        self.losses.append(losses)
        self._stale = False

    def predict(self) -> PredictiveSignals:
        """The predictive of the character after the last one read and its signals, from ``num_samples`` guide draws
        (refitting first if a character was read since the last fit)."""
        if not self.tokens:
            raise ValueError("predict needs at least one observed character (call extend first)")
        if self._stale:
            self.fit()
        with torch.no_grad():
            samples = self.distribution().sample((self.num_samples,))  # (S, t, d)
        self.filtered.append(samples[:, -1])
        return samples_signals(self.model, samples)


def filter_draws(model: TrajectoryModel, idx: Tensor, next_chars: Tensor | None = None,
                 config: SVIConfig | None = None, chains: int = 4, draws: int = 100) -> Tensor:
    """Independently seeded filters (seeds ``config.seed + c``) through one text: at every position ``t``, ``draws``
    draws of ``x_t`` from the guide that predicted ``y_{t+1}``, shape ``(chains, draws, T, d)``, the input of
    :func:`~inference.posterior.to_inference_data`.

    What ArviZ's diagnostics mean here: a guide's draws are independent by construction, so within one chain ESS
    and R-hat measure nothing about mixing. Across chains they measure whether the fitted guides depend on the seed
    (the ELBO's Monte Carlo noise, an unfinished optimisation) on the scale of the guide's own spread: R-hat near 1
    and a bulk ESS near ``chains * draws`` say the seeds agree. They say nothing about the variational bias (how far
    the Gaussian family is from the posterior).
    """
    config = SVIConfig() if config is None else config
    out = []
    for c in range(chains):
        svi = SVIFilter(model, replace(config, seed=config.seed + c), num_samples=draws)
        svi.run(idx, next_chars)
        out.append(torch.stack(svi.filtered, dim=1))  # (draws, T, d)
    return torch.stack(out)


def elbo_settling(losses: Sequence[Sequence[float]], z: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Whether each refit's negative ELBO had stopped falling: ``(drop, unsettled)`` per refit (at least 2 steps).

    ``drop`` is the mean loss over the first half of the refit's steps minus that over the second half (nats;
    positive = still falling). The loss of one step is a Monte Carlo estimate; its noise ``s`` is estimated from the
    successive differences (``Var(l_{k+1} - l_k) = 2 s^2`` for a settled loss, larger while it moves), and a refit is
    ``unsettled`` when ``drop > z s sqrt(1/n_1 + 1/n_2)`` (``n_1``, ``n_2`` the halves' sizes): a fall the noise
    does not explain.
    """
    drops, unsettled = [], []
    for fit in losses:
        trace = np.asarray(fit, dtype=float)
        if trace.size < 2:
            raise ValueError("elbo_settling needs at least 2 steps per refit")
        half = trace.size // 2
        drop = trace[:half].mean() - trace[half:].mean()
        noise = np.sqrt(np.mean(np.diff(trace) ** 2) / 2)
        drops.append(drop)
        unsettled.append(drop > z * noise * np.sqrt(1 / half + 1 / (trace.size - half)))
    return np.asarray(drops), np.asarray(unsettled, dtype=bool)


def settling_summary(losses: Sequence[Sequence[float]]) -> dict[str, float] | None:
    """:func:`elbo_settling` over every refit, summarised: the median and 90th percentile of the drop within a refit
    (nats), the fraction of refits still falling and their number; ``None`` with one step per refit (nothing to
    compare)."""
    if len(losses[0]) < 2:
        return None
    drops, unsettled = elbo_settling(losses)
    return {"drop_median": float(np.median(drops)), "drop_p90": float(np.quantile(drops, 0.9)),
            "unsettled_fraction": float(unsettled.mean()), "refits": len(losses)}
