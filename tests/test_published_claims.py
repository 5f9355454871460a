"""What README and docs/RESULTS.md say about robustness is what the committed study's summary says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from experiments.calibrated_comparisons import recommendation_markdown
from experiments.intervals import Interval, verdict
from experiments.results_page import (
    README_BLOCK,
    UNCERTAINTY_BLOCK,
    build,
    readme_with_block,
    readme_with_recommendation,
)
from experiments.uncertainty_report import summary_markdown
from experiments.uncertainty_verdicts import CRITERIA, STRONGEST

ROOT = Path(__file__).parents[1]
SUMMARY = ROOT / "results" / "robustness_study" / "summary.json"


@pytest.fixture(scope="module")
def summary() -> dict:
    return json.loads(SUMMARY.read_text())


def test_readmes_robustness_recommendation_is_the_one_the_committed_summary_gives(summary: dict) -> None:
    readme = (ROOT / "README.md").read_text()
    assert README_BLOCK[0] in readme and README_BLOCK[1] in readme
    assert readme_with_recommendation(readme, summary) == readme
    assert recommendation_markdown(summary["calibrated"]) in readme


def test_the_results_page_leads_with_the_same_recommendation(summary: dict) -> None:
    page = (ROOT / "docs" / "RESULTS.md").read_text()
    lead = page[: page.index("## Training runs") if "## Training runs" in page else len(page)]
    assert recommendation_markdown(summary["calibrated"]) in lead


def test_the_results_page_is_what_results_page_builds_from_the_committed_results() -> None:
    page = (ROOT / "docs" / "RESULTS.md").read_text()
    marker = "<!-- hand-written below -->"
    assert page.split(marker)[0] == build(ROOT / "results").split(marker)[0] + "\n" * (marker in page)


def test_every_model_of_the_study_has_its_temperature_calibration_error_and_calibrated_scores(summary: dict) -> None:
    calibrated = {(m["arm"], m["seed"]): m for m in summary["calibrated"]["models"]}
    assert set(calibrated) == {(m["arm"], m["seed"]) for m in summary["models"]}
    for m in calibrated.values():
        assert m["temperature"] > 0 and 0 <= m["test_ece"]["raw"] <= 1 and 0 <= m["test_ece"]["calibrated"] <= 1
        assert m["test_clean_bpc"]["calibrated"] <= m["test_clean_bpc"]["raw"] + 0.01  # fitted on validation


def test_every_arm_with_a_final_verdict_is_judged_against_the_temperature_matched_ce_only(summary: dict) -> None:
    comparisons = summary["calibrated"]["comparisons"]
    final = [arm for arm, c in comparisons.items() if "levels" in c["calibrated"]]
    assert "label-smoothing-0.05" in final and "margin-positive-full-lambda0.05" in final
    for arm in final:
        assert len(comparisons[arm]["seeds"]) >= 3
        assert set(comparisons[arm]["temperature_matched"]["levels"]) == set(summary["calibrated"]["conditions"][1:])


def test_every_number_of_readmes_summary_of_the_reproduction_is_on_the_generated_results_page() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("In short, on the bundled corpus")
    paragraph = readme[start: readme.index("\n\n", start)]
    generated = (ROOT / "docs" / "RESULTS.md").read_text().split("<!-- hand-written below -->")[0]
    ours = re.sub(r"paper \+?\d+(\.\d+)?%?", "", paragraph)  # the paper's numbers are quoted, not ours
    numbers = re.findall(r"[+-]?\d+\.\d+|[+-]\d+", ours)
    assert numbers and [n for n in numbers if n not in generated] == []


UNCERTAINTY = ROOT / "results" / "uncertainty_study" / "summary.json"


@pytest.fixture(scope="module")
def uncertainty() -> dict:
    return json.loads(UNCERTAINTY.read_text())


def test_readmes_uncertainty_verdict_is_the_one_the_committed_summary_gives(uncertainty: dict) -> None:
    readme = (ROOT / "README.md").read_text()
    assert UNCERTAINTY_BLOCK[0] in readme and UNCERTAINTY_BLOCK[1] in readme
    assert readme_with_block(readme, UNCERTAINTY_BLOCK, summary_markdown(uncertainty)) == readme
    page = (ROOT / "docs" / "RESULTS.md").read_text()
    assert summary_markdown(uncertainty) in page


def test_every_arm_of_the_uncertainty_study_has_three_seeds_and_a_verdict_per_shift_and_criterion(
        uncertainty: dict) -> None:
    for arm, record in uncertainty["arms"].items():
        assert len({f["seed"] for f in record["facts"]}) >= 3, arm
        for label in STRONGEST.values():
            expected = set(CRITERIA) - ({"shift_auroc"} if label == "clean" else set())
            assert set(record["verdicts"][label]) == expected
            for cell in record["verdicts"][label].values():
                assert cell["verdict"] == verdict(Interval(**cell["difference"]))
