"""One model's scores with its confidence controlled: raw, at its fitted temperature, and (for the reference)
at the temperatures that match other models' clean cost.

The robustness study scores robustness as the BPC of perturbed text, which rewards a less confident model. So
each model is also scored after post-hoc temperature scaling (:mod:`experiments.calibration`): its temperature
is fitted on the clean validation split, and every condition of the test split is scored both at ``T = 1``
(``raw``) and at the fitted ``T`` (``calibrated``). The reference (CE-only) is further scored at each
temperature ``T > T_fit`` at which its clean validation BPC equals another model's (``matched:<arm>``): the
free confidence control that every robustness method must beat.

The conditions are the clean test split, every perturbation level of the study (embedding noise, RMS-relative
noise, typos, and the text shifts: case flips and deletions), and the bundled out-of-domain text
(:mod:`experiments.out_of_domain`). Each is one draw (draw 0), scored at every temperature in the same
forward pass, so that the raw and calibrated scores see the same noise. Per condition and temperature the
record holds the BPC of every window, the expected calibration error, the mean predictive entropy (bits) and
the top-1 error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from inference.map import MAPNet, TrainedModel
from prob_attention.corpus import window_batches

from .calibration import CalibrationMeter, fit_temperature, matching_temperature, mean_nll
from .out_of_domain import OUT_OF_DOMAIN, out_of_domain_windows
from .perturbations import Perturbation, embedding_rms, window_scores
from .runs import split_windows

__all__ = ["DIGITS", "logits_of", "score_calibrated"]

DIGITS = 6
"""Decimals kept of each window's BPC in a record (the scores are float64; a millionth of a bit is far below any
difference the study resolves)."""


@torch.no_grad()
def logits_of(net: MAPNet, inputs: Tensor, batch_size: int = 64) -> Tensor:
    """The model's next-character logits at every position of ``inputs`` ``(n, T)``, as ``(n T, V)`` float32."""
    net.eval()
    device = next(net.parameters()).device
    return torch.cat([net.gpt.decode(net.gpt.embed(idx.to(device))).flatten(0, 1).float().cpu()
                      for idx, _ in window_batches(inputs, inputs, batch_size)])


def _condition(scores: Any, names: Sequence[str], windows: int) -> dict[str, Any]:
    """One condition's record from :func:`~experiments.perturbations.window_scores`' output."""
    cal = scores.calibration
    return {"windows": windows,
            "bpc": {n: [round(float(v), DIGITS) for v in row] for n, row in zip(names, scores.bpc)},
            "ece": dict(zip(names, cal["ece"])), "entropy_bits": dict(zip(names, cal["entropy_bits"])),
            "top1_error": cal["top1_error"]}


def score_calibrated(trained: TrainedModel, perturbations: Sequence[Perturbation], matched_val_bpc: Mapping[str, float],
                     noise_seed: int, batch_size: int = 64, max_windows: int | None = None,
                     stride: int = 1) -> dict[str, Any]:
    """The model's calibrated record (module docstring). The temperatures are fitted on every validation window;
    each test condition and the out-of-domain text score every ``stride``-th window of their (corrupted) text.

    ``matched_val_bpc``: for the reference, the clean validation BPC of each model to match (by name); for
    any other model, empty. A BPC that no temperature reaches (below the reference's calibrated BPC) is listed
    under ``unmatched``.
    """
    val_inputs, val_targets = split_windows(trained, "val", max_windows)
    val_logits, val_flat = logits_of(trained.net, val_inputs, batch_size), val_targets.flatten()
    fitted = fit_temperature(val_logits, val_flat)
    temperatures: dict[str, float] = {"raw": 1.0, "calibrated": fitted}
    unmatched = []
    for name, bpc in matched_val_bpc.items():
        t = matching_temperature(val_logits, val_flat, bpc * math.log(2.0), fitted=fitted)
        if t is None:
            unmatched.append(name)
        else:
            temperatures[f"matched:{name}"] = t
    names, values = list(temperatures), list(temperatures.values())
    net, chars = trained.net, trained.vocab.chars
    record: dict[str, Any] = {"temperature": fitted, "temperatures": temperatures, "unmatched": unmatched,
                              "prior_sigma": float(net.sigma.detach()), "conditions": {}}
    meter = CalibrationMeter(values[:2], val_logits.shape[1])
    meter.update(val_logits, val_flat)
    val = meter.compute()
    record["val"] = {"clean_bpc": {n: mean_nll(val_logits, val_flat, t) / math.log(2.0)
                                   for n, t in zip(names[:2], values[:2])},
                     "ece": dict(zip(names[:2], val["ece"])), "top1_error": val["top1_error"]}
    test_inputs, test_targets = split_windows(trained, "test", max_windows)
    rms = record["test_embedding_rms"] = embedding_rms(net, test_inputs, batch_size)
    for p in (Perturbation("clean"), *perturbations):
        scores = window_scores(net, test_inputs, test_targets, p, values, draw=0, seed=noise_seed, rms=rms,
                               batch_size=batch_size, chars=chars, calibration=True, stride=stride)
        record["conditions"][p.label] = _condition(scores, names, scores.bpc.shape[1])
    ood_inputs, ood_targets = out_of_domain_windows(trained)
    if max_windows is not None:
        ood_inputs, ood_targets = ood_inputs[:max_windows], ood_targets[:max_windows]
    scores = window_scores(net, ood_inputs, ood_targets, Perturbation("clean"), values, batch_size=batch_size,
                           calibration=True, stride=stride)
    record["conditions"][OUT_OF_DOMAIN] = _condition(scores, names, scores.bpc.shape[1])
    return record
