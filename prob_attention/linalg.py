"""Batched ``slogdet`` and ``solve`` that stay correct on multi-threaded CPU builds of torch.

With torch 2.13.0+cpu (MKL LAPACK) and more than one intra-op thread, batched LU factorisations of
matrices larger than about 130 x 130 race: MKL prints ``Parameter 6 was incorrect on entry to SLASWP``,
``slogdet``'s backward fails with "Pivots given to lu_solve must all be greater or equal to 1" or returns
gradients off by 1e-2, and forward values can be wrong (we measured a relative error of 0.13 on
``d = 256`` Jacobian blocks). One thread is always correct, as is every size up to 128 (the training
prior's 16 x 16 blocks). These functions take the LU factorisation and its solves on one thread
whenever the matrices are large and torch runs several CPU threads. ``solve`` and ``solve_ex`` call
``torch.linalg`` directly otherwise (CUDA, one thread, small matrices); ``slogdet`` on CPU always takes its
own LU of ``a^T`` (see :class:`_Slogdet`), whose gradient comes out in the layout the barrier's backward
reads fastest. Gradients are first-order only on these paths; ``torch.func`` transforms (``vmap``, ``grad``,
``jacrev``) run through them.

``tests/test_linalg.py`` checks both, values and gradients, against float64 ``torch.linalg`` run on one
thread (with two, torch's own result is the one that is wrong). Not guarded: ``eigvals`` and ``svdvals``
(:func:`~prob_attention.spectral_margin`, :func:`~prob_attention.singular_margin`), which use other LAPACK
routines and agree with one thread (checked in the tests).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["slogdet", "solve", "solve_ex", "THREADED_LU_MAX"]

THREADED_LU_MAX = 128
"""Largest matrix size for which a multi-threaded batched CPU LU was correct in our checks."""


def _guarded(a: Tensor) -> bool:
    return a.device.type == "cpu" and a.shape[-1] > THREADED_LU_MAX and torch.get_num_threads() > 1


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch's intra-op work on one thread inside the block (a process-wide setting, restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _lu(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(LU, pivots, info)``; ``info > 0`` marks a singular matrix (a zero on U's diagonal)."""
    with _one_thread() if _guarded(a) else nullcontext():
        return torch.linalg.lu_factor_ex(a)


def _lu_solve(lu: Tensor, pivots: Tensor, b: Tensor, adjoint: bool = False) -> Tensor:
    with _one_thread() if _guarded(lu) else nullcontext():
        return torch.linalg.lu_solve(lu, pivots, b, adjoint=adjoint)


class _Slogdet(torch.autograd.Function):
    """``(sign, log|det a|)`` from an LU factorisation of ``a^T``; backward ``d log|det a| / da = a^{-T}``.

    ``det a^T = det a``. LAPACK works on column-major matrices, which ``a^T`` is for a row-major ``a``: its
    factorisation starts from a plain copy, and the adjoint solve against its factors gives ``a^{-1}``
    column-major, i.e. the gradient ``a^{-T}`` row-major, the layout the ops downstream read fastest
    (``torch.linalg.slogdet`` transposes on the way in and returns a column-major gradient).

    The factors are outputs too (not differentiable), so that :meth:`setup_context` can keep them for the backward:
    the form ``torch.func`` transforms need; every op batches, so ``vmap`` runs the forward as it is.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # type: ignore[override]
        """``(sign, log|det a|, LU of a^T, pivots)``."""
        lu, pivots, _ = _lu(a.mT)  # a singular matrix: sign 0, log|det| = -inf, as torch.linalg.slogdet
        diag = lu.diagonal(dim1=-2, dim2=-1)
        steps = torch.arange(1, a.shape[-1] + 1, device=a.device, dtype=pivots.dtype)
        swaps = (pivots != steps).sum(-1)
        sign = torch.sign(diag).prod(-1) * (1 - 2 * (swaps % 2)).to(a.dtype)
        return sign, diag.abs().log().sum(-1), lu, pivots

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: tuple[Tensor, Tensor, Tensor, Tensor]) -> None:
        sign, _, lu, pivots = output
        ctx.save_for_backward(lu, pivots)
        ctx.mark_non_differentiable(sign, lu, pivots)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, _grad_sign: Tensor, grad_logabs: Tensor, _grad_lu: Tensor, _grad_pivots: Tensor
    ) -> Tensor:
        lu, pivots = ctx.saved_tensors
        eye = torch.eye(lu.shape[-1], dtype=lu.dtype, device=lu.device).expand_as(lu)
        inverse = _lu_solve(lu, pivots, eye, adjoint=True)  # (a^T)^{-T} = a^{-1}, column-major
        return inverse.mT * grad_logabs[..., None, None]


class _SolveOneThread(torch.autograd.Function):
    """``x = a^{-1} b``; backward ``grad_b = a^{-T} g``, ``grad_a = -grad_b x^T``.

    The forward raises on a singular matrix, a data-dependent check that ``vmap`` cannot trace, so :meth:`vmap`
    moves the vmapped dimension in front of the (already batched) matrices and solves them all in one call.
    """

    @staticmethod
    def forward(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        """``(x, LU of a, pivots)``."""
        lu, pivots, info = _lu(a)
        if bool((info > 0).any()):
            raise torch.linalg.LinAlgError("linalg.solve: a matrix of the batch is singular")
        return _lu_solve(lu, pivots, b), lu, pivots

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: tuple[Tensor, Tensor, Tensor]) -> None:
        x, lu, pivots = output
        ctx.save_for_backward(lu, pivots, x)
        ctx.mark_non_differentiable(lu, pivots)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_x: Tensor, _grad_lu: Tensor, _grad_pivots: Tensor
    ) -> tuple[Tensor, Tensor]:
        lu, pivots, x = ctx.saved_tensors
        grad_b = _lu_solve(lu, pivots, grad_x, adjoint=True)
        return -grad_b @ x.mT, grad_b

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[int | None, int | None], a: Tensor, b: Tensor
    ) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[int, int, int]]:
        """``torch.func.vmap``'s rule: the vmapped dimension in front (an input without one expanded), one call."""
        a, b = (t.expand(info.batch_size, *t.shape) if dim is None else t.movedim(dim, 0)
                for t, dim in zip((a, b), in_dims))
        return _SolveOneThread.apply(a, b), (0, 0, 0)


def slogdet(a: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.slogdet(a)`` (``(sign, log|det|)`` of ``(..., n, n)``), safe on multi-threaded CPU."""
    if a.device.type != "cpu":
        return torch.linalg.slogdet(a)
    sign, logabs, _, _ = _Slogdet.apply(a)
    return sign, logabs


def solve(a: Tensor, b: Tensor) -> Tensor:
    """``torch.linalg.solve(a, b)`` for ``a (..., n, n)``, ``b (..., n, k)`` with the same batch shape, safe on
    multi-threaded CPU."""
    return _SolveOneThread.apply(a, b)[0] if _guarded(a) else torch.linalg.solve(a, b)


def solve_ex(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``(x, singular)``: ``x = a^{-1} b`` where ``a`` is invertible and a mask ``(...)`` of the singular matrices
    of the batch, whose ``x`` is meaningless (``torch.linalg.solve_ex`` without its error check). Never raises on a
    singular matrix; no gradient on the guarded path. Safe on multi-threaded CPU."""
    if _guarded(a):
        lu, pivots, info = _lu(a)
        return _lu_solve(lu, pivots, b), info > 0
    x, info = torch.linalg.solve_ex(a, b)
    return x, info > 0
