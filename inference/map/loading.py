"""Trained runs loaded back for evaluation and inference (weights from safetensors; nothing is unpickled)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prob_attention import CausalAttentionTransform
from prob_attention.corpus import CharVocab
from prob_attention.gpt import GPTConfig, SmallGPT

from ..checkpoint import CheckpointCorruptError, CheckpointMismatchError, find_checkpoint, load_checkpoint, read_config
from .config import RunConfig
from .network import MAPNet, build_net
from .trainer import CHECKPOINT_DIR

__all__ = ["TrainedModel", "load_trained"]


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
    """Load the checkpoint of a run directory for evaluation or inference: weights from safetensors, verified
    against the checkpoint's manifest (a legacy checkpoint without one loads unverified) and checked for
    finiteness; the optimiser state is never read. A run that is training can be read: a read that meets a
    checkpoint's swap is read again from the complete checkpoint.

    Raises:
        FileNotFoundError: no checkpoint in ``run_dir``.
        CheckpointCorruptError: a file differs from its manifest hash, cannot be parsed, or holds NaN/inf weights.
        CheckpointMismatchError: the weights do not fit the saved config.
    """
    ckpt = Path(run_dir) / CHECKPOINT_DIR  # not the copy found now: a save may swap it while it is read
    if find_checkpoint(ckpt) is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir} (expected {ckpt})")
    saved = read_config(ckpt)
    config, gpt_config, vocab, corpus = _parse_config(saved, ckpt / "config.json")
    net = build_net(config, gpt_config)
    state, _ = load_checkpoint(ckpt, modules={"net": net}, optimizer=False)
    history = state.get("history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise CheckpointCorruptError(f"{ckpt / 'state.json'}: no training history")
    net.to(map_location).eval()
    return TrainedModel(net, vocab, config, gpt_config, corpus, history)


def _parse_config(saved: Any, path: Path) -> tuple[RunConfig, GPTConfig, CharVocab, str]:
    """The run config, GPT config, vocabulary and corpus name of a checkpoint's ``config.json``; a readable
    error naming ``path`` when it is not a trained run's config."""
    try:
        return (RunConfig.from_dict(saved["run"]), GPTConfig.from_dict(saved["gpt_config"]),
                CharVocab.from_dict(saved["vocab"]), str(saved["corpus"]))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointMismatchError(f"{path}: not the config of a trained run ({type(err).__name__}: {err})") from err
