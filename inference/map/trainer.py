"""One MAP run: data, seeding, the SVI loop, per-epoch evaluation, checkpoints and resume.

A run directory is owned by one process at a time (an OS lock held while :meth:`MAPTrainer.fit` runs)
and is never overwritten unless asked: a directory that already holds a run is continued with
``resume=True`` or replaced with ``overwrite=True``, and refused otherwise. Every check (the run's
configs, the checkpoint's files and hashes, its optimiser state) runs before anything is written, so
a refused run leaves the directory as it was.
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import Tensor
from tqdm.auto import tqdm

from prob_attention.corpus import CharCorpus, CharVocab, eval_windows, load_corpus, random_windows
from prob_attention.gpt import nats_to_bits

from ..checkpoint import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    config_differences,
    find_checkpoint,
    load_checkpoint,
    lock_directory,
    read_config,
    read_state,
    recover_checkpoint,
    remove_checkpoint,
    save_checkpoint,
    write_text_atomic,
)
from .config import RunConfig
from .devices import device_name
from .evaluation import evaluate, sequence_margin_of
from .network import NetOutput, build_net
from .objective import StepStats, empty_guide, map_model
from .optimizer import GlobalClipScheduler, TrainingDiverged, make_optimizer

__all__ = ["CHECKPOINT_DIR", "CONFIG_FILE", "CURVES_FILE", "HISTORY_FILE", "Data", "IncompleteCheckpointError",
           "MAPTrainer", "RunExistsError"]

CHECKPOINT_DIR = "checkpoint"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
CURVES_FILE = "curves.png"
RUN_FILES = (CONFIG_FILE, HISTORY_FILE, CURVES_FILE)
"""What a run writes beside its checkpoint (``curves.png`` by the ``train`` command)."""


class RunExistsError(FileExistsError):
    """The run directory already holds a run, and neither resuming nor overwriting it was asked for."""


class IncompleteCheckpointError(ValueError):
    """The checkpoint to resume from lacks the optimiser state, and a fresh optimiser was not asked for."""


class _NonFiniteForward(Exception):
    """The forward pass gave NaN or inf (raised inside the Pyro model; not a ``ValueError`` or ``RuntimeError``,
    which Pyro's tracing re-raises with its whole trace appended)."""


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
        """The splits of ``corpus`` encoded with the vocabulary of its training split (errors name the split)."""
        vocab = CharVocab.from_text(corpus.train, on_unknown=on_unknown)  # type: ignore[arg-type]
        return cls(corpus.name, vocab, *(corpus.encode_split(vocab, split) for split in ("train", "val", "test")))

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
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {tc.device!r} asked for, but no CUDA device is available (use --device cpu)")
        self.amp = tc.amp and self.device.type == "cuda"
        corpus = corpus if corpus is not None else load_corpus(tc.corpus, seed=tc.corpus_seed)
        self.data = Data.from_corpus(corpus, tc.on_unknown)
        self.unseen = self.data.unseen_characters(corpus)
        self.gpt_config = config.gpt_config(len(self.data.vocab))
        self.block = self.gpt_config.block_size
        corpus.require_windows(self.block)
        self.steps_per_epoch = tc.steps_per_epoch or max(1, len(self.data.train) // (tc.batch_size * self.block))
        self.verbose = self.rank == 0
        self.progress = progress and self.verbose
        self.log = log or (lambda line: tqdm.write(line))
        self.net = build_net(config, self.gpt_config).to(self.device)
        self.history: list[dict[str, Any]] = []
        self.epoch = 0
        self._resumed_optimizer_state: dict[str, Any] = {}

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
        """The checkpoint, then ``history.json``; a full disk stops the run with one line saying what is kept."""
        ckpt = self._checkpoint_dir()
        if ckpt is None or self.rank != 0:
            return
        state = {"epoch": self.epoch, "history": self.history}
        try:
            save_checkpoint(ckpt, modules={"net": self.net}, config=self.full_config(), state=state,
                            optimizer_state=self._optimizer_state(optim))
            self._write_history()
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            raise OSError(f"the disk is full, so the run stopped in {self.run_dir}: {self._kept()}; free some space, "
                          "then continue it with --resume (resume=True)") from err

    def _optimizer_state(self, optim: GlobalClipScheduler) -> dict[str, Any]:
        """The optimiser state to save, per parameter: its live state, or the resumed one while no step has used it
        (Pyro hands a loaded state to a parameter's optimiser at its first step, and only then reports it)."""
        return {**self._resumed_optimizer_state, **optim.get_state()}

    def _write_history(self) -> None:
        """``history.json``: the config and the history of the run so far."""
        write_text_atomic(self.run_dir / HISTORY_FILE,
                          json.dumps({"config": self.full_config(), "history": self.history}, indent=2, sort_keys=True))

    def _kept(self) -> str:
        """What a stopped run leaves: ``"the checkpoint at epoch 2 is kept"``, or that there is none."""
        try:
            return f"the checkpoint at epoch {read_state(self._checkpoint_dir())['epoch']} is kept"
        except FileNotFoundError:
            return "no checkpoint was written yet"

    # ------------------------------------------------------------------ the run directory
    def _owning(self) -> AbstractContextManager[object]:
        """The run directory's lock, held by rank 0 (the only writer) while the run goes on."""
        return lock_directory(self.run_dir) if self.run_dir is not None and self.rank == 0 else nullcontext()

    def holds_run(self) -> bool:
        """Whether the run directory already holds (part of) a run: its config, history, curves or checkpoint."""
        if self.run_dir is None:
            return False
        files = any((self.run_dir / name).exists() for name in RUN_FILES)
        return files or find_checkpoint(self._checkpoint_dir()) is not None

    def _start(self, optim: GlobalClipScheduler, resume: bool, overwrite: bool, fresh_optimizer: bool) -> bool:
        """Check the run directory against the request, then claim it; returns whether a checkpoint was resumed.

        Everything that can refuse the run (an existing run without ``resume`` or ``overwrite``, a differing
        config, a damaged or incomplete checkpoint) runs before the first write.
        """
        if self.run_dir is None:
            return False
        if resume:
            resumed = self._resume(optim, fresh_optimizer)
        elif self.rank == 0 and self.holds_run() and not overwrite:  # rank 0 alone decides: it writes first
            raise RunExistsError(
                f"{self.run_dir} already holds a run{self._progress_note()}; continue it with --resume "
                "(resume=True) or replace it with --overwrite (overwrite=True)")
        else:
            resumed = False
            if self.rank == 0 and overwrite:
                self._remove_run()
        if self.rank == 0:
            recover_checkpoint(self._checkpoint_dir())  # a resumed copy goes back in place; leftovers go
            self._remove_stale_history_copies()
            if not (self.run_dir / CONFIG_FILE).exists():
                write_text_atomic(self.run_dir / CONFIG_FILE, json.dumps(self.full_config(), indent=2, sort_keys=True))
        return resumed

    def _remove_stale_history_copies(self) -> None:
        """Delete the temporary ``.history.json.tmp-*`` files a kill during a write of ``history.json`` left in
        the run directory (this process holds its lock, so none is being written)."""
        for path in self.run_dir.glob(f".{HISTORY_FILE}.tmp-*"):
            if path.is_file() or path.is_symlink():
                path.unlink()

    def _progress_note(self) -> str:
        """`` (checkpoint at epoch 3 of 20)`` for a refusal message, the saved run's epoch and epoch count, or ``""``
        when no checkpoint is readable."""
        ckpt = self._checkpoint_dir()
        try:
            epoch, epochs = read_state(ckpt)["epoch"], read_config(ckpt)["run"]["train"]["epochs"]
        except (OSError, ValueError, KeyError, TypeError):
            return ""
        return f" (checkpoint at epoch {epoch} of {epochs})"

    def _remove_run(self) -> None:
        """Delete what a previous run wrote here (its files and checkpoint; nothing else in the directory)."""
        for name in (HISTORY_FILE, CURVES_FILE):
            (self.run_dir / name).unlink(missing_ok=True)
        remove_checkpoint(self._checkpoint_dir())
        (self.run_dir / CONFIG_FILE).unlink(missing_ok=True)

    def _check_run_config(self) -> None:
        """The run directory's ``config.json``, where there is one, must be this run's config."""
        path = self.run_dir / CONFIG_FILE
        if not path.exists():
            return
        try:
            saved = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointCorruptError(f"{path}: not valid JSON ({err})") from err
        self._check_saved_config(saved, path)

    def _check_saved_config(self, saved: Any, path: Path) -> None:
        """``saved`` (read from ``path``) must be this run's config, key for key; a config field added since it
        was written counts with its default value (the default keeps the old behaviour)."""
        try:
            complete = {**saved, "run": RunConfig.from_dict(saved["run"]).to_dict()}
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointMismatchError(f"{path}: not the config of a training run ({type(err).__name__}: {err})"
                                          ) from err
        diffs = config_differences(complete, self.full_config())
        if diffs:
            raise CheckpointMismatchError(f"{path} is another run's config (" + "; ".join(diffs) + "): resume with "
                                          "that run's settings or choose another run directory")

    def _refuse_a_run_without_checkpoint(self) -> None:
        """:class:`RunExistsError` when the directory holds a run's ``history.json`` (written only after a checkpoint)
        but no checkpoint: a resume there would start again and replace that run."""
        if (self.run_dir / HISTORY_FILE).exists():
            raise RunExistsError(
                f"{self.run_dir} holds a run ({HISTORY_FILE}) but no checkpoint to resume from; replace it with "
                "--overwrite (overwrite=True) or choose another run directory")

    def _resume(self, optim: GlobalClipScheduler, fresh_optimizer: bool) -> bool:
        """Load the checkpoint (weights, history, optimiser state) into this run; ``False`` when there is none."""
        self._check_run_config()
        ckpt = find_checkpoint(self._checkpoint_dir())
        if ckpt is None:
            self._refuse_a_run_without_checkpoint()
            return False
        self._check_saved_config(read_config(ckpt), ckpt / "config.json")
        state, optim_state = load_checkpoint(ckpt, modules={"net": self.net}, map_location=self.device,
                                             optimizer=not fresh_optimizer)
        try:
            epoch, history = int(state["epoch"]), list(state["history"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointCorruptError(f"{ckpt / 'state.json'}: no epoch and history ({err!r})") from err
        if optim_state is None and not fresh_optimizer and epoch < self.config.train.epochs:
            raise IncompleteCheckpointError(
                f"{ckpt} has no optimiser state (optimizer.pt): resuming would restart AdamW and its learning-rate "
                "schedule at the peak; pass --fresh-optimizer (fresh_optimizer=True) to continue with a new optimiser")
        if optim_state is not None:
            optim.set_state(optim_state)
            self._resumed_optimizer_state = optim_state
        self.epoch, self.history = epoch, history
        return True

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False, overwrite: bool = False, fresh_optimizer: bool = False) -> list[dict[str, Any]]:
        """Train for the configured epochs; returns the history.

        Each epoch ends with an evaluation (train BPC on fixed random windows, validation BPC and prior
        diagnostics) and an atomic checkpoint. The test split is scored once, after the last epoch.

        Args:
            resume: continue from the run directory's checkpoint (a new run when there is none, unless the directory
                holds the history of a run whose checkpoint is gone); a finished run's files are brought up to date.
            overwrite: replace a run the directory already holds.
            fresh_optimizer: resume with a new optimiser and schedule instead of the saved ones (needed when
                the checkpoint has no optimiser state).

        Raises:
            RunExistsError: the directory holds a run and neither ``resume`` nor ``overwrite`` was given.
            DirectoryLockedError: another process owns the run directory.
            CheckpointMismatchError, CheckpointCorruptError, IncompleteCheckpointError: the checkpoint cannot
                be resumed (nothing was written).
            TrainingDiverged: the loss, the logits or the gradient norm became non-finite; the last good
                checkpoint is kept.
            OSError: the disk is full (the message says which checkpoint is kept), or another failure to write.
        """
        if resume and overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run or replace it")
        tc = self.config.train
        pyro.clear_param_store()
        optim = self.make_optimizer()
        train_eval = self._train_eval_windows()
        val = self._limit(eval_windows(self.data.val, self.block))
        test = self._limit(eval_windows(self.data.test, self.block))
        with self._owning():
            resumed = self._start(optim, resume, overwrite, fresh_optimizer)
            if resume and self.verbose:
                self.log(f"resumed from {self._checkpoint_dir()}: {self.epoch} of {tc.epochs} epochs done" if resumed
                         else "no checkpoint to resume from: starting a new run")
                if resumed and fresh_optimizer:
                    self.log("fresh optimiser: AdamW and the learning-rate schedule start again from step 0")
            if self.verbose:
                self.log(self.describe())
            self._train(optim, train_eval, val, test)
        return self.history

    def _train(self, optim: GlobalClipScheduler, train_eval: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor],
               test: tuple[Tensor, Tensor]) -> None:
        """The remaining epochs, each evaluated and checkpointed, then the test split once."""
        tc = self.config.train
        svi = self.make_svi(optim)
        bar = tqdm(total=self.total_steps, initial=self.epoch * self.steps_per_epoch, disable=not self.progress,
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
                scores = evaluate(self.net, *test, tc.batch_size, self.amp)
                self.history[-1].update({f"test_{k}": v for k, v in scores.items()})
                self._save(optim)
                if self.verbose:
                    self.log(f"test: bpc {scores['bpc']:.4f}  barrier {scores['barrier']:.4f}")
            elif self.rank == 0 and self.run_dir is not None:
                self._write_history()  # a finished run resumed: a kill may have left history.json behind its checkpoint
        finally:
            bar.close()

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
        ``torch.compile``d one; default: the network, wrapped in DDP when distributed). Its output is checked
        for NaN and inf before Pyro sees it."""
        forward = _finite(forward or self._forward_fn())
        lambda_m = self.config.train.lambda_m
        return SVI(
            lambda idx, tgt, stats: map_model(self.net, forward, idx, tgt, lambda_m, self.amp, stats,
                                              jacobian_reg=self.config.train.jacobian_reg,
                                              label_smoothing=self.config.train.label_smoothing),
            empty_guide, optim, loss=Trace_ELBO(),
        )

    def train_step(self, svi: SVI, optim: GlobalClipScheduler, idx: Tensor, tgt: Tensor, stats: StepStats) -> float:
        """One optimiser step on a batch on the device, then one step of the cosine schedule; returns the loss.

        Raises:
            TrainingDiverged: the forward pass (logits, prior density), the loss or the gradient norm is not
                finite; no parameter was updated by this step unless only the loss was.
        """
        try:
            loss = svi.step(idx, tgt, stats)
        except _NonFiniteForward as err:
            raise TrainingDiverged(self._diverged(str(err))) from None
        except TrainingDiverged as err:  # from the gradient clipping
            raise TrainingDiverged(self._diverged(str(err))) from err
        if not math.isfinite(loss):
            raise TrainingDiverged(self._diverged(f"loss {loss}"))
        optim.step()  # the cosine schedule, per step
        return loss

    def _diverged(self, what: str) -> str:
        """The message of a stop: what went non-finite, where, and which checkpoint is left."""
        if self.run_dir is None:
            kept = "no run_dir: nothing saved"
        elif self.epoch == 0:
            kept = "no epoch finished, so no checkpoint was written"
        else:
            kept = f"the last good checkpoint (epoch {self.epoch}) is kept"
        return f"{what} in epoch {self.epoch + 1}: stopping; {kept}"

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
            "train_ce_bpc_running": nats_to_bits(float(stats.ce) / stats.steps),
            "train_prior_running": float(stats.prior) / stats.steps if self.net.use_prior else None,
            "train_clamped": int(stats.clamped),
            "seconds": seconds,
            "device": device_name(self.device) + (f" x{self.world}" if self.world > 1 else ""),
        }
        if self.net.log_sigma is not None:
            record["sigma"] = float(self.net.sigma.detach())
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


def _finite(forward: Callable[[Tensor], NetOutput]) -> Callable[[Tensor], NetOutput]:
    """``forward`` that raises :class:`_NonFiniteForward` when its logits or prior log-density hold NaN or inf."""

    def checked(idx: Tensor) -> NetOutput:
        out = forward(idx)
        finite = torch.isfinite(out.logits).all()
        if out.prior_log_density is not None:
            finite = finite & torch.isfinite(out.prior_log_density).all()
        if not bool(finite):
            raise _NonFiniteForward("non-finite forward pass (NaN or inf in the logits or the prior's log-density)")
        return out

    return checked


def _format_record(r: dict[str, Any]) -> str:
    margin = sequence_margin_of(r)
    line = (f"epoch {r['epoch']:>3}: train bpc {r.get('train_bpc', math.nan):.4f}  "
            f"val bpc {r.get('val_bpc', math.nan):.4f}  barrier {r.get('val_barrier', math.nan):+.4f}  "
            f"seq margin (t>=3) {math.nan if margin is None else margin:+.4f}  clamped {r['train_clamped']}  "
            f"({r['seconds']:.0f}s)")
    return line + (f"  sigma {r['sigma']:.3f}" if "sigma" in r else "")

