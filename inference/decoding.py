"""Uncertainty-aware decoding: generate characters from the posterior predictive over embedding trajectories.

After the prompt ``y_1..y_k`` (and each generated character), the next character is chosen from the
posterior predictive ``p(y_{t+1} | y_{1:t}) = E_{x ~ p(x | y)}[softmax(decode(x)_t)]``, estimated by

* ``"smc"``: the particle filter of :mod:`inference.smc`, extended one character at a time (the chosen
  character is then observed: it reweights the particles and anchors the next embedding);
* ``"svi"``: a low-rank Gaussian guide refitted over the whole trajectory after each character,
  warm-started at the previous fit's mean.

Every generated character carries the :class:`~inference.posterior.PredictiveSignals` it was chosen with.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from .map.config import check_bool, check_choice, check_number
from .posterior import PredictiveSignals, SVIConfig, fit_svi, samples_signals
from .smc import TrajectorySMC
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
        svi: the SVI fit's settings (``"svi"`` only).
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
    predict = _smc_predictor(model, prompt, config) if config.method == "smc" else _svi_predictor(model, prompt, config)
    out: list[GeneratedCharacter] = []
    for i in range(length):
        signals = predict(None if i == 0 else out[-1].token)
        probs = signals.probs
        token = int(probs.argmax()) if config.greedy else int(torch.multinomial(probs.float(), 1, generator=generator))
        out.append(GeneratedCharacter(token, signals))
    return out


def _smc_predictor(model: TrajectoryModel, prompt: Tensor, config: DecodeConfig):
    """A function ``new token (or None) -> signals`` over a particle filter that has read the prompt."""
    smc = TrajectorySMC(model, config.particles, config.ess_threshold, config.seed)
    tokens = prompt.tolist()
    for t, token in enumerate(tokens):
        smc.extend(token)
        if t + 1 < len(tokens):
            smc.observe(tokens[t + 1])

    def predict(new: int | None) -> PredictiveSignals:
        if new is not None:
            smc.observe(new)
            smc.extend(new)
        return smc.predict()

    return predict


def _svi_predictor(model: TrajectoryModel, prompt: Tensor, config: DecodeConfig):
    """A function ``new token (or None) -> signals`` refitting a guide to the growing trajectory."""
    ids = prompt.clone()
    mean: Tensor | None = None

    def predict(new: int | None) -> PredictiveSignals:
        nonlocal ids, mean
        if new is not None:
            ids = torch.cat([ids, ids.new_tensor([new])])
        anchors = model.anchors(ids)
        init = anchors if mean is None else torch.cat([mean, anchors[mean.shape[0]:]])
        fit = fit_svi(model, ids, ids[1:], replace(config.svi, seed=config.seed + ids.shape[0]), init=init)
        mean = fit.mean()
        return samples_signals(model, fit.sample(config.particles))

    return predict
