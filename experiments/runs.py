"""Trained runs for the experiments: train a configuration once, reuse its checkpoint afterwards.

An experiment names a run directory (:func:`default_run_dir`, ``<runs-dir>/<preset>-lambda<lambda_m>``) and a
:class:`~inference.map.RunConfig`; :func:`ensure_trained` loads the run when its checkpoint has finished
every epoch, resumes it when it stopped part-way, and trains it otherwise. A run directory holding a
different configuration is an error (the checkpoint's config must match), never silently reused.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from inference.checkpoint import CheckpointMismatchError, config_differences, find_checkpoint, read_config, read_state
from inference.map import (
    CHECKPOINT_DIR,
    MAPTrainer,
    RunConfig,
    TrainedModel,
    load_trained,
    resolve_device,
)
from prob_attention.corpus import eval_windows, load_corpus

__all__ = ["RUNS_DIR", "Stopwatch", "default_run_dir", "ensure_trained", "find_finished_run", "is_finished",
           "resolve_device", "split_windows", "training_device"]

RUNS_DIR = Path("runs")
"""Where commands train their runs by default (scratch space, not committed)."""


def default_run_dir(runs_dir: str | os.PathLike[str], preset: str, lambda_m: float) -> Path:
    """The run directory of ``preset`` trained with margin weight ``lambda_m``:
    ``<runs_dir>/<preset>-lambda<lambda_m>``."""
    return Path(runs_dir) / f"{preset}-lambda{lambda_m:g}"


def find_finished_run(config: RunConfig, folders: Iterable[str | os.PathLike[str]]) -> Path | None:
    """A finished run directly under one of ``folders`` whose configuration is exactly ``config`` (fields added
    to the configs since it was trained count at their defaults), e.g. a committed run under ``results/train``
    whatever its folder is called; ``None`` if there is none."""
    for folder in folders:
        for run_dir in sorted(p for p in Path(folder).glob("*") if p.is_dir()):
            if is_finished(run_dir):
                saved = read_config(find_checkpoint(run_dir / CHECKPOINT_DIR))["run"]
                if RunConfig.from_dict(saved).to_dict() == config.to_dict():
                    return run_dir
    return None


def is_finished(run_dir: str | os.PathLike[str]) -> bool:
    """Whether ``run_dir`` holds a checkpoint past its last epoch, with the test split scored."""
    ckpt = find_checkpoint(Path(run_dir) / CHECKPOINT_DIR)
    if ckpt is None:
        return False
    state, config = read_state(ckpt), read_config(ckpt)
    try:
        epochs = config["run"]["train"]["epochs"]
        history = state.get("history", [])
        return int(state.get("epoch", 0)) >= epochs and bool(history) and "test_bpc" in history[-1]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointMismatchError(f"{ckpt} is not the checkpoint of a training run ({err!r})") from err


def ensure_trained(config: RunConfig, run_dir: str | os.PathLike[str], progress: bool = True) -> TrainedModel:
    """The trained model of ``config`` in ``run_dir``: loaded if finished, else trained (resuming).

    Raises:
        CheckpointMismatchError: ``run_dir`` holds a run of another configuration.
    """
    if not is_finished(run_dir):
        trainer = MAPTrainer(config, run_dir, progress=progress)
        trainer.fit(resume=True)
    trained = load_trained(run_dir)
    diffs = config_differences(trained.config.to_dict(), config.to_dict())
    if diffs:
        raise CheckpointMismatchError(f"{run_dir} holds a finished run of another configuration ("
                                      + "; ".join(diffs) + "); choose another run directory")
    return trained


def split_windows(trained: TrainedModel, split: str, max_windows: int | None = None,
                  length: int | None = None) -> tuple[Tensor, Tensor]:
    """Non-overlapping ``(inputs, targets)`` windows ``(n, length)`` (default the run's ``block_size``) of a split of
    the run's own corpus, encoded with the run's vocabulary (``max_windows`` keeps the first ones)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    tc = trained.config.train
    corpus = load_corpus(tc.corpus, seed=tc.corpus_seed)
    if corpus.name != trained.corpus:
        raise ValueError(f"the run was trained on {trained.corpus!r} but {tc.corpus!r} now loads {corpus.name!r}")
    inputs, targets = eval_windows(trained.vocab.encode(getattr(corpus, split)), length or trained.gpt_config.block_size)
    return (inputs, targets) if max_windows is None else (inputs[:max_windows], targets[:max_windows])


def training_device(trained: TrainedModel) -> str:
    """The device a run was trained on, as its history recorded it."""
    return str(trained.history[-1].get("device", "not recorded")) if trained.history else "not trained"


@dataclass
class Stopwatch:
    """Wall-clock seconds since construction."""

    start: float = 0.0

    def __post_init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
