r"""The latent posterior's predictions on the uncertainty study's conditions: fitted, scored and cached per model.

For one trained model (:mod:`inference.trajectory`'s model of its embedding trajectory, ``sigma`` by empirical
Bayes on training windows):

1. **tau is fitted**, not set: the particle filter (:mod:`inference.smc`) reads evenly spaced validation windows at
   every ``tau = ratio * sigma`` of :data:`TAU_RATIOS`, and the curve of the posterior predictive's mean NLL is
   kept, with its ``tau -> 0`` limit, where the posterior collapses onto the embeddings read and the predictive is
   the MAP model's (computed exactly, not filtered). ``tau*`` is the best *positive* ratio: the posterior closest
   to useful. Whether it beats the limit is a finding the study reports, not an assumption.
2. **Every condition** (:data:`~experiments.shift_conditions.CONDITIONS`) is filtered at ``tau*``, reading the
   condition's embeddings (noisy ones under embedding noise): the filter knows nothing of the shift, as no
   baseline does. Where noise of standard deviation ``s`` was added, the condition is filtered a second time
   (label + :data:`MATCHED`) with the emission's variance matched to it, ``tau^2 = tau*^2 + s^2``: the embeddings
   read are then exactly what the model says they are, and the posterior denoises them (Bayesian denoising, its
   best case). That filter is told the noise level, so it answers whether denoising helps, not how the posterior
   compares with baselines that are not told it (nor can it detect a shift it was told of).

Per position it keeps the predictive's record (:func:`~experiments.uncertainty_metrics.predictive_record`) and the
posterior's own signals: the mutual information between the next character and the trajectory (``mi``), the
effective sample size (``ess``) and the prior's log-det margin (``margin``, eq. 25). The filtering SVI posterior
(:func:`svi_scores`, :mod:`inference.svi_filter`) is scored the same way, without ``ess``, on a few conditions
(:class:`SVISettings`), at the particle filter's ``tau*``.

A model's scores are cached in ``<name>.npz`` (the arrays) beside ``<name>.json`` (sealed: the settings, the
weights' digest, the arrays' digest, the tau curve and the costs); a cache is used only when all of them match.
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from inference.checkpoint import write_bytes_atomic
from inference.map import TrainedModel, load_trained
from inference.posterior import SequentialFilter, SVIConfig
from inference.smc import TrajectorySMC
from inference.svi_filter import SVIFilter, settling_summary
from inference.trajectory import TrajectoryModel

from .decode import trajectory_model
from .report import read_sealed_json, write_sealed_json
from .shift_conditions import CONDITIONS, ConditionWindows, condition_windows
from .uncertainty_metrics import predictive_record

__all__ = ["MATCHED", "TAU_RATIOS", "PosteriorSettings", "SVISettings", "cached_arrays", "cached_posterior",
           "cached_svi", "filter_record", "posterior_scores", "smc_record", "svi_scores"]

TAU_RATIOS: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
"""``tau / sigma`` on the fitting grid (with the ``tau -> 0`` limit). The decoding study's fixed 0.5 put the
posterior predictive's top-1 error at 0.64 to 0.78 against MAP's 0.39: the grid runs below it, down to a hundredth
of ``sigma`` (CE-only's ``sigma`` is 0.075 and it loses a bit per character under embedding noise of 0.01)."""

MATCHED = "+matched"
"""Appended to an embedding-noise condition's label: the posterior whose emission is matched to the noise."""


@dataclass(frozen=True)
class PosteriorSettings:
    """What a model's posterior scores depend on, besides its weights.

    Args:
        windows: windows per condition (and of validation, for the tau fit); length: characters per window.
        particles: the particle filter's ``P``. tau_ratios: the fitting grid. seed: windows' corruption and noise,
            and the filters' seeds (``seed + window``).
        conditions: the labels of the conditions scored.
        noise_emission: how the embedding-noise conditions are filtered (module docstring), recorded so that a
            cache made another way is not reused.
    """

    windows: int = 12
    length: int = 64
    particles: int = 32
    tau_ratios: tuple[float, ...] = TAU_RATIOS
    seed: int = 0
    conditions: tuple[str, ...] = tuple(c.label for c in CONDITIONS)
    noise_emission: tuple[str, ...] = ("blind", "matched")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def filter_record(make: Callable[[int], SequentialFilter], windows: ConditionWindows) -> dict[str, np.ndarray]:
    """A posterior filter (``make(window)``, a fresh one per window) through every window, reading the windows'
    embeddings: the record of its predictives and its signals ``(n, L)`` (``ess`` only from weighted particles)."""
    rows: list[dict[str, np.ndarray]] = []
    for i in range(windows.inputs.shape[0]):
        signals = make(i).run(windows.inputs[i], windows.targets[i], anchors=windows.embeddings[i])
        row = predictive_record(torch.stack([s.probs for s in signals]), windows.targets[i])
        row |= {"mi": np.array([s.mutual_information for s in signals]),
                "margin": np.array([s.margin for s in signals])}
        if signals[0].ess is not None:
            row["ess"] = np.array([s.ess for s in signals])
        rows.append(row)
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@torch.no_grad()
def smc_record(model: TrajectoryModel, windows: ConditionWindows, particles: int,
               seed: int) -> tuple[dict[str, np.ndarray], int]:
    """:func:`filter_record` of the particle filter (seed ``seed + window``), and its number of failed inversions."""
    filters: list[TrajectorySMC] = []

    def make(i: int) -> TrajectorySMC:
        filters.append(TrajectorySMC(model, particles, seed=seed + i))
        return filters[-1]

    record = filter_record(make, windows)
    return record, sum(f.failures for f in filters)


def _with_tau(model: TrajectoryModel, tau: float) -> TrajectoryModel:
    return TrajectoryModel(model.gpt, model.transform, model.sigma, tau, model.barrier_floor)


@torch.no_grad()
def posterior_scores(trained: TrainedModel, settings: PosteriorSettings,
                     progress: Callable[[str], None] | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The model's tau fit and its posterior's scores on every condition (module docstring): ``(facts, arrays)``,
    arrays keyed ``"<condition>/<field>"``. ``progress`` is called with the name of each stage done."""
    say = progress or (lambda _: None)
    base = trajectory_model(trained, None, settings.tau_ratios[0], settings.seed)
    val = condition_windows(trained, CONDITIONS[0], settings.windows, settings.length, settings.seed, split="val")
    map_probs = torch.softmax(trained.gpt.decode(val.embeddings).double(), dim=-1)
    curve = {0.0: float(predictive_record(map_probs, val.targets)["nll"].mean())}
    for ratio in settings.tau_ratios:
        record, _ = smc_record(_with_tau(base, ratio * base.sigma), val, settings.particles, settings.seed)
        curve[ratio] = float(record["nll"].mean())
        say(f"tau = {ratio:g} sigma")
    ratio = min(settings.tau_ratios, key=lambda r: curve[r])
    tau = ratio * base.sigma
    arrays: dict[str, np.ndarray] = {}
    failures, seconds, positions = 0, 0.0, 0
    by_label = {c.label: c for c in CONDITIONS}
    for label in settings.conditions:
        windows = condition_windows(trained, by_label[label], settings.windows, settings.length, settings.seed)
        started = time.perf_counter()
        record, failed = smc_record(_with_tau(base, tau), windows, settings.particles, settings.seed)
        seconds += time.perf_counter() - started
        positions += windows.targets.numel()
        failures += failed
        arrays |= _keyed(label, record)
        if windows.noise_scale > 0:
            matched, failed = smc_record(_with_tau(base, math.hypot(tau, windows.noise_scale)), windows,
                                         settings.particles, settings.seed)
            failures += failed
            arrays |= _keyed(label + MATCHED, matched)
        say(label)
    learned = float(trained.net.sigma.detach()) if trained.config.prior.learn_sigma else None
    facts = {"sigma": base.sigma, "learned_sigma": learned, "tau_curve": {f"{k:g}": v for k, v in curve.items()},
             "tau_ratio": ratio, "tau": tau, "map_limit_best": curve[0.0] <= curve[ratio],
             "inversion_failures": failures, "seconds_per_position": seconds / positions}
    return facts, arrays


def _keyed(label: str, record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A record's arrays keyed ``"<label>/<field>"``, floats stored as float32."""
    return {f"{label}/{k}": v.astype(np.float32 if v.dtype.kind == "f" else v.dtype) for k, v in record.items()}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached_arrays(cache: Path, key: dict[str, Any], compute: Callable[[], tuple[dict[str, Any], dict[str, np.ndarray]]],
                  log: Callable[[str], None] = print) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(facts, arrays)`` from ``cache`` (a path without suffix: ``<cache>.json``, sealed, beside ``<cache>.npz``)
    when the record holds every entry of ``key`` and the arrays their digest; else ``compute()``, written there."""
    meta_path, arrays_path = cache.parent / f"{cache.name}.json", cache.parent / f"{cache.name}.npz"
    record = read_sealed_json(meta_path, log) if meta_path.exists() else None
    if (record is not None and all(record.get(k) == v for k, v in key.items()) and arrays_path.exists()
            and record.get("arrays_sha256") == _digest(arrays_path)):
        with np.load(arrays_path, allow_pickle=False) as data:
            return record["facts"], {k: data[k] for k in data.files}
    facts, arrays = compute()
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    write_bytes_atomic(arrays_path, buffer.getvalue())
    write_sealed_json(meta_path, {**key, "arrays_sha256": _digest(arrays_path), "facts": facts})
    return facts, arrays


def _progress_bar(total: int, name: str, progress: bool) -> tuple[tqdm, Callable[[str], None]]:
    bar = tqdm(total=total, desc=name, unit="condition", disable=not progress)

    def step(label: str) -> None:
        bar.set_postfix_str(label)
        bar.update()

    return bar, step


def cached_posterior(run_dir: Path, cache: Path, settings: PosteriorSettings, weights_digest: str,
                     device: str = "cpu", progress: bool = True,
                     log: Callable[[str], None] = print) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """:func:`posterior_scores` of the run in ``run_dir``, cached in ``cache`` (:func:`cached_arrays`) for these
    ``settings`` and weights."""
    def compute() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        bar, step = _progress_bar(len(settings.tau_ratios) + len(settings.conditions), cache.name, progress)
        with bar:
            return posterior_scores(load_trained(run_dir, map_location=device), settings, step)

    return cached_arrays(cache, {"settings": settings.to_dict(), "weights": weights_digest}, compute, log)


@dataclass(frozen=True)
class SVISettings:
    """The filtering SVI posterior's share of the study (:mod:`inference.svi_filter`): the conditions it reads (it
    costs about ten particle filters per position, so a few), and its refits: ``steps`` Adam steps of learning rate
    ``lr`` (in units of tau) per position, ``draws`` guide draws per prediction, a mean-field (``normal``) guide."""

    conditions: tuple[str, ...] = ("clean", "substitution=0.1", "noise=0.04", "tempest")
    steps: int = 5
    lr: float = 0.03
    draws: int = 16
    guide: str = "normal"

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def svi_scores(trained: TrainedModel, settings: PosteriorSettings, svi: SVISettings, tau: float,
               progress: Callable[[str], None] | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The SVI filter's scores on ``svi.conditions`` at the particle filter's fitted ``tau`` (the emission matched
    to the noise as there): ``(facts, arrays)`` as :func:`posterior_scores` gives them, without ``ess``."""
    say = progress or (lambda _: None)
    base = trajectory_model(trained, None, settings.tau_ratios[0], settings.seed)
    config = SVIConfig(guide=svi.guide, steps=svi.steps, lr=svi.lr, seed=settings.seed)
    by_label = {c.label: c for c in CONDITIONS}
    arrays: dict[str, np.ndarray] = {}
    losses: list[list[float]] = []
    seconds, positions = 0.0, 0
    for label in svi.conditions:
        windows = condition_windows(trained, by_label[label], settings.windows, settings.length, settings.seed)
        filters: list[SVIFilter] = []

        def run(emission: float) -> dict[str, np.ndarray]:
            model = _with_tau(base, emission)

            def make(i: int) -> SVIFilter:
                filters.append(SVIFilter(model, replace(config, seed=settings.seed + i), svi.draws))
                return filters[-1]

            return filter_record(make, windows)

        started = time.perf_counter()
        arrays |= _keyed(label, run(tau))
        seconds += time.perf_counter() - started
        positions += windows.targets.numel()
        if windows.noise_scale > 0:
            arrays |= _keyed(label + MATCHED, run(math.hypot(tau, windows.noise_scale)))
        losses += [fit for f in filters for fit in f.losses]
        say(label)
    facts = {"tau": tau, "seconds_per_position": seconds / positions, "elbo": settling_summary(losses)}
    return facts, arrays


def cached_svi(run_dir: Path, cache: Path, settings: PosteriorSettings, svi: SVISettings, tau: float,
               weights_digest: str, device: str = "cpu", progress: bool = True,
               log: Callable[[str], None] = print) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """:func:`svi_scores` of the run in ``run_dir``, cached in ``cache`` (:func:`cached_arrays`)."""
    def compute() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        bar, step = _progress_bar(len(svi.conditions), cache.name, progress)
        with bar:
            return svi_scores(load_trained(run_dir, map_location=device), settings, svi, tau, step)

    key = {"settings": {**settings.to_dict(), "svi": svi.to_dict(), "tau": tau}, "weights": weights_digest}
    return cached_arrays(cache, key, compute, log)
