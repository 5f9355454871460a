"""One MAP run: data, seeding, the SVI loop, per-epoch evaluation, checkpoints and resume."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import Tensor
from tqdm.auto import tqdm

from prob_attention.corpus import CharCorpus, CharVocab, eval_windows, load_corpus, random_windows

from ..checkpoint import load_checkpoint, save_checkpoint, write_text_atomic
from .config import RunConfig
from .devices import device_name
from .evaluation import evaluate, sequence_margin_of
from .network import NetOutput, build_net
from .objective import StepStats, empty_guide, map_model
from .optimizer import GlobalClipScheduler, TrainingDiverged, make_optimizer

__all__ = ["CHECKPOINT_DIR", "HISTORY_FILE", "Data", "MAPTrainer"]

CHECKPOINT_DIR = "checkpoint"
HISTORY_FILE = "history.json"


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
        total = self.total_steps
        optim = self.make_optimizer()
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

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole run (the cosine schedule's length)."""
        return self.config.train.epochs * self.steps_per_epoch

    def make_optimizer(self) -> GlobalClipScheduler:
        """This run's optimiser and schedule (:func:`make_optimizer` over the whole run)."""
        return make_optimizer(self.net, self.config.train, self.total_steps)

    def batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One batch of random training windows ``(B, T)`` and their next characters, on the device."""
        idx, tgt = random_windows(self.data.train, self.config.train.batch_size, self.block, generator)
        if self.device.type == "cuda":
            idx, tgt = idx.pin_memory(), tgt.pin_memory()
        return idx.to(self.device, non_blocking=True), tgt.to(self.device, non_blocking=True)

    def make_svi(self, optim: GlobalClipScheduler, forward: Callable[[Tensor], NetOutput] | None = None) -> SVI:
        """The MAP objective of this run as Pyro SVI; ``forward`` replaces the network's forward pass (e.g. a
        ``torch.compile``d one; default: the network, wrapped in DDP when distributed)."""
        forward = forward or self._forward_fn()
        lambda_m = self.config.train.lambda_m
        return SVI(
            lambda idx, tgt, stats: map_model(self.net, forward, idx, tgt, lambda_m, self.amp, stats,
                                              jacobian_reg=self.config.train.jacobian_reg),
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
        stats = StepStats.zeros(self.device)
        self.net.train()
        for _ in range(self.steps_per_epoch):
            loss = self.train_step(svi, optim, *self.batch(gen), stats)
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


def _format_record(r: dict[str, Any]) -> str:
    line = (f"epoch {r['epoch']:>3}: train bpc {r.get('train_bpc', float('nan')):.4f}  "
            f"val bpc {r.get('val_bpc', float('nan')):.4f}  barrier {r.get('val_barrier', float('nan')):+.4f}  "
            f"seq margin (t>=3) {sequence_margin_of(r) or float('nan'):+.4f}  clamped {r['train_clamped']}  "
            f"({r['seconds']:.0f}s)")
    return line + (f"  sigma {r['sigma']:.3f}" if "sigma" in r else "")

