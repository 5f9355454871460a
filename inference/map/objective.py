"""The MAP objective as a Pyro model: the next-character likelihood and the embedding prior, an empty guide."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .network import MAPNet, NetOutput

__all__ = ["NextCharacter", "StepStats", "map_model", "jacobian_sq_norm", "empty_guide"]


class NextCharacter(dist.Categorical):
    """``Categorical(logits)`` over the next character, scored with torch's fused ``log_softmax`` + NLL.

    The distribution is the ordinary categorical; only :meth:`log_prob` is computed as
    ``-F.cross_entropy(logits, value, reduction="none")`` (in float32 at least), so that the CE-only Pyro
    objective is the same floating-point computation as a plain PyTorch cross-entropy loss.
    Logits ``(..., V)``, batch shape ``(...)``.
    """

    def __init__(self, logits: Tensor, validate_args: bool | None = None) -> None:
        self._raw_logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        super().__init__(logits=self._raw_logits, validate_args=validate_args)

    def expand(self, batch_shape: torch.Size | tuple[int, ...], _instance: Any = None) -> NextCharacter:
        shape = (*batch_shape, self._raw_logits.shape[-1])
        return NextCharacter(self._raw_logits.expand(shape), validate_args=False)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        shape = torch.broadcast_shapes(value.shape, self.batch_shape)
        logits = self._raw_logits.expand(*shape, self._raw_logits.shape[-1]).reshape(-1, self._raw_logits.shape[-1])
        nll = F.cross_entropy(logits, value.long().expand(shape).reshape(-1), reduction="none")  # (N,)
        return -nll.reshape(shape)


@dataclass
class StepStats:
    """Running sums over an epoch, kept as tensors on the device (no host sync per step)."""

    ce: Tensor
    prior: Tensor
    clamped: Tensor
    steps: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> StepStats:
        """Empty sums on ``device``."""
        def zero(dtype: torch.dtype) -> Tensor:
            return torch.zeros((), dtype=dtype, device=device)

        return cls(zero(torch.float32), zero(torch.float32), zero(torch.long))


def map_model(
    net: MAPNet, forward: Callable[[Tensor], NetOutput], idx: Tensor, targets: Tensor, lambda_m: float, amp: bool,
    stats: StepStats | None = None, jacobian_reg: float = 0.0, label_smoothing: float = 0.0,
) -> None:
    """The Pyro model of the MAP objective (module docstring); ``forward`` is ``net`` or its DDP wrapper.

    ``jacobian_reg > 0`` adds the factor ``-lambda_J / 2 * ||J||_F^2 / (B T)``, ``J = d logits / d x`` the
    Jacobian of all logits with respect to the decoded embeddings, through :func:`jacobian_sq_norm`.
    ``label_smoothing = epsilon > 0`` adds the factor ``-epsilon * (U - C) / (B T)``, ``C = -log p(y)`` the
    observed characters' cross-entropy and ``U = -mean_k log p(k)`` that of the uniform target, so that the
    objective is torch's label-smoothed cross-entropy ``(1 - epsilon) C + epsilon U``.
    """
    pyro.module("map", net)
    # the Jacobian penalty differentiates twice: fused attention kernels have no second derivative
    kernels = sdpa_kernel(SDPBackend.MATH) if jacobian_reg > 0 else contextlib.nullcontext()
    with kernels, torch.autocast(device_type=idx.device.type, dtype=torch.bfloat16, enabled=amp):
        out = forward(idx)
    n = targets.numel()
    with pyro.plate("tokens", n), poutine.scale(scale=1.0 / n):
        obs = pyro.sample("next_char", NextCharacter(out.logits.reshape(n, -1)), obs=targets.reshape(n))
    if out.prior_log_density is not None:
        pyro.factor("embedding_prior", lambda_m * out.prior_log_density.mean())
    if label_smoothing > 0:
        log_p = F.log_softmax(out.logits.reshape(n, -1).float(), dim=-1)  # (N, V)
        uniform_minus_observed = log_p.gather(1, obs.unsqueeze(1)).squeeze(1) - log_p.mean(dim=-1)  # U - C, (N,)
        pyro.factor("label_smoothing", -label_smoothing * uniform_minus_observed.sum() / n)
    if jacobian_reg > 0:
        pyro.factor("jacobian_penalty", -0.5 * jacobian_reg * jacobian_sq_norm(out.logits, out.decoded) / n)
    if stats is not None:
        with torch.no_grad():
            stats.ce += F.cross_entropy(out.logits.reshape(n, -1).float(), obs)
            if out.prior_log_density is not None:
                stats.prior += out.prior_log_density.mean()
                stats.clamped += out.clamped.sum()
        stats.steps += 1


def jacobian_sq_norm(outputs: Tensor, inputs: Tensor, create_graph: bool = True) -> Tensor:
    """An unbiased estimate of ``||d outputs / d inputs||_F^2`` from one Gaussian random projection,
    ``||J^T v||^2`` with ``v ~ N(0, I)`` over the outputs (Hoffman et al. 2019, "Robust learning with Jacobian
    regularization", with a Gaussian rather than a spherical projection: ``E[v v^T] = I`` makes it unbiased).
    With ``create_graph`` (for a penalty) the graph of the vector-Jacobian product is kept, so it can be
    differentiated; without it the estimate is a measurement.
    """
    v = torch.randn_like(outputs)
    (jtv,) = torch.autograd.grad((outputs * v).sum(), inputs, create_graph=create_graph)
    return jtv.float().pow(2).sum()


def empty_guide(*args: Any, **kwargs: Any) -> None:
    """MAP: no latent sample sites, the parameters are point estimates."""
