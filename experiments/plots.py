"""Matplotlib figures shared by the experiments (PNG, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Train and validation bits per character per epoch, and the validation barrier, side by side."""
    epochs = [r["epoch"] for r in history]
    fig, (ax_bpc, ax_bar) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_bpc.plot(epochs, [r.get("train_bpc") for r in history], "o-", label="train")
    ax_bpc.plot(epochs, [r.get("val_bpc") for r in history], "s-", label="validation")
    ax_bpc.set(xlabel="epoch", ylabel="bits per character", title="cross-entropy")
    ax_bpc.legend()
    ax_bar.plot(epochs, [r.get("val_barrier") for r in history], "o-", label="mean log det J_tt")
    ax_bar.plot(epochs, [r.get("val_seq_margin_mean") for r in history], "s-", label="mean sequence margin")
    ax_bar.set(xlabel="epoch", ylabel="nats per position", title="embedding prior (validation)")
    ax_bar.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
