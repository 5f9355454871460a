r"""The causal-attention bijector: causal self-attention read as a latent-noise flow (Section 2, eq. 4).

.. math::

    z_t = x_t - c_t(x), \qquad c_t = \sum_h W_o^h \sum_{s \in \mathcal{C}(t)} \alpha^h_{ts} W_v^h x_s,
    \qquad \alpha^h_{ts} = \operatorname{softmax}_{s \in \mathcal{C}(t)}(q^h_t \cdot k^h_s),

with ``q^h_t = W_q^h x_t``, ``k^h_s = W_k^h x_s`` (the ``1/sqrt(d_k)`` scale is absorbed into ``W_q``) and
the context ``C(t) = {s < t}`` (strict causal, the paper's main text) or ``{s <= t}`` (Appendix A).
The first position always has an empty context, ``c_1 = 0`` (so ``z_1 = x_1``); with the current
position included this is a convention, needed because ``alpha_11 = 1`` would make ``z_1 = 0``.

``dz/dx`` is block lower-triangular (Lemma B.3), so the log-density needs only the diagonal blocks
(Theorem 1)::

    strict:           J_tt = I - sum_h W_o^h W_v^h Sigma^h_t W_k^hT W_q^h
    include current:  J_tt = I - sum_h W_o^h [alpha^h_tt W_v^h + W_v^h Sigma'^h_t W_k^hT W_q^h
                                              + alpha^h_tt W_v^h (x_t - mu'^h_t)(W_k^hT q^h_t)^T]

where ``Sigma_t`` (eq. 13) is the attention-weighted covariance of the attended embeddings.
Without a value projection ``W_v = I``; without an output projection ``W_o = I / H`` (the heads'
contexts are averaged). The exact ``log|det J_tt|`` is computed either as a ``d x d`` determinant
(``logdet="full"``) or, by Sylvester's identity ``det(I_d - U W^T) = det(I_r - W^T U)``, as an
``r x r`` determinant with ``r = H d_k`` (strict) or ``H (d_k + 1)`` (current position included, no
projections), built from the query/key tensors already computed (``logdet="sylvester"``).

Pyro's conventions hold: ``_call`` is the generative direction ``z -> x`` (an implicit equation per
position, solved by Newton's method with the closed-form block), ``_inverse`` is ``x -> z``
(explicit, parallel over ``t``), and ``log_abs_det_jacobian(z, x) = log|dx/dz| = -sum_t log|det J_tt|``,
minus the margin barrier.

Example:
    >>> import torch
    >>> T = CausalAttentionTransform(dim=4, n_heads=2, head_dim=2, coupling="repulsive")
    >>> x = torch.randn(3, 5, 4)                 # batch x time x dim
    >>> z = T.inv(x)
    >>> torch.allclose(T(z), x, atol=1e-4)
    True
    >>> T.log_abs_det_jacobian(z, x).shape
    torch.Size([3])
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn
from torch.distributions import Distribution, Transform, biject_to, constraints, transform_to

from .linalg import slogdet, solve, solve_ex
from .weighted_moments import weighted_cross_covariance, weighted_mean

__all__ = ["CausalAttentionTransform", "AttentionState", "InversionError", "Coupling", "LogdetMethod"]

Coupling = Literal["free", "repulsive", "barrier"]
LogdetMethod = Literal["auto", "sylvester", "full"]

_CONTINUATION_STEPS = 200  # pseudo-arclength steps per position before z -> x gives a row up
_CORRECTOR_ITERATIONS = 4  # Newton iterations of each continuation step
_SMALLEST_STEP = 1e-6  # continuation step, relative to 1 + |z_t|, below which a row is given up
_LARGEST_TURN = 0.9  # cosine of the largest angle between the tangents of two continuation steps
_FARTHEST = 1e6  # |x - z_t|, relative to 1 + |z_t|, beyond which a continuation path is taken to escape


class InversionError(RuntimeError):
    """The implicit equation ``x_t - c_t(x) = z_t`` could not be solved (e.g. at a fold of the map)."""


@dataclass(frozen=True)
class AttentionState:
    """One pass of the attention prior over a sequence; queries are the positions ``start..S-1``.

    Shapes: ``alpha (N, H, Tq, S)``, ``q (N, H, Tq, d_k)``, ``k (N, H, S, d_k)``, ``v (N, H, S, d_v)``,
    ``x (N, S, d)``; ``w_o`` is the output projection ``(H, d, d_v)``, or ``None`` (heads averaged).
    """

    x: Tensor
    start: int
    alpha: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    w_o: Tensor | None

    @cached_property
    def context(self) -> Tensor:
        """``c_t = sum_h W_o^h sum_s alpha^h_ts v^h_s`` (eq. 4), shape ``(N, Tq, d)``.

        Computed on first use: the margin barrier does not read it.
        """
        heads = self.alpha @ self.v  # (N, H, Tq, d_v)
        if self.w_o is None:
            return heads.mean(dim=1)  # W_o^h = I / H
        return torch.einsum("hdv,nhtv->ntd", self.w_o, heads)

    @property
    def self_weight(self) -> Tensor:
        """``alpha_tt`` for each query (zeros in strict-causal mode), shape ``(N, H, Tq)``."""
        tq = self.alpha.shape[-2]
        return self.alpha[..., torch.arange(tq), torch.arange(tq) + self.start]


class CausalAttentionTransform(TransformModule):
    """Causal self-attention as a bijector on sequences, event shape ``(T, d)``.

    Its support is the regular trajectories, ``det J_tt > 0`` at every position (the paper excludes the
    configurations past the degeneracy boundary ``det J_tt = 0``). ``x -> z`` (``_inverse``) is explicit everywhere;
    ``z -> x`` (``_call``) returns a root on the regular branch, or raises :class:`InversionError` naming the position
    where it found none. What each option mix guarantees:

    - ``coupling="repulsive"``, one head, values ``= x`` (no projections), strict causality
      (:attr:`is_diffeomorphism`): ``J_tt = I - Sigma_t A`` with ``A = -W_k^T W_k <= 0``, so every eigenvalue of ``J_tt``
      is at least 1 and ``det J_tt >= 1``. ``x -> z`` is proper, hence (Hadamard) a global diffeomorphism of
      ``R^{T x d}``: ``bijective``, ``domain = codomain = R^{T x d}``, and the prior is normalised.
    - Strict causality otherwise: ``c_t`` is a convex combination of past values, so ``x_t -> z_t`` is proper of degree
      one and almost every ``z_t`` has a preimage on the regular branch (regular preimages outnumber folded ones by
      one), which the continuation of :meth:`solve_position` reaches. Where the map folds a ``z`` has several regular
      preimages, though: ``x -> z`` takes the support onto (almost) all of ``R^{T x d}``, a local diffeomorphism but not
      one-to-one. Not ``bijective``: ``T.inv(T(z)) = z``, but ``T(T.inv(x)) = x`` only where ``x`` is the preimage
      the solver picks (at each position, Newton's root from ``z_t`` if regular).
    - ``include_current=True``: ``c_t`` holds ``alpha_tt W_o W_v x_t``, which grows with ``x_t``, so some ``z`` have no
      preimage at all (one head, ``d = 1``: ``z_2 = alpha_21 (x_2 - x_1)`` is bounded) and the sampler loses mass
      (:meth:`EmbeddingPrior.lost_mass`); the solver may also miss a preimage after picking another regular root at
      an earlier position. Nothing more is guaranteed.

    Pyro's claims follow: ``domain`` is ``R^{T x d}`` for the diffeomorphism, else the latents whose ``z -> x`` solve
    succeeds (its ``check`` runs the solver); ``codomain`` is ``R^{T x d}`` for the diffeomorphism, else the regular
    trajectories (its ``check`` reads the signs of ``det J_tt``). No bijection from ``R^{T x d}`` onto those is known,
    so Pyro's autoguides cannot parametrize them: fit guides against an
    :class:`~prob_attention.EmbeddingPrior` with a ``barrier_floor`` (support ``R^{T x d}``).

    Args:
        dim: embedding dimension ``d``.
        n_heads: number of heads ``H``.
        head_dim: query/key size ``d_k`` (default ``d // H``); ``H d_k < d`` is the low-rank case.
        value_proj: learn ``W_v^h``; otherwise the values are the embeddings (``W_v = I``).
        output_proj: learn ``W_o^h`` (``d x d_v``); otherwise heads are averaged (``W_o = I / H``).
            The value size ``d_v`` is ``d_k`` when both projections are on, else ``d``.
        include_current: attend to ``s <= t`` (Appendix A) instead of ``s < t``.
        coupling: ``"free"`` (independent ``W_q, W_k``), ``"repulsive"`` (``W_q = -W_k``, so
            ``A = W_k^T W_q`` is negative semi-definite) or ``"barrier"`` (``W_q = W_k``, ``A >= 0``:
            the paper's positive-coupling regime, Section 3.4); what each guarantees is listed above.
        logdet: ``"sylvester"``, ``"full"`` or ``"auto"`` (Sylvester whenever it is available and smaller).
        init_scale: standard deviation of the initial weights (default ``d ** -0.5``).
        newton_tol: relative tolerance of the ``z -> x`` solve (default: ``1e3 * eps`` of the dtype).
        newton_max_iter: Newton iterations from each start (:meth:`solve_position`).
        cache_size: Pyro's cache of the last ``(z, x)`` pair. ``0`` (default) computes every call afresh; ``1`` hands
            back the cached partner of the very tensor last passed, which is stale once the parameters change.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int = 1,
        head_dim: int | None = None,
        *,
        value_proj: bool = False,
        output_proj: bool = False,
        include_current: bool = False,
        coupling: Coupling = "free",
        logdet: LogdetMethod = "auto",
        init_scale: float | None = None,
        newton_tol: float | None = None,
        newton_max_iter: int = 50,
        cache_size: int = 0,
    ) -> None:
        super().__init__(cache_size=cache_size)
        if dim < 1 or n_heads < 1:
            raise ValueError(f"dim and n_heads must be positive, got dim={dim}, n_heads={n_heads}")
        if head_dim is None and n_heads > dim:
            raise ValueError(f"head_dim defaults to dim // n_heads, which is 0 for dim={dim} and n_heads={n_heads}: "
                             f"give head_dim, or use at most {dim} heads")
        head_dim = head_dim if head_dim is not None else dim // n_heads
        if head_dim < 1:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
        if newton_max_iter < 1 or (newton_tol is not None and not newton_tol > 0):
            raise ValueError(f"newton_max_iter and newton_tol must be positive, got {newton_max_iter}, {newton_tol}")
        if coupling not in ("free", "repulsive", "barrier"):
            raise ValueError(f"coupling must be 'free', 'repulsive' or 'barrier', got {coupling!r}")
        if logdet not in ("auto", "sylvester", "full"):
            raise ValueError(f"logdet must be 'auto', 'sylvester' or 'full', got {logdet!r}")
        self.dim, self.n_heads, self.head_dim = dim, n_heads, head_dim
        self.value_dim = head_dim if (value_proj and output_proj) else dim
        self.include_current, self.coupling, self.logdet = include_current, coupling, logdet
        self.newton_tol, self.newton_max_iter = newton_tol, newton_max_iter
        scale = init_scale if init_scale is not None else dim**-0.5
        self.w_k = nn.Parameter(scale * torch.randn(n_heads, head_dim, dim))
        self._w_q = nn.Parameter(scale * torch.randn(n_heads, head_dim, dim)) if coupling == "free" else None
        self.w_v = nn.Parameter(scale * torch.randn(n_heads, self.value_dim, dim)) if value_proj else None
        self.w_o = nn.Parameter(scale * torch.randn(n_heads, dim, self.value_dim)) if output_proj else None
        if logdet == "sylvester" and not self.has_sylvester:
            raise ValueError("the Sylvester log-det needs strict causality, or no value/output projections")
        self._domain, self._codomain = self._constraints()

    # ----------------------------------------------------------------------------------------- weights
    @property
    def w_q(self) -> Tensor:
        """Query weights ``(H, d_k, d)``, tied to ``W_k`` by the coupling."""
        if self.coupling == "repulsive":
            return -self.w_k
        if self.coupling == "barrier":
            return self.w_k
        return self._w_q

    @property
    def coupling_matrix(self) -> Tensor:
        """``A^h = W_k^hT W_q^h``, shape ``(H, d, d)`` (Theorem 1)."""
        return self.w_k.transpose(-1, -2) @ self.w_q

    @property
    def has_sylvester(self) -> bool:
        """Whether the low-rank Sylvester determinant applies to these options."""
        return not self.include_current or (self.w_v is None and self.w_o is None)

    @property
    def sylvester_rank(self) -> int:
        """Size ``r`` of the Sylvester determinant."""
        return self.n_heads * (self.head_dim + int(self.include_current))

    @property
    def uses_sylvester(self) -> bool:
        """Whether :meth:`log_abs_det_blocks` takes the ``r x r`` path."""
        if self.logdet == "auto":
            return self.has_sylvester and self.sylvester_rank < self.dim
        return self.logdet == "sylvester"

    @property
    def is_diffeomorphism(self) -> bool:
        """Whether the options guarantee ``det J_tt >= 1`` everywhere, so that ``x -> z`` is a global diffeomorphism:
        repulsive coupling, one head, values ``= x`` and strict causality (class docstring)."""
        return (self.coupling == "repulsive" and self.n_heads == 1 and self.w_v is None and self.w_o is None
                and not self.include_current)

    @property
    def bijective(self) -> bool:  # type: ignore[override]
        """Pyro's claim ``T.inv(T(z)) = z`` and ``T(T.inv(x)) = x`` everywhere: true for :attr:`is_diffeomorphism` only."""
        return self.is_diffeomorphism

    @property
    def domain(self) -> constraints.Constraint:  # type: ignore[override]
        """The latents ``z`` ``(..., T, d)`` that ``z -> x`` maps: ``R^{T x d}``, or those whose solve succeeds. One
        object per transform, as torch's and Pyro's transforms keep (``transform.inv.codomain is transform.domain``)."""
        return self._domain

    @property
    def codomain(self) -> constraints.Constraint:  # type: ignore[override]
        """The trajectories ``x`` ``(..., T, d)`` that ``z -> x`` returns: ``R^{T x d}``, or those with every
        ``det J_tt > 0``. One object per transform (``transform.inv.domain is transform.codomain``)."""
        return self._codomain

    def _constraints(self) -> tuple[constraints.Constraint, constraints.Constraint]:
        """``(domain, codomain)`` for these options (class docstring), made once at construction."""
        if self.is_diffeomorphism:
            everywhere = constraints.independent(constraints.real, 2)
            return everywhere, everywhere
        return _SolvableLatents(self), _RegularTrajectories(self)

    def _output_map(self) -> Tensor:
        """``W_o^h``, shape ``(H, d, d_v)``; ``I / H`` without an output projection."""
        if self.w_o is not None:
            return self.w_o
        eye = torch.eye(self.dim, dtype=self.w_k.dtype, device=self.w_k.device)
        return (eye / self.n_heads).expand(self.n_heads, self.dim, self.dim)

    def _value_map(self) -> Tensor:
        """``W_v^h``, shape ``(H, d_v, d)``; the identity without a value projection."""
        if self.w_v is not None:
            return self.w_v
        eye = torch.eye(self.dim, dtype=self.w_k.dtype, device=self.w_k.device)
        return eye.expand(self.n_heads, self.dim, self.dim)

    # ------------------------------------------------------------------------------------ forward pass
    def validate_embeddings(self, x: Tensor) -> None:
        """Raise ``ValueError`` for a tensor that is not a batch of ``(T, d)`` sequences with ``T >= 1`` in the
        parameters' dtype (half precision excepted, which :meth:`log_abs_det_blocks` promotes, and any dtype inside
        autocast).

        Finiteness is checked while Pyro/torch distribution validation is enabled (the default).
        """
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"embeddings must be a floating-point tensor, got {type(x).__name__}")
        dtype = self.w_k.dtype
        if x.dtype not in (dtype, torch.float16, torch.bfloat16) and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"embeddings are {x.dtype} but the transform's parameters are {dtype}: "
                             f"convert one (x.to({dtype}) or transform.to({x.dtype}))")
        if x.dim() < 2:
            raise ValueError(f"embeddings must have shape (..., T, d), got {tuple(x.shape)}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"embeddings have dim {x.shape[-1]}, the transform expects d = {self.dim}")
        if x.shape[-2] == 0:
            raise ValueError("empty sequence (T = 0): the attention prior needs at least one position")
        if Distribution._validate_args and not bool(torch.isfinite(x).all()):
            raise ValueError("embeddings contain NaN or inf")

    def attend(self, x: Tensor, start: int = 0) -> AttentionState:
        """Attention of queries ``x[:, start:]`` over keys/values ``x``; ``x`` has shape ``(N, S, d)``."""
        n, s_len, _ = x.shape
        w_q = self.w_q
        k = torch.einsum("hkd,nsd->nhsk", self.w_k, x)  # (N, H, S, d_k)
        q = torch.einsum("hkd,ntd->nhtk", w_q, x[:, start:])  # (N, H, Tq, d_k)
        v = x.unsqueeze(1) if self.w_v is None else torch.einsum("hvd,nsd->nhsv", self.w_v, x)  # (N, H|1, S, d_v)
        t_idx = torch.arange(start, s_len, device=x.device)
        s_idx = torch.arange(s_len, device=x.device)
        allowed = (s_idx <= t_idx[:, None]) if self.include_current else (s_idx < t_idx[:, None])
        has_context = t_idx >= 1
        allowed = allowed | ~has_context[:, None]  # keep the first row finite, zeroed below
        scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))  # (N, H, Tq, S)
        alpha = torch.softmax(scores, dim=-1) * has_context[:, None].to(x.dtype)
        return AttentionState(x=x, start=start, alpha=alpha, q=q, k=k, v=v.expand(n, self.n_heads, -1, -1), w_o=self.w_o)

    def _flat(self, x: Tensor) -> tuple[Tensor, torch.Size]:
        self.validate_embeddings(x)
        batch = x.shape[:-2]
        return x.reshape(-1, *x.shape[-2:]), batch

    def _inverse(self, x: Tensor) -> Tensor:
        """``z_t = x_t - c_t(x)`` (eq. 4), parallel over positions."""
        flat, batch = self._flat(x)
        return (flat - self.attend(flat).context).reshape(*batch, *flat.shape[-2:])

    # ------------------------------------------------------------------------------ Jacobian diagonal
    def jacobian_blocks(self, state: AttentionState) -> Tensor:
        """Explicit diagonal blocks ``J_tt = dz_t/dx_t`` (Theorem 1, Appendix A), shape ``(N, Tq, d, d)``."""
        x, alpha, q, k, v = state.x, state.alpha, state.q, state.k, state.v
        cov_vk = weighted_cross_covariance(alpha, v, k)  # (N, H, Tq, d_v, d_k)
        inner = cov_vk @ self.w_q.unsqueeze(1)  # (N, H, Tq, d_v, d)  = W_v Sigma W_k^T W_q
        if self.include_current:
            a_tt = state.self_weight[..., None, None]  # (N, H, Tq, 1, 1)
            v_t = v[:, :, state.start :]  # (N, H, Tq, d_v)
            dev = v_t - weighted_mean(alpha, v)  # W_v (x_t - mu'_t)
            kq = torch.einsum("hkd,nhtk->nhtd", self.w_k, q)  # W_k^T q_t, (N, H, Tq, d)
            inner = inner + a_tt * (self._value_map().unsqueeze(1) + dev.unsqueeze(-1) * kq.unsqueeze(-2))
        if self.w_o is None:  # W_o^h = I / H: average the heads instead of multiplying by identities
            mixed = inner.mean(dim=1)  # (N, Tq, d, d)
        else:
            mixed = torch.einsum("hdv,nhtve->ntde", self.w_o, inner)  # (N, Tq, d, d)
        eye = torch.eye(self.dim, dtype=x.dtype, device=x.device)
        return eye - mixed

    def _sylvester_matrix(self, state: AttentionState) -> tuple[Tensor | None, Tensor]:
        """``(D_t, M_t)`` with ``det J_tt = D_t^d det(I_r - M_t / D_t)`` (Sylvester), ``M_t = W^T U``.

        Strict: ``M^{hg} = W_q^h W_o^g W_v^g Sigma^g W_k^gT = Cov_{alpha^g}(W_q^h W_o^g v^g, k^g)``, ``D = 1``
        (returned as ``None``).
        Current position included (no projections), with ``U^g = [Sigma'^g W_k^gT | a^g (x_t - mu'^g)] / H``,
        ``W^h = [W_q^hT | W_k^hT q^h_t]`` and ``D = 1 - mean_h a^h_tt`` (Appendix A; docs/DERIVATIONS.md, section 2).
        """
        alpha, q, k, v = state.alpha, state.q, state.k, state.v
        n, h, tq, _ = alpha.shape
        alpha_g = alpha.unsqueeze(1)  # (N, 1, G, Tq, S): weights of head g
        k_g = k.unsqueeze(1)  # (N, 1, G, S, d_k)
        if not self.include_current:
            left = torch.einsum("hkd,gdv,ngsv->nhgsk", self.w_q, self._output_map(), v)  # (N, H, G, S, d_k)
            blocks = weighted_cross_covariance(alpha_g, left, k_g)  # (N, H, G, Tq, d_k, d_k)
            d_t = None
        else:
            qk_all = torch.cat([state.x.unsqueeze(1) @ self.w_q.transpose(-1, -2), k], dim=-1)  # (N, H, S, 2d_k)
            feats = qk_all.unsqueeze(2)  # (N, H, 1, S, 2d_k): features of head h
            cov = weighted_cross_covariance(alpha_g, feats, k_g)  # (N, H, G, Tq, 2d_k, d_k)
            mean = weighted_mean(alpha_g, feats)  # (N, H, G, Tq, 2d_k)
            current = qk_all[:, :, state.start :].unsqueeze(2)  # (N, H, 1, Tq, 2d_k)
            dev = state.self_weight.unsqueeze(1).unsqueeze(-1) * (current - mean)  # (N, H, G, Tq, 2d_k)
            top = torch.cat([cov[..., : self.head_dim, :], dev[..., : self.head_dim, None]], dim=-1)
            q_h = q.unsqueeze(2).unsqueeze(-2)  # (N, H, 1, Tq, 1, d_k)
            bottom = q_h @ torch.cat([cov[..., self.head_dim :, :], dev[..., self.head_dim :, None]], dim=-1)
            blocks = torch.cat([top, bottom], dim=-2) / h  # (N, H, G, Tq, d_k+1, d_k+1)
            d_t = 1.0 - state.self_weight.mean(dim=1)  # (N, Tq)
        b = blocks.shape[-1]
        m = blocks.permute(0, 3, 1, 4, 2, 5).reshape(n, tq, h * b, h * b)  # (N, Tq, r, r)
        return d_t, m

    def log_abs_det_blocks(self, x: Tensor, state: AttentionState | None = None) -> tuple[Tensor, Tensor]:
        """``(log|det J_tt|, sign det J_tt)`` per position, shapes ``batch x T``: the margin barrier's terms.

        Determinants are taken outside autocast in at least float32.
        """
        flat, batch = self._flat(x)
        device_type = flat.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            if flat.dtype in (torch.float16, torch.bfloat16):
                flat = flat.float()
            state = state if state is not None else self.attend(flat)
            if self.uses_sylvester:
                d_t, m = self._sylvester_matrix(state)
                eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
                sign, logabs = slogdet(eye - (m if d_t is None else m / d_t[..., None, None]))
                if d_t is not None:
                    logabs = logabs + self.dim * torch.log(d_t.abs())
                    sign = sign * torch.sign(d_t) ** self.dim
            else:
                sign, logabs = slogdet(self.jacobian_blocks(state))
        return logabs.reshape(*batch, -1), sign.reshape(*batch, -1)

    def log_abs_det_jacobian(self, z: Tensor, x: Tensor) -> Tensor:
        """``log|dx/dz| = -sum_t log|det J_tt|``, shape ``batch`` (Theorem 1, eq. 11)."""
        return -self.log_abs_det_blocks(x)[0].sum(-1)

    # ------------------------------------------------------------------------------ generative z -> x
    def _call(self, z: Tensor) -> Tensor:
        """``x = T(z)``: solve ``x_t - c_t(x_{<t}, x_t) = z_t`` position by position for a root on the regular branch
        (``det J_tt > 0``, the prior's support), differentiably; raises :class:`InversionError` naming the first
        position (and batch element) where none was found."""
        flat, batch = self._flat(z)
        x, failed_at = self._solve_sequence(flat, stop_at_failure=True)
        if bool((failed_at < flat.shape[1]).any()):
            row = int(failed_at.argmin())
            element = tuple(int(i) for i in torch.unravel_index(torch.tensor(row), batch)) if batch else ()
            raise InversionError(
                f"z -> x found no root on the regular branch (det J_tt > 0) at position t={int(failed_at[row])} "
                f"(batch element {element}): z_t has no regular preimage there, or Newton's method and the "
                f"continuation from z_t both missed it (coupling={self.coupling!r}, include_current={self.include_current})"
            )
        xs: list[Tensor] = []
        for t in range(flat.shape[1]):
            prefix = torch.stack(xs, dim=1) if xs else flat[:, :0]
            xs.append(self._implicit_step(prefix, x[:, t], flat[:, t], t))
        return torch.stack(xs, dim=1).reshape(*batch, *flat.shape[-2:])

    def _implicit_step(self, prefix: Tensor, x_t: Tensor, z_t: Tensor, t: int) -> Tensor:
        """One Newton step with autograd on, from the root ``x_t`` ``(N, d)`` for the (differentiable) ``prefix``: by the
        implicit function theorem its derivatives in ``z_t``, the prefix and the parameters are exact (``F(x_t) = 0``,
        ``J_tt`` held fixed)."""
        state = self.attend(torch.cat([prefix, x_t.unsqueeze(1)], dim=1), start=t)
        residual = x_t - state.context[:, 0] - z_t
        jac = self.jacobian_blocks(state)[:, 0].detach()
        return x_t - solve(jac, residual.unsqueeze(-1)).squeeze(-1)

    @torch.no_grad()
    def _solve_sequence(self, z: Tensor, stop_at_failure: bool = False) -> tuple[Tensor, Tensor]:
        """Regular-branch roots for a flat batch ``z`` ``(N, T, d)``, no gradient: ``(x, failed_at)``, ``failed_at`` ``(N,)``
        the first position where a row has no regular root found, ``T`` where every position was solved. A row
        stops at its failure (its later positions keep ``z``); with ``stop_at_failure`` every row stops there."""
        n, t_len, _ = z.shape
        x = z.clone()
        failed_at = torch.full((n,), t_len, dtype=torch.long, device=z.device)
        for t in range(t_len):
            rows = (failed_at == t_len).nonzero().flatten()
            if rows.numel() == 0 or (stop_at_failure and rows.numel() < n):
                break
            x_t, found = self.solve_position(x[rows, :t], z[rows, t], t)
            x[rows[found], t] = x_t[found]
            failed_at[rows[~found]] = t
        return x, failed_at

    @torch.no_grad()
    def solve_position(self, prefix: Tensor, z_t: Tensor, t: int, guess: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x_t`` solving ``x_t - c_t(x_{<t}, x_t) = z_t`` row by row, and a mask of the rows solved on the regular branch.

        Shapes ``(N, t, d)``, ``(N, d)`` -> ``(N, d)``, ``(N,)``. A row counts as solved when its relative residual is
        within the tolerance and ``det J_tt > 0`` at the root. Newton's method (:meth:`_newton`) runs from ``guess``
        ``(N, d)`` (default ``z_t``); the rows it leaves unsolved (no convergence, or a root on the folded branch) run
        it again from the end of the continuation path of :meth:`_continuation`, then from ``z_t + W_o W_v x_s`` for
        each past ``s`` (the roots where attention sits on one position). A row still unsolved is marked False and
        holds an iterate (finite or not); the others are solved as usual. Unlike :meth:`_call` it never raises and
        has no gradient: for particle filters that drop the particles whose solve fails
        (:class:`inference.smc.TrajectorySMC`).
        """
        x_t, found = self._regular_newton(prefix, z_t, z_t if guess is None else guess, t)
        for restart in range(t + 1):
            todo = (~found).nonzero().flatten()
            if todo.numel() == 0:
                break
            if restart == 0:
                start, reached = self._continuation(prefix[todo], z_t[todo], t)
            else:
                value = torch.einsum("hdv,hve,ne->nd", self._output_map(), self._value_map(), prefix[todo, restart - 1])
                start, reached = z_t[todo] + value, torch.ones_like(todo, dtype=torch.bool)
            x_new, solved = self._regular_newton(prefix[todo], z_t[todo], start, t)
            solved &= reached
            x_t[todo[solved]], found[todo[solved]] = x_new[solved], True
        return x_t, found

    def _regular_newton(self, prefix: Tensor, z_t: Tensor, start: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """Newton's method from ``start`` (:meth:`_newton`): ``(x_t, found)``, ``found`` ``(N,)`` marking the rows that
        converged to a root with ``det J_tt > 0``."""
        x_t, err = self._newton(prefix, z_t, start, t)
        found = err <= self._tolerance(x_t.dtype)
        rows = found.nonzero().flatten()
        if rows.numel() > 0:
            seq = torch.cat([prefix[rows], x_t[rows].unsqueeze(1)], dim=1)
            found[rows] = self.log_abs_det_blocks(seq, self.attend(seq, start=t))[1][:, 0] > 0
        return x_t, found

    def _tolerance(self, dtype: torch.dtype) -> float:
        return self.newton_tol if self.newton_tol is not None else 1e3 * torch.finfo(dtype).eps

    def _continuation(self, prefix: Tensor, z_t: Tensor, t: int) -> tuple[Tensor, Tensor]:
        r"""Follow the roots of ``H(x, s) = x - s c_t(x) - z_t`` from ``(z_t, 0)`` to ``s = 1`` by pseudo-arclength
        continuation, row by row, without gradient. Returns ``(x, reached)``: where each row's path crosses ``s = 1``
        (a start for Newton's method at ``s = 1``), and a mask of the rows whose path got there.

        At ``s = 0`` the only root is ``x = z_t``, with ``dH/dx = I``. Along the path ``dH/dx = (1 - s) I + s J_tt``; where
        the scaled map folds the path turns back in ``s`` and ``det dH/dx`` changes sign, which the steps along the
        tangent of the curve ``(x, s)`` follow. Strict causality bounds the path, ``|x - z_t| = s |c_t| <=
        max_s |W_o W_v x_s|``: starting from the only root at ``s = 0`` it must leave the strip ``0 <= s <= 1`` at
        ``s = 1``, moving forward in ``s`` after an even number of turns, so at a root with ``det J_tt > 0`` (for almost
        every ``z_t``; the map is proper of degree one). With the current position included ``c_t`` grows with ``x_t``
        and the path can escape instead: ``z_t`` may have no preimage.
        """
        n, d = z_t.shape
        scale = 1.0 + z_t.abs().amax(-1)
        tol = self._tolerance(z_t.dtype) ** 0.5  # the corrector's; Newton polishes the end point
        eye = torch.eye(d, dtype=z_t.dtype, device=z_t.device)
        e_s = torch.zeros(n, d + 1, 1, dtype=z_t.dtype, device=z_t.device)
        e_s[:, d] = 1.0  # the s-direction

        def homotopy(rows: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
            """``H`` ``(N, d)`` and ``dH/du = [dH/dx | dH/ds]`` ``(N, d, d + 1)`` at ``u = (x, s)``."""
            x, s = u[:, :d], u[:, d:]
            state = self.attend(torch.cat([prefix[rows], x.unsqueeze(1)], dim=1), start=t)
            c = state.context[:, 0]
            h_x = (1 - s).unsqueeze(-1) * eye + s.unsqueeze(-1) * self.jacobian_blocks(state)[:, 0]
            return x - s * c - z_t[rows], torch.cat([h_x, -c.unsqueeze(-1)], dim=-1)

        def bordered(jac: Tensor, tangent: Tensor, rhs: Tensor) -> tuple[Tensor, Tensor]:
            """Solve ``[dH/du; tangent^T] y = rhs``, ``(N, d + 1)``: regular at simple turning points."""
            y, singular = solve_ex(torch.cat([jac, tangent.unsqueeze(-2)], dim=-2), rhs)
            return y.squeeze(-1), singular

        def unit_tangent(jac: Tensor, previous: Tensor) -> tuple[Tensor, Tensor]:
            """The null vector of ``dH/du`` on the side of ``previous``, normalised, and whether the orientation
            ``sign(det [dH/du; tangent^T]) = sign(det dH/dx) sign(ds)`` is the start's (positive): it is constant along
            the path, so a step that flips it has jumped to another branch."""
            tangent, singular = bordered(jac, previous, e_s[: jac.shape[0]])
            tangent = tangent / tangent.norm(dim=-1, keepdim=True)
            orientation = slogdet(torch.cat([jac, tangent.unsqueeze(-2)], dim=-2))[0]
            return tangent, ~singular & (orientation > 0)

        u = torch.cat([z_t, z_t.new_zeros(n, 1)], dim=-1)
        tangent, _ = unit_tangent(homotopy(torch.arange(n, device=z_t.device), u)[1], e_s[..., 0])
        step = 0.1 * scale
        x_end, reached, going = z_t.clone(), torch.zeros_like(scale, dtype=torch.bool), torch.ones_like(scale, dtype=torch.bool)
        for _ in range(_CONTINUATION_STEPS):
            rows = going.nonzero().flatten()
            if rows.numel() == 0:
                break
            here, direction, h = u[rows], tangent[rows], step[rows]
            predicted = here + h[:, None] * direction
            v = predicted
            for iteration in range(_CORRECTOR_ITERATIONS + 1):  # Newton on H = 0 normal to the tangent
                res, jac = homotopy(rows, v)
                if iteration == _CORRECTOR_ITERATIONS or bool((res.abs().amax(-1) <= tol * scale[rows]).all()):
                    break
                offset = ((v - predicted) * direction).sum(-1, keepdim=True)
                v = v - bordered(jac, direction, torch.cat([res, offset], dim=-1).unsqueeze(-1))[0]
            new_direction, oriented = unit_tangent(jac, direction)
            ok = (oriented & (res.abs().amax(-1) <= tol * scale[rows]) & ((v - predicted).norm(dim=-1) <= h / 2)
                  & ((new_direction * direction).sum(-1) >= _LARGEST_TURN))
            crossed = ok & (v[:, d] >= 1)
            fraction = ((1 - here[:, d]) / (v[:, d] - here[:, d])).unsqueeze(-1)  # linear to s = 1
            x_end[rows[crossed]] = (here[:, :d] + fraction * (v[:, :d] - here[:, :d]))[crossed]
            reached[rows[crossed]] = True
            u[rows[ok]], tangent[rows[ok]] = v[ok], new_direction[ok]
            distance = (u[rows, :d] - z_t[rows]).norm(dim=-1)  # |x - z_t|, bounded under strict causality
            step[rows] = torch.where(ok, torch.minimum(1.5 * h, (scale[rows] + distance) / 4), h / 2)
            going[rows] = ~crossed & (step[rows] > _SMALLEST_STEP * scale[rows]) & (distance < _FARTHEST * scale[rows])
        return x_end, reached

    def _newton(self, prefix: Tensor, z_t: Tensor, x_t: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """Damped Newton iterations for ``F(x_t) = x_t - c_t - z_t`` from ``x_t``, row by row; returns
        ``(x_t, relative residual)`` (``inf`` where the iterate is not finite).

        Each iteration works on the rows still going: a row stops when it converges or stalls (its
        ``J_tt`` is singular, or no step down to ``2^-20`` of Newton's strictly reduces ``|F|``; the second
        happens where attention saturates: ``J_tt`` is about ``I`` while ``c_t`` jumps as ``x_t`` moves, ``|F|``
        stays flat along Newton's direction, and further iterations cannot help).
        """
        scale = 1.0 + z_t.abs().amax(-1)
        tol = self._tolerance(z_t.dtype)

        def residual(rows: Tensor, x: Tensor) -> tuple[Tensor, AttentionState]:
            state = self.attend(torch.cat([prefix[rows], x.unsqueeze(1)], dim=1), start=t)
            return x - state.context[:, 0] - z_t[rows], state

        with torch.no_grad():
            rows = torch.arange(z_t.shape[0], device=z_t.device)
            x, (res, state) = x_t, residual(rows, x_t)
            x_t, err = x_t.clone(), res.abs().amax(-1) / scale
            going = err > tol
            for _ in range(self.newton_max_iter):
                if not bool(going.all()):
                    rows, x = rows[going], x[going]
                    if rows.numel() == 0:
                        break
                    res, state = residual(rows, x)
                step, singular = self._newton_step(state, res)
                step = torch.where(singular[:, None], 0.0, step)
                shrink = torch.ones_like(rows, dtype=x.dtype)
                for _ in range(20):  # halve the step where it does not reduce the residual (or is not finite)
                    candidate = x - shrink[:, None] * step
                    new_res, new_state = residual(rows, candidate)
                    worse = ~(new_res.norm(dim=-1) < res.norm(dim=-1))
                    if not bool(worse.any()):
                        break
                    shrink = torch.where(worse, shrink / 2, shrink)
                x, res, state = candidate, new_res, new_state
                x_t[rows], err[rows] = x, res.abs().amax(-1) / scale[rows]
                going = (err[rows] > tol) & ~singular & ~worse
        return x_t, torch.where(torch.isfinite(err), err, torch.inf)

    def _newton_step(self, state: AttentionState, res: Tensor) -> tuple[Tensor, Tensor]:
        """``(J_tt^{-1} F, singular)`` for one query position per row: ``state`` from ``attend(x, start=t)`` with
        ``x`` of length ``t + 1``, ``F`` ``(N, d)``; ``singular`` ``(N,)`` marks a singular ``J_tt`` (step meaningless).

        Strict causal and low rank (:attr:`uses_sylvester`): ``J_tt = I - U V`` with ``V = [W_q^h]_h`` ``(r, d)``
        and ``U = [W_o^h W_v^h Sigma^h_t W_k^hT]_h`` ``(d, r)``, so by Woodbury
        ``J_tt^{-1} F = F + U (I_r - V U)^{-1} V F``: an ``r x r`` solve (``V U`` is the Sylvester matrix
        ``M_t``). Otherwise the ``d x d`` solve with :meth:`jacobian_blocks`.
        """
        if self.include_current or not self.uses_sylvester:
            step, singular = solve_ex(self.jacobian_blocks(state)[:, 0], res.unsqueeze(-1))
            return step.squeeze(-1), singular
        cov_vk = weighted_cross_covariance(state.alpha, state.v, state.k)[:, :, 0]  # W_v Sigma W_k^T, (N, H, d_v, d_k)
        u = torch.einsum("hdv,nhvk->ndhk", self._output_map(), cov_vk).flatten(-2)  # (N, d, r)
        v = self.w_q.flatten(0, 1)  # (r, d)
        eye = torch.eye(v.shape[0], dtype=u.dtype, device=u.device)
        inner, singular = solve_ex(eye - v @ u, (res @ v.T).unsqueeze(-1))  # (N, r, 1)
        return res + (u @ inner).squeeze(-1), singular

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, n_heads={self.n_heads}, head_dim={self.head_dim}, value_proj={self.w_v is not None}, "
            f"output_proj={self.w_o is not None}, include_current={self.include_current}, "
            f"coupling={self.coupling!r}, logdet={self.logdet!r}"
        )


class _RegularTrajectories(constraints.Constraint):
    """Sequences ``x`` ``(..., T, d)`` with ``det J_tt > 0`` at every position: the support of a transform that can
    fold (its ``codomain``)."""

    is_discrete = False
    event_dim = 2

    def __init__(self, transform: CausalAttentionTransform) -> None:
        super().__init__()
        self.transform = transform

    def check(self, x: Tensor) -> Tensor:
        return (self.transform.log_abs_det_blocks(x)[1] > 0).all(-1)


class _SolvableLatents(constraints.Constraint):
    """Latents ``z`` ``(..., T, d)`` for which ``z -> x`` finds a root on the regular branch at every position (the
    ``domain`` of a transform that can fold; the check runs the solver)."""

    is_discrete = False
    event_dim = 2

    def __init__(self, transform: CausalAttentionTransform) -> None:
        super().__init__()
        self.transform = transform

    def check(self, z: Tensor) -> Tensor:
        flat, batch = self.transform._flat(z)
        return (self.transform._solve_sequence(flat)[1] == flat.shape[1]).reshape(batch)


@biject_to.register(_RegularTrajectories)
@transform_to.register(_RegularTrajectories)
def _no_map_onto_regular_trajectories(constraint: _RegularTrajectories) -> Transform:
    raise NotImplementedError(
        "no map from R^{T x d} onto the trajectories with every det J_tt > 0 (the support of an attention prior "
        "whose map can fold) is known, so an autoguide cannot parametrize it: give the EmbeddingPrior a "
        "barrier_floor (its support is then R^{T x d})"
    )
