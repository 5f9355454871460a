"""``prob-attention support-tokens``: per-position margins along real text, support tokens marked.

For each trained run: the margin ``log det J_tt`` of the embedding prior at every position of a
validation window, drawn as the text itself over a heat strip (one shared colour scale for all runs,
support tokens boxed), and over the whole split: the distribution of per-position margins and sequence
margins, and the characters that most often are a window's support token. Positions closer to the
degeneracy boundary (smaller margin) are the ones the barrier pushes on.

Example::

    prob-attention support-tokens --runs runs/default-lambda0 runs/default-lambda0.02
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import Normalize
from matplotlib.patches import Rectangle

from inference.map import TrainedModel, device_name, load_trained
from prob_attention import log_det_margin, support_tokens

from .flags import add_device_flag, add_out_flag, nonnegative_float, nonnegative_int, positive_int
from .plots import save
from .report import markdown_table, provenance, write_json, write_markdown
from .runs import Stopwatch, resolve_device, split_windows

HELP = "support tokens on real text: per-position margins as a heat strip, and how they shift with lambda_m"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="trained run directories")
    parser.add_argument("--labels", nargs="+", default=None, help="one label per run (default: CE-only, Margin-only)")
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--window", type=nonnegative_int, default=3, help="which window of the split to draw")
    parser.add_argument("--tol", type=nonnegative_float, default=0.0,
                        help="support-token tolerance above the sequence margin")
    parser.add_argument("--max-windows", type=positive_int, default=None, help="windows for the split-wide statistics")
    parser.add_argument("--row-chars", type=positive_int, default=64, help="characters per row of the heat strip")
    add_device_flag(parser)
    add_out_flag(parser, Path("results/support_tokens"))


@torch.no_grad()
def margins_of(trained: TrainedModel, inputs: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """``log det J_tt`` of the prior at every position of windows ``(n, T)`` -> ``(n, T)`` (``-inf`` past the
    boundary)."""
    device = next(trained.net.parameters()).device
    out = [log_det_margin(trained.transform, trained.gpt.embed(inputs[i : i + batch_size].to(device)).float()).cpu()
           for i in range(0, inputs.shape[0], batch_size)]
    return torch.cat(out)


FIRST_INFORMATIVE = 2
"""Positions 1 and 2 attend to no or one value: ``Sigma_t = 0`` and ``log det J_tt = 0`` whatever the model, so
support tokens and sequence margins are taken over positions ``t >= 3`` (index 2 on)."""


def informative_support(margins: torch.Tensor, tol: float) -> torch.Tensor:
    """Support tokens among positions ``t >= 3`` (boolean mask of ``margins``' shape, False before)."""
    mask = torch.zeros_like(margins, dtype=torch.bool)
    mask[..., FIRST_INFORMATIVE:] = support_tokens(margins[..., FIRST_INFORMATIVE:], tol)
    return mask


def split_statistics(trained: TrainedModel, margins: torch.Tensor, inputs: torch.Tensor, tol: float) -> dict[str, Any]:
    """Quantiles of the per-position and sequence margins (positions ``t >= 3``) and the most frequent support
    characters."""
    inner = margins[:, FIRST_INFORMATIVE:].flatten().double()
    seq = margins[:, FIRST_INFORMATIVE:].amin(-1).double()
    q = torch.tensor([0.01, 0.1, 0.5, 0.9], dtype=torch.float64)
    support = informative_support(margins, tol)
    chars = Counter(trained.vocab.decode([int(c)]) for c in inputs[support].tolist())
    total = sum(chars.values())
    return {
        "position_margin_mean": float(inner.mean()),
        "position_margin_quantiles": dict(zip(["p01", "p10", "p50", "p90"], map(float, torch.quantile(inner, q)))),
        "sequence_margin_mean": float(seq.mean()),
        "sequence_margin_min": float(seq.min()),
        "support_position_median": float(support.nonzero()[:, 1].double().median()),
        "support_characters": [(ch, n / total) for ch, n in chars.most_common(10)],
        "windows": int(inputs.shape[0]),
    }


def plot_strips(text: str, strips: dict[str, np.ndarray], support: dict[str, np.ndarray], path: Path,
                row_chars: int) -> Path:
    """The text once per run, each character on a cell coloured by its margin; support tokens boxed.

    Each run has its own colour scale and colour bar: margins of differently trained models differ by orders
    of magnitude (CE-only ~0.01, Margin-only ~10 nats), and a shared scale would show one of them flat."""
    rows = -(-len(text) // row_chars)
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(len(strips), 1, figsize=(row_chars * 0.2 + 1.5, len(strips) * (rows * 0.36 + 0.6)),
                             squeeze=False)
    for ax, (label, m) in zip(axes[:, 0], strips.items()):
        finite = m[np.isfinite(m)]
        norm = Normalize(*((float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)))
        for i, ch in enumerate(text):
            r, c = divmod(i, row_chars)
            value = m[i]
            color = cmap(norm(value)) if np.isfinite(value) else (1.0, 0.0, 0.0, 1.0)
            ax.add_patch(Rectangle((c, -r - 1), 1, 1, color=color))
            if support[label][i]:
                ax.add_patch(Rectangle((c, -r - 1), 1, 1, fill=False, edgecolor="red", linewidth=2))
            shown = {"\n": "⏎", " ": "·"}.get(ch, ch)
            ax.text(c + 0.5, -r - 0.5, shown, ha="center", va="center", fontsize=8, family="monospace",
                    color="white" if norm(value) < 0.5 else "black")
        ax.set_xlim(0, row_chars)
        ax.set_ylim(-rows, 0)
        ax.set_axis_off()
        ax.set_title(f"{label}: log det J_tt per character (red boxes: support tokens; own colour scale)",
                     fontsize=9, loc="left")
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.02, pad=0.01,
                     label="log det J_tt")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_distributions(all_margins: dict[str, torch.Tensor], path: Path) -> Path:
    fig, (ax_pos, ax_seq) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (label, m) in enumerate(all_margins.items()):
        inner = m[:, FIRST_INFORMATIVE:]
        flat = inner.flatten().numpy()
        ax_pos.hist(flat[np.isfinite(flat)], bins=80, alpha=0.5, color=f"C{i}", label=label, density=True)
        ax_seq.hist(inner.amin(-1).numpy(), bins=40, alpha=0.5, color=f"C{i}", label=label, density=True)
    ax_pos.set(xlabel="log det J_tt (positions t >= 3)", ylabel="density", title="per-position margins")
    ax_seq.set(xlabel="min_{t>=3} log det J_tt", ylabel="density", title="sequence margins (per window)")
    ax_pos.legend()
    ax_seq.legend()
    return save(fig, path)


def run(args: argparse.Namespace) -> int:
    clock = Stopwatch()
    labels = args.labels or (["CE-only", "Margin-only"] if len(args.runs) == 2 else [str(r) for r in args.runs])
    if len(labels) != len(args.runs):
        raise ValueError(f"{len(args.runs)} runs but {len(labels)} labels")
    device = resolve_device(args.device)
    results: dict[str, Any] = {"split": args.split, "window": args.window, "tol": args.tol, "models": {}}
    strips, support, all_margins = {}, {}, {}
    text = ""
    for label, run_dir in zip(labels, args.runs):
        trained = load_trained(run_dir, map_location=device)
        inputs, _ = split_windows(trained, args.split, args.max_windows)
        if not 0 <= args.window < inputs.shape[0]:
            raise ValueError(f"--window must lie in [0, {inputs.shape[0]}), got {args.window}")
        margins = margins_of(trained, inputs)
        all_margins[label] = margins
        text = trained.vocab.decode(inputs[args.window].tolist())
        strips[label] = margins[args.window].numpy()
        support[label] = informative_support(margins[args.window : args.window + 1], args.tol)[0].numpy()
        results["models"][label] = {
            "run": str(run_dir), "lambda_m": trained.config.train.lambda_m, "corpus": trained.corpus,
            "window_margins": strips[label].tolist(),
            "window_support_positions": np.flatnonzero(support[label]).tolist(),
            **split_statistics(trained, margins, inputs, args.tol),
        }
    results["text"] = text
    args.out.mkdir(parents=True, exist_ok=True)
    plot_strips(text, strips, support, args.out / "heat_strip.png", args.row_chars)
    plot_distributions(all_margins, args.out / "margins.png")
    meta = provenance(device_name(device), clock.seconds, corpus=results["models"][labels[0]]["corpus"])
    write_json(args.out / "results.json", {**results, "provenance": meta})
    rows = [[label, m["lambda_m"], m["position_margin_mean"], m["position_margin_quantiles"]["p01"],
             m["position_margin_quantiles"]["p50"], m["sequence_margin_mean"], m["sequence_margin_min"],
             m["support_position_median"],
             ", ".join(f"{ch!r} {100 * share:.0f}%" for ch, share in m["support_characters"][:5])]
            for label, m in results["models"].items()]
    table = markdown_table(["model", "lambda_m", "mean margin", "p01", "median", "mean seq. margin",
                            "min seq. margin", "median support position", "top support characters"], rows, digits=4)
    write_markdown(args.out / "table.md", f"Support tokens on the {args.split} split", [
        table, "![heat strip](heat_strip.png)", "![margins](margins.png)",
        f"Margins are `log det J_tt` of the embedding prior at each position. Positions 1 and 2 have margin 0 "
        f"whatever the model (no or one attended value), so statistics, sequence margins and support tokens (the "
        f"argmin, tolerance {args.tol:g}) are over positions t >= 3. The heat strip shows window "
        f"{args.window} of the {args.split} split.",
    ], meta)
    print(table)
    print(f"written to {args.out}")
    return 0
