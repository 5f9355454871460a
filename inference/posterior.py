r"""Posteriors over embedding trajectories: SVI with autoguides, ArviZ conversion and predictive uncertainty.

Variational inference fits a Gaussian over the whole trajectory ``x`` (``(T, d)``) of
:class:`~inference.trajectory.TrajectoryModel` with ``pyro.infer.SVI`` and ``Trace_ELBO``: ``AutoNormal``
(mean field) or ``AutoLowRankMultivariateNormal`` (``W W^T + diag``). The network is frozen, so only the
guide learns. The particle filter lives in :mod:`inference.smc`, the filtering SVI posterior (one guide grown
and refitted per character) in :mod:`inference.svi_filter`; all produce posterior samples that
:func:`to_inference_data` turns into an ``arviz.InferenceData`` (one chain per independent fit or run).

The posterior predictive of the next character after ``x_{1:t}`` averages the GPT's softmax over
posterior samples ``x^(i)`` with weights ``w_i``: ``p(y) = sum_i w_i p_i(y)``. Its signals
(:class:`PredictiveSignals`), in nats: the predictive entropy ``H[p]``, the mutual information between
``y`` and ``x`` (epistemic part) ``H[p] - sum_i w_i H[p_i] >= 0``, the prior's log-det margin
``log det J_tt`` (eq. 25, weighted mean over samples) and, for SMC, the effective sample size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Literal

import arviz as az
import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoLowRankMultivariateNormal,
    AutoNormal,
    init_to_value,
)
from pyro.optim import Adam
from torch import Tensor

from prob_attention.weighted_moments import entropy

from .trajectory import TrajectoryModel, frozen

__all__ = [
    "PredictiveSignals",
    "SVIConfig",
    "SVIFit",
    "SequentialFilter",
    "convergence",
    "fit_svi",
    "predictive_signals",
    "samples_signals",
    "svi_draws",
    "to_inference_data",
]

GuideKind = Literal["normal", "lowrank"]


# --------------------------------------------------------------------------------- predictive signals
@dataclass(frozen=True)
class PredictiveSignals:
    """The posterior predictive of one next character and its uncertainty signals (module docstring).

    ``probs`` has shape ``(V,)``; ``ess`` is ``None`` for unweighted (SVI) samples.
    """

    probs: Tensor
    entropy: float
    mutual_information: float
    margin: float
    ess: float | None


class SequentialFilter(ABC):
    """A posterior over the trajectory that reads a text one character at a time: :meth:`extend` by ``y_t``,
    :meth:`predict` ``y_{t+1}``, :meth:`observe` the character ``n_t`` that follows (the particle filter, the SVI
    filter). At its prediction after ``y_t`` it conditions on ``y_{1:t}`` and ``n_{1:t-1}``."""

    @abstractmethod
    def extend(self, token: int, anchor: Tensor | None = None) -> None:
        """Read the next character ``y_t = token``, with its embedding read ``anchor`` ``(d,)`` (default
        ``embed(y)_t``; :meth:`TrajectoryModel.model`'s ``anchors``)."""

    @abstractmethod
    def observe(self, next_char: int) -> None:
        """Observe the character ``n_t`` after the last one read."""

    @abstractmethod
    def predict(self) -> PredictiveSignals:
        """The predictive of the character after the last one read, and its signals."""

    def run(self, idx: Tensor, next_chars: Tensor | None = None,
            anchors: Tensor | None = None) -> list[PredictiveSignals]:
        """Filter through a text: per position ``t``, extend by ``y_t``, predict ``y_{t+1}``, observe it if given.

        Args:
            idx: ``(T,)`` characters; next_chars: ``(T',)``, ``T' <= T`` (default ``idx[1:]``);
            anchors: the embeddings read ``(T, d)`` (default the characters' own).

        Returns the ``T`` predictive signals (the one at ``t`` uses ``y_{1:t}`` and ``n_{1:t-1}`` only).
        """
        next_chars = idx[1:] if next_chars is None else next_chars
        if anchors is not None:
            self.model.check_anchors(anchors, idx.shape[0])
        signals = []
        for t, token in enumerate(idx.tolist()):
            self.extend(token, None if anchors is None else anchors[t])
            signals.append(self.predict())
            if t < next_chars.shape[0]:
                self.observe(int(next_chars[t]))
        return signals


def predictive_signals(probs: Tensor, weights: Tensor | None, margin: float, ess: float | None = None) -> PredictiveSignals:
    """Signals from per-sample next-character distributions ``probs`` ``(S, V)`` and normalised ``weights`` ``(S,)``
    (``None``: equal weights)."""
    if weights is None:
        weights = torch.full(probs.shape[:1], 1.0 / probs.shape[0], dtype=probs.dtype, device=probs.device)
    mean = (weights[:, None] * probs).sum(0)  # (V,)
    h_mean = float(entropy(mean))
    mean_h = float((weights * entropy(probs)).sum())
    return PredictiveSignals(mean, h_mean, max(h_mean - mean_h, 0.0), margin, ess)


@torch.no_grad()
def samples_signals(model: TrajectoryModel, samples: Tensor) -> PredictiveSignals:
    """Signals for the character after equally weighted trajectories ``samples`` ``(S, t, d)``."""
    probs = torch.softmax(model.next_char_logits(samples)[:, -1].double(), dim=-1)  # (S, V)
    margin = float(model.margins(samples, start=samples.shape[-2] - 1).mean())
    return predictive_signals(probs, None, margin)


# ---------------------------------------------------------------------------------------------- SVI
@dataclass(frozen=True)
class SVIConfig:
    """Settings of one SVI fit.

    Args:
        guide: ``"normal"`` (``AutoNormal``) or ``"lowrank"`` (``AutoLowRankMultivariateNormal``).
        steps: optimisation steps (of :class:`~inference.svi_filter.SVIFilter`: of each refit, one per prediction);
            lr: Adam's learning rate (the filter's parameters are in units of ``tau``).
        num_particles: ELBO samples per step (vectorised).
        rank: the low-rank guide's rank (Pyro's default ``ceil(sqrt(T d))`` when ``None``).
        seed: Pyro's RNG seed for the fit.
    """

    guide: GuideKind = "lowrank"
    steps: int = 300
    lr: float = 0.02
    num_particles: int = 4
    rank: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.guide not in ("normal", "lowrank"):
            raise ValueError(f"guide must be 'normal' or 'lowrank', got {self.guide!r}")
        if self.steps < 1 or self.num_particles < 1 or self.lr <= 0:
            raise ValueError("SVIConfig needs steps >= 1, num_particles >= 1 and lr > 0")


@dataclass
class SVIFit:
    """A fitted guide and its loss curve (negative ELBO per step, in nats)."""

    guide: AutoNormal | AutoLowRankMultivariateNormal
    losses: list[float]
    args: tuple[Tensor, Tensor]

    @torch.no_grad()
    def sample(self, num_samples: int) -> Tensor:
        """``num_samples`` trajectories ``(S, T, d)`` from the guide."""
        with pyro.plate("samples", num_samples, dim=-1):
            return self.guide(*self.args)["x"]

    @torch.no_grad()
    def mean(self) -> Tensor:
        """The guide's mean trajectory ``(T, d)``."""
        return self.guide.median(*self.args)["x"]


def fit_svi(model: TrajectoryModel, idx: Tensor, next_chars: Tensor | None = None,
            config: SVIConfig | None = None, init: Tensor | None = None) -> SVIFit:
    """Fit a guide to ``p(x | y)`` for characters ``idx`` ``(T,)`` and ``next_chars`` (default ``idx[1:]``).

    The guide's mean starts at ``init`` ``(T, d)`` (default: the characters' embeddings), its scale at
    ``tau / 2``. Clears Pyro's parameter store: a fit owns it until the next one.
    """
    next_chars = idx[1:] if next_chars is None else next_chars
    config = SVIConfig() if config is None else config
    init = model.anchors(idx) if init is None else init
    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)
    init_loc = init_to_value(values={"x": init})
    if config.guide == "normal":
        guide = AutoNormal(model.model, init_loc_fn=init_loc, init_scale=model.tau / 2)
    else:
        guide = AutoLowRankMultivariateNormal(model.model, init_loc_fn=init_loc, init_scale=model.tau / 2,
                                              rank=config.rank)
    elbo = Trace_ELBO(num_particles=config.num_particles, vectorize_particles=True, max_plate_nesting=0)
    svi = SVI(model.model, guide, Adam({"lr": config.lr}), loss=elbo)
    with frozen(model.gpt, model.transform):
        losses = [float(svi.step(idx, next_chars)) for _ in range(config.steps)]
    return SVIFit(guide, losses, (idx, next_chars))


def svi_draws(model: TrajectoryModel, idx: Tensor, next_chars: Tensor | None = None, config: SVIConfig | None = None,
              chains: int = 4, draws: int = 200) -> Tensor:
    """``draws`` guide samples from each of ``chains`` independent fits (seeds ``config.seed + c``),
    shape ``(chains, draws, T, d)``: the input of :func:`to_inference_data`."""
    config = SVIConfig() if config is None else config
    return torch.stack([fit_svi(model, idx, next_chars, replace(config, seed=config.seed + c)).sample(draws)
                        for c in range(chains)])


# -------------------------------------------------------------------------------------------- ArviZ
def to_inference_data(chains: Tensor) -> az.InferenceData:
    """Trajectory draws ``(chains, draws, T, d)`` as ``InferenceData`` with variable ``x`` over dims
    ``position`` and ``dim``. Chains are independent fits (SVI) or runs (SMC, resampled to equal weights)."""
    if chains.dim() != 4:
        raise ValueError(f"expected draws of shape (chains, draws, T, d), got {tuple(chains.shape)}")
    return az.from_dict(posterior={"x": chains.detach().cpu().double().numpy()}, dims={"x": ["position", "dim"]})


def convergence(idata: az.InferenceData) -> dict[str, float]:
    """The smallest and the median bulk ESS and, with two chains or more, the largest and the median split R-hat over
    all coordinates of ``x`` (with thousands of coordinates the extremes alone mostly measure their count)."""
    ess = az.ess(idata, var_names=["x"])["x"]
    out = {"ess_bulk_min": float(ess.min()), "ess_bulk_median": float(ess.median())}
    if idata.posterior.sizes["chain"] >= 2:
        rhat = az.rhat(idata, var_names=["x"])["x"]
        out.update(rhat_max=float(rhat.max()), rhat_median=float(rhat.median()))
    return out
