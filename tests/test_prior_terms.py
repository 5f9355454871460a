"""The embedding prior is the single source of its per-position terms: the MAP objective, the held-out
diagnostics and the posterior's margins all read them from :class:`EmbeddingPrior`."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from pyro.distributions import TransformedDistribution

from inference.map import RunConfig, build_net, evaluate, map_model
from inference.trajectory import TrajectoryModel
from prob_attention import CausalAttentionTransform, EmbeddingPrior, safe_log_barrier
from prob_attention.gpt import GPTConfig, SmallGPT


def test_position_terms_sum_to_the_change_of_variables_log_density(float64: None) -> None:
    torch.manual_seed(0)
    transform = CausalAttentionTransform(4, n_heads=2, head_dim=2, value_proj=True, output_proj=True)
    prior = EmbeddingPrior(transform, seq_len=6, sigma=0.7)
    x = 0.5 * torch.randn(3, 6, 4)
    generic = TransformedDistribution(prior.base_dist, [transform]).log_prob(x)  # base(T^-1 x) - log|dx/dz|
    terms = prior.position_terms(x)
    torch.testing.assert_close(terms.log_density.sum(-1), generic)
    torch.testing.assert_close(prior.log_prob(x), generic)
    torch.testing.assert_close(prior.barrier(x), terms.log_det.sum(-1))
    torch.testing.assert_close(prior.residual_log_prob(x), terms.residual.sum(-1))


def test_later_positions_of_a_growing_sequence_score_as_in_the_whole_sequence(float64: None) -> None:
    torch.manual_seed(1)
    prior = EmbeddingPrior(CausalAttentionTransform(3, head_dim=2), seq_len=5, barrier_floor=1e-3)
    x = torch.randn(2, 5, 3)
    whole, tail = prior.position_terms(x), prior.position_terms(x, start=3)
    torch.testing.assert_close(tail.residual, whole.residual[:, 3:])
    torch.testing.assert_close(tail.log_det, whole.log_det[:, 3:])
    assert torch.equal(tail.clamped, whole.clamped[:, 3:])


def test_a_barrier_floor_continues_the_log_det_by_its_tangent_and_leaves_the_rest_exact(float64: None) -> None:
    torch.manual_seed(2)
    transform = CausalAttentionTransform(3, head_dim=3, coupling="free", init_scale=2.0)
    x = 2.0 * torch.randn(64, 6, 3)
    exact = EmbeddingPrior(transform, 6).position_terms(x)
    floored = EmbeddingPrior(transform, 6, barrier_floor=1e-2).position_terms(x)
    expected, clamped = safe_log_barrier(*transform.log_abs_det_blocks(x), floor=1e-2)
    assert bool(clamped.any()) and bool((~clamped).any())
    torch.testing.assert_close(floored.log_det, expected)
    assert torch.equal(floored.clamped, clamped)
    torch.testing.assert_close(floored.log_det[~clamped], exact.log_det[~clamped])
    torch.testing.assert_close(floored.residual, exact.residual)
    assert bool(torch.isfinite(floored.log_det).all())


def test_a_barrier_floor_must_be_positive() -> None:
    with pytest.raises(ValueError, match="barrier_floor"):
        EmbeddingPrior(CausalAttentionTransform(2), 3, barrier_floor=0.0)


@pytest.mark.parametrize("density", ["margin", "full"])
def test_the_map_objectives_prior_site_is_the_runs_prior_observed_at_the_embeddings_per_token(density: str) -> None:
    """``factor(lambda_m * mean_t log p(x_t | x_<t))`` is ``sample("embeddings", prior, obs=x)`` scaled by
    ``lambda_m / (B T)`` for the full density, and the prior's barrier for the margin-only one."""
    config = RunConfig.preset("tiny", prior={"density": density, "learn_sigma": density == "full"},
                              train={"lambda_m": 0.3})
    net = build_net(config, config.gpt_config(11))
    idx, tgt = torch.randint(0, 11, (2, 32)), torch.randint(0, 11, (2, 32))
    pyro.clear_param_store()
    trace = poutine.trace(lambda: map_model(net, net, idx, tgt, 0.3, False)).get_trace()
    factor = trace.nodes["embedding_prior"]["fn"].log_prob(trace.nodes["embedding_prior"]["value"])

    x = net.gpt.embed(idx)
    prior = net.embedding_prior(32)
    if density == "full":
        def observed() -> None:
            with pyro.plate("windows", 2), poutine.scale(scale=0.3 / x.shape[:2].numel()):
                pyro.sample("embeddings", prior, obs=x)

        expected = poutine.trace(observed).get_trace().log_prob_sum()
    else:
        expected = 0.3 * prior.barrier(x).sum() / x.shape[:2].numel()
    torch.testing.assert_close(factor, expected)


def test_held_out_sequence_margins_skip_the_first_two_positions() -> None:
    config = RunConfig.preset("tiny")
    net = build_net(config, config.gpt_config(11))
    idx, tgt = torch.randint(0, 11, (3, 32)), torch.randint(0, 11, (3, 32))
    scores = evaluate(net, idx, tgt, batch_size=2)
    with torch.no_grad():
        log_det, _ = net.embedding_prior(32).log_det_terms(net.gpt.embed(idx))
    assert log_det[:, :2].abs().max() < 1e-5  # no or one attended value: det J_tt = 1
    torch.testing.assert_close(scores["informative_seq_margin_min"], float(log_det[:, 2:].amin()))
    assert "seq_margin_min" not in scores


def test_posterior_margins_use_the_runs_barrier_floor() -> None:
    torch.manual_seed(3)
    gpt = SmallGPT(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=1, n_embd=4))
    transform = CausalAttentionTransform(4, head_dim=2)
    x = torch.randn(2, 6, 4)
    loose = TrajectoryModel(gpt, transform, sigma=1.0, tau=0.5, barrier_floor=1e3)  # every position clamped
    strict = TrajectoryModel(gpt, transform, sigma=1.0, tau=0.5)
    expected, clamped = safe_log_barrier(*transform.log_abs_det_blocks(x), floor=1e3)
    assert bool(clamped.all())
    torch.testing.assert_close(loose.margins(x), expected)
    assert not torch.allclose(strict.margins(x), loose.margins(x))


def test_a_trajectory_model_rejects_a_non_positive_floor() -> None:
    gpt = SmallGPT(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=1, n_embd=4))
    with pytest.raises(ValueError, match="barrier_floor"):
        TrajectoryModel(gpt, CausalAttentionTransform(4), sigma=1.0, tau=0.5, barrier_floor=-1.0)


def test_decoding_uses_the_runs_barrier_floor_and_refuses_a_prior_on_normalised_embeddings() -> None:
    from experiments.decode import trajectory_model
    from inference.map import TrainedModel

    for prior, ok in (({"barrier_floor": 0.05}, True), ({"input_norm": True}, False)):
        config = RunConfig.preset("tiny", prior=prior)
        gpt_config = config.gpt_config(11)
        trained = TrainedModel(build_net(config, gpt_config), None, config, gpt_config, "test", [])  # type: ignore[arg-type]
        if ok:
            assert trajectory_model(trained, sigma=1.0, tau_ratio=0.5).barrier_floor == 0.05
        else:
            with pytest.raises(ValueError, match="input_norm"):
                trajectory_model(trained, sigma=1.0, tau_ratio=0.5)
