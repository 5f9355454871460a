"""The embedding prior, margins and support tokens, the scalar case, and the paper's structural results."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from reference import autograd_jacobian
from torch.autograd.functional import jacobian

from prob_attention import (
    CausalAttentionTransform,
    EmbeddingPrior,
    attention_covariance,
    attention_entropy,
    attention_weights,
    conditional_log_prob,
    log_det_margin,
    safe_log_barrier,
    scalar_margin,
    scalar_transform,
    sequence_margin,
    singular_margin,
    spectral_margin,
    support_tokens,
)
from prob_attention.weighted_moments import weighted_cross_covariance, weighted_variance


def grid_sequences(t_len: int, lo: float, hi: float, n: int):
    """All length-``t_len`` scalar sequences on an ``n``-point grid, shape ``(n**t_len, t_len, 1)``, and the cell volume."""
    axis = torch.linspace(lo, hi, n)
    mesh = torch.stack(torch.meshgrid(*[axis] * t_len, indexing="ij"), dim=-1)
    return mesh.reshape(-1, t_len, 1), ((hi - lo) / (n - 1)) ** t_len


# ------------------------------------------------------------------------------------------ the prior
def test_log_prob_is_gaussian_residual_plus_barrier(float64):
    torch.manual_seed(0)
    prior = EmbeddingPrior(CausalAttentionTransform(4, 2, 1), seq_len=6, sigma=0.7)
    x = torch.randn(3, 6, 4)
    z = prior.transform.inv(x)
    expected = dist.Normal(0.0, 0.7).log_prob(z).sum((-1, -2)) + prior.barrier(x)
    torch.testing.assert_close(prior.log_prob(x), expected)
    torch.testing.assert_close(prior.residual_log_prob(x) + prior.barrier(x), expected)


@pytest.mark.parametrize("t_len", [2, 3])
def test_repulsive_prior_integrates_to_one(float64, t_len):
    transform = scalar_transform(1.5, -1.5)  # beta = -2.25 < 0: a guaranteed bijection
    prior = EmbeddingPrior(transform, seq_len=t_len, sigma=1.0)
    x, cell = grid_sequences(t_len, -9.0, 9.0, 181 if t_len == 2 else 91)
    mass = (prior.log_prob(x).exp().sum() * cell).item()
    assert mass == pytest.approx(1.0, abs=2e-3)


def test_barrier_regime_folds_and_the_formula_overcounts_there(float64, capsys):
    """Positive coupling: the map folds. The change-of-variables formula, taken over the region
    ``det J_tt > 0`` only, integrates to 1 + (mass on the folded region): it is not a density there.
    The signed integral of ``N(z(x)) det(dz/dx)`` is exactly 1 (the map is proper, of degree one)."""
    transform = scalar_transform(1.5, 1.5)  # beta = 2.25 > 0
    prior = EmbeddingPrior(transform, seq_len=3, sigma=1.0)
    x, cell = grid_sequences(3, -9.0, 9.0, 91)
    logabs, sign = transform.log_abs_det_blocks(x)
    unfolded = (sign > 0).all(-1)
    density = (prior.residual_log_prob(x) + logabs.sum(-1)).exp() * cell  # eq. 11 taken everywhere, folds included
    folded_mass = density[~unfolded].sum().item()
    with capsys.disabled():
        print(f"\n[barrier regime, beta=2.25, T=3] grid fraction with some det J_tt <= 0: "
              f"{1 - unfolded.double().mean():.4f}; formula mass on det>0: {density[unfolded].sum():.4f}; "
              f"on the folded region: {folded_mass:.4f}")
    assert folded_mass > 1e-3
    signed = (density * sign.prod(-1)).sum().item()
    assert signed == pytest.approx(1.0, abs=2e-3)


def test_prior_samples_score_and_serve_as_pyro_sites(float64):
    torch.manual_seed(0)
    prior = EmbeddingPrior(CausalAttentionTransform(3, coupling="repulsive"), seq_len=5)

    def model():
        pyro.module("attention_prior", prior.transform)
        x = pyro.sample("x", prior)
        pyro.factor("barrier", prior.barrier(x))
        return x

    trace = pyro.poutine.trace(model).get_trace()
    x = trace.nodes["x"]["value"]
    assert x.shape == (5, 3)
    torch.testing.assert_close(trace.nodes["x"]["fn"].log_prob(x), prior.log_prob(x))
    assert "attention_prior$$$w_k" in pyro.get_param_store()
    pyro.clear_param_store()


def test_rsample_is_differentiable_in_the_parameters(float64):
    transform = CausalAttentionTransform(3, coupling="repulsive")
    x = EmbeddingPrior(transform, seq_len=4).rsample((2,))
    x.sum().backward()
    assert transform.w_k.grad is not None and transform.w_k.grad.abs().sum() > 0


def test_conditionals_multiply_to_the_joint(float64):
    torch.manual_seed(0)
    transform = CausalAttentionTransform(3, 1, 2, include_current=True)
    prior = EmbeddingPrior(transform, seq_len=4, sigma=0.5)
    x = 0.5 * torch.randn(4, 3)  # on the support (every det J_tt > 0), where log_prob is eq. 11
    total = sum(conditional_log_prob(transform, x[:t], x[t : t + 1], 0.5)[0] for t in range(4))
    torch.testing.assert_close(total, prior.log_prob(x))


def test_with_length_keeps_the_transform():
    prior = EmbeddingPrior(CausalAttentionTransform(3), seq_len=4)
    longer = prior.with_length(7)
    assert longer.transform is prior.transform and longer.event_shape == (7, 3)
    with pytest.raises(ValueError, match="seq_len"):
        prior.with_length(0)


# ------------------------------------------------------------------------ structural results (paper)
def test_prefix_consistency_under_strict_causality(float64):
    """Theorem 2: integrating out x_3 from the length-3 law gives the length-2 law."""
    transform = scalar_transform(1.2, -0.8)
    p2, p3 = EmbeddingPrior(transform, 2), EmbeddingPrior(transform, 3)
    prefix = torch.tensor([[0.4], [-1.1]])
    grid = torch.linspace(-10, 10, 2001).unsqueeze(-1)
    seqs = torch.cat([prefix.expand(len(grid), 2, 1), grid.unsqueeze(1)], dim=1)
    marginal = torch.trapezoid(p3.log_prob(seqs).exp(), grid[:, 0])
    torch.testing.assert_close(marginal, p2.log_prob(prefix).exp(), rtol=1e-6, atol=0)


def _noncausal_log_prob(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Scalar attention over all positions (not causal), values 0.5 x: ``z_t = x_t - 0.5 sum_s alpha_ts x_s``."""

    def residual(seq):
        alpha = torch.softmax(beta * seq[:, None] * seq[None, :], dim=-1)
        return seq - 0.5 * alpha @ seq

    out = []
    for seq in x:
        jac = torch.autograd.functional.jacobian(residual, seq)
        out.append(dist.Normal(0.0, 1.0).log_prob(residual(seq)).sum() + torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


def test_noncausal_attention_breaks_prefix_consistency(float64):
    """Proposition 2: with non-causal attention the length-2 marginal of the length-3 law differs."""
    prefix = torch.tensor([0.4, -1.1])
    grid = torch.linspace(-10, 10, 801)
    seqs = torch.cat([prefix.expand(len(grid), 2), grid.unsqueeze(1)], dim=1)
    marginal = torch.trapezoid(_noncausal_log_prob(seqs, 1.0).exp(), grid)
    direct = _noncausal_log_prob(prefix.unsqueeze(0), 1.0).exp()[0]
    assert abs(marginal / direct - 1) > 0.05


def test_layer_reading_the_previous_layer_has_identity_diagonal_blocks(float64):
    """Proposition 3: a pre-norm block whose attention weights come from layer l-1 is affine in x^(l)."""
    torch.manual_seed(0)
    t_len, d = 5, 4
    ln = torch.nn.LayerNorm(d)
    w_q, w_k, w_v = (torch.randn(d, d) for _ in range(3))
    x_prev = torch.randn(t_len, d)
    h = ln(x_prev)
    scores = (h @ w_q.T) @ (h @ w_k.T).T
    past = torch.ones(t_len, t_len, dtype=torch.bool).tril(-1)
    alpha = torch.softmax(scores.masked_fill(~past, -math.inf).nan_to_num(-1e300), -1) * past.any(-1, keepdim=True)

    def residual(x_cur):  # z^(l) = x^(l) - sum_{s<t} alpha_ts(x^(l-1)) W_v x^(l)_s
        return x_cur - alpha @ (x_cur @ w_v.T)

    jac = torch.autograd.functional.jacobian(residual, torch.randn(t_len, d))
    for t in range(t_len):
        torch.testing.assert_close(jac[t, :, t, :], torch.eye(d))
    # whereas our prior, whose queries read x^(l) itself, has non-trivial diagonal blocks
    blocks = CausalAttentionTransform(d).jacobian_blocks(CausalAttentionTransform(d).attend(x_prev[None]))
    assert (blocks[0, 2:] - torch.eye(d)).abs().max() > 1e-6


# ---------------------------------------------------------------------------------------- margins
def test_scalar_margin_is_the_jacobian_block_and_the_log_det_margin(float64):
    transform = scalar_transform(0.9, 1.3)
    x = torch.randn(4, 7, 1)
    margin = scalar_margin(x[..., 0], 0.9 * 1.3)
    blocks = transform.jacobian_blocks(transform.attend(x))[..., 0, 0]
    torch.testing.assert_close(margin, blocks)
    torch.testing.assert_close(margin[:, 0], torch.ones(4))
    positive = margin > 0
    torch.testing.assert_close(log_det_margin(transform, x)[positive], margin[positive].log())
    assert (log_det_margin(transform, x)[~positive] == -math.inf).all()


def test_spectral_margin_is_one_minus_spectral_radius_of_sigma_a(float64):
    torch.manual_seed(0)
    transform = CausalAttentionTransform(4, coupling="barrier")
    x = torch.randn(2, 6, 4)
    sigma = attention_covariance(transform, x)[:, 0]  # one head
    rho = torch.linalg.eigvals(sigma @ transform.coupling_matrix[0]).abs().amax(-1)
    torch.testing.assert_close(spectral_margin(transform, x), 1 - rho)
    torch.testing.assert_close(spectral_margin(transform, x)[:, 0], torch.ones(2))
    smin = singular_margin(transform, x)
    assert smin.shape == (2, 6) and (smin >= 0).all()


@pytest.mark.parametrize("include_current", [False, True])
def test_singular_margin_is_the_smallest_singular_value_of_the_autograd_jacobian_block(float64, include_current):
    """``sigma_min(J_tt)`` with ``J_tt`` cut from the whole Jacobian of ``x -> z`` by autograd, SVD'd by
    ``torch.linalg.svdvals``."""
    torch.manual_seed(0)
    transform = CausalAttentionTransform(4, 2, 2, value_proj=True, include_current=include_current, coupling="barrier")
    x = torch.randn(2, 5, 4)
    want = torch.stack([torch.stack([torch.linalg.svdvals(jac[t, :, t, :]).amin() for t in range(5)])
                        for jac in (autograd_jacobian(transform, seq) for seq in x)])
    torch.testing.assert_close(singular_margin(transform, x), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(singular_margin(transform, x)[:, 0], torch.ones(2))  # J_11 = I


def test_support_tokens_are_the_positions_at_the_sequence_margin():
    margins = torch.tensor([[1.0, 0.3, 0.5, 0.3], [1.0, 0.9, 0.2, 0.25]])
    torch.testing.assert_close(sequence_margin(margins), torch.tensor([0.3, 0.2]))
    assert support_tokens(margins).tolist() == [[False, True, False, True], [False, False, True, False]]
    assert support_tokens(margins, tol=0.1).tolist() == [[False, True, False, True], [False, False, True, True]]
    with pytest.raises(ValueError):
        support_tokens(margins, tol=-1)


def test_safe_log_barrier_is_exact_inside_and_finite_past_the_boundary(float64):
    det = torch.tensor([2.0, 0.5, 1e-2, 1e-4, 1e-12, -0.3], requires_grad=True)
    terms, clamped = safe_log_barrier(det.abs().log(), torch.sign(det), floor=1e-3)
    torch.testing.assert_close(terms[:3], det[:3].log())
    assert clamped.tolist() == [False, False, False, True, True, True]
    assert torch.isfinite(terms).all()
    terms.sum().backward()
    assert torch.isfinite(det.grad).all() and (det.grad > 0).all()  # still pushes det up
    torch.testing.assert_close(det.grad[3:], torch.full((3,), 1e3))  # slope 1/floor past the boundary
    at_floor = safe_log_barrier(torch.tensor([math.log(1e-3)]), torch.ones(1), floor=1e-3)[0]
    torch.testing.assert_close(at_floor, torch.tensor([math.log(1e-3)]))  # continuous at the floor


def test_entropy_and_weights_have_the_documented_ranges(float64):
    transform = CausalAttentionTransform(3, 2, 1)
    x = torch.randn(2, 6, 3)
    alpha = attention_weights(transform, x)
    assert alpha.shape == (2, 2, 6, 6)
    torch.testing.assert_close(alpha.sum(-1)[..., 1:], torch.ones(2, 2, 5))
    entropy = attention_entropy(transform, x)
    assert (entropy[..., 0] == 0).all() and (entropy[..., 1] == 0).all()  # empty / single-value context
    assert (entropy <= torch.log(torch.arange(6).clamp_min(1).double()) + 1e-12).all()


def test_length_one_margins_take_their_documented_values(float64):
    transform = CausalAttentionTransform(3)
    x = torch.randn(2, 1, 3)
    assert (log_det_margin(transform, x) == 0).all()
    torch.testing.assert_close(spectral_margin(transform, x), torch.ones(2, 1))


def test_weighted_variance_is_the_trace_of_the_attention_covariance(float64):
    transform = CausalAttentionTransform(4, 2, 2)
    x = torch.randn(3, 7, 4) + 5.0  # an offset, as embeddings carry: the centring must remove it
    alpha = attention_weights(transform, x)
    trace = torch.diagonal(attention_covariance(transform, x), dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(weighted_variance(alpha, x.unsqueeze(-3)), trace)


def test_the_prior_expands_inside_a_pyro_plate(float64):
    prior = EmbeddingPrior(CausalAttentionTransform(3, coupling="repulsive"), seq_len=4)

    def model():
        with pyro.plate("sequences", 5):
            return pyro.sample("x", prior)

    trace = pyro.poutine.trace(model).get_trace()
    site = trace.nodes["x"]
    assert site["value"].shape == (5, 4, 3) and isinstance(site["fn"], EmbeddingPrior)
    torch.testing.assert_close(site["fn"].log_prob(site["value"]), prior.log_prob(site["value"]))
    torch.testing.assert_close(site["fn"].barrier(site["value"]), prior.barrier(site["value"]))


def _cross_covariance_by_autograd(alpha, a, b):
    """``sum_s alpha_ts a_s b_s^T - abar_t bbar_t^T`` about the sequence mean, every step through autograd (the
    formula before its closed-form backward; for rows of ``alpha`` summing to one it is the covariance)."""
    a, b = a - a.mean(-2, keepdim=True), b - b.mean(-2, keepdim=True)
    second = torch.einsum("...ts,...sn,...sm->...tnm", alpha, a, b)
    return second - (alpha @ a).unsqueeze(-1) * (alpha @ b).unsqueeze(-2)


def test_weighted_cross_covariance_and_its_backward_equal_the_formula_by_autograd(float64):
    """The closed-form backward of the attention-weighted covariance (eq. 13): values and gradients in ``alpha``,
    ``a``, ``b`` as plain autograd of the same formula, with broadcast heads and an empty row; values as the
    definition; and gradcheck."""
    torch.manual_seed(0)
    alpha = torch.softmax(torch.randn(2, 1, 5, 6), -1)
    alpha[..., 0, :] = 0.0  # a position without context
    alpha.requires_grad_()
    a = (torch.randn(2, 3, 6, 3) + 4.0).requires_grad_()  # an offset, as embeddings carry
    b = torch.randn(1, 3, 6, 2, requires_grad=True)
    cov, want = weighted_cross_covariance(alpha, a, b), _cross_covariance_by_autograd(alpha, a, b)
    torch.testing.assert_close(cov, want)
    deviations = (a.unsqueeze(-3) - (alpha @ a).unsqueeze(-2), b.unsqueeze(-3) - (alpha @ b).unsqueeze(-2))
    torch.testing.assert_close(cov, torch.einsum("...ts,...tsn,...tsm->...tnm", alpha, *deviations))  # the definition
    assert (cov[..., 0, :, :] == 0).all()
    probe = torch.randn_like(want)
    for got, ref in zip(torch.autograd.grad((probe * cov).sum(), (alpha, a, b)),
                        torch.autograd.grad((probe * want).sum(), (alpha, a, b))):
        torch.testing.assert_close(got, ref)
    assert torch.autograd.gradcheck(weighted_cross_covariance, (alpha, a, b))


def test_weighted_cross_covariance_under_torch_func_equals_the_formula_by_autograd(float64):
    """``torch.func.jacrev`` through the closed-form backward gives autograd's Jacobian of the formula in ``alpha``,
    ``a`` and ``b``, and ``torch.func.vmap`` over a leading dimension gives the batched call."""
    torch.manual_seed(1)
    alpha = torch.softmax(torch.randn(2, 3, 4), -1)
    a, b = torch.randn(2, 4, 3) + 4.0, torch.randn(2, 4, 2)
    got = torch.func.jacrev(weighted_cross_covariance, argnums=(0, 1, 2))(alpha, a, b)
    for g, want in zip(got, jacobian(_cross_covariance_by_autograd, (alpha, a, b))):
        torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.vmap(weighted_cross_covariance)(alpha, a, b),
                               weighted_cross_covariance(alpha, a, b), rtol=1e-12, atol=1e-12)


def test_torch_func_grad_of_log_prob_equals_autograd(float64):
    """The log-determinant's custom backward under ``torch.func.grad``: the gradient of eq. 11 in ``x``."""
    torch.manual_seed(2)
    prior = EmbeddingPrior(CausalAttentionTransform(4, 2, 2, coupling="repulsive"), seq_len=5, sigma=0.8)
    x = torch.randn(5, 4, requires_grad=True)
    (want,) = torch.autograd.grad(prior.log_prob(x), x)
    torch.testing.assert_close(torch.func.grad(prior.log_prob)(x.detach()), want, rtol=1e-10, atol=1e-12)
