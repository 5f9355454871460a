r"""MAP training through Pyro: a SmallGPT observation model with the embedding prior (Section 7.1).

The Pyro model, per batch of ``B`` windows of ``T`` characters::

    x = gpt.embed(idx)                                     # (B, T, d), the prior's embeddings
    next_char ~ Categorical(gpt.decode(x))                 # obs, scaled by 1 / (B T): mean CE in nats
    factor(lambda_m * mean_{b,t} log p_prior(x)_t)         # the embedding prior, per token

and the guide is empty, so ``Trace_ELBO`` is the MAP loss (eq. 19, 27, 34)::

    L = CE(tokens | x) + lambda_m * L_prior,
    L_prior = -(1/T) sum_t log det J_tt                                   ("margin", the paper's variant)
    L_prior = -(1/T) sum_t [log N(x_t - c_t; 0, sigma^2 I) + log det J_tt] ("full", sigma fixed or learned)

``log det J_tt`` goes through :func:`~prob_attention.safe_log_barrier`: where ``det J_tt`` falls to the
floor or below it (the boundary, or past it where the map folds) the log is continued by its tangent
line, so no gradient is ever NaN; such positions are counted and reported. With ``lambda_m = 0`` the
prior is not evaluated at all and an SVI step is, bit for bit, a plain PyTorch step: mean
cross-entropy, global gradient clipping, AdamW (weight decay on matrices only), cosine schedule.

The optimiser is Pyro's: ``pyro.optim`` wraps ``torch.optim.AdamW`` in the cosine scheduler
(:class:`~pyro.optim.PyroLRScheduler`), one optimiser per parameter as Pyro does; the only addition is
:class:`GlobalClipScheduler`, which clips the gradients' *global* norm before the per-parameter steps
(Pyro's own ``clip_args`` clip each parameter separately).

Example:
    >>> config = RunConfig.preset("tiny")
    >>> history = MAPTrainer(config, run_dir=None, progress=False).fit()   # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import PyroLRScheduler
from torch import Tensor, nn
from tqdm.auto import tqdm

from prob_attention import CausalAttentionTransform, safe_log_barrier
from prob_attention.corpus import CharCorpus, CharVocab, eval_windows, load_corpus, random_windows
from prob_attention.gpt import GPTConfig, SmallGPT

from .checkpoint import load_checkpoint, save_checkpoint, write_text_atomic

__all__ = [
    "PriorConfig",
    "TrainConfig",
    "RunConfig",
    "MAPNet",
    "NextCharacter",
    "GlobalClipScheduler",
    "TrainingDiverged",
    "MAPTrainer",
    "TrainedModel",
    "load_trained",
    "evaluate",
]

CHECKPOINT_DIR = "checkpoint"
HISTORY_FILE = "history.json"


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became non-finite; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------------ configs
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

    def __post_init__(self) -> None:
        if self.density not in ("margin", "full"):
            raise ValueError(f"PriorConfig.density must be 'margin' or 'full', got {self.density!r}")
        if self.sigma <= 0 or self.barrier_floor <= 0:
            raise ValueError("PriorConfig.sigma and barrier_floor must be positive")
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

    def __post_init__(self) -> None:
        if self.lambda_m < 0:
            raise ValueError(f"TrainConfig.lambda_m must be non-negative, got {self.lambda_m}")
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


# ------------------------------------------------------------------------------------- the network
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

    def prior_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-position prior log-density and safeguard mask, ``(B, T)`` each, in float32 outside autocast.

        ``density="margin"``: the safeguarded ``log det J_tt``; ``"full"``: plus ``log N(x_t - c_t; 0, sigma^2 I)``.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            state = self.transform.attend(x)
            logabs, sign = self.transform.log_abs_det_blocks(x, state)
            terms, clamped = safe_log_barrier(logabs, sign, self.prior.barrier_floor)
            if self.prior.density == "full":
                z = x - state.context  # (B, T, d)
                terms = terms + dist.Normal(0.0, self.sigma).log_prob(z).sum(-1)
        return terms, clamped


class NextCharacter(dist.Categorical):
    """``Categorical(logits)`` over the next character, scored with torch's fused ``log_softmax`` + NLL.

    The distribution is the ordinary categorical; only :meth:`log_prob` is computed as
    ``-F.cross_entropy(logits, value, reduction="none")`` (in float32 at least), so that the CE-only Pyro
    objective is the same floating-point computation as a plain PyTorch cross-entropy loss.
    Logits ``(..., V)``, batch shape ``(...)``.
    """

    def __init__(self, logits: Tensor, validate_args: bool | None = None) -> None:
        self._raw_logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        super().__init__(logits=self._raw_logits, validate_args=validate_args)

    def expand(self, batch_shape: torch.Size | tuple[int, ...], _instance: Any = None) -> NextCharacter:
        shape = (*batch_shape, self._raw_logits.shape[-1])
        return NextCharacter(self._raw_logits.expand(shape), validate_args=False)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        shape = torch.broadcast_shapes(value.shape, self.batch_shape)
        logits = self._raw_logits.expand(*shape, self._raw_logits.shape[-1]).reshape(-1, self._raw_logits.shape[-1])
        nll = F.cross_entropy(logits, value.long().expand(shape).reshape(-1), reduction="none")  # (N,)
        return -nll.reshape(shape)


class GlobalClipScheduler(PyroLRScheduler):
    """A Pyro LR scheduler that first clips the global gradient norm of ``parameters()`` to ``max_norm``.

    Pyro steps one optimiser per parameter; clipping each parameter alone (Pyro's ``clip_args``) is not the
    usual global clipping, so it happens here, over all parameters together, in a fixed order. A non-finite
    norm raises :class:`TrainingDiverged` before any parameter changes. ``last_grad_norm`` keeps the norm.
    """

    def __init__(
        self,
        scheduler_constructor: type,
        optim_args: dict[str, Any],
        *,
        parameters: Callable[[], Iterable[Tensor]],
        max_norm: float,
    ) -> None:
        super().__init__(scheduler_constructor, optim_args)
        self.parameters, self.max_norm = parameters, max_norm
        self.last_grad_norm: Tensor | None = None

    def __call__(self, params: Iterable[Tensor], *args: Any, **kwargs: Any) -> None:
        try:
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(
                list(self.parameters()), self.max_norm, error_if_nonfinite=True
            )
        except RuntimeError as err:
            raise TrainingDiverged(f"non-finite gradient norm; no parameter was updated ({err})") from err
        super().__call__(params, *args, **kwargs)


def make_optimizer(net: MAPNet, config: TrainConfig, total_steps: int) -> GlobalClipScheduler:
    """AdamW in Pyro's cosine scheduler, weight decay on matrices only (as :func:`configure_param_groups`)."""
    dims = {f"map.{name}": p.dim() for name, p in net.named_parameters()}

    def optim_args(param_name: str) -> dict[str, Any]:
        decay = config.weight_decay if dims[param_name] >= 2 else 0.0
        return {"lr": config.lr, "betas": (config.beta1, config.beta2), "weight_decay": decay}

    return GlobalClipScheduler(
        torch.optim.lr_scheduler.CosineAnnealingLR,
        {
            "optimizer": torch.optim.AdamW,
            "optim_args": optim_args,
            "T_max": total_steps,
            "eta_min": config.lr * config.min_lr_ratio,
        },
        parameters=net.parameters,
        max_norm=config.grad_clip,
    )


@dataclass
class StepStats:
    """Running sums over an epoch, kept as tensors on the device (no host sync per step)."""

    ce: Tensor
    prior: Tensor
    clamped: Tensor
    steps: int = 0


def map_model(
    net: MAPNet, forward: Callable[[Tensor], NetOutput], idx: Tensor, targets: Tensor, lambda_m: float, amp: bool,
    stats: StepStats | None = None,
) -> None:
    """The Pyro model of the MAP objective (module docstring); ``forward`` is ``net`` or its DDP wrapper."""
    pyro.module("map", net)
    with torch.autocast(device_type=idx.device.type, dtype=torch.bfloat16, enabled=amp):
        out = forward(idx)
    n = targets.numel()
    with pyro.plate("tokens", n), poutine.scale(scale=1.0 / n):
        obs = pyro.sample("next_char", NextCharacter(out.logits.reshape(n, -1)), obs=targets.reshape(n))
    if out.prior_log_density is not None:
        pyro.factor("embedding_prior", lambda_m * out.prior_log_density.mean())
    if stats is not None:
        with torch.no_grad():
            stats.ce += F.cross_entropy(out.logits.reshape(n, -1).float(), obs)
            if out.prior_log_density is not None:
                stats.prior += out.prior_log_density.mean()
                stats.clamped += out.clamped.sum()
        stats.steps += 1


def empty_guide(*args: Any, **kwargs: Any) -> None:
    """MAP: no latent sample sites, the parameters are point estimates."""


# -------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(net: MAPNet, inputs: Tensor, targets: Tensor, batch_size: int, amp: bool = False) -> dict[str, float]:
    """Scores of ``net`` on windows ``(n, T)``: bits per character, and the prior's diagnostics.

    Returns ``bpc``; ``barrier`` (mean over positions of ``log det J_tt``, the safeguarded value),
    ``seq_margin_mean`` / ``seq_margin_min`` (``min_t log det J_tt`` per window, averaged / smallest) and
    ``clamped`` (positions at or past the safeguard floor) — the prior is evaluated even when it is not
    trained, as a diagnostic.
    """
    if inputs.shape[0] == 0:
        raise ValueError("evaluate needs at least one window")
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    ce_sum = torch.zeros((), dtype=torch.float64, device=device)
    barrier_sum = torch.zeros((), dtype=torch.float64, device=device)
    margins: list[Tensor] = []
    clamped = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, inputs.shape[0], batch_size):
        idx = inputs[start : start + batch_size].to(device, non_blocking=True)
        tgt = targets[start : start + batch_size].to(device, non_blocking=True)
        x = net.gpt.embed(idx)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = net.gpt.decode(x)
        ce_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), reduction="sum")
        logabs, sign = net.transform.log_abs_det_blocks(x.float())
        terms, mask = safe_log_barrier(logabs, sign, net.prior.barrier_floor)
        barrier_sum += terms.sum()
        margins.append(terms.amin(-1))
        clamped += mask.sum()
    n_tokens = targets.numel()
    seq_margins = torch.cat(margins)
    net.train(was_training)
    return {
        "bpc": float(ce_sum) / n_tokens / math.log(2.0),
        "barrier": float(barrier_sum) / n_tokens,
        "seq_margin_mean": float(seq_margins.mean()),
        "seq_margin_min": float(seq_margins.min()),
        "clamped": int(clamped),
    }


# ------------------------------------------------------------------------------------------ training
@dataclass
class Data:
    """The encoded splits and the vocabulary they were encoded with."""

    corpus_name: str
    vocab: CharVocab
    train: Tensor
    val: Tensor
    test: Tensor

    @classmethod
    def from_corpus(cls, corpus: CharCorpus, on_unknown: str) -> Data:
        vocab = CharVocab.from_text(corpus.train, on_unknown=on_unknown)  # type: ignore[arg-type]
        return cls(corpus.name, vocab, vocab.encode(corpus.train), vocab.encode(corpus.val), vocab.encode(corpus.test))

    def unseen_characters(self, corpus: CharCorpus) -> dict[str, int]:
        """Characters of the validation and test splits that the vocabulary maps to UNK, with counts."""
        known = set(self.vocab.chars)
        counts: dict[str, int] = {}
        for ch in corpus.val + corpus.test:
            if ch not in known:
                counts[ch] = counts.get(ch, 0) + 1
        return counts


def _distributed() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the ``torchrun`` environment (``(0, 1, 0)`` without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _seed_for(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (epoch, rank, purpose), stable across runs and resumes."""
    seed = 0x9E3779B97F4A7C15
    for p in parts:
        seed = (seed * 6364136223846793005 + p + 1442695040888963407) % (1 << 63)
    return seed


class MAPTrainer:
    """Trains a :class:`MAPNet` by MAP through Pyro's SVI; one instance is one run.

    Args:
        config: the run's configuration.
        run_dir: where ``config.json``, ``history.json``, the checkpoint and the curves go (``None``: nowhere).
        corpus: a loaded corpus (default: ``load_corpus(config.train.corpus)``).
        progress: show a progress bar (rank 0 only; the header and per-epoch lines are logged regardless).
        log: where per-epoch lines go (default ``print`` through ``tqdm.write``).

    ``fit`` clears Pyro's global parameter store first: a run owns it while it trains.
    """

    def __init__(
        self,
        config: RunConfig,
        run_dir: str | os.PathLike[str] | None,
        corpus: CharCorpus | None = None,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.rank, self.world, local_rank = _distributed()
        tc = config.train
        if tc.device == "auto":
            self.device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(f"cuda:{local_rank}" if tc.device == "cuda" else tc.device)
        self.amp = tc.amp and self.device.type == "cuda"
        corpus = corpus if corpus is not None else load_corpus(tc.corpus, seed=tc.corpus_seed)
        self.data = Data.from_corpus(corpus, tc.on_unknown)
        self.unseen = self.data.unseen_characters(corpus)
        self.gpt_config = config.gpt_config(len(self.data.vocab))
        self.block = self.gpt_config.block_size
        self.steps_per_epoch = tc.steps_per_epoch or max(1, len(self.data.train) // (tc.batch_size * self.block))
        self.verbose = self.rank == 0
        self.progress = progress and self.verbose
        self.log = log or (lambda line: tqdm.write(line))
        self.net = build_net(config, self.gpt_config).to(self.device)
        self.history: list[dict[str, Any]] = []
        self.epoch = 0

    # ------------------------------------------------------------------ bookkeeping
    def full_config(self) -> dict[str, Any]:
        """The JSON written beside the weights: the run config, the GPT config and the vocabulary."""
        return {
            "run": self.config.to_dict(),
            "gpt_config": self.gpt_config.to_dict(),
            "vocab": self.data.vocab.to_dict(),
            "corpus": self.data.corpus_name,
        }

    def describe(self) -> str:
        """The header a run prints: corpus sizes, vocabulary, model size, device, config."""
        d = self.data
        lines = [
            f"corpus {d.corpus_name}: train {len(d.train):,} / val {len(d.val):,} / test {len(d.test):,} characters; "
            f"vocab {len(d.vocab)} (incl. UNK)",
        ]
        if self.unseen:
            lines.append(
                f"  {sum(self.unseen.values())} val/test characters ({len(self.unseen)} distinct) unseen in train "
                f"-> {'UNK' if d.vocab.on_unknown == 'unk' else 'error'}"
            )
        lines.append(
            f"SmallGPT {self.net.gpt.num_params():,} params; prior {sum(p.numel() for p in self.net.transform.parameters()):,} "
            f"params ({'on' if self.net.use_prior else 'off'}, lambda_m={self.config.train.lambda_m}); "
            f"device {self.device}{' bf16' if self.amp else ''}; world size {self.world}; "
            f"{self.steps_per_epoch} steps/epoch x {self.config.train.epochs} epochs"
        )
        lines.append("config " + json.dumps(self.full_config()["run"], sort_keys=True))
        return "\n".join(lines)

    def _checkpoint_dir(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / CHECKPOINT_DIR

    def _save(self, optim: GlobalClipScheduler) -> None:
        ckpt = self._checkpoint_dir()
        if ckpt is None or self.rank != 0:
            return
        state = {"epoch": self.epoch, "history": self.history}
        save_checkpoint(ckpt, modules={"net": self.net}, config=self.full_config(), state=state,
                        optimizer_state=optim.get_state())
        write_text_atomic(self.run_dir / HISTORY_FILE,
                          json.dumps({"config": self.full_config(), "history": self.history}, indent=2, sort_keys=True))

    def _resume(self, optim: GlobalClipScheduler) -> bool:
        ckpt = self._checkpoint_dir()
        if ckpt is None or not ckpt.exists():
            return False
        state, optim_state = load_checkpoint(ckpt, modules={"net": self.net}, config=self.full_config(),
                                             map_location=self.device)
        self.epoch, self.history = int(state["epoch"]), list(state["history"])
        if optim_state is not None:
            optim.set_state(optim_state)
        return True

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> list[dict[str, Any]]:
        """Train for the configured epochs (continuing from the checkpoint with ``resume``); returns the history.

        Each epoch ends with an evaluation (train BPC on fixed random windows, validation BPC and prior
        diagnostics) and an atomic checkpoint. The test split is scored once, after the last epoch.

        Raises:
            TrainingDiverged: the loss or gradient norm became non-finite; the last checkpoint is kept.
        """
        tc = self.config.train
        pyro.clear_param_store()
        total = tc.epochs * self.steps_per_epoch
        optim = make_optimizer(self.net, tc, total)
        if self.run_dir is not None and self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir / "config.json", json.dumps(self.full_config(), indent=2, sort_keys=True))
        resumed = resume and self._resume(optim)
        if resume and self.verbose:
            self.log(f"resumed from {self._checkpoint_dir()}: {self.epoch} of {tc.epochs} epochs done" if resumed
                     else "no checkpoint to resume from: starting a new run")
        if self.verbose:
            self.log(self.describe())
        svi = self.make_svi(optim)
        train_eval = self._train_eval_windows()
        val = self._limit(eval_windows(self.data.val, self.block))
        bar = tqdm(total=total, initial=self.epoch * self.steps_per_epoch, disable=not self.progress,
                   desc="train", unit="step", dynamic_ncols=True)
        try:
            while self.epoch < tc.epochs:
                started = time.perf_counter()
                stats = self._train_epoch(svi, optim, bar)
                self.epoch += 1
                record = self._epoch_record(stats, train_eval, val, time.perf_counter() - started)
                self.history.append(record)
                self._save(optim)
                if self.verbose:
                    self.log(_format_record(record))
            if self.rank == 0 and (not self.history or "test_bpc" not in self.history[-1]):
                test = self._limit(eval_windows(self.data.test, self.block))
                scores = evaluate(self.net, *test, tc.batch_size, self.amp)
                self.history[-1].update({f"test_{k}": v for k, v in scores.items()})
                self._save(optim)
                if self.verbose:
                    self.log(f"test: bpc {scores['bpc']:.4f}  barrier {scores['barrier']:.4f}")
        finally:
            bar.close()
        return self.history

    def make_svi(self, optim: GlobalClipScheduler, forward: Callable[[Tensor], NetOutput] | None = None) -> SVI:
        """The MAP objective of this run as Pyro SVI; ``forward`` replaces the network's forward pass (e.g. a
        ``torch.compile``d one; default: the network, wrapped in DDP when distributed)."""
        forward = forward or self._forward_fn()
        lambda_m = self.config.train.lambda_m
        return SVI(
            lambda idx, tgt, stats: map_model(self.net, forward, idx, tgt, lambda_m, self.amp, stats),
            empty_guide, optim, loss=Trace_ELBO(),
        )

    def train_step(self, svi: SVI, optim: GlobalClipScheduler, idx: Tensor, tgt: Tensor, stats: StepStats) -> float:
        """One optimiser step on a batch on the device, then one step of the cosine schedule; returns the loss.

        Raises:
            TrainingDiverged: the loss is not finite (non-finite gradients raise from the clipping).
        """
        loss = svi.step(idx, tgt, stats)
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"loss {loss} at epoch {self.epoch + 1}, step {stats.steps}: stopping; the last good "
                f"checkpoint (epoch {self.epoch}) is kept" + ("" if self.run_dir else " (no run_dir: nothing saved)")
            )
        optim.step()  # the cosine schedule, per step
        return loss

    def _forward_fn(self) -> Callable[[Tensor], NetOutput]:
        if self.world == 1:
            return self.net
        import torch.distributed as torch_dist
        from torch.nn.parallel import DistributedDataParallel

        if not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        ids = [self.device.index] if self.device.type == "cuda" else None
        # with the prior off its parameters get no gradient: tell DDP not to wait for them
        return DistributedDataParallel(self.net, device_ids=ids, find_unused_parameters=not self.net.use_prior)

    def _train_epoch(self, svi: SVI, optim: GlobalClipScheduler, bar: tqdm) -> StepStats:
        tc = self.config.train
        torch.manual_seed(_seed_for(tc.seed, self.epoch, self.rank, 1))  # dropout
        gen = torch.Generator().manual_seed(_seed_for(tc.seed, self.epoch, self.rank, 2))  # batch order
        zero = lambda dtype: torch.zeros((), dtype=dtype, device=self.device)  # noqa: E731
        stats = StepStats(zero(torch.float32), zero(torch.float32), zero(torch.long))
        self.net.train()
        pin = self.device.type == "cuda"
        for _ in range(self.steps_per_epoch):
            idx, tgt = random_windows(self.data.train, tc.batch_size, self.block, gen)
            if pin:
                idx, tgt = idx.pin_memory(), tgt.pin_memory()
            idx, tgt = idx.to(self.device, non_blocking=True), tgt.to(self.device, non_blocking=True)
            loss = self.train_step(svi, optim, idx, tgt, stats)
            bar.update(1)
            if self.progress and stats.steps % 10 == 0:
                bar.set_postfix(loss=f"{loss:.3f}", epoch=self.epoch + 1)
        return stats

    def _epoch_record(self, stats: StepStats, train_eval: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor],
                      seconds: float) -> dict[str, Any]:
        tc = self.config.train
        record: dict[str, Any] = {
            "epoch": self.epoch,
            "step": self.epoch * self.steps_per_epoch,
            "train_ce_bpc_running": float(stats.ce) / stats.steps / math.log(2.0),
            "train_prior_running": float(stats.prior) / stats.steps if self.net.use_prior else None,
            "train_clamped": int(stats.clamped),
            "seconds": seconds,
            "device": device_name(self.device) + (f" x{self.world}" if self.world > 1 else ""),
        }
        if self.net.log_sigma is not None:
            record["sigma"] = float(self.net.sigma)
        if self.rank == 0:
            record["train_bpc"] = evaluate(self.net, *train_eval, tc.batch_size, self.amp)["bpc"]
            record.update({f"val_{k}": v for k, v in evaluate(self.net, *val, tc.batch_size, self.amp).items()})
        return record

    def _train_eval_windows(self) -> tuple[Tensor, Tensor]:
        tc = self.config.train
        gen = torch.Generator().manual_seed(_seed_for(tc.seed, 0, 0, 3))
        return random_windows(self.data.train, tc.batch_size * tc.train_eval_batches, self.block, gen)

    def _limit(self, windows: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        cap = self.config.train.max_eval_windows
        return windows if cap is None else (windows[0][:cap], windows[1][:cap])


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


# -------------------------------------------------------------------------------- trained models
@dataclass
class TrainedModel:
    """A trained run, loaded for evaluation or inference: the network, its vocabulary and configs."""

    net: MAPNet
    vocab: CharVocab
    config: RunConfig
    gpt_config: GPTConfig
    corpus: str
    history: list[dict[str, Any]]

    @property
    def gpt(self) -> SmallGPT:
        return self.net.gpt

    @property
    def transform(self) -> CausalAttentionTransform:
        return self.net.transform


def load_trained(run_dir: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> TrainedModel:
    """Load the checkpoint of a run directory (weights from safetensors; no code is unpickled).

    Raises:
        FileNotFoundError: no checkpoint in ``run_dir``.
        CheckpointMismatchError: the weights do not fit the saved config.
    """
    ckpt = Path(run_dir) / CHECKPOINT_DIR
    if not ckpt.is_dir():
        raise FileNotFoundError(f"no checkpoint in {run_dir} (expected {ckpt})")
    saved = json.loads((ckpt / "config.json").read_text())
    config = RunConfig.from_dict(saved["run"])
    gpt_config = GPTConfig.from_dict(saved["gpt_config"])
    net = build_net(config, gpt_config)
    state, _ = load_checkpoint(ckpt, modules={"net": net}, config=saved, map_location=map_location)
    net.to(map_location).eval()
    return TrainedModel(net, CharVocab.from_dict(saved["vocab"]), config, gpt_config, saved["corpus"],
                        list(state["history"]))


# ----------------------------------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; other names pass through."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """A readable name for results tables: the GPU model, or the CPU model with torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{model} ({threads} thread{'' if threads == 1 else 's'})"


def _format_record(r: dict[str, Any]) -> str:
    line = (f"epoch {r['epoch']:>3}: train bpc {r.get('train_bpc', float('nan')):.4f}  "
            f"val bpc {r.get('val_bpc', float('nan')):.4f}  barrier {r.get('val_barrier', float('nan')):+.4f}  "
            f"seq margin {r.get('val_seq_margin_mean', float('nan')):+.4f}  clamped {r['train_clamped']}  "
            f"({r['seconds']:.0f}s)")
    return line + (f"  sigma {r['sigma']:.3f}" if "sigma" in r else "")


def with_overrides(config: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    """``config`` with some fields of its sections replaced (``gpt=..., prior=..., train=...``)."""
    return RunConfig(
        gpt={**config.gpt, **sections.get("gpt", {})},
        prior=replace(config.prior, **sections.get("prior", {})),
        train=replace(config.train, **sections.get("train", {})),
    )
