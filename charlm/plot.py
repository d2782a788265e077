"""The loss curve of a run (matplotlib, when it is installed)."""

from __future__ import annotations

import csv
import math
from pathlib import Path


def plot_curve(metrics_csv: str | Path, out_png: str | Path) -> Path:
    """Draw training and held-out loss (bits per char) against characters seen.

    Raises ``ImportError`` when matplotlib is missing (``pip install "charlm-rnn[plot]"``).
    """
    # The object-oriented API without pyplot: no global state, no GUI backend, and half the import time.
    from matplotlib.figure import Figure

    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    tokens = [int(r["tokens"]) for r in rows]
    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    train = [(t, float(r["train_loss"]) / math.log(2)) for t, r in zip(tokens, rows) if r["train_loss"]]
    if train:
        ax.plot(*zip(*train), label="training (mean since last evaluation)")
    ax.plot(tokens, [float(r["val_bpc"]) for r in rows], marker=".", label="held out")
    ax.set_xlabel("characters seen")
    ax.set_ylabel("bits per character")
    ax.set_title(Path(out_png).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    return Path(out_png)
