"""The GPT and its embedding prior as one module, built from a run's config."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from prob_attention import CausalAttentionTransform, EmbeddingPrior
from prob_attention.gpt import GPTConfig, SmallGPT

from .config import PriorConfig, RunConfig

__all__ = ["NetOutput", "MAPNet", "FixedFrobeniusNorm", "build_net"]


class NetOutput(NamedTuple):
    """One forward pass: logits ``(B, T, V)``; the prior's per-token log-density and safeguard mask ``(B, T)``
    (``None`` when the prior is off); the embeddings the GPT decoded ``(B, T, d)`` (noise included)."""

    logits: Tensor
    prior_log_density: Tensor | None
    clamped: Tensor | None
    decoded: Tensor


class FixedFrobeniusNorm(nn.Module):
    """A parametrisation ``W -> c W / ||W||_F`` per head (``W`` of shape ``(H, d_k, d)``): the coupling's
    scale is held at ``c`` while its direction is learned (``PriorConfig.coupling_norm``)."""

    def __init__(self, norm: float) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, w: Tensor) -> Tensor:
        return self.norm * w / w.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]


class MAPNet(nn.Module):
    """The GPT and its embedding prior in one module (one ``pyro.module``, one DDP wrapper, one checkpoint).

    Args:
        gpt: the observation model.
        transform: the prior's causal-attention bijector over ``gpt.embed(idx)``.
        prior: the prior's settings.
        use_prior: evaluate the prior in :meth:`forward` (``lambda_m > 0``); otherwise it is carried along
            untouched, so the CE-only run computes exactly the GPT and nothing else.
        embed_noise: standard deviation of the Gaussian noise added, in training mode only, to the
            embeddings the GPT decodes (``TrainConfig.embed_noise``); the prior sees the clean ones.
    """

    def __init__(self, gpt: SmallGPT, transform: CausalAttentionTransform, prior: PriorConfig, use_prior: bool,
                 embed_noise: float = 0.0) -> None:
        super().__init__()
        self.gpt, self.transform, self.prior, self.use_prior = gpt, transform, prior, use_prior
        self.embed_noise = embed_noise
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
        decoded = x + self.embed_noise * torch.randn_like(x) if self.training and self.embed_noise > 0 else x
        logits = self.gpt.decode(decoded)  # (B, T, V)
        if not self.use_prior:
            return NetOutput(logits, None, None, decoded)
        log_density, clamped = self.prior_terms(x)
        return NetOutput(logits, log_density, clamped, decoded)

    def prior_input(self, x: Tensor) -> Tensor:
        """What the prior models: the embeddings ``x``, or with ``input_norm`` each token's layer-normalised
        embedding (zero mean, unit RMS over its ``d`` coordinates, no affine; an ``eps`` of ``1e-12``, not the
        GPT's ``1e-5``, so that the result does not depend on the embeddings' scale)."""
        return F.layer_norm(x, x.shape[-1:], eps=1e-12) if self.prior.input_norm else x

    def embedding_prior(self, seq_len: int) -> EmbeddingPrior:
        """The run's prior as a distribution over ``seq_len`` embeddings: this transform, ``sigma`` and the
        run's barrier floor (so its log-density is the training objective's, safeguard included)."""
        return EmbeddingPrior(self.transform, seq_len, self.sigma, barrier_floor=self.prior.barrier_floor)

    def barrier_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The run's barrier terms for embeddings ``x`` ``(B, T, d)``: the (safeguarded) ``log det J_tt`` of what
        the prior models (:meth:`prior_input`) and the safeguard mask, ``(B, T)`` each, in float32 outside
        autocast (:meth:`EmbeddingPrior.log_det_terms`)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = self.prior_input(x.float())
            return self.embedding_prior(x.shape[-2]).log_det_terms(x)

    def prior_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-position prior log-density and safeguard mask, ``(B, T)`` each, in float32 outside autocast.

        ``density="margin"``: the barrier terms (:meth:`barrier_terms`); ``"full"``: the whole
        ``log p(x_t | x_{<t})``, Gaussian residual included (:meth:`EmbeddingPrior.position_terms`).
        """
        if self.prior.density == "margin":
            return self.barrier_terms(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = self.prior_input(x.float())
            terms = self.embedding_prior(x.shape[-2]).position_terms(x)
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
    if pc.coupling_norm is not None:
        for name in ("w_k", "_w_q"):
            if getattr(transform, name) is not None:
                parametrize.register_parametrization(transform, name, FixedFrobeniusNorm(pc.coupling_norm))
    return MAPNet(gpt, transform, pc, use_prior=config.train.lambda_m > 0, embed_noise=config.train.embed_noise)

