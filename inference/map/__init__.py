r"""MAP training through Pyro: a SmallGPT observation model with the embedding prior (Section 7.1).

The Pyro model, per batch of ``B`` windows of ``T`` characters::

    x = gpt.embed(idx)                                     # (B, T, d), the prior's embeddings
    next_char ~ Categorical(gpt.decode(x))                 # obs, scaled by 1 / (B T): mean CE in nats
    x ~ EmbeddingPrior(transform, T, sigma)                # obs, scaled by lambda_m / (B T): the prior, per token

and the guide is empty, so ``Trace_ELBO`` is the MAP loss (eq. 19, 27, 34)::

    L = CE(tokens | x) + lambda_m * L_prior,
    L_prior = -(1/T) sum_t log det J_tt                                   ("margin", the paper's variant)
    L_prior = -(1/T) sum_t [log N(x_t - c_t; 0, sigma^2 I) + log det J_tt] ("full", sigma fixed or learned)

The prior is the run's :class:`~prob_attention.EmbeddingPrior` (:meth:`MAPNet.embedding_prior`), and
its terms come from :meth:`~prob_attention.EmbeddingPrior.position_terms` (``"full"``) or its barrier
terms (``"margin"``). They are computed once, inside the network's forward pass (so DDP sees every
parameter and the epoch's diagnostics reuse them), and enter the model as
``factor(lambda_m * mean_{b,t} log p(x_t | x_{<t}))``, which is the observed site above (a test checks
the two against each other). ``log det J_tt`` is safeguarded at the run's ``barrier_floor``
(:func:`~prob_attention.safe_log_barrier`): where ``det J_tt`` falls to the floor or below it (the
boundary, or past it where the map folds) the log is continued by its tangent line, so no gradient is
ever NaN; such positions are counted and reported. With ``lambda_m = 0`` the
prior is not evaluated at all and an SVI step is, bit for bit, a plain PyTorch step: mean
cross-entropy, global gradient clipping, AdamW (weight decay on matrices only), cosine schedule.

The optimiser is Pyro's: ``pyro.optim`` wraps ``torch.optim.AdamW`` in the cosine scheduler
(:class:`~pyro.optim.PyroLRScheduler`), one optimiser per parameter as Pyro does; the only addition is
:class:`GlobalClipScheduler`, which clips the gradients' *global* norm before the per-parameter steps
(Pyro's own ``clip_args`` clip each parameter separately).

Example:
    >>> config = RunConfig.preset("tiny")
    >>> history = MAPTrainer(config, run_dir=None, progress=False).fit()   # doctest: +SKIP

The package, one concern a module: :mod:`.config` (run settings, presets), :mod:`.network` (the GPT
and its prior as one ``nn.Module``), :mod:`.objective` (the Pyro model and guide), :mod:`.optimizer`
(AdamW, schedule, global clipping), :mod:`.evaluation` (held-out scores), :mod:`.trainer` (the run
loop, checkpoints, resume), :mod:`.loading` (trained runs back from disk), :mod:`.devices`.
Every public name is importable from ``inference.map``.
"""

from .config import PRESETS, PriorConfig, RunConfig, TrainConfig, with_overrides
from .devices import device_name, resolve_device
from .evaluation import evaluate, sequence_margin_of
from .loading import TrainedModel, load_trained
from .network import MAPNet, NetOutput, build_net
from .objective import NextCharacter, StepStats, empty_guide, jacobian_sq_norm, map_model
from .optimizer import GlobalClipScheduler, TrainingDiverged, make_optimizer
from .trainer import CHECKPOINT_DIR, HISTORY_FILE, Data, MAPTrainer

__all__ = [
    "CHECKPOINT_DIR",
    "HISTORY_FILE",
    "PRESETS",
    "Data",
    "GlobalClipScheduler",
    "MAPNet",
    "MAPTrainer",
    "NetOutput",
    "NextCharacter",
    "PriorConfig",
    "RunConfig",
    "StepStats",
    "TrainConfig",
    "TrainedModel",
    "TrainingDiverged",
    "build_net",
    "device_name",
    "empty_guide",
    "evaluate",
    "load_trained",
    "make_optimizer",
    "map_model",
    "jacobian_sq_norm",
    "resolve_device",
    "sequence_margin_of",
    "with_overrides",
]
