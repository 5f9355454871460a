"""What a MAP run is built from: the prior's, the optimiser's and the data's settings, and named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from prob_attention.gpt import GPTConfig

__all__ = ["PriorConfig", "TrainConfig", "RunConfig", "PRESETS", "with_overrides"]


@dataclass
class PriorConfig:
    """The embedding prior: one causal-attention stage over the GPT's input embeddings.

    Defaults: one head with ``d_k = 16`` (a rank-16 coupling ``A = W_k^T W_q``, so the exact barrier is a
    ``16 x 16`` Sylvester determinant per position), values = the embeddings, strict causality, free
    coupling, as in ``det(I - Sigma_t A)`` of the paper. The paper's head size was not preserved: ``d_k`` is
    our choice, made for cost (the barrier's work grows as ``T^2 d_k^2``; see ``benchmarks/``).

    Args:
        density: ``"margin"`` (the barrier alone, the paper's margin-only loss) or ``"full"`` (the whole
            prior log-density: Gaussian residual with scale ``sigma`` plus the barrier).
        sigma: the latent noise scale of the full prior (its initial value when ``learn_sigma``).
        learn_sigma: learn ``log sigma`` jointly (``density="full"`` only).
        barrier_floor: the determinant below which the log-barrier is extended linearly.
        input_norm: evaluate the prior on the layer-normalised embeddings (zero mean, unit RMS per token, no
            affine: what the GPT's first LayerNorm sees) instead of the raw ones, so that the barrier cannot
            be raised by growing the embeddings (a scale-free barrier).
        coupling_norm: hold the Frobenius norm of each head's ``W_k`` (and of ``W_q`` under free coupling) at
            this value (``None``: free). Under ``coupling="barrier"`` (``A = W_k^T W_k >= 0``) the margin-only
            loss is otherwise maximised by ``A -> 0``, which switches the barrier off.
    """

    n_heads: int = 1
    head_dim: int = 16
    coupling: Literal["free", "repulsive", "barrier"] = "free"
    value_proj: bool = False
    output_proj: bool = False
    include_current: bool = False
    init_scale: float | None = None
    density: Literal["margin", "full"] = "margin"
    sigma: float = 1.0
    learn_sigma: bool = False
    barrier_floor: float = 1e-3
    input_norm: bool = False
    coupling_norm: float | None = None

    def __post_init__(self) -> None:
        if self.density not in ("margin", "full"):
            raise ValueError(f"PriorConfig.density must be 'margin' or 'full', got {self.density!r}")
        if self.sigma <= 0 or self.barrier_floor <= 0:
            raise ValueError("PriorConfig.sigma and barrier_floor must be positive")
        if self.coupling_norm is not None and not self.coupling_norm > 0:
            raise ValueError(f"PriorConfig.coupling_norm must be positive, got {self.coupling_norm}")
        if self.learn_sigma and self.density != "full":
            raise ValueError("learn_sigma needs density='full' (the margin-only loss has no sigma)")


@dataclass
class TrainConfig:
    """Data, optimisation and evaluation settings (Section 7.1: AdamW, cosine, 20 epochs, batch 64, clip 1).

    Args:
        corpus: ``"bundled"`` (offline, ``wt2-valtest-offline``), ``"wikitext-2-raw"`` or a folder.
        corpus_seed: the article shuffle of the bundled corpus.
        on_unknown: what a character unseen in training does: ``"unk"`` maps it to the unknown symbol,
            ``"error"`` raises.
        seed: model initialisation, batch order and dropout.
        steps_per_epoch: optimiser steps per epoch; ``None`` is one pass worth of windows,
            ``len(train) // (batch_size * block_size)``.
        lr, min_lr_ratio: peak learning rate, cosine-annealed to ``lr * min_lr_ratio`` over the run.
        lambda_m: weight of the embedding prior; 0 is the CE-only baseline.
        train_eval_batches: batches of random training windows scored for the train BPC of an epoch.
        max_eval_windows: cap on the validation/test windows scored (``None``: the whole split).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        amp: bf16 autocast on CUDA (the barrier's determinants stay in float32).
        embed_noise: standard deviation of Gaussian noise added to the input embeddings that the GPT decodes
            during training (noise injection, a robustness peer of the barrier; the prior sees clean ones).
        jacobian_reg: weight ``lambda_J`` of the Jacobian penalty ``lambda_J / 2 * ||d logits / d x||_F^2``
            per token (Hoffman et al. 2019), estimated with one Gaussian random projection per step.
    """

    corpus: str = "bundled"
    corpus_seed: int = 0
    on_unknown: Literal["unk", "error"] = "unk"
    seed: int = 0
    epochs: int = 20
    batch_size: int = 64
    steps_per_epoch: int | None = None
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    lambda_m: float = 0.0
    train_eval_batches: int = 8
    max_eval_windows: int | None = None
    device: str = "auto"
    amp: bool = True
    embed_noise: float = 0.0
    jacobian_reg: float = 0.0

    def __post_init__(self) -> None:
        if self.lambda_m < 0:
            raise ValueError(f"TrainConfig.lambda_m must be non-negative, got {self.lambda_m}")
        for name in ("embed_noise", "jacobian_reg"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TrainConfig.{name} must be non-negative, got {getattr(self, name)}")
        for name in ("epochs", "batch_size", "train_eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"TrainConfig.steps_per_epoch must be positive, got {self.steps_per_epoch}")
        if self.grad_clip <= 0 or self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("TrainConfig needs grad_clip > 0, lr > 0 and 0 <= min_lr_ratio <= 1")


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    # about two minutes on two CPU cores: the default model, smaller batches, three short epochs
    "quick": {"train": {"epochs": 3, "batch_size": 32, "steps_per_epoch": 120, "max_eval_windows": 384}},
    # seconds: for tests and smoke runs
    "tiny": {
        "gpt": {"n_embd": 32, "block_size": 32, "n_head": 2, "n_layer": 1},
        "prior": {"head_dim": 8},
        "train": {"epochs": 2, "batch_size": 8, "steps_per_epoch": 5, "max_eval_windows": 16, "train_eval_batches": 1},
    },
}
"""Named overrides of the defaults, per section (``gpt``, ``prior``, ``train``)."""


@dataclass
class RunConfig:
    """Everything a run is built from; saved as JSON with every checkpoint and compared on resume.

    ``gpt`` holds :class:`GPTConfig` fields except ``vocab_size``, which comes from the corpus.
    """

    gpt: dict[str, Any] = field(default_factory=dict)
    prior: PriorConfig = field(default_factory=PriorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if "vocab_size" in self.gpt:
            raise ValueError("RunConfig.gpt must not set vocab_size: it is the corpus vocabulary's size")
        GPTConfig(vocab_size=1, **self.gpt)  # validates the fields early

    @classmethod
    def preset(cls, name: str, **overrides: dict[str, Any]) -> RunConfig:
        """A named preset (``default``, ``quick``, ``tiny``) with per-section ``overrides`` on top."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        sections = {k: {**PRESETS[name].get(k, {}), **overrides.get(k, {})} for k in ("gpt", "prior", "train")}
        return cls(gpt=sections["gpt"], prior=PriorConfig(**sections["prior"]), train=TrainConfig(**sections["train"]))

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, **self.gpt)

    def to_dict(self) -> dict[str, Any]:
        return {"gpt": dict(self.gpt), "prior": asdict(self.prior), "train": asdict(self.train)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return cls(gpt=dict(data["gpt"]), prior=PriorConfig(**data["prior"]), train=TrainConfig(**data["train"]))


def with_overrides(config: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    """``config`` with some fields of its sections replaced (``gpt=..., prior=..., train=...``)."""
    return RunConfig(
        gpt={**config.gpt, **sections.get("gpt", {})},
        prior=replace(config.prior, **sections.get("prior", {})),
        train=replace(config.train, **sections.get("train", {})),
    )
