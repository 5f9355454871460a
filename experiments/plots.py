"""Matplotlib figures shared by the experiments (PNG, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from inference.map import sequence_margin_of  # noqa: E402


def plot_epoch_curves(histories: dict[str, list[dict[str, Any]]], path: Path, title: str = "") -> Path:
    """Per-epoch train (dashed) and validation (solid) bits per character, and the validation margin
    diagnostics, one colour per run (``label -> history``)."""
    fig, (ax_bpc, ax_bar) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (label, history) in enumerate(histories.items()):
        color = f"C{i}"
        epochs = [r["epoch"] for r in history]
        prefix = f"{label} " if label else ""
        ax_bpc.plot(epochs, [r.get("train_bpc") for r in history], "o--", color=color, label=prefix + "train")
        ax_bpc.plot(epochs, [r.get("val_bpc") for r in history], "s-", color=color, label=prefix + "validation")
        ax_bar.plot(epochs, [r.get("val_barrier") for r in history], "o-", color=color,
                    label=prefix + "mean log det J_tt")
        ax_bar.plot(epochs, [sequence_margin_of(r) for r in history], "s:", color=color,
                    label=prefix + "mean sequence margin (t >= 3)")
    ax_bpc.set(xlabel="epoch", ylabel="bits per character", title="cross-entropy")
    ax_bpc.legend(fontsize=8)
    ax_bar.set(xlabel="epoch", ylabel="nats per position", title="embedding prior (validation)")
    ax_bar.legend(fontsize=8)
    fig.suptitle(title)
    return save(fig, path)


def save(fig: plt.Figure, path: Path) -> Path:
    """Lay out, write as PNG (creating the folder) and close."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
