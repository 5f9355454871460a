"""The categorical observation model of Section 7: a small character-level GPT.

The model is split where the paper's embedding prior attaches::

    idx (B, T) --embed--> x (B, T, n_embd) --decode--> logits (B, T, vocab)

``x = token embedding + position embedding`` is what the :class:`~prob_attention.EmbeddingPrior`
scores in the MAP objective ``L = CE(tokens | x) + lambda_m * L_margin`` (eq. 19, 27, 34), and where
the noise experiments add Gaussian noise before decoding. Losses are cross entropies in nats;
:func:`bits_per_char` converts to bits per character, the unit of the paper's tables.

Example:
    >>> import torch
    >>> model = SmallGPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    >>> idx = torch.randint(0, 11, (3, 8))          # batch x time
    >>> x = model.embed(idx)                          # batch x time x n_embd
    >>> logits = model.decode(x + 0.1 * torch.randn_like(x))
    >>> logits.shape
    torch.Size([3, 8, 11])
    >>> logits, loss = model(idx, targets=idx)
    >>> loss.ndim, bits_per_char(logits, idx).ndim
    (0, 0)

Incremental decoding keeps each layer's keys and values in a :class:`KVCache`, so extending a
sequence by one position costs one position's forward pass instead of the whole prefix's:

    >>> cache = model.new_cache()
    >>> first = model.decode(x[:, :5], cache)         # positions 0..4
    >>> last = model.decode(x[:, 5:], cache)          # positions 5..7, reading the cached 0..4
    >>> torch.allclose(torch.cat([first, last], 1), model.decode(x), atol=1e-5)
    True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GPTConfig",
    "KVCache",
    "LayerCache",
    "CausalSelfAttention",
    "MLP",
    "Block",
    "SmallGPT",
    "bits_per_char",
    "configure_param_groups",
    "cross_entropy_nats",
    "decays",
    "nats_to_bits",
]


@dataclass
class GPTConfig:
    """Sizes of :class:`SmallGPT`.

    The paper keeps 4 heads and 2 blocks; its embedding width and context length were lost, so both
    default to 128 (our choice; docs/RESULTS.md lists where we differ from the paper).

    Args:
        vocab_size: number of token ids (characters).
        block_size: the longest context ``T`` the model accepts.
        n_layer: number of transformer blocks.
        n_head: attention heads per block; must divide ``n_embd``.
        n_embd: embedding width ``d``.
        dropout: dropout probability, in ``[0, 1)``.
        bias: whether linear layers and LayerNorms have a bias.
    """

    vocab_size: int
    block_size: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"GPTConfig.bias must be a bool, got {self.bias!r}")

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain, JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        """Build a config from :meth:`to_dict`'s output; unknown keys raise ``ValueError``."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown GPTConfig keys: {sorted(unknown)}")
        return cls(**data)


@dataclass
class LayerCache:
    """One attention layer's keys and values for the positions decoded so far, ``(B, nh, t, hs)`` each."""

    k: Tensor | None = None
    v: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new positions' keys and values; returns all of them."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class KVCache:
    """Keys and values of every attention layer of a :class:`SmallGPT`, for incremental decoding.

    :meth:`SmallGPT.decode` with a cache reads the cached positions and appends the new ones, in place.
    """

    def __init__(self, n_layer: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layer)]

    def __len__(self) -> int:
        """The number of positions cached."""
        return self.layers[0].length

    @property
    def batch_size(self) -> int | None:
        """Rows cached (``None`` while empty)."""
        k = self.layers[0].k
        return None if k is None else k.shape[0]

    def reorder(self, index: Tensor) -> None:
        """Keep the rows ``index`` (a ``(B',)`` long tensor, repeats allowed), in place: resampled particles."""
        for layer in self.layers:
            if layer.k is not None:
                layer.k, layer.v = layer.k[index], layer.v[index]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (each position attends to itself and the past)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v together
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        """``(B, T, C) -> (B, T, C)``; with ``cache``, ``x`` follows the cached positions, which it also attends to
        (the cache is extended by ``x``'s keys and values)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.extend(k, v)  # (B, nh, past + T, hs)
        # query i (position past + i) sees keys 0..past + i
        mask = None if past == 0 else torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=past == 0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network, width ``4 * n_embd``, GELU."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, C) -> (B, T, C)``."""
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, 4C) inside


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        """``(B, T, C) -> (B, T, C)`` (``cache``: see :meth:`CausalSelfAttention.forward`)."""
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class SmallGPT(nn.Module):
    """A GPT over token ids: :meth:`embed` then :meth:`decode`; ``lm_head`` is tied to ``wte``.

    Initialised as GPT-2: weights ``N(0, 0.02^2)``, the residual projections (``c_proj``) with
    standard deviation ``0.02 / sqrt(2 n_layer)``, biases zero, LayerNorms the identity.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one (vocab, n_embd) matrix

        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """GPT-2 initialisation of one submodule (called through ``nn.Module.apply``)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Number of parameters, the tied embedding / output matrix counted once."""
        return sum(p.numel() for p in self.parameters())

    def embed(self, idx: Tensor) -> Tensor:
        """Input embeddings ``x = wte(idx) + wpe(positions)``: ``(B, T)`` ids ``-> (B, T, n_embd)``.

        This is the ``x`` the embedding prior scores; no dropout is applied here (it is the first
        step of :meth:`decode`), so the prior sees the same ``x`` in training and evaluation.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be 2-D (batch, time), got shape {tuple(idx.shape)}")
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise TypeError(f"idx must hold integer token ids, got dtype {idx.dtype}")
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        if idx.numel() > 0 and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}), got range "
                f"[{int(idx.min())}, {int(idx.max())}]"
            )
        pos = torch.arange(T, device=idx.device)  # (T,)
        return self.wte(idx.long()) + self.wpe(pos)  # (B, T, C) + (T, C) -> (B, T, C)

    def new_cache(self) -> KVCache:
        """An empty :class:`KVCache` for incremental :meth:`decode`."""
        return KVCache(self.config.n_layer)

    def decode(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """Logits from input embeddings: ``(B, T, n_embd) -> (B, T, vocab_size)``.

        Dropout, the blocks, the final LayerNorm and the (tied) ``lm_head``. With ``cache`` (from
        :meth:`new_cache`), ``x`` holds the positions that follow the cached ones: their logits are
        returned, the same as decoding the whole sequence, and the cache is extended by them.
        """
        return self.lm_head(self.features(x, cache))  # (B, T, vocab)

    def features(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """The input of ``lm_head``, ``(B, T, n_embd) -> (B, T, n_embd)``: :meth:`decode` is ``lm_head(features(x))``.

        Dropout, the blocks and the final LayerNorm; ``cache`` as in :meth:`decode`.
        """
        if x.dim() != 3 or x.shape[-1] != self.config.n_embd:
            raise ValueError(
                f"embeddings must have shape (batch, time, {self.config.n_embd}), got {tuple(x.shape)}"
            )
        if cache is not None:
            if len(cache.layers) != len(self.blocks):
                raise ValueError(f"the cache has {len(cache.layers)} layers, the model {len(self.blocks)}")
            if cache.batch_size not in (None, x.shape[0]):
                raise ValueError(f"the cache holds {cache.batch_size} rows, the embeddings {x.shape[0]}")
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layers[i])  # (B, T, C)
        return self.ln_f(x)  # (B, T, C)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``decode(embed(idx))``; with ``targets`` (same shape as ``idx``) also the mean CE in nats.

        Returns:
            ``(logits, loss)``: logits ``(B, T, vocab_size)``; loss a scalar (nats per token), or
            ``None`` without targets.
        """
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} differs from idx shape {tuple(idx.shape)}")
        logits = self.decode(self.embed(idx))
        loss = None if targets is None else cross_entropy_nats(logits, targets)
        return logits, loss


def cross_entropy_nats(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross entropy in nats per token: logits ``(..., V)``, integer targets ``(...)``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))  # (N, V), (N,)


def nats_to_bits(nats: float | Tensor) -> float | Tensor:
    """A cross entropy in nats as bits (``nats / ln 2``): per character, bits per character (BPC)."""
    return nats / math.log(2.0)


def bits_per_char(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross entropy in bits per character, a scalar tensor.

    Args:
        logits: ``(..., vocab_size)``.
        targets: integer ids, shape ``logits.shape[:-1]``.
    """
    return nats_to_bits(cross_entropy_nats(logits, targets))


def decays(param: Tensor) -> bool:
    """Whether AdamW's weight decay applies to ``param``: matrices (``>= 2`` dims) yes, vectors and scalars no."""
    return param.dim() >= 2


def configure_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on every parameter with ``>= 2`` dims, none on the rest.

    Matrices (linear weights, embedding tables) are decayed; biases, LayerNorm gains and other
    vectors / scalars are not. Each parameter appears exactly once (tied weights included); empty
    groups are left out. Works for any ``nn.Module``.

    Example:
        >>> groups = configure_param_groups(nn.Linear(3, 2), weight_decay=0.1)
        >>> [(len(g["params"]), g["weight_decay"]) for g in groups]
        [(1, 0.1), (1, 0.0)]
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
    params = list(model.parameters())  # shared parameters are yielded once
    decay = [p for p in params if decays(p)]
    no_decay = [p for p in params if not decays(p)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
