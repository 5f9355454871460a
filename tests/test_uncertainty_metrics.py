"""The uncertainty study's metrics on small synthetic cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from experiments.calibration import ECE_BINS
from experiments.intervals import paired_bootstrap
from experiments.uncertainty_metrics import (
    expected_calibration_error,
    mutual_information,
    predictive_record,
    record_metrics,
    shift_detection_auroc,
)


def test_a_perfectly_calibrated_predictor_has_an_ece_near_zero() -> None:
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.2, 1.0, 200_000)
    correct = rng.uniform(size=confidence.size) < confidence  # right exactly as often as it says
    assert expected_calibration_error(confidence, correct) < 0.005


def test_an_overconfident_predictor_has_the_ece_of_its_gap() -> None:
    confidence = np.full(10_000, 0.9)
    correct = np.arange(10_000) < 6_000  # 60% right at 90% confidence
    assert math.isclose(expected_calibration_error(confidence, correct), 0.3, abs_tol=1e-6)


def test_the_top_label_ece_equals_torchmetrics_multiclass_ece_on_the_probabilities() -> None:
    torch.manual_seed(0)
    probs = torch.softmax(3 * torch.randn(500, 7, dtype=torch.float64), dim=-1)
    targets = torch.randint(0, 7, (500,))
    record = predictive_record(probs, targets)
    reference = MulticlassCalibrationError(num_classes=7, n_bins=ECE_BINS, norm="l1")(probs.float(), targets)
    assert math.isclose(expected_calibration_error(record["confidence"], record["correct"]), float(reference),
                        abs_tol=1e-6)


def test_the_record_holds_the_nll_brier_score_and_entropy_of_known_predictives() -> None:
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.5, 0.25], [0.2, 0.3, 0.5]], dtype=torch.float64)
    record = predictive_record(probs, torch.tensor([0, 0, 2]))
    np.testing.assert_allclose(record["nll"], [0.0, math.log(4), math.log(2)], atol=1e-12)
    np.testing.assert_allclose(record["brier"], [0.0, 0.75**2 + 0.5**2 + 0.25**2, 0.2**2 + 0.3**2 + 0.5**2],
                               atol=1e-12)
    h = -sum(p * math.log(p) for p in (0.2, 0.3, 0.5))
    np.testing.assert_allclose(record["entropy"], [0.0, 1.5 * math.log(2), h], atol=1e-12)
    assert record["correct"].tolist() == [True, False, True]
    metrics = record_metrics(record)
    assert math.isclose(metrics["bpc"], (math.log(4) + math.log(2)) / 3 / math.log(2))
    assert math.isclose(metrics["top1_error"], 1 / 3)


def test_an_ensemble_of_identical_models_has_zero_mutual_information() -> None:
    member = torch.softmax(torch.randn(4, 6, 9, dtype=torch.float64), dim=-1)
    assert float(mutual_information(member.expand(3, -1, -1, -1)).abs().max()) < 1e-12


def test_members_that_disagree_completely_have_the_entropy_of_their_vote_as_mutual_information() -> None:
    members = torch.eye(2, dtype=torch.float64).unsqueeze(1)  # two certain members, of different classes
    assert math.isclose(float(mutual_information(members)[0]), math.log(2))


def test_shift_detection_auroc_is_one_when_every_shifted_window_is_more_uncertain_and_half_when_equal() -> None:
    assert shift_detection_auroc(np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.6])) == 1.0
    assert shift_detection_auroc(np.array([0.5, 0.6]), np.array([0.1, 0.2])) == 0.0
    assert shift_detection_auroc(np.full(4, 0.3), np.full(4, 0.3)) == 0.5


@pytest.mark.parametrize("bad", [(torch.ones(3, 4) / 4, torch.zeros(2, dtype=torch.long)),
                                 (torch.full((2, 3), float("nan")), torch.zeros(2, dtype=torch.long))])
def test_bad_predictives_are_rejected(bad: tuple[torch.Tensor, torch.Tensor]) -> None:
    with pytest.raises(ValueError):
        predictive_record(*bad)


def test_the_bootstrap_resamples_windows_with_their_positions() -> None:
    rng = np.random.default_rng(0)
    positions = rng.normal(size=(3, 40, 16))  # (seeds, windows, positions)
    interval = paired_bootstrap({"x": positions}, lambda a: float(a["x"].mean()), draws=300)
    per_window = paired_bootstrap({"x": positions.mean(-1)}, lambda a: float(a["x"].mean()), draws=300)
    # the same draws of seeds and windows: a window's positions travel with it
    for field in ("estimate", "low", "high"):
        assert math.isclose(getattr(interval, field), getattr(per_window, field), rel_tol=1e-9, abs_tol=1e-12)
