r"""A last-layer Laplace approximation with a Kronecker-factored GGN: the Bayesian baseline for :class:`SmallGPT`.

The network up to the final LayerNorm is frozen at its MAP fit; its output ``phi = features(x)`` (``(B, T, d)``,
:meth:`~prob_attention.gpt.SmallGPT.features`) is a fixed feature map and the logits ``f = W phi`` are a linear
map with weight ``W`` (``(V, d)``). The Laplace posterior is over ``W`` only. In :class:`SmallGPT` that weight is
tied to the embedding table ``wte``; here it is treated as a separate output map (the embeddings, and so the
features, stay at the MAP while ``W`` varies). Last-layer KFAC with a tuned prior precision is the default that
Daxberger et al. (2021) recommend.

Curvature (Ritter et al., 2018). For softmax cross entropy the generalised Gauss-Newton of the summed NLL over
``N`` training positions equals the Hessian exactly (``f`` is linear in ``W``)::

    H = sum_n Lambda_n ⊗ phi_n phi_n^T,      Lambda_n = diag(p_n) - p_n p_n^T,   p_n = softmax(W phi_n)

in the row-major ``vec(W)`` (entry ``W[i, a]`` at ``i d + a``). KFAC replaces the mean of Kronecker products by
the Kronecker product of means: ``H ≈ N (G ⊗ A)`` with ``G = mean_n Lambda_n`` (``V x V``, rows summing to 0)
and ``A = mean_n phi_n phi_n^T`` (``d x d``); for ``N = 1`` it is exact.

Posterior. With prior ``vec(W) ~ N(0, delta^{-1} I)`` (prior precision ``delta``), ``vec(W) ~ N(vec(W_MAP),
Sigma)``, ``Sigma^{-1} = N (G ⊗ A) + delta I``. With ``G = U_G diag(g) U_G^T`` and ``A = U_A diag(a) U_A^T``
(eigenvalues clamped at 0 against rounding)::

    Sigma = (U_G ⊗ U_A) diag(1 / (N g_i a_j + delta)) (U_G ⊗ U_A)^T.

Logits at a test feature ``phi*``: ``f* = J vec(W)`` with ``J = I_V ⊗ phi*^T``, so ``Cov(f*) = J Sigma J^T =
(U_G ⊗ psi^T) D (U_G ⊗ psi^T)^T`` with ``psi = U_A^T phi*`` (``(I ⊗ phi*^T)(U_G ⊗ U_A) = U_G ⊗ psi^T``), i.e.::

    Cov(f*) = U_G diag(m) U_G^T,     m_i = sum_j psi_j^2 / (N g_i a_j + delta)        (logit_variances)

Predictive. Monte Carlo over logits: ``f_s = W_MAP phi* + U_G (sqrt(m) * eps_s)``, ``eps_s ~ N(0, I_V)``, and
``p(y | phi*) ≈ (1/S) sum_s softmax(f_s)``, from a seeded ``torch.Generator``. Per-sample probabilities give
the predictive entropy and the mutual information ``H[mean_s p_s] - mean_s H[p_s]`` (nats).
:func:`fit_prior_precision` picks ``delta`` from :data:`PRIOR_PRECISION_GRID` by validation NLL; as ``delta``
grows, ``m -> 0`` and the predictive tends to the MAP softmax.

We write this rather than use laplace-torch: laplace-torch 0.3 pulls in torchvision and a CUDA build of torch
2.14, which would replace our CPU torch 2.13 (and torchvision from PyPI fails to import beside the CPU build).

References:
    H. Ritter, A. Botev, D. Barber. A Scalable Laplace Approximation for Neural Networks. ICLR 2018.
    E. Daxberger, A. Kristiadi, A. Immer, R. Eschenhagen, M. Bauer, P. Hennig. Laplace Redux -- Effortless
    Bayesian Deep Learning. NeurIPS 2021.

Example:
    >>> import torch
    >>> from prob_attention.gpt import GPTConfig, SmallGPT
    >>> _ = torch.manual_seed(0)
    >>> gpt = SmallGPT(GPTConfig(vocab_size=7, block_size=8, n_layer=1, n_head=1, n_embd=8))
    >>> inputs = torch.randint(0, 7, (4, 8))                                  # windows x time
    >>> laplace = LastLayerLaplace.fit(gpt, inputs, prior_precision=1.0)
    >>> phi = gpt.features(gpt.embed(inputs[:2]))                             # batch x time x d
    >>> mean, probs = laplace.predictive(phi, samples=16, seed=0)
    >>> mean.shape, probs.shape
    (torch.Size([2, 8, 7]), torch.Size([16, 2, 8, 7]))
    >>> delta, curve = fit_prior_precision(laplace, phi, inputs[:2], grid=(0.1, 1.0, 10.0))
    >>> delta in curve
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from prob_attention.gpt import SmallGPT

__all__ = ["LastLayerLaplace", "PRIOR_PRECISION_GRID", "fit_prior_precision"]

PRIOR_PRECISION_GRID: tuple[float, ...] = tuple(float(f"{10.0 ** (k / 2):.3g}") for k in range(-4, 13))
"""Prior precisions ``delta`` tried by :func:`fit_prior_precision`: ``1e-2 .. 1e6``, two per decade. At ``1e6`` a
LayerNorm feature (``|phi|^2 ~ d``) has logit standard deviations ``<= sqrt(d / 1e6) ~ 0.01``: about the MAP."""

_CHUNK = 4096  # validation positions per step of fit_prior_precision (bounds memory at samples x chunk x V)


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _as_features(phi: Tensor, weight: Tensor) -> Tensor:
    """``phi`` ``(..., d)`` as float64 on ``weight``'s device, after checking its shape and values."""
    if not isinstance(phi, Tensor) or phi.dim() < 1 or phi.shape[-1] != weight.shape[1]:
        shape = tuple(phi.shape) if isinstance(phi, Tensor) else type(phi).__name__
        raise ValueError(f"features must have shape (..., {weight.shape[1]}), got {shape}")
    if not phi.dtype.is_floating_point:
        raise ValueError(f"features must be floating point, got dtype {phi.dtype}")
    phi = phi.detach().to(device=weight.device, dtype=torch.float64)
    if not torch.isfinite(phi).all():
        raise ValueError("features contain NaN or infinite values")
    return phi


def _curvature_sums(weight: Tensor, phi: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum_n Lambda_n, sum_n phi_n phi_n^T)`` over the rows of ``phi`` ``(n, d)``, float64, weight ``(V, d)``."""
    p = torch.softmax(phi @ weight.T, dim=-1)  # (n, V)
    g = torch.diag(p.sum(0)) - p.T @ p  # (V, V): sum_n diag(p_n) - p_n p_n^T
    return g, phi.T @ phi  # (V, V), (d, d)


def _eigh(m: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs of a symmetric PSD matrix, symmetrised first, eigenvalues clamped at 0."""
    eig, vec = torch.linalg.eigh((m + m.T) / 2)
    return eig.clamp(min=0.0), vec


@dataclass(frozen=True, eq=False)
class LastLayerLaplace:
    """The KFAC Laplace posterior over the output map ``W`` of :class:`SmallGPT` (module docstring).

    Attributes:
        weight: ``W_MAP`` ``(V, d)``, float64, a detached copy of ``lm_head.weight``.
        eig_g, vec_g: eigenvalues ``(V,)`` and eigenvectors ``(V, V)`` (columns) of ``G = mean_n Lambda_n``.
        eig_a, vec_a: eigenvalues ``(d,)`` and eigenvectors ``(d, d)`` of ``A = mean_n phi_n phi_n^T``.
        positions: ``N``, the number of training positions ``G`` and ``A`` average over.
        prior_precision: ``delta > 0``.
    """

    weight: Tensor
    eig_g: Tensor
    vec_g: Tensor
    eig_a: Tensor
    vec_a: Tensor
    positions: int
    prior_precision: float = 1.0

    def __post_init__(self) -> None:
        if self.weight.dim() != 2:
            raise ValueError(f"weight must be (V, d), got shape {tuple(self.weight.shape)}")
        V, d = self.weight.shape
        shapes = {"eig_g": (V,), "vec_g": (V, V), "eig_a": (d,), "vec_a": (d, d)}
        for name, shape in shapes.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(getattr(self, name).shape)}")
        _check_count("positions", self.positions)
        _check_positive("prior_precision", self.prior_precision)

    # ------------------------------------------------------------------------------------------ fitting
    @classmethod
    def from_features(cls, weight: Tensor, phi: Tensor, prior_precision: float = 1.0) -> LastLayerLaplace:
        """The posterior for logits ``phi @ weight.T``: ``G``, ``A`` averaged over every row of ``phi`` ``(..., d)``."""
        weight = weight.detach().to(torch.float64).clone()
        phi = _as_features(phi, weight).reshape(-1, weight.shape[1])  # (N, d)
        if phi.shape[0] == 0:
            raise ValueError("need at least one feature vector")
        g, a = _curvature_sums(weight, phi)
        return cls._from_sums(weight, g, a, phi.shape[0], prior_precision)

    @classmethod
    def fit(cls, gpt: SmallGPT, inputs: Tensor, batch_size: int = 64, prior_precision: float = 1.0,
            positions: int | None = None) -> LastLayerLaplace:
        """Accumulate ``G`` and ``A`` over every position of the token windows ``inputs`` ``(n, T)``.

        The network runs in eval mode (no dropout) without gradients, ``batch_size`` windows at a time; the sums
        are float64. ``W_MAP`` is ``gpt.lm_head.weight``. ``positions``: the ``N`` the mean curvature is scaled by,
        the number of training positions the likelihood sums over (default the positions of ``inputs``): ``G`` and
        ``A`` can be estimated on a sample of the training text and scaled to all of it.
        """
        if inputs.dim() != 2 or inputs.numel() == 0:
            raise ValueError(f"inputs must be non-empty token windows (n, T), got shape {tuple(inputs.shape)}")
        _check_count("batch_size", batch_size)
        weight = gpt.lm_head.weight.detach().to(torch.float64).clone()  # (V, d)
        V, d = weight.shape
        device = weight.device
        g = torch.zeros(V, V, dtype=torch.float64, device=device)
        a = torch.zeros(d, d, dtype=torch.float64, device=device)
        was_training = gpt.training
        gpt.eval()
        try:
            with torch.no_grad():
                for batch in inputs.split(batch_size):
                    phi = gpt.features(gpt.embed(batch.to(device)))  # (B, T, d)
                    phi = _as_features(phi, weight).reshape(-1, d)  # (B T, d)
                    dg, da = _curvature_sums(weight, phi)
                    g, a = g + dg, a + da
        finally:
            gpt.train(was_training)
        return cls._from_sums(weight, g, a, inputs.numel(), prior_precision,
                              _check_count("positions", positions) if positions is not None else None)

    @classmethod
    def _from_sums(cls, weight: Tensor, g: Tensor, a: Tensor, n: int, prior_precision: float,
                   positions: int | None = None) -> LastLayerLaplace:
        eig_g, vec_g = _eigh(g / n)
        eig_a, vec_a = _eigh(a / n)
        return cls(weight, eig_g, vec_g, eig_a, vec_a, positions or n,
                   _check_positive("prior_precision", prior_precision))

    def with_prior_precision(self, delta: float) -> LastLayerLaplace:
        """The same curvature with prior precision ``delta``."""
        return dataclasses.replace(self, prior_precision=_check_positive("prior_precision", delta))

    # ---------------------------------------------------------------------------------------- the factors
    @property
    def g_factor(self) -> Tensor:
        """``G = U_G diag(g) U_G^T`` ``(V, V)``."""
        return (self.vec_g * self.eig_g) @ self.vec_g.T

    @property
    def a_factor(self) -> Tensor:
        """``A = U_A diag(a) U_A^T`` ``(d, d)``."""
        return (self.vec_a * self.eig_a) @ self.vec_a.T

    # ----------------------------------------------------------------------------------------- predictive
    def logit_variances(self, phi: Tensor) -> Tensor:
        """``m`` ``(..., V)``: the logit variances along the eigenvectors of ``G``, ``Cov(f*) = U_G diag(m) U_G^T``.

        ``m_i = sum_j psi_j^2 / (N g_i a_j + delta)`` with ``psi = U_A^T phi``; ``phi`` is ``(..., d)``.
        """
        psi = _as_features(phi, self.weight) @ self.vec_a  # (..., d)
        inv = 1.0 / (self.positions * torch.outer(self.eig_g, self.eig_a) + self.prior_precision)  # (V, d)
        return psi.square() @ inv.T  # (..., V)

    def sample_logits(self, phi: Tensor, samples: int, generator: torch.Generator) -> Tensor:
        """``samples`` draws ``f_s = W_MAP phi + U_G (sqrt(m) * eps_s)`` of the logits: ``(samples, ..., V)``."""
        _check_count("samples", samples)
        phi = _as_features(phi, self.weight)  # (..., d)
        mean = phi @ self.weight.T  # (..., V)
        std = self.logit_variances(phi).sqrt()  # (..., V)
        eps = torch.randn((samples, *mean.shape), generator=generator, dtype=torch.float64, device=generator.device)
        return mean + (std * eps.to(mean.device)) @ self.vec_g.T  # (S, ..., V)

    def sample_probs(self, phi: Tensor, samples: int, generator: torch.Generator) -> Tensor:
        """The softmax of :meth:`sample_logits`: ``(samples, ..., V)``."""
        return torch.softmax(self.sample_logits(phi, samples, generator), dim=-1)

    def predictive(self, phi: Tensor, samples: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
        """The Monte Carlo predictive at features ``phi`` ``(..., d)``, reproducible from ``seed``.

        Returns:
            ``(mean, probs)``: the predictive ``(..., V)`` (mean over samples) and the per-sample
            distributions ``(samples, ..., V)``, for NLL, entropy and mutual information.
        """
        probs = self.sample_probs(phi, samples, self._generator(seed))
        return probs.mean(0), probs

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.weight.device).manual_seed(seed)


def fit_prior_precision(
    laplace: LastLayerLaplace,
    phi: Tensor,
    targets: Tensor,
    grid: Sequence[float] = PRIOR_PRECISION_GRID,
    samples: int = 32,
    seed: int = 0,
) -> tuple[float, dict[float, float]]:
    """The grid value minimising the mean validation NLL (nats) of the MC predictive, and the whole curve.

    Args:
        laplace: the fitted posterior (its own prior precision is ignored).
        phi: validation features ``(..., d)``; targets: their next tokens, integer, shape ``phi.shape[:-1]``.
        grid: prior precisions to try, each positive.
        samples, seed: of :meth:`LastLayerLaplace.predictive`; every grid value sees the same normal draws.

    Returns:
        ``(delta, curve)``: the best ``delta`` and ``{delta: mean NLL in nats per token}`` for every grid value.
    """
    phi = _as_features(phi, laplace.weight)
    V, d = laplace.weight.shape
    if tuple(targets.shape) != tuple(phi.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} differs from the features' {tuple(phi.shape[:-1])}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
    if targets.numel() == 0:
        raise ValueError("need at least one validation position")
    if targets.min() < 0 or targets.max() >= V:
        raise ValueError(f"targets must lie in [0, {V}), got range [{int(targets.min())}, {int(targets.max())}]")
    grid = [_check_positive("grid value", delta) for delta in grid]
    if not grid:
        raise ValueError("the prior precision grid is empty")
    _check_count("samples", samples)
    phi, targets = phi.reshape(-1, d), targets.reshape(-1).to(device=phi.device, dtype=torch.long)  # (M, d), (M,)
    curve = {}
    for delta in grid:
        posterior, generator, total = laplace.with_prior_precision(delta), laplace._generator(seed), 0.0
        for rows, ys in zip(phi.split(_CHUNK), targets.split(_CHUNK)):
            log_probs = torch.log_softmax(posterior.sample_logits(rows, samples, generator), dim=-1)  # (S, m, V)
            picked = log_probs.gather(-1, ys.expand(samples, -1)[..., None]).squeeze(-1)  # (S, m)
            total -= float((torch.logsumexp(picked, dim=0) - math.log(samples)).sum())  # log mean_s p_s(y)
        curve[delta] = total / targets.numel()
    best = min(curve, key=curve.__getitem__)
    return best, curve
