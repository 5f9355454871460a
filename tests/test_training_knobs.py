"""The training settings a robustness study compares: noise injection, Jacobian regularisation, label smoothing,
a prior on layer-normalised embeddings and a coupling of fixed norm."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from experiments.evaluation import noisy_bpc
from experiments.perturbations import logit_jacobian_norm
from inference.map import MAPTrainer, RunConfig, build_net, empty_guide, jacobian_sq_norm, map_model
from prob_attention.corpus import CharCorpus, bundled_articles, eval_windows


def net_for(**sections: dict) -> torch.nn.Module:
    config = RunConfig.preset("tiny", **sections)
    return build_net(config, config.gpt_config(11))


def test_the_random_projection_estimates_the_squared_jacobian_norm_without_bias(float64: None) -> None:
    torch.manual_seed(0)
    inputs = torch.randn(2, 3, 4, requires_grad=True)
    weight = torch.randn(4, 5)
    outputs = torch.tanh(inputs @ weight)
    exact = torch.autograd.functional.jacobian(lambda x: torch.tanh(x @ weight), inputs).pow(2).sum()
    estimates = torch.stack([jacobian_sq_norm(outputs, inputs).detach() for _ in range(4000)])
    assert float(estimates.mean()) == pytest.approx(float(exact), rel=0.05)


def test_the_jacobian_penalty_enters_the_loss_with_half_its_weight() -> None:
    net = net_for(train={"jacobian_reg": 0.5})
    idx, tgt = torch.randint(0, 11, (2, 32)), torch.randint(0, 11, (2, 32))
    loss = {}
    for reg in (0.0, 0.5):
        pyro.clear_param_store()
        torch.manual_seed(1)
        loss[reg] = Trace_ELBO().differentiable_loss(
            lambda: map_model(net, net, idx, tgt, 0.0, False, jacobian_reg=reg), empty_guide)
    torch.manual_seed(1)
    out = net(idx)
    expected = 0.5 * 0.5 * jacobian_sq_norm(out.logits, out.decoded) / idx.numel()
    torch.testing.assert_close(loss[0.5] - loss[0.0], expected)


def test_the_label_smoothed_objective_is_torchs_label_smoothed_cross_entropy() -> None:
    net = net_for(train={"label_smoothing": 0.1})
    idx, tgt = torch.randint(0, 11, (2, 32)), torch.randint(0, 11, (2, 32))
    pyro.clear_param_store()
    loss = Trace_ELBO().differentiable_loss(
        lambda: map_model(net, net, idx, tgt, 0.0, False, label_smoothing=0.1), empty_guide)
    logits = net(idx).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), tgt.reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)


def test_noise_is_injected_into_the_decoded_embeddings_in_training_only_and_the_prior_sees_clean_ones() -> None:
    idx = torch.randint(0, 11, (2, 32))
    noisy = net_for(train={"embed_noise": 0.5, "lambda_m": 0.1})
    clean = net_for(train={"lambda_m": 0.1})
    train_out, clean_out = noisy.train()(idx), clean.train()(idx)
    assert not torch.allclose(train_out.logits, clean_out.logits)
    torch.testing.assert_close(train_out.prior_log_density, clean_out.prior_log_density)
    torch.testing.assert_close(noisy.eval()(idx).logits, clean.eval()(idx).logits)


def test_a_prior_on_layer_normalised_embeddings_cannot_be_moved_by_scaling_them() -> None:
    idx = torch.randint(0, 11, (2, 32))
    for input_norm, invariant in ((True, True), (False, False)):
        net = net_for(prior={"input_norm": input_norm}, train={"lambda_m": 0.1})
        before = net(idx).prior_log_density
        with torch.no_grad():
            net.gpt.wte.weight.mul_(3.0)
            net.gpt.wpe.weight.mul_(3.0)  # x = wte(idx) + wpe(t) grows threefold
        after = net(idx).prior_log_density
        assert torch.allclose(before, after, rtol=1e-3, atol=1e-4) == invariant


def test_a_fixed_coupling_norm_holds_through_training_and_a_checkpoint(tmp_path) -> None:
    articles = bundled_articles()
    corpus = CharCorpus("slice", "".join(articles[:2])[:20_000], articles[3][:2_000], articles[4][:2_000])
    config = RunConfig.preset("tiny", prior={"coupling": "barrier", "coupling_norm": 2.0}, train={"lambda_m": 0.1})
    trainer = MAPTrainer(config, tmp_path / "run", corpus, progress=False, log=lambda _: None)
    history = trainer.fit()
    norms = trainer.net.transform.w_k.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 2.0))
    assert history[-1]["val_barrier"] <= 0.0  # A = W_k^T W_k >= 0: every log det J_tt <= 0
    rebuilt = build_net(config, trainer.gpt_config)
    rebuilt.load_state_dict(trainer.net.state_dict())
    torch.testing.assert_close(rebuilt.transform.w_k, trainer.net.transform.w_k)


STEPS_PER_EPOCH = 20
"""Steps per epoch of the runs below (the tiny preset's 5 leave the model near uniform; 2 x 20 take seconds)."""


def fit(**sections: dict) -> tuple[MAPTrainer, list[dict]]:
    """A tiny run (seed 0) on a slice of the bundled corpus with ``sections`` over the preset; the trainer and history."""
    articles = bundled_articles()
    corpus = CharCorpus("slice", "".join(articles[:2])[:20_000], articles[3][:2_000], articles[4][:2_000])
    train = {"steps_per_epoch": STEPS_PER_EPOCH, **sections.pop("train", {})}
    trainer = MAPTrainer(RunConfig.preset("tiny", train=train, **sections), None, corpus, progress=False,
                         log=lambda _: None)
    history = trainer.fit()
    assert all(math.isfinite(r["val_bpc"]) for r in history)
    return trainer, history


def validation_windows(trainer: MAPTrainer) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 16 validation windows and their next characters."""
    inputs, targets = eval_windows(trainer.data.val, trainer.block)
    return inputs[:16], targets[:16]


def predictive_entropy(trainer: MAPTrainer) -> float:
    """Mean entropy (nats) of the next-character distribution over the validation windows' positions."""
    inputs, _ = validation_windows(trainer)
    trainer.net.eval()
    with torch.no_grad():
        log_p = torch.log_softmax(trainer.net(inputs).logits.float(), dim=-1)
    return float(-(log_p.exp() * log_p).sum(-1).mean())


def noise_degradation(trainer: MAPTrainer, sigma: float) -> float:
    """Validation BPC under embedding noise of scale ``sigma`` (three draws) minus the clean BPC."""
    inputs, targets = validation_windows(trainer)
    noisy = noisy_bpc(trainer.net, inputs, targets, sigma, draws=3)
    return sum(noisy) / len(noisy) - noisy_bpc(trainer.net, inputs, targets, 0.0)[0]


@pytest.fixture(scope="module")
def ce_only() -> MAPTrainer:
    """The CE-only run every setting is compared with (same seed, same batches)."""
    return fit()[0]


def test_jacobian_regularisation_ends_with_a_smaller_logit_jacobian_than_the_same_run_without_it(
        ce_only: MAPTrainer) -> None:
    regularised, _ = fit(train={"jacobian_reg": 0.01})
    inputs, _ = validation_windows(ce_only)
    assert logit_jacobian_norm(regularised.net, inputs) < 0.5 * logit_jacobian_norm(ce_only.net, inputs)


def test_noise_injection_degrades_less_under_embedding_noise_than_the_same_run_without_it(
        ce_only: MAPTrainer) -> None:
    injected, _ = fit(train={"embed_noise": 0.05})
    assert noise_degradation(injected, 0.1) < 0.5 * noise_degradation(ce_only, 0.1)


def test_label_smoothing_ends_with_a_higher_predictive_entropy_than_the_same_run_without_it(
        ce_only: MAPTrainer) -> None:
    smoothed, _ = fit(train={"label_smoothing": 0.1})
    assert predictive_entropy(smoothed) > predictive_entropy(ce_only) + 1e-3


def test_a_margin_barrier_on_layer_normalised_embeddings_ends_with_a_higher_barrier_than_without_its_weight() -> None:
    _, barrier = fit(prior={"input_norm": True}, train={"lambda_m": 0.05})
    _, unweighted = fit(prior={"input_norm": True})
    assert barrier[-1]["val_barrier"] > unweighted[-1]["val_barrier"]


def test_the_full_density_learns_sigma_down_from_its_initial_value_towards_the_residual_scale() -> None:
    _, history = fit(prior={"coupling": "barrier", "density": "full", "learn_sigma": True, "sigma": 1.0},
                     train={"lambda_m": 0.05})
    assert history[-1]["sigma"] < history[0]["sigma"] < 1.0  # the residuals' scale is far below 1


@pytest.mark.parametrize("field, value", [("embed_noise", -0.1), ("jacobian_reg", float("nan")),
                                          ("label_smoothing", 1.0)])
def test_a_negative_or_undefined_strength_is_refused(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        RunConfig.preset("tiny", train={field: value})


def test_a_non_positive_coupling_norm_is_refused() -> None:
    with pytest.raises(ValueError, match="coupling_norm"):
        RunConfig.preset("tiny", prior={"coupling_norm": 0.0})
