"""Measurements on trained runs shared by the experiments: BPC under embedding noise and the prior's
diagnostics of Table 1 (Section 7.3, 7.4)."""

from __future__ import annotations

import torch
from torch import Tensor

from inference.map import MAPNet
from prob_attention.corpus import window_batches
from prob_attention.weighted_moments import entropy, weighted_variance

from .perturbations import Perturbation, embedding_rms, window_bpc

__all__ = ["NOISE_DRAWS", "NOISE_LEVELS", "NOISE_SEED", "SIGMA_MAX", "embedding_rms", "noisy_bpc", "prior_diagnostics"]

NOISE_DRAWS = 5
"""Noise draws per level, in every noise measurement (noise-robustness, regularization-path)."""

NOISE_SEED = 0
"""The noise seed of every noise measurement; models scored with the same seed see the same noise."""

NOISE_LEVELS = 11
"""Equally spaced noise levels of a robustness sweep, from 0 to its largest sigma."""

SIGMA_MAX = {"absolute": 0.04, "relative": 0.5}
"""The largest sigma of a robustness sweep, in embedding units or as a fraction of each model's embedding RMS
(noise-robustness's module docstring says how 0.04 was chosen; 0.5 x the CE-only run's RMS 0.081 ~ 0.04)."""


@torch.no_grad()
def noisy_bpc(
    net: MAPNet, inputs: Tensor, targets: Tensor, sigma: float, draws: int = NOISE_DRAWS, seed: int = NOISE_SEED,
    batch_size: int = 64,
) -> list[float]:
    """Bits per character with Gaussian noise ``N(0, sigma^2 I)`` added to the input embeddings (Section 7.3).

    ``x = embed(idx) + sigma * eps`` is fed to the GPT's blocks; one BPC per draw, the mean of
    :func:`~experiments.perturbations.window_bpc` over the windows (which all have ``T`` characters), so two
    models scored with the same seed and batch size see the same noise. ``sigma = 0`` is the clean BPC (one draw).
    """
    if sigma < 0 or draws < 1:
        raise ValueError(f"need sigma >= 0 and draws >= 1, got sigma={sigma}, draws={draws}")
    perturbation = Perturbation("noise", sigma) if sigma > 0 else Perturbation("clean")
    return [float(window_bpc(net, inputs, targets, perturbation, draw=k, seed=seed, batch_size=batch_size).mean())
            for k in range(draws if sigma > 0 else 1)]


@torch.no_grad()
def prior_diagnostics(net: MAPNet, inputs: Tensor, batch_size: int = 64) -> dict[str, float]:
    """The prior's diagnostics of Table 1 on windows ``(n, T)``, averaged over windows and positions ``t >= 3``
    (those attending to at least two values: before, ``Sigma_t = 0`` whatever the model).

    - ``entropy``: attention entropy ``H(alpha_t) = -sum_s alpha_ts log alpha_ts`` (nats), over heads.
    - ``var_ratio``: ``Var_alpha / RMS^2``, the attention-weighted variance of the attended values
      ``tr(Sigma_t) / d`` over the sequence's mean square ``mean_t ||x_t||^2 / d`` (scale-free dispersion).
    - ``snr``: ``sum_t ||x_t||^2 / sum_t ||z_t||^2`` with ``z_t = x_t - c_t`` the prior's residual: the
      energy of the embeddings over the energy the prior leaves unexplained. (The paper's formula was lost
      in our copy; this is our reading of "higher SNR: the prior explains more of the embedding variance".)
    - ``log_det``: mean ``log det J_tt``; ``seq_margin``: mean over windows of ``min_{t >= 3} log det J_tt``
      (positions 1 and 2 have ``log det J_tt = 0`` whatever the model).
    """
    net.eval()
    device = next(net.parameters()).device
    sums = {"entropy": 0.0, "var_ratio": 0.0, "log_det": 0.0, "x_energy": 0.0, "z_energy": 0.0, "seq_margin": 0.0}
    n_positions, n_windows = 0, 0
    for idx, _ in window_batches(inputs, inputs, batch_size):
        x = net.gpt.embed(idx.to(device)).float()  # (B, T, d)
        state = net.transform.attend(x)
        alpha = state.alpha  # (B, H, T, T)
        trace = weighted_variance(alpha, state.v).mean(1)  # (B, T): tr(Sigma_t), heads averaged
        ms = x.pow(2).sum(-1).mean(-1, keepdim=True)  # (B, 1): mean_t ||x_t||^2
        z = x - state.context  # (B, T, d)
        logabs, _ = net.transform.log_abs_det_blocks(x, state)  # (B, T)
        keep = slice(2, None)
        sums["entropy"] += float(entropy(alpha).mean(1)[:, keep].sum())
        sums["var_ratio"] += float((trace / ms)[:, keep].sum())
        sums["log_det"] += float(logabs[:, keep].sum())
        sums["x_energy"] += float(x[:, keep].pow(2).sum())
        sums["z_energy"] += float(z[:, keep].pow(2).sum())
        sums["seq_margin"] += float(logabs[:, keep].amin(-1).sum())
        n_positions += x[:, keep].shape[0] * x[:, keep].shape[1]
        n_windows += x.shape[0]
    if n_positions == 0:
        raise ValueError("prior diagnostics need windows of at least 3 positions")
    return {
        "entropy": sums["entropy"] / n_positions,
        "var_ratio": sums["var_ratio"] / n_positions,
        "snr": sums["x_energy"] / sums["z_energy"],
        "log_det": sums["log_det"] / n_positions,
        "seq_margin": sums["seq_margin"] / n_windows,
    }
