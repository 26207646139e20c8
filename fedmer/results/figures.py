"""Figures a person would rather look at than read: the learning curve of a run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

__all__ = ["plot_learning_curve", "save_figure"]


def plot_learning_curve(
    rows: Sequence[dict[str, Any]], path: str | Path, *, title: str, chance: float | None = None
) -> Path:
    """Held-out UAR / macro-F1 / accuracy per round, with cumulative max epsilon on a second axis."""
    rounds = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    for key, label, style in (
        ("uar", "UAR", "-o"),
        ("macro_f1", "macro-F1", "-s"),
        ("accuracy", "accuracy", "-^"),
    ):
        ax.plot(rounds, [r[key] for r in rows], style, label=label, markersize=4)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:.0%})")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("held-out persons")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    delta = rows[-1].get("delta")
    curves = []
    if delta is not None:  # sample-level DP-SGD ran
        curves.append(
            ("epsilon_max", "crimson", f"max ε per sample, δ={delta:g} ({rows[-1].get('accountant')})")
        )
    if rows[-1].get("client_epsilon") is not None:
        curves.append(("client_epsilon", "darkorange", "ε per client (Flower RDP)"))
    ax2 = ax.twinx() if curves else None
    for key, color, label in curves:
        if ax2 is None:  # unreachable: the second axis exists whenever there are curves
            raise RuntimeError("no second axis to draw the epsilon curves on")
        pts = [
            (r["round"], r[key])
            for r in rows
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
        ]
        (line,) = ax2.plot([x for x, _ in pts], [e for _, e in pts], "--", color=color)
        handles.append(line)
        labels.append(label)
    if ax2 is not None:
        ax2.set_ylabel("cumulative ε")
        ax2.set_ylim(bottom=0)
    ax.legend(handles, labels, loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Lay out, write and close ``fig`` (closing matters in long sweeps: pyplot keeps figures)."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
