"""The uncertainty study: its shifted windows, the posterior's fitted and cached scores, and the command."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import experiments.posterior_scores as posterior_scores
from experiments.cli import main as cli_main
from experiments.perturbations import Perturbation
from experiments.posterior_scores import MATCHED, PosteriorSettings, cached_posterior
from experiments.results_page import UNCERTAINTY_BLOCK
from experiments.robustness_study import ARMS, weights_digest
from experiments.shift_conditions import CONDITIONS, Condition, condition_windows
from experiments.uncertainty_methods import BASELINES, METHODS, POSTERIORS
from experiments.uncertainty_report import summary_markdown
from experiments.uncertainty_verdicts import CRITERIA, NOISE_LABELS, STRONGEST
from inference.map import MAPTrainer, load_trained

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = PosteriorSettings(windows=2, length=8, particles=4)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two seeds of CE-only on the tiny preset, where the study finds them (``--reuse``)."""
    root = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        MAPTrainer(ARMS["ce"].config(seed, "tiny"), root / f"ce-{seed}", progress=False, log=lambda _: None).fit()
    return root


def _windows(run: Path, condition: Condition):
    return condition_windows(load_trained(run, map_location="cpu"), condition, 4, 8)


def test_text_shifts_corrupt_the_characters_and_keep_the_clean_targets(tiny_runs: Path) -> None:
    clean = _windows(tiny_runs / "ce-0", Condition(Perturbation("clean")))
    typos = _windows(tiny_runs / "ce-0", Condition(Perturbation("substitution", 0.5)))
    assert torch.equal(typos.targets, clean.targets) and not torch.equal(typos.inputs, clean.inputs)
    assert clean.noise_scale == 0.0 == typos.noise_scale
    gpt = load_trained(tiny_runs / "ce-0", map_location="cpu").gpt
    torch.testing.assert_close(typos.embeddings, gpt.embed(typos.inputs))


def test_embedding_noise_is_the_same_draw_for_every_model(tiny_runs: Path) -> None:
    noise = Condition(Perturbation("noise", 0.04))
    deltas = []
    for seed in (0, 1):
        w = _windows(tiny_runs / f"ce-{seed}", noise)
        gpt = load_trained(tiny_runs / f"ce-{seed}", map_location="cpu").gpt
        deltas.append(w.embeddings - gpt.embed(w.inputs).detach())
        assert w.noise_scale == 0.04
    torch.testing.assert_close(deltas[0], deltas[1])
    assert math.isclose(float(deltas[0].std()), 0.04, rel_tol=0.1)


def test_relative_noise_scales_with_the_models_embedding_rms_and_other_conditions_read_real_windows(
        tiny_runs: Path) -> None:
    w = _windows(tiny_runs / "ce-0", Condition(Perturbation("relative_noise", 0.5)))
    assert w.noise_scale > 0
    for condition in (Condition(Perturbation("deletion", 0.1)), Condition(None)):
        w = _windows(tiny_runs / "ce-0", condition)
        assert w.inputs.shape == w.targets.shape == (4, 8) and w.noise_scale == 0.0


def test_every_condition_has_a_family_of_the_verdict_table() -> None:
    assert {c.family for c in CONDITIONS} == set(STRONGEST)
    assert {c.label for c in CONDITIONS} >= set(STRONGEST.values())


def test_the_posterior_fits_tau_on_a_grid_with_the_map_limit_reads_shifts_blind_and_denoises_told_the_noise(
        tiny_runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    record = posterior_scores.smc_record

    def spy(model, windows, particles, seed):
        seen.append((model.tau, windows.noise_scale))
        return record(model, windows, particles, seed)

    monkeypatch.setattr(posterior_scores, "smc_record", spy)
    run = tiny_runs / "ce-0"
    facts, arrays = cached_posterior(run, tmp_path / "ce-seed0", SMALL, weights_digest(run), progress=False)
    assert list(facts["tau_curve"]) == ["0", *(f"{r:g}" for r in SMALL.tau_ratios)]
    assert facts["tau_ratio"] in SMALL.tau_ratios and math.isclose(facts["tau"], facts["tau_ratio"] * facts["sigma"])
    best = min(facts["tau_curve"][f"{r:g}"] for r in SMALL.tau_ratios)
    assert facts["map_limit_best"] == (facts["tau_curve"]["0"] <= best)
    runs = seen[len(SMALL.tau_ratios):]  # the conditions, after the fit
    noisy = [scale for _, scale in runs if scale > 0]
    assert len(noisy) == 2 * len(NOISE_LABELS)  # each noisy condition: blind, then told the noise
    assert [tau for tau, scale in runs if scale == 0] == [facts["tau"]] * (len(runs) - len(noisy))
    blind_then_matched = [tau for tau, scale in runs if scale > 0]
    assert blind_then_matched[0::2] == [facts["tau"]] * len(NOISE_LABELS)
    assert all(math.isclose(t, math.hypot(facts["tau"], s)) for t, s in zip(blind_then_matched[1::2], noisy[1::2]))
    fields = ("nll", "correct", "confidence", "brier", "entropy", "mi", "ess", "margin")
    assert set(arrays) == ({f"{label}/{f}" for label in SMALL.conditions for f in fields}
                           | {f"{label}{MATCHED}/{f}" for label in NOISE_LABELS for f in fields})
    assert all(a.shape == (2, 8) for a in arrays.values())


def test_the_posterior_cache_is_reused_only_while_settings_weights_and_arrays_match(
        tiny_runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, cache = tiny_runs / "ce-0", tmp_path / "ce-seed0"
    digest = weights_digest(run)
    facts, arrays = cached_posterior(run, cache, SMALL, digest, progress=False)
    computed = []
    original = posterior_scores.posterior_scores
    monkeypatch.setattr(posterior_scores, "posterior_scores",
                        lambda *a, **k: computed.append(1) or original(*a, **k))
    again, same = cached_posterior(run, cache, SMALL, digest, progress=False)
    assert not computed and again == facts
    assert all(np.array_equal(same[k], arrays[k]) for k in arrays)
    cached_posterior(run, cache, replace(SMALL, particles=5), digest, progress=False)
    assert len(computed) == 1
    arrays_file = tmp_path / "ce-seed0.npz"
    arrays_file.write_bytes(arrays_file.read_bytes()[:-10])  # truncated
    cached_posterior(run, cache, replace(SMALL, particles=5), digest, progress=False)
    assert len(computed) == 2


def test_the_study_scores_every_method_and_criterion_and_writes_its_report(tiny_runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "results" / "uncertainty_study"
    rc = cli_main(["uncertainty-study", "--arms", "ce", "--seeds", "0", "1", "--preset", "tiny", "--reuse",
                   str(tiny_runs), "--windows", "2", "--window-length", "8", "--particles", "4", "--bootstrap", "20",
                   "--out", str(out), "--device", "cpu", "--no-progress", "--temperatures", str(tmp_path / "none")])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    arm = summary["arms"]["ce"]
    assert [f["seed"] for f in arm["facts"]] == [0, 1]
    assert all(f["temperature_from"] == "fitted here" and f["temperature"] > 0 for f in arm["facts"])
    assert set(arm["metrics"]) == {c.label for c in CONDITIONS}
    svi = set(summary["settings"]["svi"]["conditions"])
    for label, methods in arm["metrics"].items():
        assert set(methods) == set(METHODS) - ({"svi"} if label not in svi else set())
        for method, entry in methods.items():
            assert set(entry["signals"]) == set(METHODS[method][1])
            assert 0 <= entry["ece"] <= 1 and 0 <= entry["brier"] <= 2 and entry["bpc"] > 0
    assert set(arm["verdicts"]["clean"]) == set(CRITERIA) - {"shift_auroc"}
    assert set(arm["verdicts"]["tempest"]) == set(CRITERIA)
    cell = arm["verdicts"]["tempest"]["ece"]
    assert cell["posterior"]["method"] in POSTERIORS and cell["best_baseline"]["method"] in BASELINES
    assert cell["difference"]["low"] <= cell["difference"]["estimate"] <= cell["difference"]["high"]
    assert arm["cost"]["ensemble"] == pytest.approx(2 * arm["cost"]["map"], rel=0.5)
    assert set(arm["denoising"]) == set(NOISE_LABELS) == {c.label for c in CONDITIONS if "noise" in c.family}
    assert all(set(cell) == {"bpc", "ece"} for cell in arm["denoising"].values())
    readme = (out / "README.md").read_text()
    assert "the deep ensemble per position" in readme and "## Fitting tau" in readme
    for figure in ("tau_fit.png", "reliability.png", "risk_coverage.png"):
        assert (out / figure).stat().st_size > 0
    assert (out / "posterior" / "ce-seed1.npz").exists() and (out / "posterior" / "ce-seed1.svi.npz").exists()
    assert arm["facts"][0]["svi"]["tau"] == arm["facts"][0]["tau"]

    # the results page shows the verdict, and writes it into a README's generated block
    readme, page = tmp_path / "README.md", tmp_path / "RESULTS.md"
    readme.write_text(f"intro\n{UNCERTAINTY_BLOCK[0]}\nstale\n{UNCERTAINTY_BLOCK[1]}\nrest\n")
    assert cli_main(["results-page", "--results", str(tmp_path / "results"), "--out", str(page),
                     "--readme", str(readme)]) == 0
    verdict_text = summary_markdown(summary)
    assert readme.read_text() == f"intro\n{UNCERTAINTY_BLOCK[0]}\n{verdict_text}\n{UNCERTAINTY_BLOCK[1]}\nrest\n"
    text = page.read_text()
    assert "## What the latent posterior is for" in text and verdict_text in text
    assert "## Uncertainty under shift: the latent posterior against the standard baselines" in text


def test_the_study_needs_two_seeds_and_finished_runs(tiny_runs: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    common = ["uncertainty-study", "--arms", "ce", "--preset", "tiny", "--out", str(tmp_path), "--no-progress",
              "--window-length", "8"]
    assert cli_main([*common, "--seeds", "0", "--reuse", str(tiny_runs)]) == 2
    assert "two seeds" in capsys.readouterr().err
    assert cli_main([*common, "--seeds", "0", "5", "--reuse", str(tiny_runs), "--runs-dir",
                     str(tmp_path / "nothing")]) == 2
    assert "no finished run of arm 'ce' with seed 5" in capsys.readouterr().err
    assert cli_main([*common, "--seeds", "0", "1", "--reuse", str(tiny_runs), "--window-length", "33"]) == 2
    assert "exceeds the context" in capsys.readouterr().err
