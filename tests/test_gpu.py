"""The library on a CUDA device: the barrier's accuracy, a bf16 training step, resume, the particle filter.

Every test is marked ``gpu`` (``python -m pytest -m gpu``) and skips itself without a CUDA device.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator
from pathlib import Path

import pyro
import pytest
import torch
from resume_check import assert_same_run, straight_and_resumed
from tiny_models import random_model
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from inference.map import MAPTrainer, RunConfig, StepStats, build_net
from inference.smc import TrajectorySMC
from inference.trajectory import TrajectoryModel
from prob_attention import CausalAttentionTransform, EmbeddingPrior
from prob_attention.corpus import CharCorpus, bundled_articles

# Deterministic cuBLAS needs this before its first call (cuBLAS reads it once); it changes nothing else.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = pytest.mark.gpu

BARRIER_REL_TOL = 1e-4
"""Largest relative error of the float32 CUDA barrier (values and gradient) against float64 on the CPU: far
above the CPU's own float32 errors at these sizes, far below a wrong determinant."""

BF16_REL_TOL = 1e-2
"""Largest relative difference between a loss under bf16 autocast and the same loss in float32 (bf16 keeps
8 significant bits, a relative precision of 2^-8 per rounding)."""

SMC_PROB_TOL = 0.03
"""Largest difference of a predictive probability between two 4096-particle filters with different random
streams: several times the largest difference between CPU filters of different seeds (CUDA draws its own
random numbers, so the same seed gives another stream)."""


@pytest.fixture
def cuda() -> torch.device:
    """The CUDA device; the test is skipped (with its reason) where there is none."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


@pytest.fixture
def deterministic(cuda: torch.device) -> Iterator[None]:
    """Deterministic CUDA kernels where torch has them, and the math attention kernel (the fused kernels' backward
    passes accumulate in a nondeterministic order), for one test; an op without a deterministic kernel warns
    (the test's own comparison decides). The previous settings are restored after it."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.fixture(scope="module")
def corpus() -> CharCorpus:
    """A small slice of the bundled corpus."""
    articles = bundled_articles()
    return CharCorpus("slice", "".join(articles[:3])[:40_000], articles[3][:3_000], articles[4][:3_000])


def relative_error(value: Tensor, reference: Tensor) -> float:
    """``||value - reference|| / ||reference||`` in float64 on the CPU."""
    reference = reference.detach().cpu().double()
    return float((value.detach().cpu().double() - reference).norm() / reference.norm())


def barrier_and_gradient(transform: CausalAttentionTransform, x: Tensor) -> tuple[Tensor, Tensor]:
    """The prior's barrier ``sum_t log det J_tt`` per sequence and its gradient in ``x``."""
    x = x.detach().requires_grad_()
    barrier = EmbeddingPrior(transform, x.shape[-2], sigma=1.0).barrier(x)
    (grad,) = torch.autograd.grad(barrier.sum(), x)
    return barrier.detach(), grad


@pytest.mark.parametrize("logdet", ["sylvester", "full"])
@pytest.mark.parametrize("coupling", ["free", "barrier"])
def test_the_barrier_on_cuda_equals_the_float64_cpu_closed_form(cuda: torch.device, coupling: str,
                                                                logdet: str) -> None:
    torch.manual_seed(0)
    transform = CausalAttentionTransform(128, 1, 16, coupling=coupling, logdet=logdet)  # the training prior's size
    x = 0.2 * torch.randn(4, 128, 128)  # inside the support: every det J_tt > 0
    expected, expected_grad = barrier_and_gradient(copy.deepcopy(transform).double(), x.double())
    on_cuda = transform.to(cuda)
    barrier, grad = barrier_and_gradient(on_cuda, x.to(cuda))
    assert barrier.device.type == "cuda" and barrier.dtype == torch.float32
    assert relative_error(barrier, expected) <= BARRIER_REL_TOL
    assert relative_error(grad, expected_grad) <= BARRIER_REL_TOL
    log_det_jacobian = on_cuda.log_abs_det_jacobian(on_cuda.inv(x.to(cuda)), x.to(cuda))
    assert relative_error(log_det_jacobian, -expected) <= BARRIER_REL_TOL


def test_the_barrier_under_bf16_autocast_on_cuda_keeps_float32_accuracy(cuda: torch.device) -> None:
    torch.manual_seed(0)
    transform = CausalAttentionTransform(128, 1, 16)
    x = 0.2 * torch.randn(4, 128, 128)  # inside the support: every det J_tt > 0
    expected, _ = barrier_and_gradient(copy.deepcopy(transform).double(), x.double())
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        barrier, grad = barrier_and_gradient(transform.to(cuda), x.to(cuda))
    assert barrier.dtype == torch.float32 and bool(torch.isfinite(grad).all())
    assert relative_error(barrier, expected) <= BARRIER_REL_TOL


def one_map_step(corpus: CharCorpus, amp: bool) -> tuple[float, MAPTrainer]:
    """The loss of one MAP step of the tiny preset on CUDA (``lambda_m = 0.05``, seed 0, the same batch for any
    ``amp``) and the trainer after it."""
    config = RunConfig.preset("tiny", train={"device": "cuda", "amp": amp, "lambda_m": 0.05})
    trainer = MAPTrainer(config, None, corpus, progress=False, log=lambda _: None)
    pyro.clear_param_store()
    optim = trainer.make_optimizer()
    svi = trainer.make_svi(optim)
    idx, tgt = trainer.batch(torch.Generator().manual_seed(0))
    loss = trainer.train_step(svi, optim, idx, tgt, StepStats.zeros(trainer.device))
    return loss, trainer


def test_a_map_step_under_bf16_autocast_on_cuda_is_finite_and_matches_float32(cuda: torch.device,
                                                                             corpus: CharCorpus) -> None:
    loss32, trainer32 = one_map_step(corpus, amp=False)
    loss16, trainer16 = one_map_step(corpus, amp=True)
    assert trainer16.amp and not trainer32.amp
    assert math.isfinite(loss16) and loss16 == pytest.approx(loss32, rel=BF16_REL_TOL)
    initial = build_net(trainer16.config, trainer16.gpt_config).state_dict()  # seeded: the weights before the step
    stepped = trainer16.net.state_dict()
    assert all(v.device.type == "cuda" and bool(torch.isfinite(v).all()) for v in stepped.values())
    assert any(not torch.equal(stepped[k].cpu(), v) for k, v in initial.items())


def test_the_tiny_preset_resumes_on_cuda_bit_identically(deterministic: None, corpus: CharCorpus, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    config = RunConfig.preset("tiny", train={"device": "cuda", "lambda_m": 0.05, "epochs": 3})
    straight, resumed, history, logged = straight_and_resumed(config, corpus, tmp_path, monkeypatch)
    assert resumed.device.type == "cuda" and resumed.amp
    assert_same_run(straight, resumed, history, logged)


def filter_probs(model: TrajectoryModel, text: Tensor, seed: int) -> tuple[Tensor, TrajectorySMC]:
    """The predictive probabilities ``(T, V)`` of a 4096-particle filter that resamples before every step."""
    smc = TrajectorySMC(model, num_particles=4096, ess_threshold=1.0, seed=seed)
    signals = smc.run(text)
    return torch.stack([s.probs for s in signals]), smc


def test_the_particle_filter_on_cuda_matches_the_cpu_one_within_monte_carlo_error(cuda: torch.device) -> None:
    on_cpu = random_model(weight_scale=0.3)
    on_cuda = TrajectoryModel(copy.deepcopy(on_cpu.gpt).to(cuda), copy.deepcopy(on_cpu.transform).to(cuda),
                              sigma=on_cpu.sigma, tau=on_cpu.tau)
    text = torch.tensor([1, 2, 3, 4, 0])
    expected, _ = filter_probs(on_cpu, text, seed=0)
    probs, smc = filter_probs(on_cuda, text.to(cuda), seed=0)
    assert probs.device.type == "cuda" and probs.shape == expected.shape == (5, 5)
    assert smc.x.shape == (4096, 5, 4) and smc.failures == 0
    assert bool(torch.isfinite(probs).all() and torch.isfinite(smc.x).all())
    assert all(0 < ess <= 4096 for ess in smc.ess)
    torch.testing.assert_close(probs.sum(-1).cpu(), torch.ones(5), rtol=0, atol=1e-5)
    # CUDA draws its own random numbers: the two filters agree as two independent runs do
    assert float((probs.cpu() - expected).abs().max()) <= SMC_PROB_TOL
