"""Tiny random trajectory models shared by the posterior tests."""

import torch

from inference.trajectory import TrajectoryModel
from prob_attention import CausalAttentionTransform
from prob_attention.gpt import GPTConfig, SmallGPT


def random_model(dim: int = 4, vocab: int = 5, block: int = 8, weight_scale: float | None = None,
                 seed: int = 0) -> TrajectoryModel:
    """A random GPT and a repulsive (globally invertible) prior; ``weight_scale`` re-draws every GPT weight."""
    torch.manual_seed(seed)
    gpt = SmallGPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=1, n_head=1, n_embd=dim)).eval()
    if weight_scale is not None:
        with torch.no_grad():
            for p in gpt.parameters():
                p.normal_(0.0, weight_scale)
    return TrajectoryModel(gpt, CausalAttentionTransform(dim, coupling="repulsive"), sigma=1.0, tau=0.5)
