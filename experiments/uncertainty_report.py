"""The uncertainty study's report: tables and figures from its summary, and the generated headline that README and
the results page show."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .calibration import ECE_BINS
from .laplace import PRIOR_PRECISION_GRID
from .plots import plt, save
from .report import markdown_table
from .selective import risk_coverage
from .shift_conditions import CONDITIONS
from .uncertainty_methods import METHODS, POSTERIORS, ArmScores, available
from .uncertainty_verdicts import CRITERIA, FAMILY_NAMES, NOISE_LABELS, STRONGEST, contender_name

SELECTION = ("On each side the contender is the best by its point estimate on these windows (for error and shift "
             "detection, the best of the method's signals): the posterior's best filter and signal against the best "
             "baseline and signal, a selection both sides share.")

VERDICT_MARKS = {"better": "**better**", "worse": "worse", "not distinguishable": "n.d."}


def tau_table(arms: dict[str, dict[str, Any]]) -> str:
    """The fitted tau per arm: validation NLL of the posterior predictive at each tau / sigma, relative to the
    ``tau -> 0`` limit (the MAP predictive), mean over seeds."""
    ratios = list(next(iter(arms.values()))["facts"][0]["tau_curve"])
    headers = ["arm", "sigma (empirical Bayes)", "sigma (learned in training, end of the run)",
               *[f"tau = {r} sigma" for r in ratios[1:]], "best tau / sigma (per seed)", "MAP limit best"]
    rows = []
    for arm, rec in arms.items():
        facts = rec["facts"]
        deltas = [np.mean([(f["tau_curve"][r] - f["tau_curve"]["0"]) / math.log(2.0) for f in facts])
                  for r in ratios[1:]]
        rows.append([arm, np.mean([f["sigma"] for f in facts]), _learned_sigma(facts),
                     *[f"{d:+.4f}" for d in deltas],
                     "/".join(f"{f['tau_ratio']:g}" for f in facts),
                     f"{sum(f['map_limit_best'] for f in facts)} of {len(facts)} seeds"])
    return markdown_table(headers, rows, digits=4)


def _learned_sigma(facts: list[dict[str, Any]]) -> str:
    """The sigma a run learned (mean over seeds) and how much it still moved in its last epoch, or ``-``."""
    paths = [f["learned_sigma_last_epochs"] for f in facts if f.get("learned_sigma_last_epochs")]
    if not paths:
        return "-"
    last, change = np.mean([p[-1] for p in paths]), np.mean([p[-1] - p[0] for p in paths])
    return f"{last:.4f} ({change:+.4f} in the last epoch)"


def fitted_baselines_table(arms: dict[str, dict[str, Any]]) -> str:
    """Per arm and seed: the fitted temperature and the Laplace prior precision fitted on validation (at the top
    of its grid the Laplace predictive is the MAP softmax)."""
    top = max(PRIOR_PRECISION_GRID)
    rows = [[arm, " / ".join(f"{f['temperature']:.3f}" for f in rec["facts"]),
             " / ".join(f"{f['laplace_prior_precision']:.3g}" for f in rec["facts"]),
             f"{sum(f['laplace_prior_precision'] >= top for f in rec['facts'])} of {len(rec['facts'])} seeds"]
            for arm, rec in arms.items()]
    return markdown_table(["arm", "temperature (per seed)", "Laplace prior precision (per seed)",
                           f"prior precision at the grid's top ({top:g})"], rows)


def metrics_table(arm: dict[str, Any], labels: Sequence[str]) -> str:
    """One arm: per condition and method, BPC, top-1 error, ECE, Brier, and its best signal's error AURC and shift
    AUROC (pooled over seeds)."""
    headers = ["condition", "method", "BPC", "top-1 error", "ECE", "Brier", "best error signal (AURC)",
               "best shift signal (AUROC)"]
    rows = []
    for label in labels:
        for method, m in arm["metrics"][label].items():
            name, signals = METHODS[method]
            err = min(m["signals"], key=lambda s: m["signals"][s]["aurc"])
            row = [label, name, m["bpc"], m["top1_error"], m["ece"], m["brier"],
                   f"{signals[err]} ({m['signals'][err]['aurc']:.3f})"]
            if label == "clean":
                row.append("")
            else:
                sh = max(m["signals"], key=lambda s: m["signals"][s]["shift_auroc"])
                row.append(f"{signals[sh]} ({m['signals'][sh]['shift_auroc']:.3f})")
            rows.append(row)
    return markdown_table(headers, rows)


def _verdict_cell(cell: dict[str, Any]) -> str:
    """``"**better** -0.123 [-0.200, -0.050]"``: a verdict with its difference and interval."""
    d = cell["difference"]
    return f"{VERDICT_MARKS[cell['verdict']]} {d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def posterior_verdict_table(arms: dict[str, dict[str, Any]]) -> str:
    """Per family (strongest level) and criterion: the posterior against the best baseline, per arm (n.d.: not
    distinguishable)."""
    names = list(arms)
    headers = ["shift", "criterion", *names]
    rows = []
    for family, label in STRONGEST.items():
        for criterion, (cname, _) in CRITERIA.items():
            if criterion == "shift_auroc" and label == "clean":
                continue
            cells = []
            for arm in names:
                c = arms[arm]["verdicts"][label][criterion]
                cells.append(f"{_verdict_cell(c)} vs {contender_name(c['best_baseline'])}")
            rows.append([f"{FAMILY_NAMES[family]} ({label})", cname, *cells])
    return markdown_table(headers, rows)


def denoising_table(arms: dict[str, dict[str, Any]]) -> str:
    """Posterior - MAP under embedding noise, per arm and level (BPC, ECE)."""
    rows = []
    for label in NOISE_LABELS:
        for criterion in ("bpc", "ece"):
            cells = []
            for rec in arms.values():
                cells.append(_verdict_cell(rec["denoising"][label][criterion]))
            rows.append([label, CRITERIA[criterion][0], *cells])
    return markdown_table(["condition", "criterion", *arms], rows)


def family_table(families: dict[str, dict[str, Any]]) -> str:
    """Per family and criterion: the baselines that are best (with the number of arms where each is), and how the
    posterior fared against the best one over the arms."""
    rows = []
    for family in (f for f in STRONGEST if f in families):  # the study's order (the JSON keeps keys sorted)
        criteria = families[family]
        row = [f"{FAMILY_NAMES[family]} ({STRONGEST[family]})"]
        for criterion in CRITERIA:
            if criterion not in criteria:
                row.append("")
                continue
            cell = criteria[criterion]
            names = [contender_name(b) for b in cell["best_baseline"].values()]
            ranked = sorted(set(names), key=lambda n: (-names.count(n), n))
            best = ", ".join(f"{n} ({names.count(n)})" for n in ranked)
            verdicts = list(cell["posterior"].values())
            row.append(f"{best}; posterior: {verdicts.count('better')} better, "
                       f"{verdicts.count('not distinguishable')} n.d., {verdicts.count('worse')} worse")
        rows.append(row)
    return markdown_table(["shift (strongest level)", *(name for name, _ in CRITERIA.values())], rows)


def wins_table(wins: list[dict[str, Any]]) -> str:
    """Every cell where the posterior beats the best baseline, with its interval."""
    rows = [[w["arm"], w["condition"], CRITERIA[w["criterion"]][0], contender_name(w["posterior"]),
             contender_name(w["best_baseline"]),
             f"{w['difference']['estimate']:+.3f} [{w['difference']['low']:+.3f}, {w['difference']['high']:+.3f}]"]
            for w in wins]
    return markdown_table(["arm", "condition", "criterion", "posterior", "best baseline", "difference"], rows)


def cost_table(arms: dict[str, dict[str, Any]]) -> str:
    headers = ["method", *arms, "against the ensemble (mean)"]
    rows = []
    for method, (name, _) in METHODS.items():
        costs = [arms[a]["cost"].get(method) for a in arms]
        ratio = cost_ratio(arms, method)
        rows.append([name, *[f"{1000 * c:.3g} ms" if c is not None else "-" for c in costs],
                     f"{ratio:.3g}x" if ratio is not None else "-"])
    return markdown_table(headers, rows)


def cost_ratio(arms: dict[str, dict[str, Any]], method: str) -> float | None:
    """The method's cost per position over the deep ensemble's, mean over the arms it scored (``None``: none)."""
    ratios = [rec["cost"][method] / rec["cost"]["ensemble"] for rec in arms.values() if method in rec["cost"]]
    return float(np.mean(ratios)) if ratios else None


def plot_tau(arms: dict[str, dict[str, Any]], path: Path) -> Path:
    """Validation NLL (bits) of the posterior predictive against tau / sigma, relative to the MAP limit."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, rec in arms.items():
        ratios = [r for r in rec["facts"][0]["tau_curve"] if r != "0"]
        y = [np.mean([(f["tau_curve"][r] - f["tau_curve"]["0"]) / math.log(2.0) for f in rec["facts"]]) for r in ratios]
        ax.plot([float(r) for r in ratios], y, marker="o", label=arm)
    ax.axhline(0.0, color="k", lw=0.8, ls="--", label="tau -> 0 (MAP)")
    ax.set(xscale="log", xlabel="tau / sigma", ylabel="validation NLL - MAP's (bits per character)",
           title="Fitting tau: the posterior predictive against its MAP limit")
    ax.legend(fontsize=7)
    return save(fig, path)


def plot_reliability(scores: ArmScores, labels: Sequence[str], arm: str, path: Path) -> Path:
    """Reliability diagrams (accuracy against confidence, :data:`ECE_BINS` bins, pooled over seeds) of every
    method on ``labels``, and under embedding noise of the particle filter told the noise level (dashed)."""
    fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 4), squeeze=False)
    for ax, label in zip(axes[0], labels):
        curves = [(METHODS[m][0], scores.records[m][label], "-") for m in available(scores, label)]
        if label in scores.matched:
            curves.append((f"{METHODS['smc'][0]}, told the noise level", scores.matched[label], "--"))
        for name, rec, style in curves:
            ax.plot(*_reliability(rec["confidence"].reshape(-1), rec["correct"].reshape(-1)), marker=".", ls=style,
                    label=name)
        ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls=":")
        ax.set(xlabel="confidence (max p)", ylabel="accuracy", title=f"{arm}: {label}")
        ax.legend(fontsize=6)
    return save(fig, path)


def _reliability(confidence: np.ndarray, correct: np.ndarray) -> tuple[list[float], list[float]]:
    """Mean confidence and accuracy in each non-empty bin of :data:`ECE_BINS` equal-width bins."""
    which = np.clip(np.digitize(confidence, np.linspace(0.0, 1.0, ECE_BINS + 1)[1:-1]), 0, ECE_BINS - 1)
    keep = [b for b in range(ECE_BINS) if (which == b).any()]
    return [float(confidence[which == b].mean()) for b in keep], [float(correct[which == b].mean()) for b in keep]


def plot_risk_coverage(scores: ArmScores, labels: Sequence[str], arm: str, path: Path) -> Path:
    """Risk-coverage curves of every method's predictive entropy (and MAP's max-probability) on ``labels``."""
    fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 4), squeeze=False)
    for ax, label in zip(axes[0], labels):
        for method, signal in [*((m, "entropy") for m in available(scores, label)), ("map", "neg_maxprob")]:
            errors = ~scores.records[method][label]["correct"].reshape(-1)
            coverage, risk = risk_coverage(scores.signals[method][label][signal].reshape(-1), errors)
            ax.plot(coverage, risk, lw=1, ls="--" if signal == "neg_maxprob" else "-",
                    label=f"{METHODS[method][0]}, {METHODS[method][1][signal]}")
        ax.set(xlabel="coverage", ylabel="risk (top-1 error)", title=f"{arm}: {label}")
    axes[0][0].legend(fontsize=6)
    return save(fig, path)


def headline(summary: dict[str, Any]) -> list[str]:
    """What the posterior is good for, from the summary: generated, never written by hand."""
    arms, wins = summary["arms"], summary["posterior_wins"]
    cells = sum(len(c) for rec in arms.values() for c in rec["verdicts"].values())
    map_best = sum(f["map_limit_best"] for rec in arms.values() for f in rec["facts"])
    models = sum(len(rec["facts"]) for rec in arms.values())
    smallest = sum(f["tau_ratio"] == min(summary["settings"]["tau_ratios"]) for rec in arms.values()
                   for f in rec["facts"])
    tau_line = (f"- Fitting tau on validation: the `tau -> 0` limit (the MAP predictive) is at least as good as every "
                f"positive tau for {map_best} of {models} models; the best positive tau is the grid's smallest for "
                f"{smallest} of {models}.")
    lines = []
    if wins:
        family_of = {c.label: c.family for c in CONDITIONS}
        groups: dict[str, dict[str, set[str]]] = {}
        for w in wins:
            groups.setdefault(family_of[w["condition"]], {}).setdefault(w["criterion"], set()).add(w["arm"])
        where = "; ".join(f"{FAMILY_NAMES[f]}: " + ", ".join(f"{CRITERIA[c][0]} in {len(a)} of {len(arms)} arms"
                                                              for c, a in crits.items())
                          for f, crits in groups.items())
        lines.append(f"- The latent posterior beats the best baseline in {len(wins)} of {cells} (arm, condition, "
                     f"criterion) cells, under {where} (at some level of the family).")
    else:
        lines.append(f"- The latent posterior beats the best baseline in none of {cells} (arm, condition, criterion) "
                     "cells.")
    worse = sum(c["verdict"] == "worse" for rec in arms.values() for cs in rec["verdicts"].values()
                for c in cs.values())
    lines.append(f"- It is worse than the best baseline in {worse} of them, not distinguishable in the rest.")
    gap = max(abs(rec["metrics"]["clean"]["smc"]["bpc"] - rec["metrics"]["clean"]["map"]["bpc"])
              for rec in arms.values())
    ensemble_best = sum(c["bpc"]["best_baseline"]["method"] == "ensemble" for rec in arms.values()
                        for c in rec["verdicts"].values())
    lines.append(f"- Why: fitted by validation likelihood, the posterior hardly spreads beyond the point estimate "
                 f"(tau below), so on clean text its BPC is within {gap:.4f} of MAP's in every arm and it inherits "
                 f"MAP's confidence; the deep ensemble (three models) is the best baseline in BPC in {ensemble_best} "
                 f"of {sum(len(rec['verdicts']) for rec in arms.values())} (arm, condition) cells.")
    lines.append(tau_line)
    per_arm = {arm: sum(c["bpc"]["verdict"] == "better" for c in rec["denoising"].values())
               for arm, rec in arms.items()}
    where = ", ".join(f"{arm} at {n} of {len(arms[arm]['denoising'])} levels" for arm, n in per_arm.items() if n)
    lines.append(f"- Bayesian denoising: under embedding noise, the posterior told the noise level (its emission "
                 f"matched to it) predicts better than decoding the noisy embeddings directly (BPC) in "
                 f"{sum(per_arm.values())} of {sum(len(rec['denoising']) for rec in arms.values())} (arm, level) "
                 f"cells{': ' + where if where else ''}.")
    costs = [f"{cost_ratio(arms, m):.0f} times ({METHODS[m][0]})" for m in POSTERIORS if cost_ratio(arms, m)]
    lines.append(f"- The latent posterior costs {' and '.join(costs)} the deep ensemble per position (mean over the "
                 "arms).")
    svi = summary["settings"]["svi"]
    read = [arm for arm in svi["arms"] if "svi" in arms.get(arm, {}).get("cost", {})]
    if read:
        ratio = np.mean([arms[a]["cost"]["svi"] / arms[a]["cost"]["smc"] for a in read])
        lines.append(f"- The SVI filter ({svi['steps']} steps per position) read only {', '.join(read)}, on "
                     f"{', '.join(svi['conditions'])}: it costs {ratio:.0f} times the particle filter per position.")
    return lines


def summary_markdown(summary: dict[str, Any]) -> str:
    """The headline and, per shift family, the best baselines and the posterior's verdicts: what README shows."""
    return ("\n".join(headline(summary)) + "\n\nPer shift family (strongest level), per criterion: the best baseline "
            "in each arm (how many arms) and the latent posterior against it over the arms (95% paired bootstrap "
            "over seeds and windows; n.d.: not distinguishable).\n\n" + family_table(summary["families"]))
