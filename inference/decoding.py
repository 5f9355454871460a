"""Uncertainty-aware decoding: generate characters from the posterior predictive over embedding trajectories.

After the prompt ``y_1..y_k`` (and each generated character), the next character is chosen from the
posterior predictive ``p(y_{t+1} | y_{1:t}) = E_{x ~ p(x | y)}[softmax(decode(x)_t)]``, estimated by

* ``"smc"``: the particle filter of :mod:`inference.smc`, extended one character at a time (the chosen
  character is then observed: it reweights the particles and anchors the next embedding);
* ``"svi"``: the filtering variational posterior of :mod:`inference.svi_filter`, one Gaussian guide over the
  growing trajectory, refitted with ``svi.steps`` warm-started SVI steps before each prediction (the first one
  after reading the whole prompt).

Both read the prompt the same way, extending by each character and observing the one after it.

Every generated character carries the :class:`~inference.posterior.PredictiveSignals` it was chosen with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from .map.config import check_bool, check_choice, check_number
from .posterior import PredictiveSignals, SequentialFilter, SVIConfig
from .smc import TrajectorySMC
from .svi_filter import SVIFilter
from .trajectory import TrajectoryModel

__all__ = ["DecodeConfig", "GeneratedCharacter", "generate"]


@dataclass(frozen=True)
class DecodeConfig:
    """Settings of :func:`generate`.

    Args:
        method: ``"smc"`` or ``"svi"``.
        particles: SMC particles, or guide samples per prediction (SVI).
        greedy: take the predictive's most probable character; otherwise sample it.
        ess_threshold: SMC resampling threshold (fraction of the particles).
        svi: the SVI filter's settings, ``steps`` per prediction (``"svi"`` only; seeded by ``seed``).
        seed: proposals, resampling and sampling.
    """

    method: Literal["smc", "svi"] = "smc"
    particles: int = 32
    greedy: bool = True
    ess_threshold: float = 0.5
    svi: SVIConfig = field(default_factory=lambda: SVIConfig(steps=100))
    seed: int = 0

    def __post_init__(self) -> None:
        owner = "DecodeConfig"
        check_choice(owner, "method", self.method, ("smc", "svi"))
        check_number(owner, "particles", self.particles, low=1, integer=True)
        check_bool(owner, "greedy", self.greedy)
        check_number(owner, "ess_threshold", self.ess_threshold, low=0, high=1)
        check_number(owner, "seed", self.seed, low=0, integer=True)


@dataclass(frozen=True)
class GeneratedCharacter:
    """One generated character id and the predictive signals it was drawn with."""

    token: int
    signals: PredictiveSignals


def generate(model: TrajectoryModel, prompt: Tensor, length: int,
             config: DecodeConfig | None = None) -> list[GeneratedCharacter]:
    """Generate ``length`` characters after ``prompt`` (ids ``(k,)``, ``k >= 1``); ``k + length - 1`` must fit
    the GPT's context (the last character is predicted, never read)."""
    config = DecodeConfig() if config is None else config
    model.check_tokens(prompt)
    if length < 0 or prompt.shape[0] + length - 1 > model.gpt.config.block_size:
        raise ValueError(f"prompt ({prompt.shape[0]}) + length ({length}) exceed the GPT's context of "
                         f"{model.gpt.config.block_size} + 1 characters")
    generator = torch.Generator(device=prompt.device).manual_seed(config.seed)
    posterior = (TrajectorySMC(model, config.particles, config.ess_threshold, config.seed) if config.method == "smc"
                 else SVIFilter(model, replace(config.svi, seed=config.seed), config.particles))
    predict = _predictor(posterior, prompt)
    out: list[GeneratedCharacter] = []
    for i in range(length):
        signals = predict(None if i == 0 else out[-1].token)
        probs = signals.probs
        token = int(probs.argmax()) if config.greedy else int(torch.multinomial(probs.float(), 1, generator=generator))
        out.append(GeneratedCharacter(token, signals))
    return out


def _predictor(posterior: SequentialFilter, prompt: Tensor) -> Callable[[int | None], PredictiveSignals]:
    """A function ``new token (or None) -> signals`` over a filter that has read the prompt: extended by each of its
    characters and observing the one after it (the character after the last is observed once it is chosen)."""
    tokens = prompt.tolist()
    for t, token in enumerate(tokens):
        posterior.extend(token)
        if t + 1 < len(tokens):
            posterior.observe(tokens[t + 1])

    def predict(new: int | None) -> PredictiveSignals:
        if new is not None:
            posterior.observe(new)
            posterior.extend(new)
        return posterior.predict()

    return predict
