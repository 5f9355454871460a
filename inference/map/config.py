"""What a MAP run is built from: the prior's, the optimiser's and the data's settings, and named presets."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch

from prob_attention.gpt import GPTConfig

__all__ = ["PRESETS", "PriorConfig", "RunConfig", "TrainConfig", "check_bool", "check_choice", "check_number",
           "number_problem", "with_overrides"]


def number_problem(value: Any, *, low: float | None = None, high: float | None = None, low_open: bool = False,
                   high_open: bool = False, integer: bool = False) -> str | None:
    """What is wrong with ``value`` as a finite number (an int when ``integer``) between ``low`` and ``high``
    (each end closed unless ``*_open``; ``None``: unbounded), e.g. ``"must lie in [1, inf)"``; ``None`` if nothing."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        return f"must be a finite {'integer' if integer else 'number'}"
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if not (below or above):
        return None
    return (f"must lie in {'(' if low_open or low is None else '['}{'-inf' if low is None else f'{low:g}'}, "
            f"{'inf' if high is None else f'{high:g}'}{')' if high_open or high is None else ']'}")


def check_number(owner: str, name: str, value: Any, **bounds: Any) -> None:
    """Raise ``ValueError`` naming ``owner.name`` when :func:`number_problem` finds one (``bounds``: its keywords)."""
    problem = number_problem(value, **bounds)
    if problem is not None:
        raise ValueError(f"{owner}.{name} {problem}, got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise ``ValueError`` naming ``owner.name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_bool(owner: str, name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``owner.name`` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be true or false, got {value!r}")


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
        owner = "PriorConfig"
        check_number(owner, "n_heads", self.n_heads, low=1, integer=True)
        check_number(owner, "head_dim", self.head_dim, low=1, integer=True)
        check_choice(owner, "coupling", self.coupling, ("free", "repulsive", "barrier"))
        check_choice(owner, "density", self.density, ("margin", "full"))
        for name in ("value_proj", "output_proj", "include_current", "learn_sigma"):
            check_bool(owner, name, getattr(self, name))
        if self.init_scale is not None:
            check_number(owner, "init_scale", self.init_scale, low=0, low_open=True)
        check_number(owner, "sigma", self.sigma, low=0, low_open=True)
        check_number(owner, "barrier_floor", self.barrier_floor, low=0, low_open=True)
        check_bool(owner, "input_norm", self.input_norm)
        if self.coupling_norm is not None:
            check_number(owner, "coupling_norm", self.coupling_norm, low=0, low_open=True)
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
        label_smoothing: weight ``epsilon`` of the uniform distribution mixed into each next-character target
            (Szegedy et al. 2016; ``F.cross_entropy(..., label_smoothing=epsilon)``): a confidence peer, trained
            to be less sure, against which the robustness of every other setting is read.
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
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        owner = "TrainConfig"
        if not isinstance(self.corpus, str) or not self.corpus:
            raise ValueError(f"TrainConfig.corpus must name a corpus, got {self.corpus!r}")
        check_choice(owner, "on_unknown", self.on_unknown, ("unk", "error"))
        for name in ("corpus_seed", "seed"):
            check_number(owner, name, getattr(self, name), low=0, integer=True)
        for name in ("epochs", "batch_size", "train_eval_batches"):
            check_number(owner, name, getattr(self, name), low=1, integer=True)
        for name in ("steps_per_epoch", "max_eval_windows"):
            if getattr(self, name) is not None:
                check_number(owner, name, getattr(self, name), low=1, integer=True)
        for name in ("lr", "grad_clip"):
            check_number(owner, name, getattr(self, name), low=0, low_open=True)
        check_number(owner, "min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        check_number(owner, "weight_decay", self.weight_decay, low=0)
        for name in ("beta1", "beta2"):
            check_number(owner, name, getattr(self, name), low=0, high=1, high_open=True)
        check_number(owner, "lambda_m", self.lambda_m, low=0)
        check_number(owner, "embed_noise", self.embed_noise, low=0)
        check_number(owner, "jacobian_reg", self.jacobian_reg, low=0)
        check_number(owner, "label_smoothing", self.label_smoothing, low=0, high=1, high_open=True)
        check_bool(owner, "amp", self.amp)
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"TrainConfig.device must be 'auto' or a torch device such as 'cpu' or 'cuda', "
                                 f"got {self.device!r}") from err


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
        unknown = set(self.gpt) - set(GPTConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"RunConfig.gpt has unknown fields {sorted(unknown)}")
        if "dropout" in self.gpt:
            check_number("GPTConfig", "dropout", self.gpt["dropout"], low=0, high=1, high_open=True)
        GPTConfig(vocab_size=1, **self.gpt)  # validates the other fields early

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
