"""The thread-safe batched determinant and solve: exact against float64 torch.linalg, on the guarded path."""

from __future__ import annotations

import pytest
import torch

from prob_attention import linalg


@pytest.fixture
def two_threads():
    """Force the guarded path: two intra-op threads (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _matrices(n: int, batch: int = 6, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.eye(n, dtype=dtype) + 0.5 * torch.randn(batch, n, n, generator=g, dtype=dtype) / n**0.5
    a[0, 0] = -a[0, 0]  # a negative determinant
    a[1] = a[1, [1, 0, *range(2, n)]]  # rows exchanged: partial pivoting must swap them back
    return a


def test_guarded_slogdet_and_its_gradient_equal_torch_in_float64(two_threads) -> None:
    a = _matrices(linalg.THREADED_LU_MAX + 32).requires_grad_()
    assert linalg._guarded(a)
    sign, logabs = linalg.slogdet(a)
    with linalg._one_thread():  # the reference on one thread: with two, torch's own result is what is wrong
        ref_sign, ref_logabs = torch.linalg.slogdet(a.detach())
        inverse = torch.linalg.inv(a.detach())
    assert torch.equal(sign, ref_sign) and (sign == -1).any()
    torch.testing.assert_close(logabs, ref_logabs, rtol=1e-12, atol=1e-12)
    weights = torch.arange(1.0, a.shape[0] + 1, dtype=a.dtype)
    (grad,) = torch.autograd.grad((weights * logabs).sum(), a)
    torch.testing.assert_close(grad, weights[:, None, None] * inverse.mT, rtol=1e-10, atol=1e-10)


def test_guarded_solve_and_its_gradients_equal_torch_in_float64(two_threads) -> None:
    a = _matrices(linalg.THREADED_LU_MAX + 32, seed=1).requires_grad_()
    b = torch.randn(a.shape[0], a.shape[-1], 3, dtype=a.dtype, requires_grad=True)
    x = linalg.solve(a, b)
    probe = torch.randn_like(x)
    grads = torch.autograd.grad((probe * x).sum(), (a, b))
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    with linalg._one_thread():
        x_ref = torch.linalg.solve(a_ref, b_ref)
        grads_ref = torch.autograd.grad((probe * x_ref).sum(), (a_ref, b_ref))
    torch.testing.assert_close(x, x_ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_guarded_solve_of_a_singular_matrix_raises_like_torch(two_threads) -> None:
    a = _matrices(linalg.THREADED_LU_MAX + 8)
    a[2, :, 0] = 0.0
    with pytest.raises(torch.linalg.LinAlgError, match="singular"):
        linalg.solve(a, torch.ones(a.shape[0], a.shape[-1], 1, dtype=a.dtype))


@pytest.mark.parametrize("n", [16, linalg.THREADED_LU_MAX + 8], ids=["direct", "guarded"])
def test_solve_ex_marks_singular_matrices_and_solves_the_others(two_threads, n: int) -> None:
    a = _matrices(n, seed=2)
    a[2, :, 0] = 0.0
    b = torch.randn(a.shape[0], n, 1, dtype=a.dtype)
    x, singular = linalg.solve_ex(a, b)
    assert singular.tolist() == [i == 2 for i in range(a.shape[0])]
    regular = ~singular
    with linalg._one_thread():
        torch.testing.assert_close(x[regular], torch.linalg.solve(a[regular], b[regular]), rtol=1e-10, atol=1e-10)


def test_small_matrices_and_one_thread_take_torch_directly() -> None:
    assert not linalg._guarded(torch.zeros(4, 16, 16))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert not linalg._guarded(torch.zeros(4, 256, 256))
    finally:
        torch.set_num_threads(before)


def test_the_thread_count_is_restored_after_a_guarded_call(two_threads) -> None:
    linalg.slogdet(_matrices(linalg.THREADED_LU_MAX + 1, dtype=torch.float32))
    assert torch.get_num_threads() == 2


def test_float32_gradients_stay_accurate_with_several_threads(two_threads) -> None:
    """The failure this module works around: with several threads, torch 2.13's batched CPU LU of
    256 x 256 float32 matrices gave gradients off by ~3e-2 or failed; the guarded path stays at float32 accuracy."""
    a = _matrices(256, batch=32, dtype=torch.float32).requires_grad_()
    (grad,) = torch.autograd.grad(linalg.slogdet(a)[1].sum(), a)
    with linalg._one_thread():
        want = torch.linalg.inv(a.detach().double()).mT
    assert float((grad.double() - want).abs().max()) < 1e-4


def test_eigvals_and_svdvals_need_no_guard_with_several_threads(two_threads) -> None:
    """The spectral and singular margins call these unguarded: with two threads they match one thread."""
    a = _matrices(linalg.THREADED_LU_MAX + 32, batch=8)
    eig, sv = torch.linalg.eigvals(a).abs().sort(dim=-1).values, torch.linalg.svdvals(a)
    with linalg._one_thread():
        eig_ref, sv_ref = torch.linalg.eigvals(a).abs().sort(dim=-1).values, torch.linalg.svdvals(a)
    torch.testing.assert_close(eig, eig_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sv, sv_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n", [16, linalg.THREADED_LU_MAX + 8], ids=["direct", "guarded"])
def test_slogdet_passes_gradcheck_in_float64(two_threads, n: int) -> None:
    """The log-det's closed-form backward ``a^{-T}``, on the training prior's 16 x 16 blocks and on the guarded sizes."""
    a = _matrices(n, batch=3).requires_grad_()
    assert (linalg.slogdet(a)[0] == -1).any()
    assert torch.autograd.gradcheck(lambda m: linalg.slogdet(m)[1], (a,), fast_mode=n > 16)


def test_small_slogdet_equals_torch_and_its_gradient_is_row_major() -> None:
    """Values and gradient as ``torch.linalg.slogdet`` in float64 (a singular matrix: sign 0, ``-inf``), and a float32
    gradient within float32 accuracy of the float64 inverse, laid out row-major for the covariance backward."""
    a = _matrices(16, batch=5).requires_grad_()
    singular = a.detach().clone()
    singular[2, :, 3] = 0.0
    for m in (a.detach(), singular):
        torch.testing.assert_close(linalg.slogdet(m), torch.linalg.slogdet(m), rtol=1e-12, atol=1e-12)
    weights = torch.arange(1.0, 6.0, dtype=a.dtype)
    (grad,) = torch.autograd.grad((weights * linalg.slogdet(a)[1]).sum(), a)
    torch.testing.assert_close(grad, weights[:, None, None] * torch.linalg.inv(a.detach()).mT, rtol=1e-10, atol=1e-10)
    a32 = a.detach().float().requires_grad_()
    (grad32,) = torch.autograd.grad(linalg.slogdet(a32)[1].sum(), a32)
    assert grad32.is_contiguous()
    assert float((grad32.double() - torch.linalg.inv(a.detach()).mT).abs().max()) < 1e-5


@pytest.mark.parametrize("n", [16, linalg.THREADED_LU_MAX + 8], ids=["direct", "guarded"])
def test_slogdet_and_solve_under_vmap_equal_the_batched_calls(two_threads, n: int) -> None:
    """``torch.func.vmap`` over the batch (and over right-hand sides sharing one batch of matrices) gives what the
    batched call gives."""
    a = _matrices(n, batch=2)
    b = torch.randn(3, 2, n, 1, dtype=a.dtype)
    for got, want in zip(torch.func.vmap(linalg.slogdet)(a), linalg.slogdet(a)):
        assert torch.equal(got, want)
    torch.testing.assert_close(torch.func.vmap(linalg.solve)(a, b[0]), linalg.solve(a, b[0]), rtol=1e-12, atol=1e-12)
    shared = torch.func.vmap(linalg.solve, in_dims=(None, 0))(a, b)
    torch.testing.assert_close(shared, torch.stack([linalg.solve(a, rhs) for rhs in b]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [16, linalg.THREADED_LU_MAX + 8], ids=["direct", "guarded"])
def test_torch_func_jacobians_of_slogdet_and_solve_are_their_closed_forms(two_threads, n: int) -> None:
    """``jacrev``: ``d log|det a_i| / d a_j = delta_ij a_i^{-T}`` and ``d (a_i^{-1} b_i) / d b_j = delta_ij a_i^{-1}``;
    ``grad`` of ``<p, a^{-1} b>``: ``a^{-T} p`` in ``b`` and ``-(a^{-T} p) x^T`` in ``a``, in float64."""
    a = _matrices(n, batch=2)
    b = torch.randn(2, n, 1, dtype=a.dtype)
    probe = torch.randn_like(b)
    with linalg._one_thread():
        inverse, x = torch.linalg.inv(a), torch.linalg.solve(a, b)
    eye = torch.eye(2, dtype=a.dtype)
    jac = torch.func.jacrev(lambda m: linalg.slogdet(m)[1])(a)  # (2, 2, n, n)
    torch.testing.assert_close(jac, eye[:, :, None, None] * inverse.mT.unsqueeze(1), rtol=1e-10, atol=1e-10)
    jac_b = torch.func.jacrev(linalg.solve, argnums=1)(a, b)[:, :, 0, :, :, 0]  # (2, n, 2, n)
    torch.testing.assert_close(jac_b, eye[:, None, :, None] * inverse.unsqueeze(2), rtol=1e-10, atol=1e-10)
    grad_a, grad_b = torch.func.grad(lambda m, r: (probe * linalg.solve(m, r)).sum(), argnums=(0, 1))(a, b)
    torch.testing.assert_close(grad_b, inverse.mT @ probe, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_a, -(inverse.mT @ probe) @ x.mT, rtol=1e-10, atol=1e-10)
