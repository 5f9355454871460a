"""Posteriors over embedding trajectories: the Pyro model, SVI, SMC, ArviZ, an exact check, metrics, decode CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from tiny_models import random_model

from experiments.cli import main as cli_main
from experiments.decoding_study import COMBINED, SIGNALS, run_facts, signal_table
from experiments.selective import aurc, auroc, cross_fitted_logistic, oracle_aurc, risk_coverage
from inference.decoding import DecodeConfig, generate
from inference.map import MAPTrainer, RunConfig
from inference.posterior import (
    SVIConfig,
    convergence,
    fit_svi,
    predictive_signals,
    svi_draws,
    to_inference_data,
)
from inference.smc import TrajectorySMC, smc_draws
from inference.trajectory import TrajectoryModel, empirical_sigma
from prob_attention.corpus import CharCorpus, bundled_articles

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny ops

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("observed_next", [2, 3])
def test_the_model_has_a_latent_trajectory_and_observed_embeddings_and_next_characters(observed_next: int) -> None:
    tm = random_model()
    idx = torch.tensor([1, 2, 3])
    trace = pyro.poutine.trace(tm.model).get_trace(idx, torch.tensor([2, 3, 4])[:observed_next])
    sites = {n: s for n, s in trace.nodes.items() if s["type"] == "sample"}
    assert list(sites) == ["x", "embedding", "next_char"]
    assert not sites["x"]["is_observed"] and sites["x"]["fn"].event_shape == (3, 4)
    assert sites["embedding"]["is_observed"] and torch.equal(sites["embedding"]["value"], tm.anchors(idx))
    assert sites["next_char"]["is_observed"] and sites["next_char"]["value"].shape == (observed_next,)
    trace.compute_log_prob()
    assert all(torch.isfinite(s["log_prob_sum"]) for s in sites.values())


def test_empirical_sigma_maximises_the_prior_density_of_the_embeddings() -> None:
    tm = random_model()
    x = tm.gpt.embed(torch.randint(0, 5, (6, 8))).detach()
    sigma = empirical_sigma(tm.transform, x)
    with torch.no_grad():
        log_p = [float(TrajectoryModel(tm.gpt, tm.transform, s, 1.0).prior(8).log_prob(x).sum())
                 for s in (sigma, 0.95 * sigma, 1.05 * sigma)]
    assert log_p[0] > max(log_p[1:])


@pytest.mark.parametrize("bad", [torch.tensor([], dtype=torch.long), torch.tensor([1, 9]), torch.arange(9) % 5])
def test_the_model_rejects_empty_out_of_vocabulary_or_too_long_texts(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        random_model().anchors(bad)


def test_the_next_anchor_is_the_newest_positions_embedding_until_the_context_is_full() -> None:
    tm = random_model(block=3)
    torch.testing.assert_close(tm.next_anchor([1, 2], 4), tm.anchors(torch.tensor([1, 2, 4]))[-1])
    with pytest.raises(ValueError, match="full"):
        tm.next_anchor([1, 2, 4], 3)
    smc = TrajectorySMC(tm, num_particles=4)
    for token in (1, 2, 4):
        smc.extend(token)
    with pytest.raises(ValueError, match="full"):
        smc.extend(3)


# ------------------------------------------------------------------------------------------ inference
@pytest.mark.parametrize("guide", ["normal", "lowrank"])
def test_svi_reduces_the_loss_and_samples_trajectories(guide: str) -> None:
    tm = random_model(weight_scale=0.5)
    idx = torch.tensor([1, 2, 3, 4])
    fit = fit_svi(tm, idx, config=SVIConfig(guide=guide, steps=150, lr=0.05))
    assert np.mean(fit.losses[-20:]) < np.mean(fit.losses[:20])
    assert fit.sample(7).shape == (7, 4, 4) and fit.mean().shape == (4, 4)
    assert all(p.grad is None for p in tm.gpt.parameters())  # the network is frozen: only the guide learns


def test_independent_svi_fits_become_arviz_chains() -> None:
    draws = svi_draws(random_model(), torch.tensor([1, 2, 3]), config=SVIConfig("normal", steps=30), chains=2, draws=50)
    idata = to_inference_data(draws)
    assert idata.posterior["x"].shape == (2, 50, 3, 4)
    summary = convergence(idata)
    assert summary["ess_bulk_min"] > 0 and math.isfinite(summary["rhat_max"])


def test_smc_tracks_an_ess_in_0_p_and_a_predictive_distribution_per_position() -> None:
    tm = random_model(weight_scale=0.5)
    smc = TrajectorySMC(tm, num_particles=32)
    signals = smc.run(torch.tensor([1, 2, 3, 4, 0]))
    assert len(signals) == 5 == len(smc.ess) and smc.x.shape == (32, 5, 4)
    assert all(0 < s.ess <= 32 for s in signals)
    assert all(math.isclose(float(s.probs.sum()), 1.0, rel_tol=1e-6) for s in signals)
    assert all(s.mutual_information >= 0 and s.entropy <= math.log(5) + 1e-6 for s in signals)
    assert smc.failures == 0


def test_smc_predictive_from_cached_decoding_equals_decoding_every_trajectory_whole() -> None:
    tm = random_model(weight_scale=0.5)
    smc = TrajectorySMC(tm, num_particles=8, ess_threshold=1.0)  # resample before every step: the cache follows
    for token, next_char in [(1, 2), (2, 3), (3, 4), (4, 0)]:
        smc.extend(token)
        probs = smc.predict().probs
        whole = torch.softmax(tm.next_char_logits(smc.x)[:, -1], dim=-1)  # (P, V), no cache
        torch.testing.assert_close(probs, smc.weights() @ whole, rtol=1e-5, atol=1e-6)
        smc.observe(next_char)


def test_smc_observe_adds_each_particles_log_probability_of_the_next_character() -> None:
    tm = random_model(weight_scale=0.5)
    smc = TrajectorySMC(tm, num_particles=8, ess_threshold=1e-9)  # never resample: weights stay comparable
    with pytest.raises(ValueError, match="extend"):
        smc.observe(1)
    smc.extend(1)
    before = smc.log_weights.clone()
    smc.observe(3)  # without a predict first
    log_probs = torch.log_softmax(tm.next_char_logits(smc.x)[:, -1], dim=-1)[:, 3]
    torch.testing.assert_close(smc.log_weights - before, log_probs, rtol=1e-5, atol=1e-6)
    assert smc.ess == []  # observing is not predicting


def test_smc_zero_weights_and_counts_particles_whose_inversion_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    tm = random_model()
    solve = tm.transform.solve_position

    def folding(prefix, z_t, t, guess=None):  # no root wherever z_t[0] > 0 (after the first position)
        x_t, ok = solve(prefix, z_t, t, guess)
        return x_t, ok & ~((z_t[:, 0] > 0) & (t > 0))

    monkeypatch.setattr(tm.transform, "solve_position", folding)
    smc = TrajectorySMC(tm, num_particles=16, ess_threshold=1e-9)  # never resample: keep the zeros visible
    smc.extend(1)
    smc.extend(2)
    dead = torch.isinf(smc.log_weights)
    assert smc.failures == int(dead.sum()) > 0 and not bool(dead.all())
    assert 0 < smc.effective_sample_size() <= 16 - smc.failures + 1e-9


def test_predictive_mutual_information_is_zero_when_every_sample_agrees() -> None:
    p = torch.tensor([[0.2, 0.3, 0.5]] * 4, dtype=torch.float64)
    same = predictive_signals(p, None, margin=0.0)
    assert same.mutual_information == pytest.approx(0.0, abs=1e-12)
    split = predictive_signals(torch.eye(3, dtype=torch.float64)[:2], None, margin=0.0)
    assert split.entropy == pytest.approx(math.log(2)) and split.mutual_information == pytest.approx(math.log(2))


# --------------------------------------------------------------------------------------- exact check
def test_svi_and_smc_posterior_means_match_the_exact_posterior(float64: None) -> None:
    """d = 3, T = 3, V = 3 (d = 2 would make the GPT's final LayerNorm a sign function of x).

    Exact: self-normalised importance sampling from the emission ``N(embed(y), tau^2)``, weights = prior x
    likelihood, with its delta-method standard error ``se_is``. SMC: 16 independent runs of 500 particles,
    100 resampled draws each; ``se_smc`` = the spread of the runs' means / 4. Tolerances come from these Monte Carlo errors (4.5 standard errors per
    coordinate), not from the observed differences. SVI (low-rank Gaussian) carries a variational bias that
    no Monte Carlo error bounds: it is allowed half a posterior standard deviation, and must end much closer
    to the exact mean than its starting point (the embeddings) is.
    """
    tm = random_model(dim=3, vocab=3, block=3, weight_scale=1.0, seed=1)
    idx, nxt = torch.tensor([0, 2, 1]), torch.tensor([2, 1, 0])
    anchors = tm.anchors(idx)
    g = torch.Generator().manual_seed(0)
    x = anchors + tm.tau * torch.randn(200_000, 3, 3, generator=g)
    with torch.no_grad():
        log_lik = torch.distributions.Categorical(logits=tm.next_char_logits(x)).log_prob(nxt).sum(-1)
        w = torch.softmax(tm.prior(3).log_prob(x) + log_lik, dim=0)[:, None, None]
    exact = (w * x).sum(0)
    sd = (w * (x - exact) ** 2).sum(0).sqrt()
    se_is = (w**2 * (x - exact) ** 2).sum(0).sqrt()

    draws = smc_draws(tm, idx, nxt, num_particles=500, chains=16, draws=100)
    runs = draws.mean(1)  # one estimate per independent run, resampling noise included
    se_smc = runs.std(0) / 4
    assert torch.all((runs.mean(0) - exact).abs() <= 4.5 * (se_is**2 + se_smc**2).sqrt())
    idata = to_inference_data(draws)
    assert idata.posterior["x"].shape == (16, 100, 3, 3)
    assert convergence(idata)["rhat_max"] < 1.05

    svi = fit_svi(tm, idx, nxt, SVIConfig(guide="lowrank", steps=400, lr=0.05, num_particles=16)).mean()
    assert torch.all((svi - exact).abs() <= 0.5 * sd + 4.5 * se_is)
    assert (svi - exact).abs().max() < 0.5 * (anchors - exact).abs().max()


# ------------------------------------------------------------------------------------------- metrics
@pytest.mark.parametrize(
    "scores, errors, expected",
    [
        ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),
        ([1.0, 2.0, 3.0], [0, 0, 1], 1.0),
        ([1.0, 2.0, 3.0], [1, 0, 0], 0.0),
        ([1.0, 1.0], [0, 1], 0.5),  # a tie counts one half
        ([1.0, 2.0, 2.0, 3.0], [0, 1, 0, 1], 0.875),  # (1 + 0.5 + 1 + 1) / 4
    ],
)
def test_auroc_matches_hand_computed_cases(scores: list[float], errors: list[int], expected: float) -> None:
    assert auroc(np.array(scores), np.array(errors, dtype=bool)) == pytest.approx(expected)


@pytest.mark.parametrize(
    "scores, errors, expected",
    [
        ([1.0, 2.0, 3.0], [0, 1, 0], (0 + 1 / 2 + 1 / 3) / 3),
        ([1.0, 2.0, 3.0], [0, 0, 1], (0 + 0 + 1 / 3) / 3),
        ([1.0, 1.0], [1, 0], 0.5),  # a tie: each order equally likely, risk(1) = 1/2
        ([1.0, 2.0, 2.0], [0, 1, 0], (0 + 0.25 + 1 / 3) / 3),  # risk(2) = (0 + 1/2) / 2
    ],
)
def test_aurc_matches_hand_computed_cases(scores: list[float], errors: list[int], expected: float) -> None:
    s, e = np.array(scores), np.array(errors, dtype=bool)
    assert aurc(s, e) == pytest.approx(expected)
    coverage, risk = risk_coverage(s, e)
    assert coverage[-1] == 1.0 and risk[-1] == pytest.approx(e.mean())
    assert oracle_aurc(e) <= aurc(s, e) + 1e-12


def test_metrics_reject_single_class_or_mismatched_inputs() -> None:
    with pytest.raises(ValueError):
        auroc(np.array([1.0, 2.0]), np.array([True, True]))
    with pytest.raises(ValueError):
        aurc(np.array([1.0, 2.0]), np.array([True]))


# ------------------------------------------------------------------------------------ decoding, CLI
@pytest.mark.parametrize("method", ["smc", "svi"])
def test_generate_returns_one_signal_per_character(method: str) -> None:
    config = DecodeConfig(method, particles=8, svi=SVIConfig(steps=10))
    out = generate(random_model(weight_scale=0.5), torch.tensor([1, 2]), 3, config)
    assert len(out) == 3 and all(0 <= c.token < 5 for c in out)
    assert all((c.signals.ess is None) == (method == "svi") for c in out)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    articles = bundled_articles()
    corpus = CharCorpus("slice", "".join(articles[:3])[:40_000], articles[3][:3_000], articles[4][:3_000])
    run_dir = tmp_path_factory.mktemp("run")
    MAPTrainer(RunConfig.preset("tiny", train={"lambda_m": 0.02}), run_dir, corpus=corpus, progress=False,
               log=lambda line: None).fit()
    return run_dir


@pytest.mark.parametrize("threshold, flagged", [(-1.0, 4), (1e9, 0)])
def test_decode_cli_prints_signals_and_marks_high_mutual_information(
    tiny_run: Path, capsys: pytest.CaptureFixture[str], threshold: float, flagged: int
) -> None:
    rc = cli_main(["decode", "--run-dir", str(tiny_run), "--prompt", "The ", "--length", "4", "--particles", "8",
                   "--sigma", "0.05", "--mi-threshold", str(threshold), "--device", "cpu"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line[:4].strip().isdigit()]
    assert rc == 0 and len(rows) == 4
    assert sum(row.rstrip().endswith("?") for row in rows) == flagged
    assert "text: The " in out


@pytest.mark.parametrize("prompt, message", [("", "empty"), ("Th\u2603e", "'\u2603' at position 2")])
def test_decode_cli_rejects_an_empty_prompt_or_unknown_characters(
    tiny_run: Path, capsys: pytest.CaptureFixture[str], prompt: str, message: str
) -> None:
    rc = cli_main(["decode", "--run-dir", str(tiny_run), "--prompt", prompt, "--sigma", "0.05"])
    assert rc == 2 and message in capsys.readouterr().err


def test_decoding_study_quick_writes_both_posteriors_signals_diagnostics_and_costs(tiny_run: Path,
                                                                                   tmp_path: Path) -> None:
    out = tmp_path / "study"
    rc = cli_main(["decoding-study", "--run-dirs", str(tiny_run), "--quick", "--sigma", "0.05", "--out", str(out),
                   "--device", "cpu", "--no-progress"])
    assert rc == 0
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert run["positions"] == 32 and run["posteriors"] == ["smc", "svi"]
    assert set(run["metrics"]) == set(SIGNALS) | set(COMBINED)
    assert set(run["curves"]) == set(SIGNALS)
    assert set(run["cost"]) == {"smc", "svi"} and run["cost"]["svi"]["steps_per_position"] == 5
    assert all(c["seconds_per_position"] > 0 for c in run["cost"].values())
    assert 0 <= run["svi"]["elbo"]["unsettled_fraction"] <= 1 and run["svi"]["elbo"]["refits"] == 32
    assert run["svi"]["arviz"]["chains"] == 2 and math.isfinite(run["svi"]["arviz"]["rhat_max"])
    table = (out / "table.md").read_text()
    assert "SVI mutual information" in table and "ms per position" in table
    assert (out / "risk_coverage.png").stat().st_size > 0


def test_decoding_study_scores_only_the_posteriors_asked_for(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "study"
    assert cli_main(["decoding-study", "--run-dirs", str(tiny_run), "--quick", "--sigma", "0.05", "--out", str(out),
                     "--device", "cpu", "--no-progress", "--posteriors", "svi", "--svi-steps", "1",
                     "--svi-chains", "0"]) == 0
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert "cf_map_svi_mi" in run["metrics"]
    assert not any(k.startswith(("smc", "cf_map_smc", "neg_", "cf_map_neg")) for k in run["metrics"])
    assert "smc_error_rate" not in run and set(run["cost"]) == {"svi"}
    assert run["svi"]["elbo"] is None and run["svi"]["arviz"] is None  # one step: nothing to settle; no chains
    assert "SVI:" in run_facts([run]) and "SMC:" not in run_facts([run])


@pytest.mark.parametrize("folder", sorted(p.parent.name for p in (REPO / "results").glob("decoding*/results.json")))
def test_every_committed_decoding_study_still_renders(folder: str) -> None:
    runs = json.loads((REPO / "results" / folder / "results.json").read_text())["runs"]
    table = signal_table(runs)
    assert all(label in table for key, label in {**SIGNALS, **COMBINED}.items() if key in runs[0]["metrics"])
    assert all(Path(r["run_dir"]).name in run_facts(runs) for r in runs)


def test_cross_fitted_logistic_scores_each_fold_with_a_model_fitted_on_the_others() -> None:
    rng = np.random.default_rng(0)
    errors = rng.random(400) < 0.3
    features = np.stack([errors + 0.8 * rng.standard_normal(400), rng.standard_normal(400)], axis=1)
    folds = np.repeat([0, 1], 200)
    scores = cross_fitted_logistic(features, errors, folds)
    assert auroc(scores, errors) > 0.7  # the informative feature carries over to held-out folds
    relabelled = errors.copy()
    relabelled[:200] = ~relabelled[:200]  # fold 0's own labels must not move fold 0's scores
    np.testing.assert_allclose(cross_fitted_logistic(features, relabelled, folds)[:200], scores[:200])
    with pytest.raises(ValueError, match="two folds"):
        cross_fitted_logistic(features, errors, np.zeros(400))
