"""The shifted conditions of the uncertainty study, as windows a posterior filter can read.

The conditions are the robustness study's shifts (:mod:`experiments.perturbations`, :mod:`experiments.out_of_domain`):
one set of shifts for both studies, at fewer levels (a posterior filter costs a particle filter per window). Each
condition is a few evenly spaced windows of ``length`` characters of the test split (or of the out-of-domain text),
read as embeddings:

- text shifts (typos, case flips, deletions) corrupt the characters, as the robustness study does
  (:func:`~experiments.perturbations.corrupt_text`, draw 0); each window keeps its clean targets;
- embedding noise adds ``scale * eps`` to the embeddings read, ``eps`` a standard normal drawn from a stream of its
  own (``index = -4``: :func:`~experiments.perturbations.noise_generator`), ``scale`` the level (absolute noise) or
  the level times the model's embedding RMS on the test split (RMS-relative noise). The draws depend on the window
  and position only, never on the model, so every model and method reads the same noise (a paired comparison).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from inference.map import TrainedModel
from prob_attention.corpus import CharVocab, eval_windows

from .out_of_domain import OUT_OF_DOMAIN, out_of_domain_text
from .perturbations import TEXT_KINDS, Perturbation, corrupt_text, embedding_rms, noise_generator
from .runs import split_windows

__all__ = ["CONDITIONS", "Condition", "ConditionWindows", "condition_windows", "evenly_spaced"]

NOISE_STREAM = -4
"""The :func:`~experiments.perturbations.noise_generator` index of the study's embedding noise."""


@dataclass(frozen=True)
class Condition:
    """A test condition: a perturbation of the test split, or (``perturbation`` ``None``) the out-of-domain text."""

    perturbation: Perturbation | None

    @property
    def label(self) -> str:
        return OUT_OF_DOMAIN if self.perturbation is None else self.perturbation.label

    @property
    def family(self) -> str:
        """``clean``, the perturbation's kind, or the out-of-domain text's name."""
        return OUT_OF_DOMAIN if self.perturbation is None else self.perturbation.kind


CONDITIONS: tuple[Condition, ...] = (
    Condition(Perturbation("clean")),
    *(Condition(Perturbation("substitution", r)) for r in (0.02, 0.05, 0.10)),
    *(Condition(Perturbation("noise", s)) for s in (0.01, 0.04)),
    *(Condition(Perturbation("relative_noise", s)) for s in (0.125, 0.5)),
    Condition(Perturbation("case", 0.10)),
    Condition(Perturbation("deletion", 0.10)),
    Condition(None),
)
"""Clean test text; 2, 5 and 10% typos (the levels the issue names); embedding noise at the weakest and strongest
absolute levels of the robustness study (0.01 already costs CE-only about a bit per character) and at the
RMS-relative 0.125 and 0.5; the strongest case flips and deletions; the out-of-domain text."""


@dataclass
class ConditionWindows:
    """The windows of one condition for one model: ``inputs``, ``targets`` ``(n, L)`` and the embeddings read,
    ``embeddings`` ``(n, L, d)``; ``noise_scale`` is the standard deviation of the noise in them (0 for none)."""

    inputs: Tensor
    targets: Tensor
    embeddings: Tensor
    noise_scale: float


def evenly_spaced(inputs: Tensor, targets: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """``count`` evenly spaced windows (all if fewer), first and last included."""
    pick = torch.from_numpy(np.linspace(0, inputs.shape[0] - 1, min(count, inputs.shape[0])).round().astype(np.int64))
    return inputs[pick], targets[pick]


@torch.no_grad()
def condition_windows(trained: TrainedModel, condition: Condition, count: int, length: int, seed: int = 0,
                      split: str = "test") -> ConditionWindows:
    """``count`` windows of ``length`` characters of ``split`` (or of the out-of-domain text) under ``condition``."""
    gpt = trained.gpt
    if condition.perturbation is None:
        text = CharVocab(trained.vocab.chars, on_unknown="unk").encode(out_of_domain_text())
        inputs, targets = evenly_spaced(*eval_windows(text, length), count)
        return ConditionWindows(inputs, targets, gpt.embed(inputs.to(_device(trained))), 0.0)
    p = condition.perturbation
    vocab_size, chars = trained.gpt_config.vocab_size, trained.vocab.chars
    full_inputs, full_targets = split_windows(trained, split, length=length)
    if p.kind == "deletion":
        inputs, targets = evenly_spaced(*corrupt_text(full_inputs, full_targets, p, vocab_size, chars, seed), count)
    else:
        inputs, targets = evenly_spaced(full_inputs, full_targets, count)
        if p.kind in TEXT_KINDS:
            inputs, targets = corrupt_text(inputs, targets, p, vocab_size, chars, seed)
    embeddings = gpt.embed(inputs.to(_device(trained)))
    scale = {"noise": p.level, "relative_noise": p.level * embedding_rms(trained.net, full_inputs)}.get(p.kind, 0.0)
    if scale > 0:
        eps = torch.randn(embeddings.shape, generator=noise_generator(seed, 0, NOISE_STREAM))
        embeddings = embeddings + scale * eps.to(embeddings)
    return ConditionWindows(inputs, targets, embeddings, float(scale))


def _device(trained: TrainedModel) -> torch.device:
    return trained.transform.w_k.device
