"""Input perturbations of a robustness study, scored per window so that models compare pairwise.

Five families, each at a few levels:

- ``noise``: Gaussian noise ``N(0, sigma^2 I)`` on the input embeddings, ``sigma`` in embedding units
  (the paper's protocol, Section 7.3);
- ``relative_noise``: the same with ``sigma = level * RMS``, the model's own embedding RMS per coordinate
  on the scored split, so that a model cannot gain by spreading its embeddings;
- ``substitution``: each input character replaced, with probability ``level``, by another character drawn
  uniformly from the vocabulary (never the unknown symbol), scored against the clean next character:
  typos in the text;
- ``case``: each letter's case flipped, with probability ``level``, where the vocabulary holds the other case
  (a slipped shift key), scored against the clean next character;
- ``deletion``: each input character dropped, with probability ``level``, from the text before it is cut into
  windows; each kept character is scored against the character that follows it in the clean text (the model
  reads text with gaps and must still predict what comes next). The windows are fewer, and their count and
  content depend only on ``(seed, draw)``, so models still compare window by window.

Every draw depends only on ``(seed, draw)``, never on the model, so two models are scored on the same
noise and the same corrupted positions (a paired comparison); for substitutions the positions corrupted at
a lower rate are a subset of those at a higher one. Embedding noise is drawn batch by batch
(:func:`noise_generator`), so it is paired across models scored with the same ``batch_size``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from inference.map import MAPNet
from inference.map.objective import jacobian_sq_norm
from prob_attention.corpus import window_batches
from prob_attention.gpt import nats_to_bits

from .calibration import CalibrationMeter

__all__ = ["TEXT_KINDS", "Perturbation", "WindowScores", "corrupt_text", "delete_characters", "embedding_rms",
           "flip_case", "noise_generator", "substitute_characters", "swapcase_ids", "window_bpc", "window_scores"]

Kind = Literal["clean", "noise", "relative_noise", "substitution", "case", "deletion"]

TEXT_KINDS: tuple[Kind, ...] = ("substitution", "case", "deletion")
"""The families that corrupt the text; the others perturb the embeddings."""


@dataclass(frozen=True)
class Perturbation:
    """One perturbation family at one level (``clean``: none, level 0)."""

    kind: Kind
    level: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("clean", "noise", "relative_noise", *TEXT_KINDS):
            raise ValueError(f"unknown perturbation {self.kind!r}")
        if not (self.level >= 0.0 and self.level == self.level and self.level != float("inf")):
            raise ValueError(f"a perturbation level must be finite and non-negative, got {self.level}")
        if self.kind in TEXT_KINDS and self.level > 1.0:
            raise ValueError(f"a {self.kind} rate is at most 1, got {self.level}")
        if (self.kind == "clean") != (self.level == 0.0):
            raise ValueError("the clean perturbation has level 0, and only it")

    @property
    def label(self) -> str:
        return "clean" if self.kind == "clean" else f"{self.kind}={self.level:g}"


def noise_generator(seed: int, draw: int, index: int) -> torch.Generator:
    """The generator of draw ``draw`` for batch ``index`` of a scoring pass (the noise of every noise measurement,
    since the first sweeps: ``seed * 1_000_003 + draw * 10_007 + index``); ``index = -1, -2, -3`` are the
    substitution, case and deletion streams of the draw."""
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


def swapcase_ids(chars: Sequence[str]) -> Tensor:
    """For a vocabulary of ``chars`` (ids ``1..len(chars)``, id 0 the unknown symbol): each id's image under a
    flip of case, ``(V,)``; an id whose other case is not in the vocabulary (or that has none) maps to itself."""
    index = {c: i + 1 for i, c in enumerate(chars)}
    return torch.tensor([0] + [index.get(c.swapcase(), i + 1) for i, c in enumerate(chars)])


def flip_case(idx: Tensor, rate: float, swapcase: Tensor, seed: int, draw: int) -> Tensor:
    """``idx`` ``(n, T)`` with each letter whose other case is in the vocabulary flipped to it with probability
    ``rate`` (``swapcase``: :func:`swapcase_ids`). The flipped positions at a lower rate are a subset of those at
    a higher one."""
    u = torch.rand(idx.shape, generator=noise_generator(seed, draw, -2))
    flipped = swapcase[idx]
    return torch.where((u < rate) & (flipped != idx), flipped, idx)


def delete_characters(inputs: Tensor, targets: Tensor, rate: float, seed: int, draw: int) -> tuple[Tensor, Tensor]:
    """Consecutive windows ``(n, T)`` of a text (as :func:`~prob_attention.corpus.eval_windows` cuts them) with
    each input character dropped with probability ``rate``, re-cut into ``(m, T)`` windows, ``m <= n``; each
    kept character keeps its clean next character as target (the ragged tail is dropped). The kept positions at
    a higher rate are a subset of those at a lower one."""
    u = torch.rand(inputs.numel(), generator=noise_generator(seed, draw, -3))
    keep = u >= rate
    kept_inputs, kept_targets = inputs.flatten()[keep], targets.flatten()[keep]
    block = inputs.shape[1]
    m = kept_inputs.numel() // block
    if m == 0:
        raise ValueError(f"deleting {rate:.0%} of the characters leaves less than one window of {block}")
    return kept_inputs[: m * block].view(m, block), kept_targets[: m * block].view(m, block)


def corrupt_text(inputs: Tensor, targets: Tensor, perturbation: Perturbation, vocab_size: int,
                 chars: Sequence[str] | None = None, seed: int = 0, draw: int = 0) -> tuple[Tensor, Tensor]:
    """The windows ``(inputs, targets)`` under one draw of a text perturbation (:data:`TEXT_KINDS`; any other is
    returned unchanged). ``chars``: the model's vocabulary (:attr:`~prob_attention.corpus.CharVocab.chars`),
    needed for ``case``."""
    kind, level = perturbation.kind, perturbation.level
    if kind == "substitution":
        return substitute_characters(inputs, level, vocab_size, seed, draw), targets
    if kind == "case":
        if chars is None:
            raise ValueError("flipping case needs the model's vocabulary (chars)")
        return flip_case(inputs, level, swapcase_ids(chars), seed, draw), targets
    if kind == "deletion":
        return delete_characters(inputs, targets, level, seed, draw)
    return inputs, targets


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


@dataclass
class WindowScores:
    """What one scoring pass gives: ``bpc`` ``(k, n)`` (float64), the bits per character of each window at each
    of ``k`` temperatures, and, when asked for, the :class:`~experiments.calibration.CalibrationMeter` statistics
    over all positions (``ece``, ``entropy_bits`` per temperature, ``top1_error``)."""

    bpc: Tensor
    calibration: dict[str, Any] | None = None


@torch.no_grad()
def window_scores(net: MAPNet, inputs: Tensor, targets: Tensor, perturbation: Perturbation,
                  temperatures: Sequence[float] = (1.0,), draw: int = 0, seed: int = 0, rms: float | None = None,
                  batch_size: int = 64, chars: Sequence[str] | None = None, calibration: bool = False,
                  stride: int = 1) -> WindowScores:
    """Score the windows under one draw of ``perturbation`` with the logits divided by each of ``temperatures``
    (one forward pass for all of them).

    ``rms``: the model's embedding RMS on these windows, for ``relative_noise`` (measured when omitted);
    ``chars``: its vocabulary, for ``case``; ``calibration``: also measure calibration error, entropy and error;
    ``stride``: score every ``stride``-th window of the (corrupted) text only.
    """
    net.eval()
    device = next(net.parameters()).device
    kind, level = perturbation.kind, perturbation.level
    inputs, targets = corrupt_text(inputs, targets, perturbation, net.gpt.config.vocab_size, chars, seed, draw)
    inputs, targets = inputs[::stride], targets[::stride]
    sigma = level if kind == "noise" else 0.0
    if kind == "relative_noise":
        sigma = level * (rms if rms is not None else embedding_rms(net, inputs, batch_size))
    meter = CalibrationMeter(list(temperatures), net.gpt.config.vocab_size) if calibration else None
    out = []
    for j, (idx, tgt) in enumerate(window_batches(inputs, targets, batch_size)):
        x = net.gpt.embed(idx.to(device))  # (B, T, d)
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=noise_generator(seed, draw, j)).to(device)
        logits = net.gpt.decode(x).flatten(0, 1).float()  # (B T, V)
        flat_targets = tgt.to(device).flatten()
        nats = torch.stack([F.cross_entropy(logits / t, flat_targets, reduction="none") for t in temperatures])
        out.append(nats.view(len(temperatures), *idx.shape).double().mean(-1).cpu())  # (k, B)
        if meter is not None:
            meter.update(logits, flat_targets)
    return WindowScores(nats_to_bits(torch.cat(out, dim=1)), meter.compute() if meter is not None else None)


def window_bpc(net: MAPNet, inputs: Tensor, targets: Tensor, perturbation: Perturbation, draw: int = 0,
               seed: int = 0, rms: float | None = None, batch_size: int = 64,
               chars: Sequence[str] | None = None) -> Tensor:
    """Bits per character of each window ``(n,)`` (float64) under one draw of ``perturbation``, at the model's
    own temperature (:func:`window_scores` with ``T = 1``)."""
    return window_scores(net, inputs, targets, perturbation, (1.0,), draw, seed, rms, batch_size, chars).bpc[0]
