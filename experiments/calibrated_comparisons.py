"""The robustness study's verdicts with confidence controlled, and the recommendation that follows from them.

Every model has a calibrated record (:mod:`experiments.calibrated_scores`): its test conditions scored raw, at
its fitted temperature and, for CE-only, at the temperatures that match each arm's clean validation BPC. Each
arm is compared with CE-only, paired by seed and window, in three ways:

- ``calibrated``: the arm at its fitted temperature against CE-only at its own, the standard post-hoc
  calibration of both (the recommendation rests on this one);
- ``temperature_matched``: the arm as trained against CE-only at the temperature at which CE-only's clean
  validation BPC equals the arm's (per seed): the free confidence control. Where the arm's BPC is below
  anything a temperature gives CE-only, its control is CE-only at its fitted temperature;
- ``raw``: both as trained (draw 0 of each perturbation: the same draw as the other two).

An arm *beats a temperature* under a family when it is better than CE-only both calibrated and
temperature-matched at the family's strongest level.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from .intervals import compare_levels
from .plots import save
from .report import markdown_table

__all__ = ["MODES", "arm_mean", "calibration_table", "compare_calibrated", "family_levels", "model_calibration",
           "plot_calibrated", "recommendation", "recommendation_markdown", "recommendation_table", "strongest_level",
           "strongest_levels", "verdict_table"]

MODES: tuple[str, ...] = ("calibrated", "temperature_matched", "raw")


def family_levels(conditions: Sequence[str], family: str) -> list[str]:
    """The conditions of one family, weakest first (``noise=0.01``, ...; a family of one condition is itself)."""
    return [c for c in conditions if c == family or c.startswith(family + "=")]


def strongest_level(conditions: Sequence[str], family: str) -> str:
    """The family's strongest level (its last)."""
    return family_levels(conditions, family)[-1]


def _reference_temperature(reference: dict[str, Any], arm: str, mode: str) -> str:
    if mode == "raw":
        return "raw"
    if mode == "calibrated":
        return "calibrated"
    return f"matched:{arm}" if f"matched:{arm}" in reference["temperatures"] else "calibrated"


def compare_calibrated(arm: str, arm_records: list[dict[str, Any]], reference_records: list[dict[str, Any]],
                       conditions: Sequence[str], families: Sequence[str], min_seeds: int, draws: int,
                       seed: int, modes: Sequence[str] = MODES) -> dict[str, Any]:
    """The arm against the reference in each of ``modes`` (module docstring), paired by seed; with fewer than
    ``min_seeds`` paired seeds, point estimates only (``screening``). Against a reference other than CE-only,
    which has no matched temperatures, ``temperature_matched`` falls back to ``calibrated``: ask for
    ``modes=("calibrated",)`` there."""
    by_seed = {r["seed"]: r for r in reference_records}
    paired = [(r, by_seed[r["seed"]]) for r in arm_records if r["seed"] in by_seed]
    seeds = [r["seed"] for r, _ in paired]
    out: dict[str, Any] = {"seeds": seeds}
    if not paired:
        return out | {"verdict": "no paired seeds"}
    for mode in modes:
        ours_t = "calibrated" if mode == "calibrated" else "raw"

        def ours(label: str) -> np.ndarray:
            return np.array([r["conditions"][label]["bpc"][ours_t] for r, _ in paired])

        def theirs(label: str) -> np.ndarray:
            return np.array([c["conditions"][label]["bpc"][_reference_temperature(c, arm, mode)] for _, c in paired])

        controls = sorted({_reference_temperature(c, arm, mode) for _, c in paired})
        if len(paired) < min_seeds:
            out[mode] = {"controls": controls, "screening": {
                "clean_cost_percent": 100 * (ours("clean").mean() / theirs("clean").mean() - 1),
                "bpc_difference": {c: float(ours(c).mean() - theirs(c).mean()) for c in conditions[1:]}}}
            continue
        result = compare_levels(ours, theirs, conditions, draws, seed, degradation=False)
        for family in families:
            verdicts = [result["levels"][c]["bpc_verdict"] for c in family_levels(conditions, family)]
            result[f"{family}_better_at_every_level"] = all(v == "better" for v in verdicts)
        out[mode] = {"controls": controls, **result}
    return out


def model_calibration(record: dict[str, Any]) -> dict[str, Any]:
    """One model's calibration at a glance: its fitted temperature, the expected calibration error and mean
    predictive entropy raw and calibrated (clean validation and test, and the out-of-domain text), and its
    top-1 error on clean test text."""
    clean = record["conditions"]["clean"]
    ood = record["conditions"][list(record["conditions"])[-1]]
    return {"arm": record["arm"], "seed": record["seed"], "temperature": record["temperature"],
            "val_ece": record["val"]["ece"], "val_clean_bpc": record["val"]["clean_bpc"],
            "test_ece": {k: clean["ece"][k] for k in ("raw", "calibrated")},
            "test_clean_bpc": {k: float(np.mean(clean["bpc"][k])) for k in ("raw", "calibrated")},
            "test_entropy_bits": {k: clean["entropy_bits"][k] for k in ("raw", "calibrated")},
            "test_top1_error": clean["top1_error"], "prior_sigma": record["prior_sigma"],
            "test_embedding_rms": record["test_embedding_rms"],
            "out_of_domain_ece": {k: ood["ece"][k] for k in ("raw", "calibrated")},
            "unmatched": record["unmatched"]}


def arm_mean(models: list[dict[str, Any]], arm: str, *keys: str) -> float:
    """The mean over an arm's seeds of one (nested) field of :func:`model_calibration`'s records, e.g.
    ``arm_mean(models, "ce", "test_ece", "raw")``."""
    values = []
    for m in (m for m in models if m["arm"] == arm):
        for key in keys:
            m = m[key]
        values.append(m)
    return float(np.mean(values))


def calibration_table(models: list[dict[str, Any]]) -> str:
    """Per arm (means over its seeds): what it does to the model's confidence and scale. Fitted temperature, ECE
    raw -> calibrated on clean test and on the out-of-domain text, predictive entropy and BPC on clean test,
    embedding RMS, the prior's sigma (learned or set) and the logits' Jacobian norm."""
    rows = []
    for arm in dict.fromkeys(m["arm"] for m in models):
        mean = partial(arm_mean, models, arm)
        seeds = sum(m["arm"] == arm for m in models)
        rows.append([f"{arm} ({seeds})", f"{mean('temperature'):.3f}",
                     f"{mean('test_ece', 'raw'):.4f} -> {mean('test_ece', 'calibrated'):.4f}",
                     f"{mean('out_of_domain_ece', 'raw'):.3f} -> {mean('out_of_domain_ece', 'calibrated'):.3f}",
                     f"{mean('test_entropy_bits', 'raw'):.3f}",
                     f"{mean('test_clean_bpc', 'raw'):.4f} -> {mean('test_clean_bpc', 'calibrated'):.4f}",
                     f"{mean('test_embedding_rms'):.4f}", f"{mean('prior_sigma'):.4f}",
                     f"{mean('val_logit_jacobian_norm'):.3g}"])
    return markdown_table(["arm (seeds)", "fitted T", "test ECE raw -> calibrated", "out-of-domain ECE",
                           "test entropy (bits/char)", "test BPC raw -> calibrated", "embedding RMS", "prior sigma",
                           "logit Jacobian norm"], rows)


def verdict_table(comparisons: dict[str, dict[str, Any]], mode: str, labels: Sequence[str],
                  reference: str = "CE-only") -> str:
    """Arms x ``labels`` in one mode: the clean cost and, per level, the verdict and BPC difference with its
    interval; screens (fewer seeds) below, as point estimates."""
    final, screens = [], []
    for name, c in comparisons.items():
        m = c.get(mode)
        if m is None:
            continue
        if "levels" in m:
            final.append([name, _interval(m["clean_cost_percent"], 2)]
                         + [f"{m['levels'][lab]['bpc_verdict']} {_interval(m['levels'][lab]['bpc_difference'])}"
                            for lab in labels])
        else:
            seeds = len(c["seeds"])
            screens.append([f"{name} ({seeds} seed{'s' if seeds > 1 else ''})",
                            f"{m['screening']['clean_cost_percent']:+.2f}"]
                           + [f"{m['screening']['bpc_difference'][lab]:+.3f}" for lab in labels])
    headers = ["clean cost %", *labels]
    tables = [markdown_table([f"arm vs {reference}", *headers], final)] if final else []
    if screens:
        tables += ["Screens (fewer seeds): point estimates, no interval and no verdict.",
                   markdown_table([f"screen vs {reference}", *headers], screens)]
    return "\n\n".join(tables)


def _beats_temperature(comparison: dict[str, Any], level: str) -> bool:
    return all(comparison.get(mode, {}).get("levels", {}).get(level, {}).get("bpc_verdict") == "better"
               for mode in ("calibrated", "temperature_matched"))


def recommendation(comparisons: dict[str, dict[str, Any]], conditions: Sequence[str],
                   families: dict[str, str]) -> list[dict[str, Any]]:
    """Per family: the arm (of those with a final verdict) with the largest calibrated gain over CE-only at the
    family's strongest level among those that beat a temperature there (module docstring), its clean cost
    (calibrated, test) and its gain; ``arm: None`` where no arm beats a temperature."""
    rows = []
    for family, name in families.items():
        level = strongest_level(conditions, family)
        winners = [(c["calibrated"]["levels"][level]["bpc_difference"]["estimate"], arm)
                   for arm, c in comparisons.items() if _beats_temperature(c, level)]
        row: dict[str, Any] = {"family": family, "name": name, "level": level, "arm": None}
        if winners:
            _, arm = min(winners)
            c = comparisons[arm]
            row |= {"arm": arm, "clean_cost_percent": c["calibrated"]["clean_cost_percent"],
                    "gain_over_calibrated": c["calibrated"]["levels"][level]["bpc_difference"],
                    "gain_over_matched": c["temperature_matched"]["levels"][level]["bpc_difference"],
                    "also": sorted(a for _, a in winners if a != arm)}
        rows.append(row)
    return rows


def strongest_levels(conditions: Sequence[str], families: Sequence[str]) -> list[str]:
    """The strongest level of every family, in the order of ``conditions``."""
    return sorted((strongest_level(conditions, f) for f in families), key=list(conditions).index)


def recommendation_markdown(confidence: dict[str, Any]) -> str:
    """The recommendation as README and the results page lead with it: how overconfident CE-only is, the table,
    and where nothing beats a temperature; every number read from ``confidence`` (``summary.json``'s
    ``calibrated``)."""
    models = confidence["models"]
    seeds = sum(m["arm"] == "ce" for m in models)
    t = arm_mean(models, "ce", "temperature")
    ece = {k: arm_mean(models, "ce", "test_ece", k) for k in ("raw", "calibrated")}
    bpc = {k: arm_mean(models, "ce", "test_clean_bpc", k) for k in ("raw", "calibrated")}
    rows = confidence["recommendation"]
    nothing = [r["name"] for r in rows if r["arm"] is None]
    conditions = confidence["conditions"]
    final = {arm: c for arm, c in confidence["comparisons"].items() if "levels" in c.get("calibrated", {})}
    nowhere = [arm for arm, c in final.items()
               if not any(_beats_temperature(c, strongest_level(conditions, f)) for f in confidence["families"])]
    lines = [
        f"CE-only is {'over' if t > 1 else 'under'}confident: its temperature fitted on clean validation text is "
        f"{t:.3f} (mean of {seeds} seeds), which moves its BPC on clean test text (one window in "
        f"{confidence.get('window_stride', 1)}, as in all the scores below) from {bpc['raw']:.4f} to "
        f"{bpc['calibrated']:.4f} and its expected calibration error from {ece['raw']:.4f} to {ece['calibrated']:.4f}. "
        "A setting *beats a temperature* under a family when, at the family's strongest level, it is better than "
        "CE-only both with each model at its own fitted temperature and with CE-only at the temperature that "
        "matches the setting's clean validation BPC (95% paired bootstrap over seeds and windows, three seeds).",
        "",
        recommendation_table(rows),
        "",
        ("Nothing beats a temperature under " + ", ".join(nothing) + "." if nothing
         else "Under every family some setting beats a temperature."),
        "",
        (f"Of the {len(final)} settings with three seeds, these beat a temperature under no family: "
         + ", ".join(f"`{a}`" for a in nowhere) + "." if nowhere
         else f"Each of the {len(final)} settings with three seeds beats a temperature under some family."),
    ]
    return "\n".join(lines)


def _interval(d: dict[str, float], digits: int = 3) -> str:
    return f"{d['estimate']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


def recommendation_table(rows: list[dict[str, Any]]) -> str:
    """:func:`recommendation` as a short table a reader acts on."""
    body = []
    for r in rows:
        under = r["name"] if r["level"] == r["family"] else f"{r['name']} ({r['level']})"
        if r["arm"] is None:
            body.append([under, "nothing beats a temperature", "", "", "", ""])
        else:
            flags = f" (`{r['train_flags']}`)" if r.get("train_flags") else ""
            body.append([under, f"`{r['arm']}`{flags}", _interval(r["clean_cost_percent"], 2),
                         _interval(r["gain_over_calibrated"]), _interval(r["gain_over_matched"]),
                         ", ".join(f"`{a}`" for a in r["also"]) or "none"])
    return markdown_table(["under (strongest level)", "use (train flags)", "clean cost % (calibrated)",
                           "BPC vs CE-only at its fitted T",
                           "BPC vs CE-only at the matched T", "others that beat a temperature"], body)


def plot_calibrated(comparisons: dict[str, dict[str, Any]], conditions: Sequence[str], families: dict[str, str],
                    path: Path) -> Path:
    """One panel per family: each arm with a final verdict, its BPC minus CE-only's against the level, calibrated
    (solid, with the 95% interval as bars) and against CE-only at the matched temperature (dashed). Below zero
    the arm is better; a family where no curve is below zero on both is one where nothing beats a temperature."""
    final = {arm: c for arm, c in comparisons.items() if "levels" in c.get("calibrated", {})}
    names = list(families)
    rows = [(names[i:i + 3] + ["."] * 3)[:3] for i in range(0, len(names), 3)]  # three panels a row, "." empty
    fig, panels = plt.subplot_mosaic([*rows, ["legend"] * 3], figsize=(15, 4.25 * len(rows) + 1.5),
                                     gridspec_kw={"height_ratios": (*[1] * len(rows), 0.25)})
    tab20 = plt.get_cmap("tab20")
    colours = [tab20(i) for i in [*range(0, 20, 2), *range(1, 20, 2)]]  # the ten dark hues first
    for family, name in families.items():
        ax = panels[family]
        levels = family_levels(conditions, family)
        xs = np.arange(len(levels))
        for k, (arm, c) in enumerate(final.items()):
            colour = colours[k % len(colours)]
            for mode, style in (("calibrated", "-"), ("temperature_matched", "--")):
                d = [c[mode]["levels"][lev]["bpc_difference"] for lev in levels]
                y = np.array([v["estimate"] for v in d])
                err = np.array([[v["estimate"] - v["low"] for v in d], [v["high"] - v["estimate"] for v in d]])
                ax.errorbar(xs + 0.04 * (k - len(final) / 2), y, yerr=err if mode == "calibrated" else None,
                            color=colour, linestyle=style, marker="o", markersize=3, capsize=2,
                            label=arm if mode == "calibrated" else None)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(xs, [lev.split("=")[-1] for lev in levels])
        ax.set_xlim(-0.5, len(levels) - 0.5)
        ax.set(title=name, xlabel="level", ylabel="test BPC minus CE-only's")
    panels["legend"].axis("off")
    if final:
        panels["legend"].legend(*panels[names[0]].get_legend_handles_labels(), loc="center", ncol=5, fontsize=8)
    fig.suptitle("Against CE-only at its fitted temperature (solid, 95% interval) and at the temperature matching "
                 "the arm's clean cost (dashed)")
    return save(fig, path)
