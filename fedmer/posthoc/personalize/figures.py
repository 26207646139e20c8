"""The personalization figure: per-client global vs personalized UAR, worst client marked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fedmer.results.figures import save_figure

if TYPE_CHECKING:
    from fedmer.posthoc.personalize.finetune import ClientResult

__all__ = ["plot_personalization"]


def plot_personalization(results: Sequence[ClientResult], path: Path, *, chance: float, title: str) -> Path:
    """Paired bars per client; a refused client shows only its global bar and the word "refused"."""
    x = np.arange(len(results))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(results) + 2), 4.0), dpi=110)
    ax.bar(x - 0.2, [r.global_uar for r in results], 0.4, label="global model", color="tab:grey")
    pers = [r.personalized_uar for r in results]
    ax.bar(x + 0.2, [0.0 if v is None else v for v in pers], 0.4, label="personalized head", color="tab:blue")
    for xi, v in zip(x, pers, strict=True):
        if v is None:
            ax.text(xi + 0.2, 0.02, "refused", rotation=90, ha="center", va="bottom", fontsize=7)
    worst = min(range(len(results)), key=lambda i: results[i].deployed_uar)
    ax.axvspan(worst - 0.45, worst + 0.45, color="crimson", alpha=0.12, label="worst client (deployed)")
    ax.axhline(chance, color="black", ls=":", lw=1, label=f"chance ({chance:.2f})")
    ax.set_xticks(x, [str(r.client) for r in results])
    ax.set_xlabel("client")
    ax.set_ylabel("UAR on the client's evaluation set")
    ax.set_ylim(0, 1.08)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=4, loc="upper center")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
