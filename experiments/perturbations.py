"""Input perturbations of a robustness study, scored per window so that models compare pairwise.

Three families, each at a few levels:

- ``noise``: Gaussian noise ``N(0, sigma^2 I)`` on the input embeddings, ``sigma`` in embedding units
  (the paper's protocol, Section 7.3);
- ``relative_noise``: the same with ``sigma = level * RMS``, the model's own embedding RMS per coordinate
  on the scored split, so that a model cannot gain by spreading its embeddings;
- ``substitution``: each input character replaced, with probability ``level``, by another character drawn
  uniformly from the vocabulary (never the unknown symbol), scored against the clean next character:
  typos in the text.

Every draw depends only on ``(seed, draw)``, never on the model, so two models are scored on the same
noise and the same corrupted positions (a paired comparison); for substitutions the positions corrupted at
a lower rate are a subset of those at a higher one. Embedding noise is drawn batch by batch
(:func:`noise_generator`), so it is paired across models scored with the same ``batch_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from inference.map import MAPNet
from inference.map.objective import jacobian_sq_norm
from prob_attention.corpus import window_batches
from prob_attention.gpt import nats_to_bits

__all__ = ["Perturbation", "embedding_rms", "noise_generator", "substitute_characters", "window_bpc"]

Kind = Literal["clean", "noise", "relative_noise", "substitution"]


@dataclass(frozen=True)
class Perturbation:
    """One perturbation family at one level (``clean``: none, level 0)."""

    kind: Kind
    level: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("clean", "noise", "relative_noise", "substitution"):
            raise ValueError(f"unknown perturbation {self.kind!r}")
        if not (self.level >= 0.0 and self.level == self.level and self.level != float("inf")):
            raise ValueError(f"a perturbation level must be finite and non-negative, got {self.level}")
        if self.kind == "substitution" and self.level > 1.0:
            raise ValueError(f"a substitution rate is at most 1, got {self.level}")
        if (self.kind == "clean") != (self.level == 0.0):
            raise ValueError("the clean perturbation has level 0, and only it")

    @property
    def label(self) -> str:
        return "clean" if self.kind == "clean" else f"{self.kind}={self.level:g}"


def noise_generator(seed: int, draw: int, index: int) -> torch.Generator:
    """The generator of draw ``draw`` for batch ``index`` of a scoring pass (the noise of every noise measurement,
    since the first sweeps: ``seed * 1_000_003 + draw * 10_007 + index``); ``index = -1`` is the substitution
    stream of the draw."""
    return torch.Generator().manual_seed(seed * 1_000_003 + draw * 10_007 + index)


def substitute_characters(idx: Tensor, rate: float, vocab_size: int, seed: int, draw: int) -> Tensor:
    """``idx`` ``(n, T)`` with each position replaced, with probability ``rate``, by a different id drawn
    uniformly from ``1..vocab_size-1`` (id 0, the unknown symbol, is never drawn).

    The uniform numbers and the replacement ids depend on ``(seed, draw)`` and ``idx.shape`` only, so the
    corrupted positions at a lower rate are a subset of those at a higher rate.
    """
    if vocab_size < 3:
        raise ValueError(f"substitutions need at least two known characters, got vocab_size={vocab_size}")
    gen = noise_generator(seed, draw, -1)
    u = torch.rand(idx.shape, generator=gen)
    r = torch.randint(1, vocab_size - 1, idx.shape, generator=gen)  # one of the V - 2 other known ids
    replacement = r + ((r >= idx) & (idx > 0)).long()  # skip the original id
    return torch.where(u < rate, replacement, idx)


@torch.no_grad()
def embedding_rms(net: MAPNet, inputs: Tensor, batch_size: int = 64) -> float:
    """Root mean square of the input embedding coordinates, ``sqrt(mean x^2)``: the scale noise is measured against."""
    device = next(net.parameters()).device
    total, count = 0.0, 0
    for idx, _ in window_batches(inputs, inputs, batch_size):
        x = net.gpt.embed(idx.to(device))
        total += float(x.double().pow(2).sum())
        count += x.numel()
    return math.sqrt(total / count)


def logit_jacobian_norm(net: MAPNet, inputs: Tensor, batch_size: int = 64, seed: int = 0) -> float:
    """``||d logits / d x||_F^2`` per position: the sensitivity of the next-character logits to the decoded
    embeddings that Jacobian regularisation penalises (its training term is ``lambda_J / 2`` times this). The
    mean over ``inputs``' positions of :func:`~inference.map.objective.jacobian_sq_norm`'s random-projection
    estimate, one seeded projection per batch (the caller's random state is left as it was)."""
    device = next(net.parameters()).device
    net.eval()
    total, positions = 0.0, 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for idx, _ in window_batches(inputs, inputs, batch_size):
            out = net(idx.to(device))
            total += float(jacobian_sq_norm(out.logits, out.decoded, create_graph=False))
            positions += idx.numel()
    return total / positions


@torch.no_grad()
def window_bpc(net: MAPNet, inputs: Tensor, targets: Tensor, perturbation: Perturbation, draw: int = 0,
               seed: int = 0, rms: float | None = None, batch_size: int = 64) -> Tensor:
    """Bits per character of each window ``(n,)`` (float64) under one draw of ``perturbation``.

    ``rms``: the model's embedding RMS on these windows, for ``relative_noise`` (measured when omitted).
    """
    net.eval()
    device = next(net.parameters()).device
    kind, level = perturbation.kind, perturbation.level
    if kind == "substitution":
        inputs = substitute_characters(inputs, level, net.gpt.config.vocab_size, seed, draw)
    sigma = level if kind == "noise" else 0.0
    if kind == "relative_noise":
        sigma = level * (rms if rms is not None else embedding_rms(net, inputs, batch_size))
    out = []
    for j, (idx, tgt) in enumerate(window_batches(inputs, targets, batch_size)):
        x = net.gpt.embed(idx.to(device))  # (B, T, d)
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=noise_generator(seed, draw, j)).to(device)
        logits = net.gpt.decode(x)  # (B, T, V)
        nats = F.cross_entropy(logits.flatten(0, 1).float(), tgt.to(device).flatten(), reduction="none")
        out.append(nats.view(idx.shape).double().mean(-1).cpu())  # (B,)
    return nats_to_bits(torch.cat(out))
