"""Membership-inference audit of a finished run: how much does the global model leak?

An epsilon is a bound; an audit is a measurement. ``audit_run`` loads a run folder
(``config.json`` + ``model.pt``), takes one client's training sequences as members and
sequences of held-out persons (in no client) as non-members, balances the two by a seeded
subsample, runs the loss-threshold and LiRA attacks of :mod:`fedmer.posthoc.audit.attacks`, and
writes ``audit.json`` and a log-log ROC plot ``audit_roc.png`` next to the run.

Two approximations, stated in ``audit.json`` as well:

* The game is person-level: members are sequences of the client's persons, non-members
  sequences of persons never seen. The run's DP guarantee is per sequence, so its epsilon
  bounds this game only through group privacy (vacuous at tens of sequences per person);
  the audit measures what leaks in practice, it does not test the accountant.
* Shadows are trained centrally, not federated: on the other clients' data (the
  background: the auditor is assumed to know everything but the candidates' membership,
  DP's own adversary) plus a person-level half of the candidates, with the client recipe
  (SGD momentum 0.9, lr, batch, DP-SGD noise multiplier and clip) for as many steps as
  one client took over the run (``num_rounds * local_epochs * ceil(n / batch)``). The
  target instead averaged per round over clients, which also averages their DP noise, so
  private shadows are noisier per step than the target; calibration is approximate.
  Without the background (``background=False``) shadows never see the other sites and
  are miscalibrated (measured: LiRA AUC below 0.5 on the default run).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from fedmer.config import ConfigError
from fedmer.data.base import MultimodalDataset, concat_datasets
from fedmer.data.registry import load_client_dataset, load_split
from fedmer.posthoc.audit.attacks import (
    lira_attack,
    loss_threshold_attack,
    run_noise_multiplier,
    run_steps,
    train_shadows,
)
from fedmer.posthoc.audit.roc import AttackResult, roc_curve, roc_metrics
from fedmer.results.figures import save_figure
from fedmer.results.layout import AUDIT_JSON, AUDIT_PNG, ROUNDS_JSONL, SUMMARY_JSON
from fedmer.results.reader import RunArtifacts, RunError, load_run, load_run_model
from fedmer.results.recorder import read_rounds

#: The audit entry point plus the lower-level pieces, re-exported so one import serves.
__all__ = [
    "AttackResult",
    "AuditError",
    "audit_run",
    "format_table",
    "lira_attack",
    "loss_threshold_attack",
    "plot_roc",
    "roc_metrics",
    "train_shadows",
]

log = logging.getLogger(__name__)


class AuditError(RunError):
    """The run folder cannot be audited; the message says what is missing or wrong."""


def _load_run(run_dir: Path) -> tuple[RunArtifacts, dict[str, Any]]:
    try:
        run = load_run(run_dir)
    except RunError as err:
        raise AuditError(str(err)) from None
    return run, run.config


def _privacy(run_dir: Path, config: dict[str, Any], client: int) -> dict[str, Any]:
    """The run's own privacy statement plus the epsilon it reports spending."""
    out: dict[str, Any] = {"statement": config.get("privacy")}
    summary_path = run_dir / SUMMARY_JSON
    if summary_path.is_file():
        final = json.loads(summary_path.read_text()).get("final", {})
        out.update(
            epsilon_max=final.get("epsilon_max"),
            delta=final.get("delta"),
            accountant=final.get("accountant"),
            unit=final.get("privacy_unit"),
        )
    else:
        out["note"] = "no summary.json: the spent epsilon is unknown"
    if (run_dir / ROUNDS_JSONL).is_file():
        for row in read_rounds(run_dir):
            eps = row.get("client_epsilons", {}).get(str(client))
            if eps is not None:
                out["target_client_epsilon"] = eps  # cumulative: the last one wins
    return out


def _balanced(data: MultimodalDataset, n: int, rng: np.random.Generator) -> MultimodalDataset:
    return data if len(data) == n else data.subset(np.sort(rng.choice(len(data), n, replace=False)))


def audit_run(
    run_dir: Path,
    *,
    client: int = 0,
    shadows: int = 8,
    seed: int = 0,
    background: bool = True,
) -> dict[str, Any]:
    """Attack the run's global model on ``client``'s members; write audit.json + ROC; return it.

    ``shadows=0`` runs the loss attack only; ``background=False`` trains the shadows on
    candidates alone (a weaker attacker who does not hold the other clients' data).
    """
    threads = torch.get_num_threads()
    # The model is tiny: one thread beats two, and by ~9x when another process holds a core.
    torch.set_num_threads(1)
    try:
        return _audit(Path(run_dir), client, shadows, seed, background)
    finally:
        torch.set_num_threads(threads)


def _audit(run_dir: Path, client: int, shadows: int, seed: int, background: bool) -> dict[str, Any]:
    t0 = time.monotonic()
    run, config = _load_run(run_dir)
    cfg = run.cfg
    n_clients = cfg.federation.num_clients
    if isinstance(client, bool) or not isinstance(client, int) or not 0 <= client < n_clients:
        raise AuditError(f"invalid client={client!r}: this run has clients 0..{n_clients - 1}")
    if shadows < 0 or shadows == 1:
        raise AuditError(f"invalid shadows={shadows}: use 0 (loss attack only) or at least 2")
    try:
        client_data, split = load_client_dataset(cfg, client), load_split(cfg)
    except (ConfigError, OSError) as err:
        raise AuditError(f"cannot load the run's data: {err}") from None
    n = min(len(client_data), len(split.test))
    rng = np.random.default_rng([seed, client])
    members, nonmembers = _balanced(client_data, n, rng), _balanced(split.test, n, rng)

    try:
        model = load_run_model(run)
    except RunError as err:
        raise AuditError(str(err)) from None
    results: list[AttackResult] = [loss_threshold_attack(model, members, nonmembers, seed=seed)]
    steps = run_steps(cfg, len(client_data))
    noise = run_noise_multiplier(cfg, len(client_data))
    others = [c for c in range(n_clients) if c != client] if background and shadows else []
    back = concat_datasets([load_client_dataset(cfg, c) for c in others]) if others else None
    if shadows:
        pool = concat_datasets([members, nonmembers])
        shadow = train_shadows(
            cfg, pool, shadows=shadows, noise=noise, steps=steps, background=back, seed=seed
        )
        results += [
            lira_attack(model, members, nonmembers, shadow, offline=o, seed=seed) for o in (False, True)
        ]

    report: dict[str, Any] = {
        "run_dir": str(run_dir.resolve()),
        "target_client": client,
        "game": {
            "members": f"{n} of client {client}'s {len(client_data)} training sequences "
            f"({len(np.unique(members.person))} persons)",
            "nonmembers": f"{n} of {len(split.test)} sequences of held-out persons "
            f"({len(np.unique(nonmembers.person))} persons, in no client)",
            "unit": "person-level (all of a member person's sequences were trained on); the DP "
            "guarantee is per sequence, so epsilon bounds this game only via group privacy",
            "seed": seed,
        },
        "attacks": {r.name: r.to_json() for r in results},
        "shadow": {
            "count": shadows,
            "steps": steps,
            "background": f"the other {len(others)} clients' data ({len(back)} sequences)"
            if back is not None
            else None,
            "dp_sgd": cfg.privacy.mode == "sample",
            "noise_multiplier": noise,
            "max_grad_norm": cfg.privacy.max_grad_norm if cfg.privacy.mode == "sample" else None,
            "training": "central (no federation): background plus a person-level random half of "
            "the candidates, each candidate person in exactly half of the shadows",
        },
        "privacy": _privacy(run_dir, config, client),
        "elapsed_s": round(time.monotonic() - t0, 1),
    }
    (run_dir / AUDIT_JSON).write_text(json.dumps(report, indent=2))
    plot_roc(results, run_dir / AUDIT_PNG, title=_title(client, report["privacy"]))
    log.info("audit of %s: %s", run_dir, ", ".join(f"{r.name} AUC {r.auc:.3f}" for r in results))
    return report


def _title(client: int, privacy: dict[str, Any]) -> str:
    eps, delta = privacy.get("epsilon_max"), privacy.get("delta")
    if eps is None:
        return f"membership inference, client {client}"
    if delta is None:
        return f"membership inference, client {client} (non-private: ε = ∞)"
    return f"membership inference, client {client} (ε = {float(eps):.2f}, δ = {float(delta):g})"


def plot_roc(results: list[AttackResult], path: Path, *, title: str) -> Path:
    """Log-log ROC, one curve per attack, as in the LiRA paper: low FPR is where leaks show."""
    floor = 0.5 / max(r.n_nonmembers for r in results)
    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=120)
    ax.plot([floor, 1], [floor, 1], ":", color="grey", label="chance")
    for r in results:
        fpr, tpr = roc_curve(r.scores_in, r.scores_out)
        ax.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), label=f"{r.name} (AUC {r.auc:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def _pct(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2%}"


def format_table(report: dict[str, Any]) -> str:
    """A short plain-text table of an audit report (what the CLI prints)."""
    lines = [f"{'attack':<16}{'AUC':>7}  {'95% CI':<15}{'TPR@1%':>8}{'TPR@0.1%':>10}  members/non"]
    for name, a in report["attacks"].items():
        lo, hi = a["auc_ci95"]
        lines.append(
            f"{name:<16}{a['auc']:>7.3f}  [{lo:.3f}, {hi:.3f}] {_pct(a['tpr_at_1pct_fpr']):>8}"
            f"{_pct(a['tpr_at_0.1pct_fpr']):>10}  {a['n_members']}/{a['n_nonmembers']}"
        )
    p = report["privacy"]
    if p.get("delta") is None and p.get("epsilon_max") is not None:
        lines.append("privacy: off (non-private baseline, epsilon infinite)")
    elif p.get("epsilon_max") is not None:
        lines.append(
            f"privacy: epsilon {float(p['epsilon_max']):.3f} (max over clients) at delta {p['delta']:g}, "
            f"{p['accountant']} accountant, unit {p['unit']}"
        )
    return "\n".join(lines)
