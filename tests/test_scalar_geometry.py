"""``prob-attention scalar-geometry`` (Section 3.4, Figures 3.2 and 3.3): outputs and the properties behind them."""

import json

import pytest
import torch

from experiments.cli import main as cli_main
from experiments.scalar_geometry import (
    ScalarGeometryConfig,
    conditional_densities,
    couplings,
    population,
    transform_for,
)
from prob_attention import log_det_margin, scalar_margin

SMALL = {"n_sequences": 300, "grid_points": 1601}


@pytest.fixture(scope="module")
def densities():
    return conditional_densities(ScalarGeometryConfig(**SMALL))


def test_quick_command_writes_json_table_and_figures(tmp_path):
    assert cli_main(["scalar-geometry", "--quick", "--out", str(tmp_path)]) == 0
    for name in ("scalar_geometry.json", "scalar_geometry.md", "fig3_2_conditional_density.png",
                 "fig3_3_population.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    res = json.loads((tmp_path / "scalar_geometry.json").read_text())
    assert res["quick"] and res["config"]["n_sequences"] < 4000
    assert res["paper"]["excluded_positive"] == 613
    assert set(res["population"]) == {"positive", "negative"}
    table = (tmp_path / "scalar_geometry.md").read_text()
    assert "613 (15.3%)" in table and res["command"] in table and "seed" in table


def test_flags_override_quick(tmp_path):
    argv = ["scalar-geometry", "--quick", "--n-sequences", "50", "--beta", "2", "--context", "-1", "1",
            "--out", str(tmp_path)]
    assert cli_main(argv) == 0
    cfg = json.loads((tmp_path / "scalar_geometry.json").read_text())["config"]
    assert cfg["n_sequences"] == 50 and cfg["beta"] == 2.0 and cfg["context"] == [-1.0, 1.0]


@pytest.mark.parametrize("case", ["zero", "negative"])
def test_density_integrates_to_one_where_the_map_is_a_bijection(densities, case):
    c = densities["cases"][case]
    assert c["min_margin"] > 0 and not c["fold_points"]
    assert c["integral"] == pytest.approx(1.0, abs=1e-6)


def test_zero_coupling_is_the_reference_shifted_to_the_context_mean(densities):
    grid, ctx = densities["grid"], torch.tensor(densities["context"], dtype=torch.float64)
    expected = torch.distributions.Normal(ctx.mean(), 1.0).log_prob(grid).exp()
    torch.testing.assert_close(densities["cases"]["zero"]["density"], expected)


def test_negative_coupling_sharpens_and_positive_flattens_the_peak(densities):
    ref = densities["reference_peak"]
    assert densities["cases"]["negative"]["peak_density"] > ref > densities["cases"]["positive"]["peak_density"]


def test_positive_coupling_folds_and_the_unfolded_formula_is_not_normalized(densities):
    """The fold ``m_t <= 0`` removes mass from the grid, yet the formula restricted to ``det J > 0``
    integrates to 1 + P(z in the overlap of the two unfolded branches) (> 1, not < 1), and the mass
    on the fold equals that overlap; the signed integral is 1 (degree-one proper map)."""
    c = densities["cases"]["positive"]
    assert len(c["fold_points"]) == 2 and c["min_margin"] < 0
    context = torch.tensor(densities["context"], dtype=torch.float64)
    for f in c["fold_points"]:
        seq = torch.cat([context, torch.tensor([f], dtype=torch.float64)])
        assert scalar_margin(seq, 1.0)[-1].item() == pytest.approx(0.0, abs=1e-9)
    assert c["folded_mass"] > 1e-2
    assert c["integral"] == pytest.approx(1.0 + c["overlap_mass"], abs=1e-4)
    assert c["folded_mass"] == pytest.approx(c["overlap_mass"], abs=1e-4)
    assert c["integral_signed"] == pytest.approx(1.0, abs=1e-6)


def test_positive_density_without_a_fold_integrates_to_one():
    dens = conditional_densities(ScalarGeometryConfig(beta=0.5, grid_points=1601))  # 0.5 * 1.25 < 1
    c = dens["cases"]["positive"]
    assert c["min_margin"] > 0 and c["integral"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("case", ["positive", "negative"])
def test_excluded_fraction_is_the_direct_count_and_the_margin_is_the_log_det_margin(case):
    config = ScalarGeometryConfig(**SMALL)
    beta = couplings(config.beta)[case]
    pop = population(config, beta)
    # the direct count from the library's scalar margin, on an independently drawn copy of the population
    gen = torch.Generator().manual_seed(config.seed)
    x = config.x_scale * torch.randn(config.n_sequences, config.length, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(pop["x"], x)
    direct = int((scalar_margin(x, beta) <= 0).any(-1).sum())
    assert int(pop["excluded"].sum()) == direct
    assert (direct > 0) == (case == "positive")
    # the experiment's margin equals exp(log det J_tt) from the bijector (float64), -inf past the boundary
    log_det = log_det_margin(transform_for(beta), x[..., None])
    valid = pop["margin"] > 0
    torch.testing.assert_close(pop["margin"][valid], log_det[valid].exp(), rtol=1e-12, atol=1e-12)
    assert torch.isneginf(log_det[~valid]).all()
    # and is exactly linear in the attention variance (eq. 8)
    torch.testing.assert_close(pop["margin"], 1.0 - beta * pop["variance"], rtol=0, atol=1e-12)
    assert torch.isneginf(pop["log_density"][pop["excluded"]]).all()
    assert torch.isfinite(pop["log_density"][~pop["excluded"]]).all()


def test_population_is_seeded():
    config = ScalarGeometryConfig(n_sequences=20)
    torch.testing.assert_close(population(config, 1.0)["x"], population(config, 1.0)["x"])
    other = population(ScalarGeometryConfig(n_sequences=20, seed=1), 1.0)["x"]
    assert not torch.equal(population(config, 1.0)["x"], other)


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError):
        ScalarGeometryConfig(beta=-1.0)
    with pytest.raises(ValueError):
        ScalarGeometryConfig(length=1)
