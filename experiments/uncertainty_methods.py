"""The methods of the uncertainty study and what each predicts, as per-position records and uncertainty signals.

The baselines a practitioner tries first: the MAP softmax, a temperature fitted on validation, a last-layer Laplace
approximation (:mod:`experiments.laplace`) and the deep ensemble of an arm's seeds; and the latent posterior's
filters, read from their caches (:mod:`experiments.posterior_scores`). Each method's uncertainty signals are
oriented so that higher means more uncertain.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.map import TrainedModel

from .calibrated_scores import logits_of
from .calibration import fit_temperature
from .laplace import LastLayerLaplace, fit_prior_precision
from .report import read_sealed_json
from .runs import split_windows
from .shift_conditions import evenly_spaced
from .uncertainty_metrics import (
    RECORD_FIELDS,
    mutual_information,
    predictive_record,
)

TOTAL = {"neg_maxprob": "1 - max p", "entropy": "entropy"}

BAYESIAN = {**TOTAL, "mi": "mutual information"}

METHODS: dict[str, tuple[str, dict[str, str]]] = {
    "map": ("MAP", TOTAL),
    "temperature": ("temperature", TOTAL),
    "laplace": ("last-layer Laplace", BAYESIAN),
    "ensemble": ("deep ensemble", BAYESIAN),
    "smc": ("latent posterior (SMC)", {**BAYESIAN, "neg_ess": "minus ESS", "neg_margin": "minus log-det margin"}),
    "svi": ("latent posterior (SVI)", {**BAYESIAN, "neg_margin": "minus log-det margin"}),
}
"""Each method's name and its uncertainty signals (key -> name; higher = more uncertain)."""

BASELINES = ("map", "temperature", "laplace", "ensemble")

POSTERIORS = ("smc", "svi")
"""The latent posterior's two filters; the SVI filter reads only some arms and conditions (``--svi-arms``,
``--svi-conditions``): it costs about ten particle filters per position."""

LAPLACE_TRAIN_WINDOWS = 64
"""Evenly spaced training windows (of the run's context) the Laplace curvature's factors are estimated on: 8192
positions (the curvature is then scaled to the whole training split)."""

LAPLACE_VAL_WINDOWS = 32
"""Validation windows the Laplace prior precision is fitted on."""

LAPLACE_SAMPLES = 32
"""Monte Carlo logit draws of the Laplace predictive (as many as the particle filter's particles)."""


@dataclass
class Scores:
    """One method on one model (or one ensemble): per condition, its record and signals ``(windows, L)``, and its
    cost in seconds per position."""

    records: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    signals: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    seconds_per_position: float = 0.0


def _scored(probs: torch.Tensor, targets: torch.Tensor, **signals: torch.Tensor) -> tuple[dict, dict]:
    record = predictive_record(probs, targets)
    out = {"neg_maxprob": 1.0 - record["confidence"], "entropy": record["entropy"]}
    out |= {k: v.detach().double().cpu().numpy() for k, v in signals.items()}
    return record, out


def fitted_temperature(trained: TrainedModel, cache: Path) -> tuple[float, str]:
    """The temperature the robustness study fitted for this model (its calibrated cache), else fitted the same way
    (every validation window); and where it came from."""
    record = read_sealed_json(cache, log=lambda _: None) if cache.exists() else None
    if record is not None and "temperature" in record:
        return float(record["temperature"]), "robustness study"
    inputs, targets = split_windows(trained, "val")
    return fit_temperature(logits_of(trained.net, inputs), targets.flatten()), "fitted here"


@torch.no_grad()
def baseline_scores(trained: TrainedModel, temperature: float, laplace: LastLayerLaplace, windows: dict[str, Any],
                    seed: int) -> tuple[dict[str, Scores], dict[str, torch.Tensor]]:
    """MAP, temperature and Laplace on every condition's windows, and the MAP softmax (the ensemble's member)."""
    gpt = trained.gpt.eval()
    out = {k: Scores() for k in ("map", "temperature", "laplace")}
    member: dict[str, torch.Tensor] = {}
    decoding, sampling, positions = 0.0, 0.0, 0
    for label, w in windows.items():
        started = time.perf_counter()
        phi = gpt.features(w.embeddings)
        logits = gpt.lm_head(phi).double()
        probs = torch.softmax(logits, dim=-1)
        decoding += time.perf_counter() - started
        started = time.perf_counter()
        mean, draws = laplace.predictive(phi, samples=LAPLACE_SAMPLES, seed=seed)
        sampling += time.perf_counter() - started
        member[label] = probs
        targets = w.targets.to(probs.device)
        for key, p, extra in (("map", probs, {}), ("temperature", torch.softmax(logits / temperature, -1), {}),
                              ("laplace", mean, {"mi": mutual_information(draws)})):
            out[key].records[label], out[key].signals[label] = _scored(p, targets, **extra)
        positions += targets.numel()
    out["map"].seconds_per_position = out["temperature"].seconds_per_position = decoding / positions
    out["laplace"].seconds_per_position = (decoding + sampling) / positions  # it needs the features too
    return out, member


def ensemble_scores(members: Sequence[dict[str, torch.Tensor]], windows: dict[str, Any],
                    member_seconds: float) -> Scores:
    """The deep ensemble of the members' MAP softmaxes, per condition."""
    out = Scores(seconds_per_position=member_seconds)
    for label, w in windows.items():
        stack = torch.stack([m[label] for m in members])
        out.records[label], out.signals[label] = _scored(stack.mean(0), w.targets, mi=mutual_information(stack))
    return out


def posterior_as_scores(arrays: dict[str, np.ndarray], facts: dict[str, Any], labels: Sequence[str]) -> Scores:
    """A filter's cached scores of one model (the conditions of ``labels`` it read) as a method's :class:`Scores`."""
    out = Scores(seconds_per_position=facts["seconds_per_position"])
    for label in (lab for lab in labels if f"{lab}/nll" in arrays):
        rec = {f: arrays[f"{label}/{f}"].astype(np.float64 if f != "correct" else bool) for f in RECORD_FIELDS}
        out.records[label] = rec
        out.signals[label] = {"neg_maxprob": 1.0 - rec["confidence"], "entropy": rec["entropy"],
                              "mi": arrays[f"{label}/mi"].astype(np.float64),
                              "neg_margin": -arrays[f"{label}/margin"].astype(np.float64)}
        if f"{label}/ess" in arrays:
            out.signals[label]["neg_ess"] = -arrays[f"{label}/ess"].astype(np.float64)
    return out


@dataclass
class ArmScores:
    """Every method of one arm, stacked over seeds: ``records[method][condition][field]`` and
    ``signals[method][condition][signal]`` are ``(seeds, windows, L)``; ``facts`` per seed; costs per method."""

    records: dict[str, dict[str, dict[str, np.ndarray]]]
    signals: dict[str, dict[str, dict[str, np.ndarray]]]
    facts: list[dict[str, Any]]
    cost: dict[str, float]
    matched: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    """Under each embedding-noise condition, the record of the particle filter told the noise level (its emission
    matched to it: :data:`~experiments.posterior_scores.MATCHED`), ``(seeds, windows, L)`` per field."""


def fitted_laplace(trained: TrainedModel) -> tuple[LastLayerLaplace, dict[float, float]]:
    """The last-layer Laplace of the run (its curvature estimated on training windows and scaled to every position
    of the training split, the likelihood the model was fitted to), its prior precision fitted on validation."""
    train_inputs, _ = split_windows(trained, "train")
    sample, _ = evenly_spaced(train_inputs, train_inputs, LAPLACE_TRAIN_WINDOWS)
    laplace = LastLayerLaplace.fit(trained.gpt, sample.to(trained.transform.w_k.device),
                                   positions=train_inputs.numel())
    val_inputs, val_targets = split_windows(trained, "val", LAPLACE_VAL_WINDOWS)
    with torch.no_grad():
        phi = trained.gpt.features(trained.gpt.embed(val_inputs.to(trained.transform.w_k.device)))
    delta, curve = fit_prior_precision(laplace, phi, val_targets.to(phi.device), samples=LAPLACE_SAMPLES)
    return laplace.with_prior_precision(delta), curve


def available(scores: ArmScores, label: str) -> list[str]:
    """The methods that scored condition ``label`` for this arm."""
    return [m for m in METHODS if label in scores.records.get(m, {})]
