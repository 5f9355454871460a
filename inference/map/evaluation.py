"""Scores of a MAP network on held-out windows: bits per character and the prior's diagnostics."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from prob_attention.corpus import window_batches
from prob_attention.gpt import nats_to_bits

from .network import MAPNet

__all__ = ["evaluate", "sequence_margin_of"]


@torch.no_grad()
def evaluate(net: MAPNet, inputs: Tensor, targets: Tensor, batch_size: int, amp: bool = False) -> dict[str, float]:
    """Scores of ``net`` on windows ``(n, T)``: bits per character, and the prior's diagnostics.

    Returns ``bpc``; ``barrier`` (mean over positions of ``log det J_tt``, the safeguarded value),
    ``informative_seq_margin_mean`` / ``informative_seq_margin_min`` (the sequence margin
    ``min_{t >= 3} log det J_tt`` per window, averaged / smallest: positions 1 and 2 attend to at most one
    value, so ``log det J_tt = 0`` there whatever the model) and ``clamped`` (positions at or past the
    safeguard floor) — the prior is evaluated even when it is not trained, as a diagnostic. Histories
    written before the sequence margin skipped ``t = 1, 2`` hold ``seq_margin_mean`` / ``seq_margin_min``
    instead (the minimum over every position, so never above 0).
    """
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    ce_sum = torch.zeros((), dtype=torch.float64, device=device)
    barrier_sum = torch.zeros((), dtype=torch.float64, device=device)
    margins: list[Tensor] = []
    clamped = torch.zeros((), dtype=torch.long, device=device)
    for idx, tgt in window_batches(inputs, targets, batch_size):
        idx, tgt = idx.to(device, non_blocking=True), tgt.to(device, non_blocking=True)
        x = net.gpt.embed(idx)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = net.gpt.decode(x)
        ce_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), reduction="sum")
        terms, mask = net.barrier_terms(x)
        barrier_sum += terms.sum()
        margins.append(terms[:, 2:].amin(-1) if terms.shape[-1] > 2 else torch.full_like(terms[:, 0], math.nan))
        clamped += mask.sum()
    n_tokens = targets.numel()
    seq_margins = torch.cat(margins)
    net.train(was_training)
    return {
        "bpc": nats_to_bits(float(ce_sum) / n_tokens),
        "barrier": float(barrier_sum) / n_tokens,
        "informative_seq_margin_mean": float(seq_margins.mean()),
        "informative_seq_margin_min": float(seq_margins.min()),
        "clamped": int(clamped),
    }


def sequence_margin_of(record: dict[str, Any], prefix: str = "val_") -> float | None:
    """The mean sequence margin ``min_{t >= 3} log det J_tt`` of a history record or :func:`evaluate` scores
    (keys under ``prefix``); ``None`` for a record written before that definition (see :func:`evaluate`)."""
    return record.get(f"{prefix}informative_seq_margin_mean")
