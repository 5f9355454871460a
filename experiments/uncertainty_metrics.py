"""What a predictive distribution is scored by, per position, and the metrics of a set of positions.

A *record* holds, for every scored position (any shape, e.g. ``(windows, length)``), what the metrics need of a
predictive ``p`` over the next character ``y``:

- ``nll``: ``-log p(y)`` (nats); ``correct``: whether ``argmax p = y``; ``confidence``: ``max p``;
- ``brier``: ``sum_k (p_k - [k = y])^2``, the multiclass Brier score (Brier 1950) of the position;
- ``entropy``: ``H[p]`` (nats).

The metrics of a set of positions: bits per character, top-1 error, the expected calibration error of the top
label (torchmetrics' ``binary_calibration_error`` on ``(confidence, correct)``, which is its
``MulticlassCalibrationError`` without the logits, :data:`~experiments.calibration.ECE_BINS` bins, L1) and the
mean Brier score (torchmetrics has none for many classes; it is the sum above). An *uncertainty signal* (higher =
"more likely wrong") is scored as a detector of the method's own top-1 errors (AUROC, AURC:
:mod:`experiments.selective`) and, averaged over each window, as a detector of shifted windows among in-domain
ones (:func:`shift_detection_auroc`).

Example:
    >>> import torch
    >>> r = predictive_record(torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]), torch.tensor([0, 2]))
    >>> r["brier"].tolist(), r["correct"].tolist()
    ([0.5, 0.0], [True, True])
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_calibration_error

from prob_attention.weighted_moments import entropy

from .calibration import ECE_BINS
from .selective import auroc

__all__ = ["RECORD_FIELDS", "expected_calibration_error", "mutual_information", "predictive_record",
           "record_metrics", "shift_detection_auroc"]

RECORD_FIELDS = ("nll", "correct", "confidence", "brier", "entropy")
"""The per-position fields of a record (module docstring)."""


@torch.no_grad()
def predictive_record(probs: Tensor, targets: Tensor) -> dict[str, np.ndarray]:
    """The record of predictive distributions ``probs`` ``(..., V)`` for ``targets`` ``(...)``: numpy arrays of
    the targets' shape (float64; ``correct`` boolean)."""
    if probs.shape[:-1] != targets.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and targets {tuple(targets.shape)} do not match")
    if not bool(torch.isfinite(probs).all()):
        raise ValueError("probs must be finite")
    p = probs.double()
    y = targets.long().to(p.device)
    p_y = p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    confidence, top = p.max(-1)
    out = {"nll": -torch.log(p_y.clamp_min(1e-300)), "correct": top == y, "confidence": confidence,
           "brier": p.pow(2).sum(-1) - 2.0 * p_y + 1.0, "entropy": entropy(p)}
    return {k: v.cpu().numpy() for k, v in out.items()}


def mutual_information(member_probs: Tensor, weights: Tensor | None = None) -> Tensor:
    """``H[sum_m w_m p_m] - sum_m w_m H[p_m]`` (nats, clipped at 0 against rounding) of member predictives
    ``(M, ..., V)`` with weights ``(M,)`` summing to 1 (default equal): the disagreement between the members,
    zero when they agree."""
    p = member_probs.double()
    w = torch.full(p.shape[:1], 1.0 / p.shape[0], dtype=p.dtype) if weights is None else weights.double()
    w = w.reshape(-1, *[1] * (p.dim() - 1)).to(p.device)
    mean = (w * p).sum(0)
    return (entropy(mean) - (w[..., 0] * entropy(p)).sum(0)).clamp_min(0.0)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """The top-label ECE of positions with top-1 probability ``confidence`` and top-1 outcome ``correct``."""
    conf = torch.as_tensor(np.asarray(confidence, dtype=np.float64).reshape(-1))
    hit = torch.as_tensor(np.asarray(correct, dtype=bool).reshape(-1)).long()
    if conf.numel() == 0 or conf.shape != hit.shape:
        raise ValueError(f"need equally many confidences and outcomes, got {conf.numel()} and {hit.numel()}")
    return float(binary_calibration_error(conf, hit, n_bins=bins, norm="l1", validate_args=False))


def record_metrics(record: dict[str, np.ndarray]) -> dict[str, float]:
    """``bpc``, ``top1_error``, ``ece`` and ``brier`` over every position of a record."""
    return {"bpc": float(np.mean(record["nll"])) / math.log(2.0),
            "top1_error": 1.0 - float(np.mean(record["correct"])),
            "ece": expected_calibration_error(record["confidence"], record["correct"]),
            "brier": float(np.mean(record["brier"]))}


def shift_detection_auroc(in_domain: np.ndarray, shifted: np.ndarray) -> float:
    """How well a signal's window means tell shifted windows from in-domain ones: the AUROC of ``shifted``
    ``(n_s,)`` against ``in_domain`` ``(n_i,)`` (a higher mean signal flags a shift; 0.5 is chance)."""
    in_domain, shifted = np.asarray(in_domain, dtype=float).reshape(-1), np.asarray(shifted, dtype=float).reshape(-1)
    return auroc(np.concatenate([in_domain, shifted]),
                 np.concatenate([np.zeros(in_domain.size, bool), np.ones(shifted.size, bool)]))
