"""Turn a sweep (a Hydra multirun folder) into one tidy CSV and a Markdown report with plots.

Each run folder holds ``config.json`` (its flat run config), ``rounds.jsonl`` and, when the
run was audited, ``audit.json``. This module reads every run under a folder and writes
``runs.csv`` (one row per run: the swept settings, final held-out metrics, the epsilon of
the protected unit with its delta and accountant, the attack AUCs), ``rounds.csv`` (one row
per run and round, for learning curves), the figures of :mod:`fedmer.results.report_figures` and a
``report.md`` that groups runs over seeds (mean and standard deviation). The small pieces
(:func:`group_rows`, :func:`mean_sd_text`, :func:`pivot_table`, :func:`write_csv`) are public
so that benchmarks tabulate their own runs the same way.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from fedmer.config import FederationConfig
from fedmer.results.intervals import auc_interval, distinguishable, mean_interval
from fedmer.results.layout import AUDIT_JSON, CONFIG_JSON, ROUNDS_JSONL, SUMMARY_JSON
from fedmer.results.recorder import read_rounds
from fedmer.results.report_figures import plot_attack_auc, plot_learning_curves, plot_uar_vs_epsilon

__all__ = [
    "RUN_COLUMNS",
    "collect_runs",
    "group_rows",
    "group_runs",
    "mean_sd_text",
    "pivot_table",
    "write_csv",
    "write_report",
]

log = logging.getLogger(__name__)
_Row = TypeVar("_Row")
_Key = TypeVar("_Key", bound=Hashable)

RUN_COLUMNS = (
    "run", "dataset", "data", "scenario", "strategy", "fusion", "privacy_mode", "target_epsilon", "seed",
    "clients", "clients_per_round", "uar", "chance_uar", "accuracy", "macro_f1", "epsilon",
    "client_epsilon", "unit_epsilon", "delta", "accountant", "unit", "rounds", "loss_auc",
    "loss_auc_lo", "loss_auc_hi", "loss_tpr_1pct", "lira_auc", "lira_offline_auc", "lira_tpr_1pct",
)  # fmt: skip
ROUND_COLUMNS = (
    "run",
    "dataset",
    "privacy_mode",
    "clients",
    "target_epsilon",
    "strategy",
    "seed",
    "round",
    "uar",
    "epsilon",
)


def _eps(value: Any) -> float:
    return math.inf if value in ("inf", None) else float(value)


def _dataset(rc: dict[str, Any]) -> str:
    """A label for the data: the synthetic scenario, or the real dataset's name."""
    return f"synthetic {rc['data.scenario']}" if rc["data.name"] == "synthetic" else str(rc["data.name"])


def _audit_columns(run_dir: Path) -> dict[str, Any]:
    """AUC and TPR at 1% FPR of each attack in the run's audit.json (empty when not audited)."""
    path = run_dir / AUDIT_JSON
    if not path.exists():
        return {}
    attacks = json.loads(path.read_text())["attacks"]

    def get(name: str, key: str) -> Any:
        return attacks.get(name, {}).get(key)

    loss_ci = get("loss_threshold", "auc_ci95") or [None, None]
    return {
        "loss_auc": get("loss_threshold", "auc"),
        "loss_auc_lo": loss_ci[0],
        "loss_auc_hi": loss_ci[1],
        "loss_tpr_1pct": get("loss_threshold", "tpr_at_1pct_fpr"),
        "lira_auc": get("lira_online", "auc"),
        "lira_offline_auc": get("lira_offline", "auc"),
        "lira_tpr_1pct": get("lira_online", "tpr_at_1pct_fpr"),
    }


def _unit_epsilon(mode: str, sample_eps: float, client_eps: Any) -> float:
    """The epsilon of the unit the run protects: per sample, per client, or inf without DP."""
    if mode == "client":
        return _eps(client_eps)
    if mode == "off":
        return math.inf
    return sample_eps  # sample, or both (the client-level one is in client_epsilon)


def collect_runs(root: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-run and per-round rows of every finished run below ``root`` (unfinished runs are reported)."""
    runs: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    for config_path in sorted(Path(root).rglob(CONFIG_JSON)):
        run_dir = config_path.parent
        if not (run_dir / ROUNDS_JSONL).exists():
            log.warning("skipping %s: no rounds.jsonl (the run did not start)", run_dir)
            continue
        cfg = json.loads(config_path.read_text())
        rc, privacy = cfg["run_config"], cfg.get("privacy", {})
        rows = read_rounds(run_dir)
        if len(rows) - 1 < int(rc["federation.num_rounds"]):
            log.warning(
                "%s stopped after round %d of %s; reported as is",
                run_dir,
                len(rows) - 1,
                rc["federation.num_rounds"],
            )
        name = str(run_dir.relative_to(root)) if run_dir != Path(root) else run_dir.name
        summary = (
            json.loads((run_dir / SUMMARY_JSON).read_text()) if (run_dir / SUMMARY_JSON).exists() else {}
        )
        clients = int(rc["federation.num_clients"])
        final, mode = rows[-1], rc["privacy.mode"]
        target = _eps(rc["privacy.target_epsilon"]) if mode != "off" else math.inf
        sample_eps = _eps(final["epsilon_max"])
        common = {
            "dataset": _dataset(rc),
            "privacy_mode": mode,
            "target_epsilon": target,
            "strategy": rc["strategy.name"],
            "seed": rc["seed"],
            "clients": clients,
        }
        runs.append(
            {
                "run": name,
                **common,
                "data": rc["data.name"],
                "scenario": rc["data.scenario"],
                "fusion": rc["model.fusion"],
                "clients": clients,
                "clients_per_round": FederationConfig(
                    num_clients=clients,
                    fraction_train=float(rc["federation.fraction_train"]),
                    min_train_clients=int(rc["federation.min_train_clients"]),
                ).clients_per_round,
                "uar": final["uar"],
                "chance_uar": summary.get("chance_uar"),
                "accuracy": final["accuracy"],
                "macro_f1": final["macro_f1"],
                "epsilon": sample_eps,
                "client_epsilon": final.get("client_epsilon"),
                "unit_epsilon": _unit_epsilon(mode, sample_eps, final.get("client_epsilon")),
                "delta": final["delta"]
                if final["delta"] is not None
                else privacy.get("client_level", {}).get("delta"),
                "accountant": final["accountant"],
                "unit": privacy.get("unit", "none") if mode != "client" else privacy["client_level"]["unit"],
                "rounds": len(rows) - 1,
                **_audit_columns(run_dir),
            }
        )
        rounds.extend(
            {"run": name, **common, "round": r["round"], "uar": r["uar"], "epsilon": _eps(r["epsilon_max"])}
            for r in rows
        )
    return runs, rounds


def _mean_sd(values: Sequence[float | None]) -> tuple[float, float]:
    known = [v for v in values if v is not None and not math.isnan(v)]
    if not known:
        return math.nan, math.nan
    return statistics.fmean(known), (statistics.stdev(known) if len(known) > 1 else 0.0)


def mean_sd_text(values: Sequence[float], digits: int = 3) -> str:
    """A table cell over seeds: "mean ± sd" (sample sd), just the mean when there is one value."""
    mean, sd = _mean_sd(list(values))
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def group_rows(rows: Iterable[_Row], key: Callable[[_Row], _Key]) -> dict[_Key, list[_Row]]:
    """``rows`` grouped by ``key`` in first-seen order (e.g. the seeds of each setting)."""
    groups: dict[_Key, list[_Row]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups


def pivot_table(
    rows: Iterable[Mapping[str, Any]],
    index: Sequence[str],
    column: Callable[[Mapping[str, Any]], str | None],
    columns: Sequence[str],
    value: str,
) -> list[str]:
    """Markdown lines of ``value`` pivoted: a line per distinct ``index`` fields, a column per ``columns``.

    ``column(row)`` names a row's column (a row it maps outside ``columns`` is left out);
    each cell is :func:`mean_sd_text` over its rows plus their count, e.g. "0.612 ± 0.020 [3]",
    so settings can be compared side by side (say centralised vs federated vs DP).
    """
    kept = [r for r in rows if column(r) in columns]
    lines = ["| " + " | ".join([*index, *columns]) + " |", "|" + "---|" * (len(index) + len(columns))]
    for key, members in group_rows(kept, lambda r: tuple(str(r[k]) for k in index)).items():
        by_column = group_rows(members, column)
        cells = [
            f"{mean_sd_text(v)} [{len(v)}]" if (v := [float(m[value]) for m in by_column.get(c, [])]) else ""
            for c in columns
        ]
        lines.append("| " + " | ".join([*key, *cells]) + " |")
    return lines


def group_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, unit, strategy, clients, target epsilon): means, sds and 95% intervals.

    ``beats_chance``: the UAR interval over seeds lies above chance. ``leak``: the loss attack's
    AUC interval lies above 0.5. ``vs_no_dp``: whether the cell's attack AUC interval is
    distinguishable from that of the same dataset's no-DP cell (None without one).
    """
    groups = group_rows(
        runs, lambda r: (r["dataset"], r["privacy_mode"], r["strategy"], r["clients"], r["target_epsilon"])
    )
    out = []
    for (dataset, mode, strategy, clients, target), members in sorted(groups.items()):
        uar, uar_sd = _mean_sd([m["uar"] for m in members])
        uar_ci = _clip(mean_interval([m["uar"] for m in members]))
        chance = members[0].get("chance_uar")
        loss_auc, loss_sd = _mean_sd([m.get("loss_auc") for m in members])
        audited = [m for m in members if m.get("loss_auc") is not None]
        loss_ci = _clip(
            auc_interval(
                [m["loss_auc"] for m in audited],
                [(_num(m.get("loss_auc_lo")), _num(m.get("loss_auc_hi"))) for m in audited],
            )
        )
        lira_auc, lira_sd = _mean_sd([m.get("lira_auc") for m in members])
        out.append(
            {
                "dataset": dataset,
                "privacy_mode": mode,
                "strategy": strategy,
                "clients": clients,
                "clients_per_round": members[0]["clients_per_round"],
                "target_epsilon": target,
                "runs": len(members),
                "uar": uar,
                "uar_sd": uar_sd,
                "uar_ci": uar_ci,
                "chance_uar": chance,
                "beats_chance": None if chance is None or math.isnan(uar_ci[0]) else uar_ci[0] > chance,
                "unit_epsilon": max(m["unit_epsilon"] for m in members),
                "delta": members[0]["delta"],
                "accountant": "Flower RDP" if mode == "client" else members[0]["accountant"],
                "loss_auc": loss_auc,
                "loss_auc_sd": loss_sd,
                "loss_auc_ci": loss_ci,
                "leak": None if math.isnan(loss_ci[0]) else loss_ci[0] > 0.5,
                "lira_auc": lira_auc,
                "lira_auc_sd": lira_sd,
                "lira_runs": sum(m.get("lira_auc") is not None for m in members),
            }
        )
    for g in out:  # each cell's leakage against its dataset's no-DP cell (the one with most runs)
        refs = [r for r in out if r["dataset"] == g["dataset"] and r["privacy_mode"] == "off"]
        ref = max(refs, key=lambda r: r["runs"], default=None)
        g["vs_no_dp"] = (
            None if ref is None or ref is g else distinguishable(g["loss_auc_ci"], ref["loss_auc_ci"])
        )
    return out


def _clip(ci: tuple[float, float]) -> tuple[float, float]:
    """An interval of a rate (UAR, AUC) cut to [0, 1], where the rate lives."""
    return (min(max(ci[0], 0.0), 1.0), min(max(ci[1], 0.0), 1.0)) if not math.isnan(ci[0]) else ci


def _num(value: Any) -> float:
    return math.nan if value in (None, "") else float(value)


def _fmt(v: float, sd: float | None = None) -> str:
    if v is None or math.isnan(v):
        return "–"
    return f"{v:.3f}" if sd is None else f"{v:.3f} ± {sd:.3f}"


def _yes_no(value: bool | None, yes: str = "yes", no: str = "no") -> str:
    return "–" if value is None else (yes if value else no)


def _interval(ci: tuple[float, float]) -> str:
    return "–" if math.isnan(ci[0]) else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _table(groups: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| dataset | unit | strategy | clients (per round) | target ε | runs | UAR mean ± sd "
        "| UAR 95% interval | beats chance | ε reached (δ, accountant) "
        "| loss-attack AUC [95% interval] | leak detected "
        "| leakage vs no DP | LiRA AUC (runs) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        eps = g["unit_epsilon"]
        reached = "∞" if math.isinf(eps) else f"{eps:.3g} (δ={g['delta']:g}, {g['accountant']})"
        lira = f"{_fmt(g['lira_auc'])} ({g['lira_runs']})" if g["lira_runs"] else "–"
        chance = g["chance_uar"]
        beats = _yes_no(g["beats_chance"]) + (f" (chance {chance:.3f})" if chance is not None else "")
        auc = "–" if math.isnan(g["loss_auc"]) else f"{g['loss_auc']:.3f} {_interval(g['loss_auc_ci'])}"
        cells = [
            g["dataset"], g["privacy_mode"], g["strategy"], f"{g['clients']} ({g['clients_per_round']})",
            "–" if g["privacy_mode"] == "off" else f"{g['target_epsilon']:g}", str(g["runs"]),
            _fmt(g["uar"], g["uar_sd"]), _interval(g["uar_ci"]), beats, reached, auc, _yes_no(g["leak"]),
            _yes_no(g["vs_no_dp"], "distinguishable", "not distinguishable"), lira,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_csv(path: Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """``rows`` as a CSV with ``columns`` in that order (other keys ignored, missing ones empty)."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_report(root: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write runs.csv, rounds.csv, the figures and report.md; return report.md's path."""
    runs, rounds = collect_runs(root)
    if not runs:
        raise FileNotFoundError(f"no finished runs (config.json + rounds.jsonl) under {root}")
    out = Path(out_dir or root)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "runs.csv", runs, RUN_COLUMNS)
    write_csv(out / "rounds.csv", rounds, ROUND_COLUMNS)
    groups = group_runs(runs)
    figures = [
        ("UAR vs epsilon", plot_uar_vs_epsilon(groups, out / "uar_vs_epsilon.png")),
        ("learning curves", plot_learning_curves(rounds, out / "learning_curves.png")),
    ]
    if any(g["loss_auc"] == g["loss_auc"] for g in groups):  # at least one audited run (not NaN)
        figures.append(("attack AUC vs epsilon", plot_attack_auc(groups, out / "attack_auc_vs_epsilon.png")))
    audited = sum(r.get("loss_auc") is not None for r in runs)
    report = out / "report.md"
    report.write_text(
        f"# Sweep report: {Path(root).resolve()}\n\n"
        f"{len(runs)} finished runs ({audited} audited). UAR is on held-out persons after the last round. "
        "ε is that of the unit the run protects, cumulative over the whole run: for `sample` one training "
        "sequence within a client (DP-SGD, max over clients), for `client` one whole client (Flower's "
        "accountant, no sampling amplification); its δ and accountant are given with it. Target ε = inf "
        "is the same pipeline with noise 0 (clipping only); unit `off` is the non-private reference. "
        "UAR 95% interval: Student t over the cell's runs (seeds); the cell beats chance when the interval "
        "lies above chance UAR. Attack AUC: loss-threshold membership inference against one client's "
        "training persons vs held-out persons (0.5 = no leak), its interval combines each target model's "
        "bootstrap interval with the spread between the cell's target models; a leak is detected when the "
        "interval lies above 0.5, and a cell's leakage is distinguishable from the no-DP cell's when the "
        "two intervals do not overlap.\n\n"
        + "\n".join(_table(groups))
        + "\n\n"
        + "\n\n".join(f"![{title}]({path.name})" for title, path in figures)
        + "\n\nData: `runs.csv` (one row per run), `rounds.csv` (one row per run and round).\n"
    )
    return report
