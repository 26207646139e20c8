"""Figures of a sweep report: UAR vs epsilon, learning curves, attack AUC vs epsilon.

One panel per dataset, because UAR scales differ between tasks (5 emotions vs 2 stress
states). Epsilon runs on a log axis; the "inf" point (noise 0, clipping only) sits one
octave right of the largest finite target and is labelled so. Units are told apart by line
style (solid: per sample, dashed: per client), strategies by colour.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedmer.results.figures import save_figure

__all__ = ["plot_attack_auc", "plot_learning_curves", "plot_uar_vs_epsilon"]

_STYLE = {"sample": "-", "client": "--", "both": ":", "off": "-."}


def _panels(datasets: Sequence[str], rows: int = 1) -> tuple[plt.Figure, list[list[plt.Axes]]]:
    cols = max(len(datasets), 1)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), dpi=120, squeeze=False)
    return fig, axes.tolist()


def _x_axis(ax: plt.Axes, targets: Sequence[float]) -> float:
    """Log epsilon axis with the infinite target placed and labelled at the right; return its x."""
    finite = sorted({t for t in targets if math.isfinite(t)})
    inf_x = (finite[-1] * 2) if finite else 1.0
    ticks = [*finite, inf_x] if any(math.isinf(t) for t in targets) else finite
    ax.set_xscale("log")
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in finite] + (["∞"] if len(ticks) > len(finite) else []))
    ax.minorticks_off()
    ax.set_xlabel("target ε (∞: clipping, no noise)")
    ax.grid(alpha=0.3)
    return inf_x


def _xs(targets: Sequence[float], inf_x: float) -> list[float]:
    return [inf_x if math.isinf(t) else t for t in targets]


def plot_uar_vs_epsilon(groups: list[dict[str, Any]], path: Path) -> Path:
    """Mean held-out UAR ± sd over seeds against the target epsilon, per strategy, unit and fleet size.

    The no-DP reference (unit ``off``) is a horizontal line, chance a grey dotted one; series of
    one unit that differ only in the number of clients are told apart by colour and label.
    """
    datasets = sorted({g["dataset"] for g in groups})
    fig, axes = _panels(datasets)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        mine = [g for g in groups if g["dataset"] == dataset]
        curves = [g for g in mine if g["privacy_mode"] != "off"]
        inf_x = _x_axis(ax, [g["target_epsilon"] for g in curves] or [1.0])
        series: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
        for g in curves:
            series[(g["strategy"], g["privacy_mode"], g.get("clients", 0))].append(g)
        several = len({k[2] for k in series}) > 1
        for i, ((strategy, mode, clients), pts) in enumerate(sorted(series.items())):
            pts.sort(key=lambda g: g["target_epsilon"])
            fleet = f", {clients} clients ({pts[0].get('clients_per_round', '?')}/round)" if several else ""
            ax.errorbar(
                _xs([g["target_epsilon"] for g in pts], inf_x),
                [g["uar"] for g in pts],
                yerr=[g["uar_sd"] for g in pts],
                color=f"C{i}",
                linestyle=_STYLE.get(mode, "-"),
                marker="o",
                markersize=3,
                capsize=2,
                label=f"{strategy}, per {mode}{fleet}",
            )
        for j, ref in enumerate(g for g in mine if g["privacy_mode"] == "off"):
            ax.axhline(ref["uar"], color="black", linewidth=1.0, linestyle=_STYLE["off"], alpha=0.8 - 0.2 * j,
                       label=f"{ref['strategy']}, no DP ({ref.get('clients', '?')} clients)")  # fmt: skip
        chance = next((g.get("chance_uar") for g in mine if g.get("chance_uar") is not None), None)
        if chance is not None:
            ax.axhline(chance, color="grey", linewidth=0.8, linestyle=":", label="chance")
        ax.set_title(dataset)
        ax.set_ylabel("held-out UAR (mean ± sd over seeds)")
        ax.legend(fontsize=6)
    fig.suptitle("Privacy/accuracy frontier (solid: ε per sample, dashed: ε per client)", fontsize=10)
    return save_figure(fig, path)


def plot_learning_curves(rounds: list[dict[str, Any]], path: Path) -> Path:
    """Mean UAR per round for each target epsilon (over strategies and seeds); row = unit."""
    datasets = sorted({r["dataset"] for r in rounds})
    several = len({r.get("clients") for r in rounds}) > 1  # a fleet-size axis: a row per unit and size
    unit = (
        (lambda r: (r["privacy_mode"], r.get("clients")))
        if several
        else (lambda r: (r["privacy_mode"], None))
    )
    modes = sorted({unit(r) for r in rounds}, key=lambda m: (m[0], m[1] or 0))
    fig, axes = _panels(datasets, rows=len(modes))
    targets = sorted({r["target_epsilon"] for r in rounds})
    cmap = plt.get_cmap("viridis")
    colour = {t: cmap(i / max(len(targets) - 1, 1)) for i, t in enumerate(targets)}
    for row, mode in zip(axes, modes, strict=True):
        for ax, dataset in zip(row, datasets, strict=True):
            curves: dict[float, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
            for r in rounds:
                if r["dataset"] == dataset and unit(r) == mode:
                    curves[r["target_epsilon"]][int(r["round"])].append(float(r["uar"]))
            for target in sorted(curves):
                by_round = sorted(curves[target].items())
                ax.plot(
                    [k for k, _ in by_round],
                    [statistics.fmean(v) for _, v in by_round],
                    color=colour[target],
                    label="ε = ∞" if math.isinf(target) else f"ε = {target:g}",
                )
            size = f", {mode[1]} clients" if mode[1] is not None else ""
            ax.set_title(
                f"{dataset}, per {mode[0]}{size}" if mode[0] != "off" else f"{dataset}, no DP{size}",
                fontsize=9,
            )
            ax.set_xlabel("round")
            ax.set_ylabel("held-out UAR")
            ax.grid(alpha=0.3)
            if curves:
                ax.legend(fontsize=6)
            else:  # this dataset has no runs of this unit (e.g. a fleet axis on another dataset)
                ax.set_visible(False)
    fig.suptitle("Learning curves (mean over strategies and seeds)", fontsize=10, y=1.0)
    return save_figure(fig, path)


def plot_attack_auc(groups: list[dict[str, Any]], path: Path) -> Path:
    """Membership-inference AUC (loss threshold; LiRA where run) against the target epsilon."""
    datasets = sorted({g["dataset"] for g in groups})
    fig, axes = _panels(datasets)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        mine = [g for g in groups if g["dataset"] == dataset]
        inf_x = _x_axis(ax, [g["target_epsilon"] for g in mine])
        for i, mode in enumerate(sorted({g["privacy_mode"] for g in mine})):
            by_target: dict[float, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
            for g in mine:
                if g["privacy_mode"] != mode:
                    continue
                for attack in ("loss_auc", "lira_auc"):
                    if g[attack] == g[attack]:  # not NaN: some run of this group was audited
                        by_target[g["target_epsilon"]][attack].append(g[attack])
            for attack, marker, label in (("loss_auc", "o", "loss threshold"), ("lira_auc", "s", "LiRA")):
                pts = [(t, statistics.fmean(v[attack])) for t, v in sorted(by_target.items()) if v[attack]]
                if pts:
                    ax.plot(
                        _xs([t for t, _ in pts], inf_x),
                        [a for _, a in pts],
                        color=f"C{i}",
                        linestyle=_STYLE.get(mode, "-"),
                        marker=marker,
                        markersize=4,
                        label=f"{label}, per {mode}",
                    )
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(dataset)
        ax.set_ylabel("attack AUC (mean over strategies, seeds)")
        ax.legend(fontsize=7)
    fig.suptitle("Membership inference vs ε (0.5 = chance)", fontsize=10)
    return save_figure(fig, path)
