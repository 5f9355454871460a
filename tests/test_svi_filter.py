"""The filtering SVI posterior: the exact first position, the particle filter's conditioning, the ELBO, diagnostics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pyro.infer import Trace_ELBO
from tiny_models import random_model

from inference.posterior import SVIConfig, convergence, to_inference_data
from inference.smc import TrajectorySMC
from inference.svi_filter import SVIFilter, elbo_settling, filter_draws
from inference.trajectory import TrajectoryModel

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny ops

GUIDES = ["normal", "lowrank"]


@pytest.mark.parametrize("guide", GUIDES)
def test_the_first_prediction_comes_from_the_exact_gaussian_posterior_of_the_first_embedding(guide: str) -> None:
    """At the first position the prior is ``N(0, sigma^2 I)`` (no context, ``J_11 = I``) and no next character is
    observed yet, so ``p(x_1 | embed(y)_1) = N(r embed(y)_1, r tau^2 I)``, ``r = sigma^2 / (sigma^2 + tau^2)``: both
    guide families hold it, and the fitted guide and its predictive must match it within Monte Carlo error."""
    tm = random_model(weight_scale=0.5)
    x = torch.randn(5, 1, 4)
    latent = torch.distributions.Normal(0.0, tm.sigma)
    torch.testing.assert_close(tm.prior(1).log_prob(x), latent.log_prob(x).sum((1, 2)))
    svi = SVIFilter(tm, SVIConfig(guide, steps=500, lr=0.02, num_particles=16, rank=2), num_samples=4000)
    signals = svi.run(torch.tensor([2]))[0]

    r = tm.sigma**2 / (tm.sigma**2 + tm.tau**2)
    anchor = tm.anchors(torch.tensor([2]))[0]
    exact_mean, exact_sd = r * anchor, math.sqrt(r) * tm.tau
    assert (anchor - exact_mean).abs().max() > 0.5 * exact_sd  # the guide starts at the anchor, away from the answer
    draws = svi.distribution().sample((20_000,))[:, 0]  # (n, d)
    assert torch.all((draws.mean(0) - exact_mean).abs() < 0.2 * exact_sd)  # Adam's noise floor: ~0.1 sd
    assert torch.all((draws.std(0) / exact_sd - 1).abs() < 0.15)
    exact = exact_mean + exact_sd * torch.randn(20_000, 1, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact_predictive = torch.softmax(tm.next_char_logits(exact)[:, -1].double(), dim=-1).mean(0)
    torch.testing.assert_close(signals.probs, exact_predictive, rtol=0, atol=0.01)


def test_each_prediction_conditions_on_what_the_particle_filter_has_read() -> None:
    """At the prediction of position ``t``, both filters have read ``y_1..y_t`` and observed the given next characters
    before ``t`` (here not the text's own, and fewer than the text): the SVI filter fits ``model(idx[:t+1],
    next_chars[:t])``, at every step of the refit."""
    base = random_model(weight_scale=0.5)
    fitted: list[tuple[list[int], list[int]]] = []

    class Spy(TrajectoryModel):
        def model(self, idx: torch.Tensor, next_chars: torch.Tensor | None = None,
                  anchors: torch.Tensor | None = None) -> torch.Tensor:
            fitted.append((idx.tolist(), next_chars.tolist()))
            return super().model(idx, next_chars, anchors)

    class RecordingSMC(TrajectorySMC):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.observed: list[int] = []
            self.at_predict: list[tuple[list[int], list[int]]] = []

        def observe(self, next_char: int) -> None:
            self.observed.append(int(next_char))
            super().observe(next_char)

        def predict(self):
            self.at_predict.append((list(self.tokens), list(self.observed)))
            return super().predict()

    tm = Spy(base.gpt, base.transform, base.sigma, base.tau)
    idx, next_chars = torch.tensor([1, 2, 3, 4, 0]), torch.tensor([3, 0, 2])
    expected = [(idx[: t + 1].tolist(), next_chars[:t].tolist()) for t in range(idx.shape[0])]
    smc = RecordingSMC(tm, num_particles=8)
    smc.run(idx, next_chars)
    assert smc.at_predict == expected
    SVIFilter(tm, SVIConfig("normal", steps=2), num_samples=4).run(idx, next_chars)
    assert fitted == [call for call in expected for _ in range(2)]


@pytest.mark.parametrize("guide", GUIDES)
def test_more_steps_per_position_do_not_raise_the_negative_elbo(guide: str) -> None:
    tm = random_model(weight_scale=0.5)
    idx = torch.tensor([1, 2, 3, 4, 0, 2])
    elbo = Trace_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=0)
    loss = {}
    for steps in (1, 40):
        svi = SVIFilter(tm, SVIConfig(guide, steps=steps, lr=0.05, rank=2), num_samples=4)
        svi.run(idx)
        with torch.no_grad():
            loss[steps] = elbo.loss(tm.model, svi.guide, *svi.data)
    assert loss[40] < loss[1]


def test_a_refit_continues_from_the_previous_guide_and_adds_one_block_per_character() -> None:
    tm = random_model(weight_scale=0.5)
    svi = SVIFilter(tm, SVIConfig("normal", steps=3), num_samples=4)
    svi.extend(1)
    svi.predict()
    before = svi.distribution().mean.clone()
    svi.observe(2)
    svi.extend(2)
    assert torch.equal(svi.distribution().mean[:1], before)  # read, not yet refitted
    torch.testing.assert_close(svi.distribution().mean[1], tm.anchors(torch.tensor([1, 2]))[1])
    svi.predict()
    svi.predict()  # nothing new read: no refit
    assert [len(fit) for fit in svi.losses] == [3, 3] and len(svi.filtered) == 3


def test_the_filter_refuses_observing_before_reading_and_reading_past_the_context() -> None:
    svi = SVIFilter(random_model(block=2), SVIConfig("normal", steps=1))
    with pytest.raises(ValueError, match="extend"):
        svi.observe(1)
    with pytest.raises(ValueError, match="extend"):
        svi.predict()
    svi.extend(1)
    svi.extend(2)
    with pytest.raises(ValueError, match="full"):
        svi.extend(3)


def test_elbo_settling_flags_a_falling_loss_and_not_a_noisy_flat_one() -> None:
    rng = np.random.default_rng(0)
    falling, flat = np.linspace(10.0, 0.0, 8) + 0.1 * rng.standard_normal(8), rng.standard_normal(8)
    drop, unsettled = elbo_settling([falling.tolist(), flat.tolist()])
    assert drop[0] == pytest.approx(falling[:4].mean() - falling[4:].mean())
    assert unsettled.tolist() == [True, False]
    with pytest.raises(ValueError, match="2 steps"):
        elbo_settling([[1.0]])


def test_seeded_filters_become_arviz_chains_of_each_newest_position() -> None:
    tm = random_model(weight_scale=0.5)
    draws = filter_draws(tm, torch.tensor([1, 2, 3]), config=SVIConfig("normal", steps=3), chains=2, draws=30)
    assert draws.shape == (2, 30, 3, 4)
    assert not torch.equal(draws[0], draws[1])  # the seeds differ
    summary = convergence(to_inference_data(draws))
    assert summary["ess_bulk_min"] > 0 and math.isfinite(summary["rhat_max"])
    assert summary["rhat_median"] <= summary["rhat_max"]
