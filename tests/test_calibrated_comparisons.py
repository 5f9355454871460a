"""The verdicts with confidence controlled, on synthetic calibrated records whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.calibrated_comparisons import compare_calibrated, recommendation, recommendation_markdown

CONDITIONS = ["clean", "noise=0.1", "noise=0.2", "tempest"]
FAMILIES = {"noise": "embedding noise", "tempest": "out-of-domain text"}


def record(arm: str, seed: int, bpc: dict[str, dict[str, float]], matched: tuple[str, ...] = ()) -> dict:
    """A calibrated record whose every window scores ``bpc[condition][temperature]`` plus seeded jitter."""
    rng = np.random.default_rng(seed)
    temperatures = {"raw": 1.0, "calibrated": 1.1, **{f"matched:{m}": 1.3 for m in matched}}
    conditions = {c: {"bpc": {t: list(bpc[c].get(t, bpc[c]["raw"]) + 0.01 * rng.standard_normal(50))
                              for t in temperatures},
                      "ece": {t: 0.01 for t in temperatures}, "entropy_bits": {t: 1.5 for t in temperatures},
                      "top1_error": 0.4}
                  for c in CONDITIONS}
    return {"arm": arm, "seed": seed, "temperature": 1.1, "temperatures": temperatures, "unmatched": [],
            "conditions": conditions}


def ce(seed: int) -> dict:
    """CE-only: worse at the matched temperature on clean text, better under noise there."""
    return record("ce", seed, {
        "clean": {"raw": 2.0, "calibrated": 1.98, "matched:a": 2.05, "matched:b": 2.05},
        "noise=0.1": {"raw": 3.0, "calibrated": 2.9, "matched:a": 2.8, "matched:b": 2.8},
        "noise=0.2": {"raw": 4.0, "calibrated": 3.8, "matched:a": 3.6, "matched:b": 3.6},
        "tempest": {"raw": 5.0, "calibrated": 4.8, "matched:a": 4.5, "matched:b": 4.5},
    }, matched=("a", "b"))


def arm(name: str, seed: int, noise: float, tempest: float) -> dict:
    """An arm costing 2.05 clean, scoring ``noise`` at the strongest noise level and ``tempest`` out of domain,
    the same raw and calibrated."""
    return record(name, seed, {"clean": {"raw": 2.05}, "noise=0.1": {"raw": 2.7}, "noise=0.2": {"raw": noise},
                               "tempest": {"raw": tempest}})


@pytest.fixture(scope="module")
def comparisons() -> dict:
    refs = [ce(s) for s in range(3)]
    # a beats CE-only under noise both calibrated and at the matched temperature; b only against the raw model
    return {name: compare_calibrated(name, [arm(name, s, noise, 4.7) for s in range(3)], refs, CONDITIONS,
                                     list(FAMILIES), 3, 200, 0)
            for name, noise in (("a", 3.3), ("b", 3.7))}


def test_a_setting_that_beats_ce_only_raw_but_not_at_matched_confidence_is_not_recommended(comparisons: dict) -> None:
    b = comparisons["b"]
    assert b["raw"]["levels"]["noise=0.2"]["bpc_verdict"] == "better"
    assert b["temperature_matched"]["levels"]["noise=0.2"]["bpc_verdict"] == "worse"
    rows = {r["family"]: r for r in recommendation(comparisons, CONDITIONS, FAMILIES)}
    assert rows["noise"]["arm"] == "a" and rows["noise"]["also"] == []
    assert rows["tempest"]["arm"] is None  # 4.7 beats the raw 5.0 and the calibrated 4.8, not the matched 4.5


def test_the_control_at_matched_confidence_is_ce_only_at_the_arms_own_matched_temperature(comparisons: dict) -> None:
    assert comparisons["a"]["temperature_matched"]["controls"] == ["matched:a"]
    assert comparisons["a"]["calibrated"]["controls"] == ["calibrated"]
    cost = comparisons["a"]["temperature_matched"]["clean_cost_percent"]["estimate"]
    assert cost == pytest.approx(0.0, abs=0.1)  # the matched temperature gives CE-only the arm's clean BPC


def test_too_few_seeds_give_point_estimates_and_no_recommendation() -> None:
    few = compare_calibrated("a", [arm("a", 0, 3.3, 4.7)], [ce(0)], CONDITIONS, list(FAMILIES), 3, 200, 0)
    assert "screening" in few["calibrated"] and "levels" not in few["calibrated"]
    assert all(r["arm"] is None for r in recommendation({"a": few}, CONDITIONS, FAMILIES))


def test_the_recommendation_says_where_nothing_beats_a_temperature_and_which_settings_never_do(
        comparisons: dict) -> None:
    models = [{"arm": "ce", "temperature": 1.1, "test_ece": {"raw": 0.03, "calibrated": 0.01},
               "test_clean_bpc": {"raw": 2.0, "calibrated": 1.98}}]
    text = recommendation_markdown({"models": models, "conditions": CONDITIONS, "families": FAMILIES,
                                    "comparisons": comparisons,
                                    "recommendation": recommendation(comparisons, CONDITIONS, FAMILIES)})
    assert "overconfident" in text and "1.100" in text
    assert "Nothing beats a temperature under out-of-domain text." in text
    assert "these beat a temperature under no family: `b`." in text
