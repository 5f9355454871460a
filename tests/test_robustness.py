"""Perturbations scored per window, and paired bootstrap intervals over seeds and windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.evaluation import embedding_rms
from experiments.intervals import Interval, mean_difference, paired_bootstrap, verdict
from experiments.perturbations import Perturbation, logit_jacobian_norm, substitute_characters, window_bpc
from inference.map import RunConfig, build_net, evaluate


@pytest.fixture(scope="module")
def net_and_windows() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    config = RunConfig.preset("tiny")
    net = build_net(config, config.gpt_config(12)).eval()
    g = torch.Generator().manual_seed(0)
    return net, torch.randint(0, 12, (10, 32), generator=g), torch.randint(0, 12, (10, 32), generator=g)


def test_substitutions_at_rate_zero_change_nothing_and_at_rate_one_change_every_character() -> None:
    idx = torch.randint(0, 9, (40, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(substitute_characters(idx, 0.0, 9, seed=0, draw=0), idx)
    changed = substitute_characters(idx, 1.0, 9, seed=0, draw=0)
    assert bool((changed != idx).all())
    assert int(changed.min()) >= 1 and int(changed.max()) <= 8  # never the unknown symbol, always in the vocabulary


def test_substituted_positions_are_nested_across_rates_and_fixed_by_seed_and_draw() -> None:
    idx = torch.randint(1, 30, (50, 64), generator=torch.Generator().manual_seed(2))
    low, high = (substitute_characters(idx, r, 30, seed=3, draw=1) != idx for r in (0.02, 0.1))
    assert bool((low <= high).all()) and int(low.sum()) < int(high.sum())
    assert torch.equal(substitute_characters(idx, 0.1, 30, seed=3, draw=1), substitute_characters(idx, 0.1, 30, 3, 1))
    assert not torch.equal(substitute_characters(idx, 0.1, 30, seed=3, draw=2), substitute_characters(idx, 0.1, 30, 3, 1))
    assert abs(float(high.double().mean()) - 0.1) < 0.02


def test_replacements_are_uniform_over_the_other_known_characters() -> None:
    idx = torch.full((200, 100), 4)
    counts = torch.bincount(substitute_characters(idx, 1.0, 6, seed=0, draw=0).flatten(), minlength=6)
    assert int(counts[0]) == 0 and int(counts[4]) == 0
    assert bool(((counts[[1, 2, 3, 5]].double() / idx.numel() - 0.25).abs() < 0.01).all())


def test_clean_window_scores_average_to_the_evaluated_bpc(net_and_windows) -> None:
    net, inputs, targets = net_and_windows
    per_window = window_bpc(net, inputs, targets, Perturbation("clean"), batch_size=3)
    assert per_window.shape == (10,)
    assert float(per_window.mean()) == pytest.approx(evaluate(net, inputs, targets, batch_size=4)["bpc"], rel=1e-6)


def test_relative_noise_is_absolute_noise_scaled_by_the_embedding_rms(net_and_windows) -> None:
    net, inputs, targets = net_and_windows
    rms = embedding_rms(net, inputs)
    relative = window_bpc(net, inputs, targets, Perturbation("relative_noise", 0.5), draw=1, seed=2)
    absolute = window_bpc(net, inputs, targets, Perturbation("noise", 0.5 * rms), draw=1, seed=2)
    torch.testing.assert_close(relative, absolute)


def test_the_logit_jacobian_norm_estimates_the_exact_norm_per_position_and_keeps_the_callers_random_state(
        net_and_windows) -> None:
    net, inputs, _ = net_and_windows
    idx = inputs[:2]
    x = net.gpt.embed(idx).detach()
    exact = float(torch.autograd.functional.jacobian(net.gpt.decode, x).pow(2).sum()) / idx.numel()
    state = torch.random.get_rng_state()
    estimates = [logit_jacobian_norm(net, idx, seed=s) for s in range(300)]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert logit_jacobian_norm(net, idx, seed=7) == estimates[7]
    assert float(np.mean(estimates)) == pytest.approx(exact, rel=0.05)


def test_the_same_draw_gives_the_same_scores_and_another_draw_other_scores(net_and_windows) -> None:
    net, inputs, targets = net_and_windows
    for p in (Perturbation("noise", 0.3), Perturbation("substitution", 0.2)):
        first = window_bpc(net, inputs, targets, p, draw=0)
        assert torch.equal(first, window_bpc(net, inputs, targets, p, draw=0))
        assert not torch.equal(first, window_bpc(net, inputs, targets, p, draw=1))


@pytest.mark.parametrize("kind, level", [("clean", 0.1), ("noise", 0.0), ("noise", -1.0), ("noise", float("nan")),
                                         ("substitution", 1.5), ("typos", 0.1)])
def test_an_ill_formed_perturbation_is_refused(kind: str, level: float) -> None:
    with pytest.raises(ValueError):
        Perturbation(kind, level)  # type: ignore[arg-type]


def test_a_constant_improvement_has_a_degenerate_interval_below_zero() -> None:
    reference = np.random.default_rng(0).normal(2.0, 0.3, (3, 50))
    interval = paired_bootstrap({"method": reference - 0.1, "reference": reference}, mean_difference, draws=200)
    assert interval.estimate == pytest.approx(-0.1)
    assert interval.low == pytest.approx(-0.1) and interval.high == pytest.approx(-0.1)
    assert verdict(interval) == "better"


def test_the_interval_covers_the_estimate_and_widens_with_noisier_differences() -> None:
    rng = np.random.default_rng(1)
    reference = rng.normal(2.0, 0.3, (3, 200))
    narrow = paired_bootstrap({"method": reference + rng.normal(0.0, 0.01, (3, 200)), "reference": reference},
                              mean_difference, draws=500)
    wide = paired_bootstrap({"method": reference + rng.normal(0.0, 0.5, (3, 200)), "reference": reference},
                            mean_difference, draws=500)
    for iv in (narrow, wide):
        assert iv.low <= iv.estimate <= iv.high
    assert wide.high - wide.low > 5 * (narrow.high - narrow.low)
    assert verdict(narrow) == "not distinguishable"


def test_a_seed_effect_shared_by_both_settings_cancels_in_the_paired_difference() -> None:
    rng = np.random.default_rng(2)
    seed_effect = np.array([[-1.0], [0.0], [1.0]])  # large differences between seeds, the same for both settings
    reference = 2.0 + seed_effect + rng.normal(0.0, 0.05, (3, 100))
    method = reference + 0.05 + rng.normal(0.0, 0.01, (3, 100))
    assert verdict(paired_bootstrap({"method": method, "reference": reference}, mean_difference, draws=500)) == "worse"


def test_the_verdict_reads_the_sign_of_the_interval() -> None:
    assert verdict(Interval(0.2, 0.1, 0.3, 0.95)) == "worse"
    assert verdict(Interval(0.0, -0.1, 0.1, 0.95)) == "not distinguishable"
    assert verdict(Interval(-0.2, -0.3, -0.1, 0.95)) == "better"


def test_arrays_of_different_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        paired_bootstrap({"method": np.zeros((3, 5)), "reference": np.zeros((2, 5))}, mean_difference)
