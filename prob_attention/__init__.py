"""prob-attention: causal self-attention as a latent-noise generative model over embeddings.

The model side of the library (arXiv 2602.22271): the causal-attention bijector, the embedding
prior it defines, and the margins / support tokens read off its Jacobian.
"""

from .margins import (
    attention_covariance,
    attention_entropy,
    attention_weights,
    log_det_margin,
    safe_log_barrier,
    sequence_margin,
    singular_margin,
    spectral_margin,
    support_tokens,
)
from .prior import EmbeddingPrior, PriorTerms, conditional_log_prob
from .scalar import scalar_attention, scalar_margin, scalar_transform
from .transform import AttentionState, CausalAttentionTransform, InversionError

__all__ = [
    "AttentionState",
    "CausalAttentionTransform",
    "EmbeddingPrior",
    "InversionError",
    "PriorTerms",
    "attention_covariance",
    "attention_entropy",
    "attention_weights",
    "conditional_log_prob",
    "log_det_margin",
    "safe_log_barrier",
    "scalar_attention",
    "scalar_margin",
    "scalar_transform",
    "sequence_margin",
    "singular_margin",
    "spectral_margin",
    "support_tokens",
]
