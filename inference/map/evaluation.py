"""Scores of a MAP network on held-out windows: bits per character and the prior's diagnostics."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from prob_attention import safe_log_barrier

from .network import MAPNet

__all__ = ["evaluate"]


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
