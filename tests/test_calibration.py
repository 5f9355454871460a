"""Post-hoc calibration: the fitted temperature, the matching temperature and the calibration statistics, on
synthetic predictors whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from experiments.calibration import CalibrationMeter, fit_temperature, matching_temperature, mean_nll


def predictor(scale: float, n: int = 20_000, classes: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``scale`` times the true ones, and targets drawn from the true distribution: a predictor whose
    ideal temperature is ``scale``."""
    g = torch.Generator().manual_seed(seed)
    true_logits = 1.5 * torch.randn(n, classes, generator=g, dtype=torch.float64)
    targets = torch.multinomial(torch.softmax(true_logits, -1), 1, generator=g).squeeze(1)
    return scale * true_logits, targets


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.5])
def test_the_fitted_temperature_undoes_a_known_over_or_under_confidence(scale: float) -> None:
    logits, targets = predictor(scale)
    assert fit_temperature(logits, targets) == pytest.approx(scale, rel=0.05)


def test_the_fitted_temperature_minimises_the_held_out_nll() -> None:
    logits, targets = predictor(2.0, seed=1)
    t = fit_temperature(logits, targets)
    best = mean_nll(logits, targets, t)
    assert all(best <= mean_nll(logits, targets, t * f) for f in (0.99, 1.01, 0.8, 1.25))


def test_the_matching_temperature_costs_exactly_the_nll_asked_for_and_is_less_confident() -> None:
    logits, targets = predictor(1.0, seed=2)
    fitted = fit_temperature(logits, targets)
    goal = mean_nll(logits, targets, fitted) + 0.05
    t = matching_temperature(logits, targets, goal)
    assert t is not None and t > fitted
    assert mean_nll(logits, targets, t) == pytest.approx(goal, abs=1e-9)


def test_no_temperature_matches_an_nll_below_the_calibrated_one_or_at_the_uniform_prediction() -> None:
    logits, targets = predictor(1.0, seed=3)
    fitted = fit_temperature(logits, targets)
    assert matching_temperature(logits, targets, mean_nll(logits, targets, fitted) - 0.01) is None
    assert matching_temperature(logits, targets, math.log(logits.shape[1])) is None


@pytest.mark.parametrize("logits, targets", [
    (torch.zeros(4, 3), torch.zeros(5, dtype=torch.long)),
    (torch.zeros(4), torch.zeros(4, dtype=torch.long)),
    (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)),
    (torch.tensor([[0.0, float("nan")]]), torch.zeros(1, dtype=torch.long)),
])
def test_wrong_shapes_no_positions_and_non_finite_logits_are_refused(logits: torch.Tensor,
                                                                      targets: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        fit_temperature(logits, targets)


def test_a_perfectly_calibrated_predictor_has_an_expected_calibration_error_near_zero() -> None:
    logits, targets = predictor(1.0, n=50_000, seed=4)
    meter = CalibrationMeter([1.0, 3.0], n_classes=7)
    for start in range(0, len(targets), 10_000):
        meter.update(logits[start:start + 10_000], targets[start:start + 10_000])
    stats = meter.compute()
    assert stats["ece"][0] < 0.01
    assert stats["ece"][1] > 0.1  # three times too confident: miscalibrated


def test_a_sure_predictor_that_is_right_half_the_time_has_a_calibration_error_of_one_half() -> None:
    logits = torch.tensor([[20.0, 0.0]]).repeat(1000, 1)
    targets = torch.arange(1000) % 2
    stats = CalibrationMeter([1.0], n_classes=2)
    stats.update(logits, targets)
    result = stats.compute()
    assert result["ece"][0] == pytest.approx(0.5, abs=1e-3)
    assert result["top1_error"] == 0.5
    assert result["entropy_bits"][0] == pytest.approx(0.0, abs=1e-6)


def test_the_entropy_of_a_uniform_prediction_is_log2_of_the_vocabulary() -> None:
    meter = CalibrationMeter([1.0, 0.5], n_classes=8)
    meter.update(torch.zeros(10, 8), torch.zeros(10, dtype=torch.long))
    assert meter.compute()["entropy_bits"] == pytest.approx([3.0, 3.0])
