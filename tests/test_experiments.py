"""The reproduction commands: the whole pipeline on the tiny preset, and the pieces it is built from."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest
import torch

from experiments import results_page
from experiments.cli import main as cli_main
from experiments.evaluation import noisy_bpc, prior_diagnostics
from experiments.noise_robustness import crossover
from experiments.regularization_path import draws_phrase, optimum
from experiments.runs import ensure_trained, is_finished, split_windows
from inference.checkpoint import CheckpointMismatchError
from inference.map import RunConfig, evaluate, load_trained

OUTPUTS = {
    "scalar_geometry": ["scalar_geometry.json", "scalar_geometry.md", "fig3_2_conditional_density.png",
                        "fig3_3_population.png"],
    "ce_vs_margin": ["results.json", "table.md", "curves.png"],
    "noise_robustness": ["results.json", "table.md", "noise_val.png", "noise_test.png"],
    "noise_robustness_relative": ["results.json", "table.md", "noise_val.png", "noise_test.png"],
    "regularization_path": ["results.json", "table.md", "path.png"],
    "support_tokens": ["results.json", "table.md", "heat_strip.png", "margins.png"],
}

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``prob-attention reproduce --quick`` once for the module; returns its folder (``runs/``, ``out/``)."""
    root = tmp_path_factory.mktemp("reproduce")
    status = cli_main(["reproduce", "--quick", "--runs-dir", str(root / "runs"), "--out", str(root / "out"),
                       "--no-progress"])
    assert status == 0
    return root


def test_reproduce_quick_writes_every_experiment(quick: Path) -> None:
    for experiment, files in OUTPUTS.items():
        for name in files:
            assert (quick / "out" / experiment / name).stat().st_size > 0, f"{experiment}/{name} missing"
    steps = json.loads((quick / "out" / "reproduce.json").read_text())["steps"]
    assert [s["argv"][0] for s in steps] == ["scalar-geometry", "ce-vs-margin", "noise-robustness",
                                             "noise-robustness", "regularization-path", "support-tokens"]
    assert all(s["status"] == 0 for s in steps)


def test_every_table_names_its_command_device_and_corpus(quick: Path) -> None:
    for experiment in ("ce_vs_margin", "noise_robustness", "noise_robustness_relative", "regularization_path",
                       "support_tokens"):
        meta = json.loads((quick / "out" / experiment / "results.json").read_text())["provenance"]
        assert meta["command"] and meta["device"] and meta["wall_seconds"] >= 0
        assert meta["corpus"] == "wt2-valtest-offline"
        assert "Produced by:" in (quick / "out" / experiment / "table.md").read_text()


def test_noise_results_are_consistent(quick: Path) -> None:
    results = json.loads((quick / "out" / "noise_robustness" / "results.json").read_text())
    assert len(results["sigmas"]) == 11 and results["sigmas"][0] == 0.0
    for model in results["models"].values():
        for split in model["splits"].values():
            assert split["degradation"][0] == 1.0
            assert split["bpc"][-1] > split["bpc"][0]  # the largest noise hurts


def test_relative_noise_is_a_fraction_of_each_models_embedding_rms(quick: Path) -> None:
    absolute = json.loads((quick / "out" / "noise_robustness" / "results.json").read_text())
    relative = json.loads((quick / "out" / "noise_robustness_relative" / "results.json").read_text())
    assert absolute["noise_scale"] == "absolute" and relative["noise_scale"] == "relative"
    for model in relative["models"].values():
        for split in model["splits"].values():
            assert split["noise_sigmas"] == pytest.approx([s * split["embedding_rms"] for s in relative["sigmas"]])
    for model in absolute["models"].values():
        assert all(split["noise_sigmas"] == absolute["sigmas"] for split in model["splits"].values())


def test_the_path_scores_noise_relative_to_each_models_rms(quick: Path) -> None:
    results = json.loads((quick / "out" / "regularization_path" / "results.json").read_text())
    for point in results["points"]:
        for split in point["splits"].values():
            assert split["embedding_rms"] > 0
            assert split["degradation_relative"] == pytest.approx(split["noisy_bpc_relative"] / split["clean_bpc"])
    assert set(results["optimum"]["val"]) == {"noisy_bpc", "degradation", "noisy_bpc_relative"}


def test_finished_only_scores_the_finished_runs_and_lists_the_rest(quick: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["regularization-path", "--preset", "tiny", "--runs-dir", str(quick / "runs"), "--max-windows", "8",
            "--draws", "1", "--splits", "val", "--finished-only", "--out", str(tmp_path / "path")]
    assert cli_main(argv + ["--lambdas", "0", "0.02", "0.07"]) == 0
    results = json.loads((tmp_path / "path" / "results.json").read_text())
    assert [p["lambda_m"] for p in results["points"]] == [0, 0.02] and results["missing"] == [0.07]
    assert not (quick / "runs" / "tiny-lambda0.07").exists()  # nothing trained
    assert "Not trained yet" in (tmp_path / "path" / "table.md").read_text()
    assert cli_main(argv + ["--lambdas", "0.07"]) == 2 and "no finished run" in capsys.readouterr().err


def test_reproduce_reuses_finished_runs(quick: Path) -> None:
    run_dir = quick / "runs" / "tiny-lambda0"
    assert is_finished(run_dir)
    weights = run_dir / "checkpoint" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    ensure_trained(RunConfig.preset("tiny"), run_dir, progress=False)
    assert weights.stat().st_mtime_ns == before


def test_a_run_directory_of_another_config_is_an_error(quick: Path) -> None:
    with pytest.raises((CheckpointMismatchError, ValueError)):
        ensure_trained(RunConfig.preset("tiny", train={"lambda_m": 0.5}), quick / "runs" / "tiny-lambda0", progress=False)


def test_clean_noisy_bpc_is_the_evaluated_bpc_and_noise_is_shared(quick: Path) -> None:
    trained = load_trained(quick / "runs" / "tiny-lambda0")
    inputs, targets = split_windows(trained, "val", 24)
    clean = noisy_bpc(trained.net, inputs, targets, 0.0, draws=3)
    assert len(clean) == 1  # no noise: one draw
    assert clean[0] == pytest.approx(evaluate(trained.net, inputs, targets, 8)["bpc"], rel=1e-6)
    first = noisy_bpc(trained.net, inputs, targets, 0.5, draws=2, seed=7)
    assert first == noisy_bpc(trained.net, inputs, targets, 0.5, draws=2, seed=7)
    assert first != noisy_bpc(trained.net, inputs, targets, 0.5, draws=2, seed=8)


def test_prior_diagnostics_lie_in_their_ranges(quick: Path) -> None:
    trained = load_trained(quick / "runs" / "tiny-lambda0.02")
    inputs, _ = split_windows(trained, "val", 16)
    d = prior_diagnostics(trained.net, inputs)
    assert 0 < d["entropy"] <= math.log(inputs.shape[1])
    assert d["var_ratio"] >= 0 and d["snr"] > 0 and math.isfinite(d["log_det"])


def test_crossover_finds_where_a_curve_goes_and_stays_below() -> None:
    sigmas = [0.0, 0.1, 0.2, 0.3]
    assert crossover(sigmas, [2.0, 3.0, 4.0, 5.0], [2.1, 2.9, 3.8, 4.5]) == {
        "index": 1, "interval": (0.0, 0.1), "better_at_every_positive_sigma": True}
    late = crossover(sigmas, [2.0, 3.0, 4.0, 5.0], [2.1, 2.9, 4.1, 4.5])
    assert late["index"] == 3 and late["interval"] == (0.2, 0.3) and not late["better_at_every_positive_sigma"]
    assert crossover(sigmas, [2.0, 3.0, 4.0, 5.0], [2.1, 3.1, 4.1, 5.1])["index"] is None


def test_the_path_optimum_is_the_smallest_noisy_bpc() -> None:
    points = [{"lambda_m": lam, "splits": {"val": {"noisy_bpc": v}}} for lam, v in
              [(0.0, 5.0), (0.01, 4.6), (0.02, 4.5), (0.1, 4.7)]]
    best = optimum(points, "val")
    assert best["lambda_m"] == 0.02 and best["interior"]
    assert best["improvement_over_lambda0_percent"] == pytest.approx(10.0)
    assert not optimum(points[:3], "val")["interior"]


def test_the_path_optimum_counts_the_noise_draws_it_wins_against_lambda0() -> None:
    points = [{"lambda_m": lam, "splits": {"val": {"noisy_bpc": sum(d) / 3, "noisy_bpc_draws": d}}} for lam, d in
              [(0.0, [5.0, 4.0, 4.5]), (0.02, [4.0, 4.1, 4.3]), (0.1, [4.9, 4.9, 4.9])]]
    best = optimum(points, "val")
    assert best["lambda_m"] == 0.02 and (best["draws_better"], best["draws"]) == (2, 3)
    assert draws_phrase(best) == ", lower in 2 of 3 noise draws"
    assert draws_phrase(optimum(points[:1], "val")) == ""  # lambda_m = 0 itself: nothing to compare


def test_split_windows_rejects_unknown_splits(quick: Path) -> None:
    trained = load_trained(quick / "runs" / "tiny-lambda0")
    with pytest.raises(ValueError, match="split"):
        split_windows(trained, "dev")
    inputs, targets = split_windows(trained, "test", 5)
    assert inputs.shape == targets.shape == (5, trained.gpt_config.block_size)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_the_results_page_reads_every_experiment_and_keeps_hand_written_text(quick: Path) -> None:
    page = quick / "RESULTS.md"
    page.write_text(f"old generated text\n{results_page.MARKER}\nour discussion\n")
    assert cli_main(["results-page", "--results", str(quick / "out"), "--out", str(page)]) == 0
    text = page.read_text()
    assert "old generated text" not in text and text.endswith(f"{results_page.MARKER}\nour discussion\n")
    for title in ("Scalar geometry", "CE-only vs Margin-only", "Robustness to embedding noise",
                  "Regularization path", "Support tokens"):
        assert f"## {title}" in text
    assert "target at most +2%: **" in text and "Produced by `" in text
    assert text.index("**val**") < text.index("**test**")  # the paper's split first


def test_a_recorded_command_from_a_fresh_clone_reads_committed_runs_not_another_machines_folders() -> None:
    from experiments.results_page import fresh_clone_command

    assert fresh_clone_command("x --runs /work/runs/full-lambda0 /work/runs/full-lambda0.02") == \
        "x --runs results/train/ce-lambda0 results/train/margin-lambda0.02"
    inputs = {"--runs", "--run-dirs", "--ce-run", "--margin-run", "--runs-dir"}
    commands = []
    for path in (REPO / "results").rglob("*.json"):
        data = json.loads(path.read_text())
        meta = data.get("provenance") or data.get("meta") if isinstance(data, dict) else None
        if isinstance(meta, dict) and "command" in meta:
            commands.append(fresh_clone_command(meta["command"]))
    assert commands
    for command in commands:
        assert "/work/" not in command, command
        words, flag = shlex.split(command), None
        for word in words:
            if word.startswith("--"):
                flag = word
            elif flag in inputs and not word.startswith("runs/"):  # runs/: scratch that the command trains into
                assert (REPO / word).exists(), f"{word} in {command}"


@pytest.mark.parametrize("folder", ["decoding", "decoding_svi_w8"])
def test_the_results_page_names_each_decoding_studys_posteriors_and_their_costs(folder: str) -> None:
    res = json.loads((REPO / "results" / folder / "results.json").read_text())
    text = "\n".join(results_page.decoding_section(res, folder=folder))
    posteriors = res["runs"][0].get("posteriors", ["smc"])
    assert f"(posterior: {' and '.join(p.upper() for p in posteriors)};" in text
    assert "SMC: 16 particles" in text and ("SVI: normal guide" in text) == ("svi" in posteriors)
    assert ("ms per position" in text) == ("cost" in res["runs"][0])
    assert f"../results/{folder}/risk_coverage.png" in text
