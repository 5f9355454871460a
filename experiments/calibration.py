"""Post-hoc calibration of a next-character model: a fitted temperature, and the temperature at which one model
costs what another does.

Temperature scaling (Guo et al. 2017, "On calibration of modern neural networks") divides a model's logits by
one scalar ``T`` before the softmax, ``p_T(y | x) = softmax(z / T)_y``: it changes no prediction (the argmax),
only the confidence. ``T`` is fitted by minimising the mean negative log-likelihood on held-out text (the clean
validation split). With ``beta = 1 / T`` the mean NLL ``L(beta) = mean(-beta z_y + logsumexp(beta z))`` is
convex in ``beta``: its derivative ``mean(E_{p_beta}[z] - z_y)`` is increasing (its own derivative is the variance
of ``z`` under ``p_beta``), so the fit is the root of the derivative and is found by bisection, exactly.

A model that is overconfident has ``T > 1`` (its held-out BPC drops when its logits are shrunk). Robustness
scored as the BPC of perturbed text rewards a less confident model, so a robustness claim has to beat a
confidence control: the reference model at the temperature ``T > T_fit`` at which its clean held-out BPC equals
the claimant's (:func:`matching_temperature`). On ``(0, beta_fit]`` the NLL falls monotonically from ``log V``
(the uniform prediction) to its minimum, so that temperature is unique when it exists.

Expected calibration error comes from torchmetrics (top-label, 15 equal-width confidence bins, L1).

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> true_logits = 2.0 * torch.randn(20_000, 5, generator=g, dtype=torch.float64)
    >>> targets = torch.distributions.Categorical(logits=true_logits).sample()
    >>> round(fit_temperature(3.0 * true_logits, targets), 1)  # a model three times too confident
    3.0
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassCalibrationError

__all__ = ["ECE_BINS", "CalibrationMeter", "fit_temperature", "matching_temperature", "mean_nll"]

ECE_BINS = 15
"""Confidence bins of the expected calibration error (Guo et al. 2017's choice)."""

_BETA_RANGE = (1e-3, 1e3)
"""The inverse temperatures searched: ``T`` from 0.001 to 1000."""

_BISECTIONS = 50
"""Bisection steps in ``log beta``: the bracket's width of 13.8 in ``log beta`` shrinks below 1e-14."""


def _check(logits: Tensor, targets: Tensor) -> None:
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (N, V) and targets (N,), got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("no positions to calibrate on")
    if not torch.isfinite(logits).all():
        raise ValueError("the logits hold NaN or inf")


def _as_float64(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """The logits in float64 and each position's target logit ``z_y``, after checking both."""
    _check(logits, targets)
    z = logits.double()
    return z, z.gather(1, targets.long()[:, None]).squeeze(1)


def _nll(z: Tensor, z_y: Tensor, beta: float) -> float:
    """``L(beta) = mean(logsumexp(beta z) - beta z_y)``, nats."""
    return float((torch.logsumexp(beta * z, dim=-1) - beta * z_y).mean())


def mean_nll(logits: Tensor, targets: Tensor, temperature: float) -> float:
    """Mean negative log-likelihood in nats of ``targets`` ``(N,)`` under ``softmax(logits / temperature)``,
    ``logits`` ``(N, V)``, computed in float64."""
    return _nll(*_as_float64(logits, targets), 1.0 / temperature)


def _nll_slope(z: Tensor, z_y: Tensor, beta: float) -> float:
    """``dL / d beta = mean(E_{softmax(beta z)}[z] - z_y)`` (module docstring)."""
    p = torch.softmax(beta * z, dim=-1)
    return float(((p * z).sum(-1) - z_y).mean())


def _bisect(increasing, low: float, high: float) -> float:
    """The root in ``log`` space of an increasing function with ``f(low) <= 0 <= f(high)``."""
    a, b = math.log(low), math.log(high)
    for _ in range(_BISECTIONS):
        mid = 0.5 * (a + b)
        if increasing(math.exp(mid)) < 0.0:
            a = mid
        else:
            b = mid
    return math.exp(0.5 * (a + b))


def fit_temperature(logits: Tensor, targets: Tensor) -> float:
    """The temperature ``T`` that minimises the mean NLL of ``targets`` ``(N,)`` under ``softmax(logits / T)``,
    ``logits`` ``(N, V)`` (module docstring), within ``[0.001, 1000]``.

    Raises:
        ValueError: wrong shapes, no positions, or non-finite logits.
    """
    z, z_y = _as_float64(logits, targets)
    low, high = _BETA_RANGE
    if _nll_slope(z, z_y, high) <= 0.0:
        return 1.0 / high
    if _nll_slope(z, z_y, low) >= 0.0:
        return 1.0 / low
    return 1.0 / _bisect(lambda beta: _nll_slope(z, z_y, beta), low, high)


def matching_temperature(logits: Tensor, targets: Tensor, nats: float, fitted: float | None = None) -> float | None:
    """The temperature ``T >= T_fit`` at which the mean NLL of ``targets`` under ``softmax(logits / T)`` is
    ``nats``: the model made exactly as unconfident as it must be to cost ``nats``.

    ``fitted``: the model's fitted temperature on the same positions (computed when omitted). ``None`` when no
    such temperature exists: ``nats`` is below the model's calibrated NLL (no temperature makes it that good) or
    at or above ``log V`` (the uniform prediction, reached only as ``T -> inf``).
    """
    z, z_y = _as_float64(logits, targets)
    fitted = fit_temperature(logits, targets) if fitted is None else fitted
    best, uniform = _nll(z, z_y, 1.0 / fitted), math.log(logits.shape[1])
    if not best <= nats < uniform:
        return None
    if nats == best:
        return fitted
    low = _BETA_RANGE[0]
    if _nll(z, z_y, low) < nats:
        return None
    # L(beta) falls on (0, beta_fit]: f(beta) = nats - L(beta) is increasing there
    return 1.0 / _bisect(lambda beta: nats - _nll(z, z_y, beta), low, 1.0 / fitted)


class CalibrationMeter:
    """Running calibration statistics of a model at several temperatures, fed batch by batch: the expected
    calibration error (torchmetrics' ``MulticlassCalibrationError``, top label, :data:`ECE_BINS` bins, L1), the
    mean predictive entropy (bits) and the top-1 error. One meter per condition; :meth:`compute` gives one list
    per statistic, in the order of ``temperatures``."""

    def __init__(self, temperatures: list[float], n_classes: int) -> None:
        self.temperatures = list(temperatures)
        self._ece = [MulticlassCalibrationError(num_classes=n_classes, n_bins=ECE_BINS, norm="l1")
                     for _ in self.temperatures]
        self._entropy = [0.0 for _ in self.temperatures]
        self._errors = 0
        self._count = 0

    @torch.no_grad()
    def update(self, logits: Tensor, targets: Tensor) -> None:
        """Add positions: ``logits`` ``(N, V)``, ``targets`` ``(N,)``."""
        _check(logits, targets)
        z = logits.float().cpu()
        y = targets.long().cpu()
        for k, t in enumerate(self.temperatures):
            log_p = torch.log_softmax(z / t, dim=-1)
            p = log_p.exp()
            self._ece[k].update(p, y)
            self._entropy[k] += float(-(p * log_p).sum(-1).double().sum()) / math.log(2.0)
        self._errors += int((z.argmax(-1) != y).sum())
        self._count += y.numel()

    def compute(self) -> dict[str, list[float] | float]:
        """``{"ece": [...], "entropy_bits": [...], "top1_error": e}``: per temperature, and the top-1 error (the
        same at every temperature)."""
        if self._count == 0:
            raise ValueError("no positions were added")
        return {"ece": [float(m.compute()) for m in self._ece],
                "entropy_bits": [e / self._count for e in self._entropy],
                "top1_error": self._errors / self._count}
