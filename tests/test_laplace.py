"""Properties of the last-layer KFAC Laplace approximation (experiments/laplace.py), in float64 at tiny sizes."""

import math

import pytest
import torch

from experiments.laplace import PRIOR_PRECISION_GRID, LastLayerLaplace, fit_prior_precision
from prob_attention.gpt import GPTConfig, SmallGPT
from prob_attention.weighted_moments import entropy

pytestmark = pytest.mark.usefixtures("float64", "one_thread")

V, D = 4, 3


def random_laplace(n: int = 5, prior_precision: float = 1.0, seed: int = 0) -> LastLayerLaplace:
    """A posterior for a random output map ``(V, D)`` fitted on ``n`` random features."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, D, generator=gen)
    phi = torch.randn(n, D, generator=gen)
    return LastLayerLaplace.from_features(weight, phi, prior_precision)


def tiny_gpt(seed: int = 0) -> SmallGPT:
    torch.manual_seed(seed)
    return SmallGPT(GPTConfig(vocab_size=7, block_size=8, n_layer=1, n_head=1, n_embd=8)).double().eval()


@pytest.mark.parametrize("delta", [0.1, 1.0, 30.0])
def test_logit_covariance_from_eigen_formula_equals_brute_force_inverse(delta):
    laplace = random_laplace(n=5, prior_precision=delta)
    precision = laplace.positions * torch.kron(laplace.g_factor, laplace.a_factor) + delta * torch.eye(V * D)
    sigma = torch.linalg.inv(precision)  # (V D, V D), row-major vec(W)
    phi_star = torch.randn(2, 3, D)  # batch x time x d
    m = laplace.logit_variances(phi_star)
    assert m.shape == (2, 3, V)
    for b in range(2):
        for t in range(3):
            jac = torch.kron(torch.eye(V), phi_star[b, t][None, :])  # (V, V D): df/dvec(W)
            brute = jac @ sigma @ jac.T
            eigen = laplace.vec_g @ torch.diag(m[b, t]) @ laplace.vec_g.T
            torch.testing.assert_close(eigen, brute, rtol=1e-9, atol=1e-12)


def test_kfac_is_exact_hessian_of_softmax_nll_for_one_position():
    gen = torch.Generator().manual_seed(1)
    weight, phi, target = torch.randn(V, D, generator=gen), torch.randn(D, generator=gen), 2
    laplace = LastLayerLaplace.from_features(weight, phi[None])
    assert laplace.positions == 1

    def nll(w: torch.Tensor) -> torch.Tensor:
        return -torch.log_softmax(w @ phi, dim=-1)[target]

    hessian = torch.autograd.functional.hessian(nll, weight).reshape(V * D, V * D)  # row-major vec(W)
    torch.testing.assert_close(torch.kron(laplace.g_factor, laplace.a_factor), hessian, rtol=1e-9, atol=1e-12)


def test_logit_samples_have_the_laplace_covariance():
    laplace = random_laplace(n=5, prior_precision=0.5)
    phi = torch.randn(D)
    f = laplace.sample_logits(phi, 20_000, torch.Generator().manual_seed(0))  # (S, V)
    cov = laplace.vec_g @ torch.diag(laplace.logit_variances(phi)) @ laplace.vec_g.T
    torch.testing.assert_close(f.mean(0), laplace.weight @ phi, rtol=0, atol=0.05 * cov.diag().max().sqrt())
    torch.testing.assert_close(torch.cov(f.T), cov, rtol=0, atol=0.05 * cov.abs().max())


def test_predictive_tends_to_map_softmax_as_prior_precision_grows_and_is_uncertain_when_small():
    laplace = random_laplace(n=5)
    phi = torch.randn(6, D)
    map_probs = torch.softmax(phi @ laplace.weight.T, dim=-1)
    mean, probs = laplace.with_prior_precision(1e12).predictive(phi, samples=8)
    torch.testing.assert_close(mean, map_probs, rtol=0, atol=1e-5)
    torch.testing.assert_close(probs, map_probs.expand_as(probs), rtol=0, atol=1e-5)

    mean, probs = laplace.with_prior_precision(1e-2).predictive(phi, samples=64)
    mutual_information = entropy(mean) - entropy(probs).mean(0)  # (6,), nats
    assert (mutual_information > 1e-3).all()


def test_fit_on_tiny_gpt_matches_direct_curvature_and_features_reproduce_decode():
    gpt = tiny_gpt()
    inputs = torch.randint(0, 7, (5, 8))
    laplace = LastLayerLaplace.fit(gpt, inputs, batch_size=2)  # three batches, the last one short
    assert laplace.positions == 5 * 8
    torch.testing.assert_close(laplace.weight, gpt.lm_head.weight)
    assert laplace.weight.data_ptr() != gpt.lm_head.weight.data_ptr()

    x = gpt.embed(inputs)
    phi = gpt.features(x)  # (5, 8, 8)
    assert torch.equal(gpt.lm_head(phi), gpt.decode(x))

    g, a = laplace.g_factor, laplace.a_factor
    torch.testing.assert_close(g.sum(-1), torch.zeros(7), rtol=0, atol=1e-12)  # softmax is shift-invariant
    for factor in (g, a):
        torch.testing.assert_close(factor, factor.T, rtol=0, atol=1e-14)
        assert torch.linalg.eigvalsh(factor).min() > -1e-12
    p = torch.softmax(gpt.decode(x), -1).reshape(-1, 7)  # (N, V)
    flat = phi.reshape(-1, 8)
    direct_g = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    torch.testing.assert_close(g, direct_g, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a, flat.T @ flat / flat.shape[0], rtol=1e-9, atol=1e-12)


def test_the_curvature_estimated_on_a_sample_scales_to_all_the_training_positions():
    gpt = tiny_gpt()
    inputs = torch.randint(0, 7, (5, 8))
    sample, scaled = LastLayerLaplace.fit(gpt, inputs), LastLayerLaplace.fit(gpt, inputs, positions=4000)
    assert scaled.positions == 4000 and sample.positions == 40
    torch.testing.assert_close(scaled.g_factor, sample.g_factor)
    phi = gpt.features(gpt.embed(inputs[:1])).detach()
    # the data term grows 100-fold: with a negligible prior the logit variances shrink 100-fold, except along G's
    # null direction (a shift of every logit, which the softmax ignores), where only the prior acts
    tiny, curved = 1e-9, sample.eig_g > 1e-8
    torch.testing.assert_close(scaled.with_prior_precision(tiny).logit_variances(phi)[..., curved] * 100,
                               sample.with_prior_precision(tiny).logit_variances(phi)[..., curved], rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="positions"):
        LastLayerLaplace.fit(gpt, inputs, positions=0)


def test_fit_prior_precision_returns_a_grid_value_and_a_finite_curve():
    gpt = tiny_gpt()
    inputs = torch.randint(0, 7, (4, 8))
    laplace = LastLayerLaplace.fit(gpt, inputs)
    phi = gpt.features(gpt.embed(inputs[:2])).detach()
    targets = torch.randint(0, 7, (2, 8))
    best, curve = fit_prior_precision(laplace, phi, targets, samples=8)
    assert best in PRIOR_PRECISION_GRID
    assert list(curve) == list(PRIOR_PRECISION_GRID)
    assert all(math.isfinite(nll) and nll > 0 for nll in curve.values())
    assert curve[best] == min(curve.values())
    assert PRIOR_PRECISION_GRID[0] <= 1e-2 and PRIOR_PRECISION_GRID[-1] >= 1e6


BAD_CALLS = {
    "feature dim": lambda lap, gpt, phi, y: lap.logit_variances(torch.randn(2, D + 1)),
    "scalar features": lambda lap, gpt, phi, y: lap.logit_variances(torch.tensor(1.0)),
    "non-finite features": lambda lap, gpt, phi, y: lap.predictive(torch.tensor([[0.0, math.nan, 1.0]])),
    "integer features": lambda lap, gpt, phi, y: lap.predictive(torch.ones(2, D, dtype=torch.long)),
    "zero samples": lambda lap, gpt, phi, y: lap.predictive(phi, samples=0),
    "zero delta": lambda lap, gpt, phi, y: lap.with_prior_precision(0.0),
    "negative delta": lambda lap, gpt, phi, y: lap.with_prior_precision(-1.0),
    "targets shape": lambda lap, gpt, phi, y: fit_prior_precision(lap, phi, y[:, :2]),
    "targets range": lambda lap, gpt, phi, y: fit_prior_precision(lap, phi, y + V),
    "float targets": lambda lap, gpt, phi, y: fit_prior_precision(lap, phi, y.double()),
    "empty grid": lambda lap, gpt, phi, y: fit_prior_precision(lap, phi, y, grid=()),
    "grid value": lambda lap, gpt, phi, y: fit_prior_precision(lap, phi, y, grid=(1.0, 0.0)),
    "grid samples": lambda lap, gpt, phi, y: fit_prior_precision(lap, phi, y, samples=0),
    "fit inputs 1-D": lambda lap, gpt, phi, y: LastLayerLaplace.fit(gpt, torch.randint(0, 7, (8,))),
    "fit batch size": lambda lap, gpt, phi, y: LastLayerLaplace.fit(gpt, torch.randint(0, 7, (2, 8)), batch_size=0),
    "fit prior": lambda lap, gpt, phi, y: LastLayerLaplace.fit(gpt, torch.randint(0, 7, (2, 8)), prior_precision=0.0),
    "no features": lambda lap, gpt, phi, y: LastLayerLaplace.from_features(lap.weight, torch.randn(0, D)),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_inputs_raise_value_error(case):
    phi, targets = torch.randn(2, 3, D), torch.randint(0, V, (2, 3))
    with pytest.raises(ValueError):
        BAD_CALLS[case](random_laplace(), tiny_gpt(), phi, targets)


def test_seeded_predictive_is_reproducible():
    laplace = random_laplace()
    phi = torch.randn(2, 3, D)
    mean, probs = laplace.predictive(phi, samples=5, seed=7)
    again_mean, again_probs = laplace.predictive(phi, samples=5, seed=7)
    assert torch.equal(mean, again_mean) and torch.equal(probs, again_probs)
    assert probs.shape == (5, 2, 3, V)
    assert not torch.equal(probs, laplace.predictive(phi, samples=5, seed=8)[1])
