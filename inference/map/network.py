"""The GPT and its embedding prior as one module, built from a run's config."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from prob_attention import CausalAttentionTransform, EmbeddingPrior
from prob_attention.gpt import GPTConfig, SmallGPT

from .config import PriorConfig, RunConfig

__all__ = ["NetOutput", "MAPNet", "build_net"]


class NetOutput(NamedTuple):
    """One forward pass: logits ``(B, T, V)``; the prior's per-token log-density and safeguard mask ``(B, T)``
    (``None`` when the prior is off)."""

    logits: Tensor
    prior_log_density: Tensor | None
    clamped: Tensor | None


class MAPNet(nn.Module):
    """The GPT and its embedding prior in one module (one ``pyro.module``, one DDP wrapper, one checkpoint).

    Args:
        gpt: the observation model.
        transform: the prior's causal-attention bijector over ``gpt.embed(idx)``.
        prior: the prior's settings.
        use_prior: evaluate the prior in :meth:`forward` (``lambda_m > 0``); otherwise it is carried along
            untouched, so the CE-only run computes exactly the GPT and nothing else.
    """

    def __init__(self, gpt: SmallGPT, transform: CausalAttentionTransform, prior: PriorConfig, use_prior: bool) -> None:
        super().__init__()
        self.gpt, self.transform, self.prior, self.use_prior = gpt, transform, prior, use_prior
        self.log_sigma = nn.Parameter(torch.tensor(math.log(prior.sigma))) if prior.learn_sigma else None

    @property
    def sigma(self) -> Tensor:
        """The latent noise scale of the full prior."""
        if self.log_sigma is not None:
            return self.log_sigma.exp()
        return torch.tensor(self.prior.sigma, device=self.transform.w_k.device)

    def forward(self, idx: Tensor) -> NetOutput:
        """``idx (B, T)`` -> logits and, with the prior on, its per-token log-density ``(B, T)``."""
        x = self.gpt.embed(idx)  # (B, T, d)
        logits = self.gpt.decode(x)  # (B, T, V)
        if not self.use_prior:
            return NetOutput(logits, None, None)
        log_density, clamped = self.prior_terms(x)
        return NetOutput(logits, log_density, clamped)

    def embedding_prior(self, seq_len: int) -> EmbeddingPrior:
        """The run's prior as a distribution over ``seq_len`` embeddings: this transform, ``sigma`` and the
        run's barrier floor (so its log-density is the training objective's, safeguard included)."""
        return EmbeddingPrior(self.transform, seq_len, self.sigma, barrier_floor=self.prior.barrier_floor)

    def prior_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-position prior log-density and safeguard mask, ``(B, T)`` each, in float32 outside autocast.

        ``density="margin"``: the prior's barrier terms, the (safeguarded) ``log det J_tt``
        (:meth:`EmbeddingPrior.log_det_terms`); ``"full"``: the whole ``log p(x_t | x_{<t})``, Gaussian
        residual included (:meth:`EmbeddingPrior.position_terms`).
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            prior = self.embedding_prior(x.shape[-2])
            if self.prior.density == "margin":
                return prior.log_det_terms(x)
            terms = prior.position_terms(x)
        return terms.log_density, terms.clamped


def build_net(config: RunConfig, gpt_config: GPTConfig) -> MAPNet:
    """The GPT, then the prior, initialised from ``config.train.seed`` (the GPT's initialisation does not
    depend on the prior's settings, so every ``lambda_m`` starts from the same GPT)."""
    pc = config.prior
    torch.manual_seed(config.train.seed)
    gpt = SmallGPT(gpt_config)
    transform = CausalAttentionTransform(
        gpt_config.n_embd, pc.n_heads, pc.head_dim, value_proj=pc.value_proj, output_proj=pc.output_proj,
        include_current=pc.include_current, coupling=pc.coupling, init_scale=pc.init_scale,
    )
    return MAPNet(gpt, transform, pc, use_prior=config.train.lambda_m > 0)

