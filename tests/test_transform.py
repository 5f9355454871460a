"""The causal-attention bijector: exact log-det, Jacobian structure, inverse, bad input."""

import itertools

import pytest
import torch
from reference import autograd_jacobian, autograd_log_abs_det
from torch.autograd.functional import jacobian

from prob_attention import CausalAttentionTransform, InversionError, scalar_transform

D = 5
HEADS = [(1, 2), (2, 2), (1, 5)]  # (n_heads, head_dim): low rank, multi-head low rank, full rank
OPTIONS = list(
    itertools.product(HEADS, [False, True], [False, True], [False, True], ["free", "repulsive", "barrier"])
)


def make(heads, value_proj, output_proj, include_current, coupling, logdet="auto", **kw):
    n_heads, head_dim = heads
    return CausalAttentionTransform(
        D, n_heads, head_dim, value_proj=value_proj, output_proj=output_proj,
        include_current=include_current, coupling=coupling, logdet=logdet, **kw,
    )


def sylvester_refused(opt, logdet):
    """The one documented invalid mix: the Sylvester log-det with the current position included and a value or output
    projection (no ``r x r`` form there)."""
    _, value_proj, output_proj, include_current, _ = opt
    return logdet == "sylvester" and include_current and (value_proj or output_proj)


def logdets(opt):
    """The log-det methods that ``opt`` accepts, of ``"full"`` and ``"sylvester"``."""
    return [logdet for logdet in ["full", "sylvester"] if not sylvester_refused(opt, logdet)]


def option_id(opt):
    (h, dk), vp, op, ic, c = opt
    return f"H{h}dk{dk}-{'v' if vp else ''}{'o' if op else ''}-{'incl' if ic else 'strict'}-{c}"


@pytest.mark.parametrize("opt", OPTIONS, ids=option_id)
def test_log_abs_det_jacobian_equals_minus_autograd_log_det(float64, opt):
    torch.manual_seed(0)
    for logdet in logdets(opt):
        transform = make(*opt, logdet=logdet)
        x = 0.5 * torch.randn(2, 2, 4, D)  # batch shape (2, 2); moderate scale keeps alpha_tt < 1 in float
        ladj = transform.log_abs_det_jacobian(transform.inv(x), x)
        assert ladj.shape == (2, 2)
        torch.testing.assert_close(ladj, -autograd_log_abs_det(transform, x), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("opt", [o for o in OPTIONS if o[-1] == "free"], ids=option_id)
def test_log_det_gradients_equal_autograd_through_the_jacobian(float64, opt):
    """The closed-form backward passes (weighted covariance, determinant) against plain autograd of
    ``sum_t log|det J_tt|``, with ``J_tt`` cut from the whole Jacobian of ``x -> z``: in ``x`` and in every weight.
    (The other couplings only tie ``W_q`` to ``W_k``, upstream of both.)"""
    torch.manual_seed(5)
    for logdet in logdets(opt):
        transform = make(*opt, logdet=logdet)
        x = (0.5 * torch.randn(1, 4, D)).requires_grad_()
        wrt = [x, *transform.parameters()]
        got = torch.autograd.grad(transform.log_abs_det_blocks(x)[0].sum(), wrt)
        jac = jacobian(transform._inverse, x[0], create_graph=True, vectorize=True)  # (T, d, T, d)
        reference = sum(torch.linalg.slogdet(jac[t, :, t, :])[1] for t in range(4))
        for g, want in zip(got, torch.autograd.grad(reference, wrt)):
            torch.testing.assert_close(g, want, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("opt", OPTIONS, ids=option_id)
def test_jacobian_is_block_lower_triangular_with_closed_form_diagonal(float64, opt):
    torch.manual_seed(1)
    transform = make(*opt)
    x = torch.randn(4, D)
    jac = autograd_jacobian(transform, x)  # (T, d, T, d)
    blocks = transform.jacobian_blocks(transform.attend(x.unsqueeze(0)))[0]
    for t in range(4):
        torch.testing.assert_close(jac[t, :, t, :], blocks[t])
        for s in range(t + 1, 4):
            assert jac[t, :, s, :].abs().max() == 0
    torch.testing.assert_close(blocks[0], torch.eye(D))  # empty context


@pytest.mark.parametrize("opt", OPTIONS, ids=option_id)
def test_newton_step_is_the_inverse_jacobian_block_times_the_residual(float64, opt):
    torch.manual_seed(4)
    for logdet in logdets(opt):  # the dense d x d solve, and Woodbury's r x r one where it applies
        transform = make(*opt, logdet=logdet)
        x, res = torch.randn(3, 4, D), torch.randn(3, D)
        state = transform.attend(x, start=3)
        jac = torch.stack([autograd_jacobian(transform, x[n])[3, :, 3, :] for n in range(3)])
        step, singular = transform._newton_step(state, res)
        assert not singular.any()
        torch.testing.assert_close(jac @ step.unsqueeze(-1), res.unsqueeze(-1))


@pytest.mark.parametrize("opt", OPTIONS, ids=option_id)
def test_only_the_documented_mix_refuses_a_logdet_method(opt):
    """The loops above skip exactly these: every other option mix builds with every method."""
    for logdet in ["auto", "full", "sylvester"]:
        if sylvester_refused(opt, logdet):
            with pytest.raises(ValueError, match="the Sylvester log-det needs strict causality"):
                make(*opt, logdet=logdet)
        else:
            make(*opt, logdet=logdet)


@pytest.mark.parametrize("opt", OPTIONS, ids=option_id)
def test_torch_func_jacrev_of_both_directions_equals_the_autograd_jacobian(float64, opt):
    """``torch.func.jacrev`` runs through the custom autograd Functions of ``z -> x`` (the solver, then the implicit
    step that carries the gradient) and of ``x -> z``, and gives ``torch.autograd``'s Jacobians."""
    torch.manual_seed(7)
    transform = make(*opt, init_scale=0.3 / D**0.5)
    x = 0.5 * torch.randn(2, 4, D)
    z = transform.inv(x)
    torch.testing.assert_close(torch.func.jacrev(transform)(z), jacobian(transform, z), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.jacrev(transform.inv)(x), jacobian(transform.inv, x), rtol=1e-10, atol=1e-12)


def test_auto_picks_sylvester_only_when_it_is_smaller():
    assert CausalAttentionTransform(8, 1, 2).uses_sylvester
    assert not CausalAttentionTransform(8, 2, 4).uses_sylvester  # r = 8 = d
    assert not CausalAttentionTransform(8, 1, 2, include_current=True, value_proj=True).uses_sylvester


@pytest.mark.parametrize("opt", OPTIONS, ids=option_id)
def test_round_trip_near_identity(float64, opt):
    torch.manual_seed(2)
    transform = make(*opt, init_scale=0.3 / D**0.5)
    x = torch.randn(3, 6, D)
    regular = (transform.log_abs_det_blocks(x)[1] > 0).all(-1)  # the support: with alpha_tt in J_tt, x can leave it
    assert regular.any()
    torch.testing.assert_close(transform(transform.inv(x[regular])), x[regular])
    if not opt[3]:  # strict causal: c_t is a bounded convex combination, so every z has a preimage
        z = torch.randn(3, 6, D)
        torch.testing.assert_close(transform.inv(transform(z)), z)


def test_round_trip_repulsive_at_full_strength(float64):
    torch.manual_seed(3)
    transform = CausalAttentionTransform(D, coupling="repulsive", init_scale=2.0)
    x = 3 * torch.randn(4, 8, D)
    torch.testing.assert_close(transform._call(transform._inverse(x)), x)
    assert (transform.log_abs_det_blocks(x)[0] >= -1e-12).all()  # |det J_tt| >= 1 when sym(A) <= 0


def test_inverse_raises_where_no_preimage_exists(float64):
    # include-current scalar map: z_2 = x_2 - (a_21 x_1 + a_22 x_2) stays bounded as |x_2| grows
    transform = scalar_transform(2.0, 2.0, include_current=True)
    z = torch.tensor([[[1.0], [100.0]]])
    with pytest.raises(InversionError, match="position t=1"):
        transform(z)


def test_solve_position_marks_the_rows_without_a_root_and_solves_the_others(float64):
    transform = scalar_transform(0.5, 0.5, include_current=True)  # z_2 = alpha_21 (x_2 - x_1) is bounded
    z = torch.tensor([[[1.0], [0.2]], [[1.0], [100.0]]])
    x_t, converged = transform.solve_position(z[:, :1], z[:, 1], 1)  # the prefix x_1 = z_1
    assert converged.tolist() == [True, False]
    torch.testing.assert_close(x_t[0], transform(z[:1])[0, 1])


def test_length_one_sequence_is_the_identity(float64):
    transform = CausalAttentionTransform(D, 2, 2)
    x = torch.randn(3, 1, D)
    torch.testing.assert_close(transform.inv(x), x)
    assert (transform.log_abs_det_jacobian(x, x) == 0).all()


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.randn(D), "shape"),
        (torch.randn(2, 3, D + 1), "dim"),
        (torch.randn(2, 0, D), "empty"),
        (torch.full((1, 3, D), float("nan")), "NaN"),
        (torch.full((1, 3, D), float("inf")), "inf"),
        (torch.ones(1, 3, D, dtype=torch.long), "floating"),
    ],
)
def test_bad_input_is_a_clear_error(bad, match):
    transform = CausalAttentionTransform(D)
    with pytest.raises(ValueError, match=match):
        transform.inv(bad)
    with pytest.raises(ValueError, match=match):
        transform.log_abs_det_blocks(bad)


@pytest.mark.parametrize(
    "kwargs", [dict(coupling="nope"), dict(logdet="qr"), dict(n_heads=0),
               dict(include_current=True, value_proj=True, logdet="sylvester")]
)
def test_bad_options_are_clear_errors(kwargs):
    with pytest.raises(ValueError):
        CausalAttentionTransform(D, **kwargs)


def test_coupling_parametrizations_fix_the_sign_of_A():
    for coupling, sign in [("repulsive", -1), ("barrier", 1)]:
        a = CausalAttentionTransform(D, 2, 2, coupling=coupling).coupling_matrix.detach()
        eig = torch.linalg.eigvalsh(0.5 * (a + a.transpose(-1, -2)))
        assert (sign * eig >= -1e-6).all()
