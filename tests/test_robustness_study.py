"""The robustness study end to end on tiny runs: it trains, reuses, caches, compares with intervals and
lists what is missing."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from experiments import robustness_study as study


def study_args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    return parser.parse_args([
        "--preset", "tiny", "--arms", "ce", "noise-0.02", "margin-free-lambda0.02", "--runs-dir", str(tmp_path / "runs"),
        "--out", str(tmp_path / "out"), "--reuse", "--max-windows", "6", "--draws", "1", "--bootstrap", "50",
        "--no-progress", *extra,
    ])


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp_path = tmp_path_factory.mktemp("study")
    assert study.run(study_args(tmp_path)) == 0
    return tmp_path, json.loads((tmp_path / "out" / "summary.json").read_text())


def test_every_arm_and_seed_is_trained_scored_and_described(finished: tuple[Path, dict]) -> None:
    tmp_path, summary = finished
    assert sorted((r["arm"], r["seed"]) for r in summary["models"]) == [
        (arm, seed) for arm in ("ce", "margin-free-lambda0.02", "noise-0.02") for seed in (0, 1, 2)]
    record = summary["models"][0]
    assert set(record["val_bpc"]) == {"clean", *summary["perturbations"]}
    assert {r["regime"]["name"] for r in summary["models"] if r["arm"] == "ce"} == {"prior not trained"}
    assert (tmp_path / "out" / "robustness_val.png").stat().st_size > 0
    assert summary["meta"]["missing"] == []


def test_each_arm_is_compared_with_ce_only_at_every_level_with_an_interval(finished: tuple[Path, dict]) -> None:
    _, summary = finished
    comparison = summary["comparisons"]["noise-0.02"]["test"]
    assert comparison["seeds"] == [0, 1, 2]
    for level in summary["perturbations"]:
        cell = comparison["levels"][level]
        d = cell["bpc_difference"]
        assert d["low"] <= d["estimate"] <= d["high"]
        assert cell["bpc_verdict"] in ("better", "worse", "not distinguishable")
    assert "ce" not in summary["comparisons"]


def test_a_peer_is_compared_with_the_margin_arm_whose_clean_cost_it_is_tuned_to(finished: tuple[Path, dict]) -> None:
    _, summary = finished
    matched = summary["matched"]["noise-0.02"]
    assert matched["margin_arm"] == study.ARMS["noise-0.02"].matched_to == "margin-free-lambda0.02"
    cost = matched["cost"]
    assert cost["difference_percent"] == pytest.approx(
        100 * (cost["peer_val_clean_bpc"] / cost["margin_val_clean_bpc"] - 1))
    assert cost["matched"] == (abs(cost["difference_percent"]) <= study.MATCH_TOLERANCE_PERCENT)
    assert matched["test"]["seeds"] == [0, 1, 2] and set(matched["test"]["levels"]) == set(summary["perturbations"])


@pytest.mark.parametrize("peer_bpc, matched", [(2.009, True), (1.991, True), (2.011, False), (1.989, False)])
def test_a_peer_matches_a_margin_arm_only_within_the_tolerance_of_its_clean_validation_bpc(
        peer_bpc: float, matched: bool) -> None:
    def models(*window_bpc: list[float]) -> list[dict]:
        return [{"splits": {"val": {"bpc": {"clean": bpc}}}} for bpc in window_bpc]

    cost = study.matched_cost(models([peer_bpc - 0.1, peer_bpc + 0.1]), models([1.9, 2.1], [1.95, 2.05]))
    assert cost["margin_val_clean_bpc"] == pytest.approx(2.0) and cost["peer_val_clean_bpc"] == pytest.approx(peer_bpc)
    assert cost["difference_percent"] == pytest.approx(100 * (peer_bpc / 2.0 - 1))
    assert cost["matched"] is matched and (cost["peer_seeds"], cost["margin_seeds"]) == (1, 2)


def test_every_peer_is_tuned_to_a_margin_arm_of_the_study_and_the_ablation_compared_with_the_arm_it_ablates() -> None:
    assert study.ARMS["margin-positive-full-norm0.001-lambda0.05"].matched_to == "margin-positive-full-lambda0.05"
    for arm in study.ARMS.values():
        if arm.name.startswith(("noise-", "jacobian-")) or arm.matched_to:
            assert arm.matched_to in study.ARMS and study.ARMS[arm.matched_to].overrides["train"]["lambda_m"] > 0


def test_the_pairs_asked_for_are_compared_head_to_head_first_against_second(
        finished: tuple[Path, dict], tmp_path: Path) -> None:
    runs, _ = finished
    args = study_args(runs, "--no-train", "--versus", "noise-0.02:margin-free-lambda0.02", "--out", str(tmp_path))
    assert study.run(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    direct = summary["head_to_head"]["noise-0.02 vs margin-free-lambda0.02"]
    for split in ("val", "test"):
        assert direct[split] == summary["matched"]["noise-0.02"][split]  # the same paired comparison
    assert "## Head to head, test" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize("pair", ["noise-0.02", "noise-0.02:noise-0.02", "noise-0.02:no-such-arm"])
def test_a_head_to_head_pair_must_name_two_different_arms(pair: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="ARM:REFERENCE"):
        study.arm_pair(pair)


def test_a_head_to_head_pair_outside_the_arms_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="not in --arms: jacobian-1e-05"):
        study.run(study_args(tmp_path, "--no-train", "--versus", "jacobian-1e-05:noise-0.02"))


def test_the_default_head_to_head_pairs_are_arms_of_the_study() -> None:
    assert all(first in study.ARMS and second in study.ARMS and first != second for first, second in study.HEAD_TO_HEAD)


def test_a_second_run_reuses_the_trained_runs_and_the_cached_scores(finished: tuple[Path, dict]) -> None:
    tmp_path, _ = finished
    cache = tmp_path / "out" / "scores" / "ce-seed0.json"
    stamp = cache.stat().st_mtime_ns
    assert study.run(study_args(tmp_path, "--no-train")) == 0
    assert cache.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("damage", ["edited", "truncated", "unsealed"])
def test_a_cache_changed_after_it_was_written_is_recomputed_naming_its_file(
        finished: tuple[Path, dict], damage: str, capsys: pytest.CaptureFixture[str]) -> None:
    tmp_path, _ = finished
    cache = tmp_path / "out" / "scores" / "ce-seed0.json"
    original = json.loads(cache.read_text())
    if damage == "edited":
        cache.write_text(json.dumps(original | {"splits": {**original["splits"], "val": {
            **original["splits"]["val"], "embedding_rms": 123.0}}}))
    elif damage == "truncated":
        cache.write_text(cache.read_text()[:200])
    else:
        cache.write_text(json.dumps({k: v for k, v in original.items() if k != "content_sha256"}))
    assert study.run(study_args(tmp_path, "--no-train")) == 0
    assert str(cache) in capsys.readouterr().out
    assert json.loads(cache.read_text()) == original


def test_every_model_is_calibrated_and_compared_with_confidence_controlled(finished: tuple[Path, dict]) -> None:
    _, summary = finished
    confidence = summary["calibrated"]
    assert sorted((m["arm"], m["seed"]) for m in confidence["models"]) == sorted(
        (r["arm"], r["seed"]) for r in summary["models"])
    assert all(m["temperature"] > 0 and 0 <= m["test_ece"]["calibrated"] <= 1 for m in confidence["models"])
    comparison = confidence["comparisons"]["noise-0.02"]
    for mode in ("calibrated", "temperature_matched", "raw"):
        assert set(comparison[mode]["levels"]) == set(study.CALIBRATED_CONDITIONS[1:])
    assert [r["family"] for r in confidence["recommendation"]] == list(study.FAMILIES)


def test_ce_only_is_scored_at_the_temperature_that_matches_each_arms_clean_validation_bpc(
        finished: tuple[Path, dict]) -> None:
    tmp_path, _ = finished
    scores = tmp_path / "out" / "scores"
    for seed in (0, 1, 2):
        ce = json.loads((scores / f"ce-seed{seed}.calibrated.json").read_text())
        for arm in ("noise-0.02", "margin-free-lambda0.02"):
            arm_val = json.loads((scores / f"{arm}-seed{seed}.json").read_text())["splits"]["val"]["bpc"]["clean"]
            assert ce["settings"]["matched_val_bpc"][arm] == pytest.approx(sum(arm_val) / len(arm_val))
            assert f"matched:{arm}" in ce["temperatures"] or arm in ce["unmatched"]


def test_an_arm_with_too_few_seeds_gets_no_verdict_and_missing_runs_are_listed(finished: tuple[Path, dict]) -> None:
    tmp_path, _ = finished
    args = study_args(tmp_path, "--no-train", "--seeds", "0", "1", "7", "--out", str(tmp_path / "out2"))
    assert study.run(args) == 0
    summary = json.loads((tmp_path / "out2" / "summary.json").read_text())
    comparison = summary["comparisons"]["noise-0.02"]["val"]
    assert "fewer than 3" in comparison["verdict"] and "levels" not in comparison
    assert any("seed 7" in m for m in summary["meta"]["missing"])


def test_an_arm_with_too_few_seeds_is_screened_by_point_estimates_apart_from_the_final_table(
        finished: tuple[Path, dict], tmp_path: Path) -> None:
    runs, three_seeds = finished
    args = study_args(runs, "--no-train", "--seeds", "0", "--out", str(tmp_path / "out"))
    assert study.run(args) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    screened = summary["comparisons"]["noise-0.02"]["test"]["screening"]
    ours, ce = ({r["arm"]: r for r in summary["models"]}[arm] for arm in ("noise-0.02", "ce"))
    assert screened["clean_cost_percent"] == pytest.approx(100 * (ours["test_clean_bpc"] / ce["test_clean_bpc"] - 1))
    for level, difference in screened["bpc_difference"].items():
        assert difference == pytest.approx(ours["test_bpc"][level] - ce["test_bpc"][level])
    assert "| noise-0.02 (1 seed) |" in (tmp_path / "out" / "README.md").read_text()
    tables = study.comparison_tables({"seeded": three_seeds["comparisons"]["noise-0.02"],
                                      "screened": summary["comparisons"]["noise-0.02"]}, "test")
    final, screens = tables.split("Screens, fewer than 3 seeds")
    assert "| seeded |" in final and "screened" not in final
    assert "| screened (1 seed) |" in screens and "seeded" not in screens


def test_a_screen_is_trained_and_expected_on_its_own_seeds_only(
        finished: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs, _ = finished
    screen = dataclasses.replace(study.ARMS["noise-0.02"], screened_on=(0,))
    monkeypatch.setitem(study.ARMS, "noise-0.02", screen)
    assert study.run(study_args(runs, "--no-train", "--out", str(tmp_path / "out"))) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["seed"] for r in summary["models"] if r["arm"] == "noise-0.02"] == [0]
    assert summary["meta"]["missing"] == []
    assert "screening" in summary["comparisons"]["noise-0.02"]["test"]


def test_a_finished_run_with_the_same_configuration_is_reused(finished: tuple[Path, dict], tmp_path: Path) -> None:
    runs, _ = finished
    args = study_args(tmp_path, "--no-train", "--reuse", str(runs / "runs"))
    assert study.run_dir_for(study.ARMS["ce"], 1, args) == runs / "runs" / "ce-seed1"
    other = study_args(tmp_path, "--no-train", "--reuse", str(runs / "runs"), "--epochs", "3")
    assert study.run_dir_for(study.ARMS["ce"], 1, other) == tmp_path / "runs" / "ce-seed1"


def test_the_results_page_shows_the_verdicts_and_every_models_regime(finished: tuple[Path, dict]) -> None:
    from experiments.results_page import robustness_section

    _, summary = finished
    text = "\n".join(robustness_section(summary))
    assert "| noise-0.02 |" in text and "relative_noise=0.5" in text
    # every model; a verdict and a match row per split; a calibrated and a temperature-matched verdict row
    assert text.count("| ce |") == 3 and text.count("| noise-0.02 |") == 3 + 2 + 2 + 2
    assert "confidence controlled" in text and "| noise-0.02 (3) |" in text  # each arm's calibration
    assert "| noise-0.02 vs margin-free-lambda0.02 |" in text
    assert "Produced by" in text and "Head to head" not in text
    direct = {"noise-0.02 vs margin-free-lambda0.02": {s: summary["matched"]["noise-0.02"][s] for s in ("val", "test")}}
    text = "\n".join(robustness_section(summary | {"head_to_head": direct}))
    assert "**Head to head.**" in text and text.count("| noise-0.02 vs margin-free-lambda0.02 |") == 2 + 2


@pytest.mark.parametrize("name", sorted(study.ARMS))
def test_the_train_flags_of_every_arm_make_its_run(name: str) -> None:
    from experiments.train import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    arm = study.ARMS[name]
    args = parser.parse_args(arm.train_flags().split())
    assert config_from_args(args).to_dict() == arm.config(0).to_dict()
