"""Pyro's AdamW in a cosine schedule, with global gradient clipping; a non-finite gradient stops training."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from pyro.optim import PyroLRScheduler
from torch import Tensor

from prob_attention.gpt import decays

from .config import TrainConfig
from .network import MAPNet

__all__ = ["TrainingDiverged", "GlobalClipScheduler", "make_optimizer"]


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became non-finite; the last good checkpoint is kept."""



class GlobalClipScheduler(PyroLRScheduler):
    """A Pyro LR scheduler that first clips the global gradient norm of ``parameters()`` to ``max_norm``.

    Pyro steps one optimiser per parameter; clipping each parameter alone (Pyro's ``clip_args``) is not the
    usual global clipping, so it happens here, over all parameters together, in a fixed order. A non-finite
    norm raises :class:`TrainingDiverged` before any parameter changes. ``last_grad_norm`` keeps the norm.
    """

    def __init__(
        self,
        scheduler_constructor: type,
        optim_args: dict[str, Any],
        *,
        parameters: Callable[[], Iterable[Tensor]],
        max_norm: float,
    ) -> None:
        super().__init__(scheduler_constructor, optim_args)
        self.parameters, self.max_norm = parameters, max_norm
        self.last_grad_norm: Tensor | None = None

    def __call__(self, params: Iterable[Tensor], *args: Any, **kwargs: Any) -> None:
        try:
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(
                list(self.parameters()), self.max_norm, error_if_nonfinite=True
            )
        except RuntimeError as err:
            raise TrainingDiverged(f"non-finite gradient norm; no parameter was updated ({err})") from err
        super().__call__(params, *args, **kwargs)


def make_optimizer(net: MAPNet, config: TrainConfig, total_steps: int) -> GlobalClipScheduler:
    """AdamW in Pyro's cosine scheduler, weight decay on matrices only (:func:`~prob_attention.gpt.decays`)."""
    decayed = {f"map.{name}": decays(p) for name, p in net.named_parameters()}

    def optim_args(param_name: str) -> dict[str, Any]:
        decay = config.weight_decay if decayed[param_name] else 0.0
        return {"lr": config.lr, "betas": (config.beta1, config.beta2), "weight_decay": decay}

    return GlobalClipScheduler(
        torch.optim.lr_scheduler.CosineAnnealingLR,
        {
            "optimizer": torch.optim.AdamW,
            "optim_args": optim_args,
            "T_max": total_steps,
            "eta_min": config.lr * config.min_lr_ratio,
        },
        parameters=net.parameters,
        max_norm=config.grad_clip,
    )
