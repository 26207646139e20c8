"""``fedmer explain RUN_DIR``: modality contributions of a finished run's predictions, on disk.

Explains chosen held-out test samples (``indices``, or ``n`` drawn at random with ``seed``)
and, for the dataset-level view, every test sample; writes ``explain.json`` and
``explain.png`` (per-sample grouped bars of the ablation drop and, where the fusion has
them, of its weights; a heatmap of the mean drop per predicted class and modality).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fedmer.posthoc.explain.attribution import Explanation, explain, mean_contributions
from fedmer.results.figures import save_figure
from fedmer.results.reader import load_run, load_run_model

__all__ = ["EXPLAIN_JSON", "EXPLAIN_PNG", "explain_run", "format_explanations", "plot_explanations"]

log = logging.getLogger(__name__)

EXPLAIN_JSON, EXPLAIN_PNG = "explain.json", "explain.png"


def explain_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    indices: Sequence[int] | None = None,
    n: int = 6,
    seed: int = 0,
) -> dict[str, Any]:
    """Explain the run's global model on its test persons; write JSON + PNG; return the JSON."""
    run = load_run(run_dir)
    model, test = load_run_model(run), run.split().test
    if indices is None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"invalid n={n!r}: expected a positive number of samples to explain")
        rng = np.random.default_rng(seed)
        indices = np.sort(rng.choice(len(test), min(n, len(test)), replace=False)).tolist()
    chosen = explain(model, test, indices)
    everyone = explain(model, test)
    table = mean_contributions(everyone, test.class_names)
    out = Path(out_dir) if out_dir is not None else run.run_dir
    out.mkdir(parents=True, exist_ok=True)
    has_weights = any(c.weight is not None for e in everyone for c in e.contributions)
    report: dict[str, Any] = {
        "run_dir": str(run.run_dir.resolve()),
        "model": f"{run.cfg.model.encoder}/{run.cfg.model.fusion}",
        "explained_on": f"held-out test sequences (indices into the run's test split of {len(test)})",
        "weights": f"{run.cfg.model.fusion} fusion weights" if has_weights else "none (fusion has none)",
        "ablation": "drop in the predicted class's probability / logit when the modality is masked out",
        "samples": [e.to_json() for e in chosen],
        "per_class_mean": {
            "grouped_by": "predicted class, over every test sample that recorded the modality",
            "n_samples": len(everyone),
            "table": table,
        },
        "files": {"plot": EXPLAIN_PNG},
    }
    (out / EXPLAIN_JSON).write_text(json.dumps(report, indent=2))
    plot_explanations(chosen, table, out / EXPLAIN_PNG, title=report["model"])
    log.info("explanations of %d samples of %s written to %s", len(chosen), run.run_dir, out)
    return report


def _grouped(ax: plt.Axes, chosen: Sequence[Explanation], key: str, ylabel: str) -> None:
    mods = [c.modality for c in chosen[0].contributions]
    width = 0.8 / len(mods)
    for j, m in enumerate(mods):
        x = np.arange(len(chosen)) + (j - (len(mods) - 1) / 2) * width
        vals = [getattr(e.contributions[j], key) for e in chosen]
        ax.bar(x, [0.0 if v is None else v for v in vals], width, label=m, color=f"C{j}")
        for xi, v in zip(x, vals, strict=True):
            if v is None:  # absent: a marker on the zero-height bar, not a silent "no effect"
                ax.text(xi, 0, "x", ha="center", va="bottom", fontsize=7, color=f"C{j}")
    ax.axhline(0, color="black", lw=0.6)
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + 0.25 * (high - low))  # headroom for the legend
    ax.legend(fontsize=7, ncol=len(mods), loc="upper center")
    labels = [f"#{e.index}\n{e.predicted}\n(true {e.true})" for e in chosen]
    ax.set_xticks(np.arange(len(chosen)), labels, fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def plot_explanations(
    chosen: Sequence[Explanation], table: dict[str, dict[str, Any]], path: Path, *, title: str
) -> Path:
    """Per-sample grouped bars (x = absent) plus the per-class mean-drop heatmap."""
    has_weights = any(c.weight is not None for e in chosen for c in e.contributions)
    panels = 3 if has_weights else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), dpi=100)
    _grouped(axes[0], chosen, "prob_drop", "drop in p(predicted) when masked out")
    axes[0].set_title("ablation (x = modality absent)", fontsize=9)
    if has_weights:
        _grouped(axes[1], chosen, "weight", "fusion weight")
        axes[1].set_title("the model's own modality weights", fontsize=9)
    heat = axes[-1]
    classes = list(table)
    mods = list(table[classes[0]]["modalities"]) if classes else []
    grid = np.full((len(classes), len(mods)), np.nan)
    for i, c in enumerate(classes):
        for j, m in enumerate(mods):
            value = table[c]["modalities"][m]["mean_prob_drop"]
            grid[i, j] = np.nan if value is None else value
    lim = max(float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 0.0, 1e-6)
    im = heat.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        text = f"{v:.2f}" if np.isfinite(v) else ("absent" if table[classes[i]]["n_predicted"] else "-")
        heat.text(j, i, text, ha="center", va="center", fontsize=7)
    heat.set_xticks(range(len(mods)), mods, fontsize=8)
    ylabels = [f"{c} (n={table[c]['n_predicted']})" for c in classes]
    heat.set_yticks(range(len(classes)), ylabels, fontsize=8)
    heat.set_ylabel("predicted class (- = never predicted)", fontsize=8)
    heat.set_title("mean drop in p(predicted), all test samples", fontsize=9)
    fig.colorbar(im, ax=heat, shrink=0.8)
    fig.suptitle(f"modality contributions ({title})", fontsize=10)
    return save_figure(fig, path)


def format_explanations(report: dict[str, Any]) -> str:
    """One line per explained sample and modality (what the CLI prints)."""
    lines = []
    for s in report["samples"]:
        p = max(s["probabilities"])
        lines.append(f"sample {s['index']}: predicted {s['predicted']} (p={p:.3f}), true {s['true']}")
        for c in s["contributions"]:
            if not c["present"]:
                lines.append(f"  {c['modality']:<8} absent")
                continue
            w = "" if c["weight"] is None else f"  weight {c['weight']:.3f}"
            lines.append(
                f"  {c['modality']:<8} drop p {c['prob_drop']:+.3f}  drop logit {c['logit_drop']:+.3f}{w}"
            )
    return "\n".join(lines)
