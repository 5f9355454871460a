"""Trained runs loaded back for evaluation and inference (weights from safetensors; nothing is unpickled)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prob_attention import CausalAttentionTransform
from prob_attention.corpus import CharVocab
from prob_attention.gpt import GPTConfig, SmallGPT

from ..checkpoint import load_checkpoint
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
