"""``fedmer personalize RUN_DIR``: fine-tune every client's head, score it, account for it, write it down.

For each client: plan the DP-SGD steps, derive the noise for ``target_epsilon`` over them,
check the client's ledger cap (refuse and report the client if it would be exceeded; it
keeps the global model), record the spend, fine-tune, and score the global and the
personalized model on the same evaluation set:

* ``partition.scheme=site``: the held-out test persons of the client's own site (test
  split ``site`` field), with the client's sensor kit applied (a modality the client never
  recorded is masked out of its test persons too);
* ``dirichlet`` (clients are not sites), or a site without test persons: every held-out
  test person, and the output says so. UAR does not depend on the label mix, so there the
  client-specific figure is ``client_prior_accuracy``: per-class recall weighted by the
  client's own training label distribution.

Writes ``personalize.{csv,json,png}`` (``personalize_nodp.*`` for the non-private comparison).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import numpy as np
from torch import nn

from fedmer.data.base import MultimodalDataset
from fedmer.data.registry import load_client_dataset
from fedmer.posthoc.inference import score
from fedmer.posthoc.personalize.figures import plot_personalization
from fedmer.posthoc.personalize.finetune import (
    ClientResult,
    DPPlan,
    PersonalizeError,
    PersonalizeSettings,
    finetune_head,
    plan_steps,
)
from fedmer.privacy.engine import noise_for_target
from fedmer.privacy.ledger import UNIT, LedgerError, PrivacyLedger, load_ledger
from fedmer.results.layout import ROUNDS_JSONL
from fedmer.results.reader import RunArtifacts, load_run, load_run_model
from fedmer.results.recorder import read_rounds

__all__ = ["format_table", "personalize_run"]

log = logging.getLogger(__name__)


def _prior_accuracy(report: dict, prior: np.ndarray) -> float:
    """Recall per class weighted by the client's label distribution (over classes the eval set has)."""
    support = np.asarray(report["confusion"]).sum(axis=1) > 0
    w = prior * support
    return float(np.dot(w, report["per_class_recall"]) / w.sum()) if w.sum() > 0 else 0.0


def _eval_set(run: RunArtifacts, client: MultimodalDataset, test: MultimodalDataset) -> tuple[Any, str]:
    sites = np.unique(client.site)
    if run.cfg.partition.scheme == "site" and len(sites) == 1:
        rows = np.flatnonzero(test.site == sites[0])
        if rows.size:
            kit = cast(np.ndarray, client.mask.any(axis=0))  # (M,) of a 2-D mask, never a scalar
            local = test.subset(rows)
            local = local.with_mask(local.mask & kit[None, :])
            missing = [m for m, k in zip(test.modalities, kit, strict=True) if not k]
            what = f"held-out persons of the client's site {int(sites[0])}"
            return local, what + (
                f" (without {', '.join(missing)}: the client has no such sensor)" * bool(missing)
            )
        why = f"site {int(sites[0])} has no held-out test persons"
    else:
        why = f"partition.scheme={run.cfg.partition.scheme}: clients are not sites"
    return test, f"all held-out test persons ({why}); see client_prior_accuracy for the client's label mix"


def _ledger(
    run: RunArtifacts, client: int, settings: PersonalizeSettings, ledger_dir: Path | None
) -> PrivacyLedger:
    p = run.cfg.privacy
    path = run.ledger_path(client, ledger_dir)
    if not path.exists():
        trained = (run.run_dir / ROUNDS_JSONL).is_file() and any(
            str(client) in r.get("client_epsilons", {}) for r in read_rounds(run.run_dir)
        )
        if trained:
            raise PersonalizeError(
                f"{path}: no ledger, but client {client} trained with DP-SGD in this run; point "
                "--ledger-dir at the folder holding client-<i>.json (a new ledger would forget its spend)"
            )
        log.warning("client %d never trained in this run: starting its ledger at %s", client, path)
    try:
        return load_ledger(
            path, node=f"client-{client}", accountant=p.accountant, delta=p.delta, cap=settings.cap
        )
    except LedgerError as err:
        raise PersonalizeError(str(err)) from None


def _check_privacy(run: RunArtifacts, settings: PersonalizeSettings) -> None:
    p = run.cfg.privacy
    if not settings.dp:
        return
    if not p.sample_level:
        raise PersonalizeError(
            f"the run was trained with privacy.mode={p.mode}: no sample-level DP, so its epsilon per "
            "sample is already infinite and there is no ledger to add to; use --no-dp"
        )
    if settings.delta is not None and not math.isclose(settings.delta, p.delta, rel_tol=1e-12):
        raise PersonalizeError(
            f"invalid delta={settings.delta:g}: the federated rounds were accounted at delta={p.delta:g} "
            f"({p.accountant}); the fine-tune's spend composes with them in the same ledger only at the "
            "same delta and accountant, so use that delta (or leave --delta out)"
        )


def personalize_run(
    run_dir: str | Path,
    settings: PersonalizeSettings | None = None,
    out_dir: str | Path | None = None,
    *,
    ledger_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Personalize every client of a finished run; write CSV, JSON and PNG; return the JSON."""
    settings = settings if settings is not None else PersonalizeSettings()
    run = load_run(run_dir)
    _check_privacy(run, settings)
    cfg = run.cfg
    global_model, test = load_run_model(run), run.split().test
    lr = settings.lr if settings.lr is not None else cfg.federation.lr
    batch = settings.batch_size or cfg.federation.batch_size
    results = []
    for c in range(cfg.federation.num_clients):
        data = load_client_dataset(cfg, c)
        results.append(_one_client(run, c, data, test, global_model, settings, lr, batch, ledger_dir))
    report = _report(run, settings, lr, batch, results)
    out = Path(out_dir) if out_dir is not None else run.run_dir
    out.mkdir(parents=True, exist_ok=True)
    stem = "personalize" if settings.dp else "personalize_nodp"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    with open(out / f"{stem}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(ClientResult.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)
    plot_personalization(results, out / f"{stem}.png", chance=1.0 / test.num_classes, title=report["label"])
    log.info("personalization of %s written to %s", run.run_dir, out)
    return report


def _one_client(
    run: RunArtifacts,
    client: int,
    data: MultimodalDataset,
    test: MultimodalDataset,
    global_model: nn.Module,
    settings: PersonalizeSettings,
    lr: float,
    batch: int,
    ledger_dir: str | Path | None,
) -> ClientResult:
    p = run.cfg.privacy
    eval_data, eval_what = _eval_set(run, data, test)
    prior = np.bincount(data.y, minlength=data.num_classes) / len(data)
    before = score(global_model, eval_data)
    common: dict[str, Any] = dict(
        client=client,
        n_train=len(data),
        eval_set=eval_what,
        n_eval=len(eval_data),
        global_uar=before["uar"],
        global_client_prior_accuracy=_prior_accuracy(before, prior),
        private=settings.dp,
    )
    privacy: dict[str, Any]  # the ClientResult privacy fields, None until known
    plan, privacy = (
        None,
        dict.fromkeys(
            (
                "noise_multiplier",
                "sample_rate",
                "steps",
                "epsilon_finetune",
                "epsilon_before",
                "epsilon_after",
                "delta",
                "accountant",
                "unit",
            )
        ),
    )
    if settings.dp:
        rate, steps = plan_steps(len(data), batch, settings.epochs)
        noise = noise_for_target(settings.target_epsilon, p.delta, rate, steps, p.accountant)
        plan = DPPlan(noise, rate, steps, p.max_grad_norm, p.accountant, p.delta, p.grad_sample_mode)
        ledger = _ledger(run, client, settings, Path(ledger_dir) if ledger_dir else None)
        exceeded, after = ledger.would_exceed([plan.entry])
        privacy.update(
            noise_multiplier=noise,
            sample_rate=rate,
            steps=steps,
            epsilon_finetune=plan.epsilon(),
            epsilon_before=ledger.spent(),
            delta=p.delta,
            accountant=p.accountant,
            unit=UNIT,
        )
        if exceeded:
            reason = (
                f"ledger cap {ledger.cap:g} would be exceeded: epsilon {ledger.spent():.4g} -> {after:.4g} "
                f"(delta {p.delta:g}); keeps the global model"
            )
            log.warning("client %d refused: %s", client, reason)
            return ClientResult(
                **common,
                **privacy,
                status="refused",
                reason=reason,
                personalized_uar=None,
                personalized_client_prior_accuracy=None,
            )
        # Paid before training, as in the federated rounds: a crash mid-way has still spent it.
        ledger = ledger.record([plan.entry], run_id=f"personalize:{run.run_dir.name}", server_round=0)
        privacy["epsilon_after"] = ledger.spent()
    tuned = finetune_head(
        global_model,
        data,
        epochs=settings.epochs,
        lr=lr,
        batch_size=batch,
        seed=int(np.random.SeedSequence([run.cfg.seed, settings.seed, client]).generate_state(1)[0]),
        dp=plan,
    )
    after_report = score(tuned.model, eval_data)
    return ClientResult(
        **common,
        **privacy,
        status="personalized",
        reason=None,
        personalized_uar=after_report["uar"],
        personalized_client_prior_accuracy=_prior_accuracy(after_report, prior),
    )


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values)}


def _report(
    run: RunArtifacts, settings: PersonalizeSettings, lr: float, batch: int, results: list[ClientResult]
) -> dict[str, Any]:
    p = run.cfg.privacy
    worst = min(results, key=lambda r: r.deployed_uar)
    label = (
        f"head fine-tune, DP-SGD target ε={settings.target_epsilon:g} per fine-tune "
        f"(δ={p.delta:g}, {p.accountant})"
        if settings.dp
        else "head fine-tune, NON-PRIVATE (no DP-SGD: ε = ∞)"
    )
    return {
        "run_dir": str(run.run_dir.resolve()),
        "label": label,
        "private": settings.dp,
        "settings": {**asdict(settings), "lr": lr, "batch_size": batch},
        "trained": "model.fusion parameters only (encoders frozen), from the run's final global model",
        "privacy": {
            "unit": UNIT if settings.dp else "none",
            "accountant": p.accountant if settings.dp else "none",
            "delta": p.delta if settings.dp else None,
            "composition": "the fine-tune's (noise, rate, steps) entry is added to the client's ledger, the "
            "same file as its federated rounds; epsilon_after is the client's lifetime epsilon over both, "
            "recomputed by one accountant at one delta (valid only because both use the same ones)"
            if settings.dp
            else "non-private comparison: nothing recorded in the ledgers; epsilon infinite",
            "federated_run": run.final_privacy(),
        },
        "global_uar": _summary([r.global_uar for r in results]),
        "deployed_uar": _summary([r.deployed_uar for r in results]),
        "deployed_is": "the personalized model, or the global model where the client was refused",
        "worst_client": {
            "client": worst.client,
            "deployed_uar": worst.deployed_uar,
            "global_uar": worst.global_uar,
        },
        "refused": [r.client for r in results if r.status == "refused"],
        "clients": [asdict(r) for r in results],
    }


def _num(value: float | None, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def format_table(report: dict[str, Any]) -> str:
    """Per-client global vs personalized UAR and epsilon (what the CLI prints)."""
    lines = [
        report["label"],
        f"{'client':>6}{'global':>9}{'personal':>10}{'eps fine':>10}{'eps life':>10}  status",
    ]
    for c in report["clients"]:
        lifetime = c["epsilon_after"] if c["epsilon_after"] is not None else c["epsilon_before"]
        lines.append(
            f"{c['client']:>6}{c['global_uar']:>9.4f}{_num(c['personalized_uar']):>10}"
            f"{_num(c['epsilon_finetune'], '.3f'):>10}{_num(lifetime, '.3f'):>10}"
            f"  {c['status']}{' (' + c['reason'] + ')' if c['reason'] else ''}"
        )
    g, d, w = report["global_uar"], report["deployed_uar"], report["worst_client"]
    lines.append(
        f"mean UAR global {g['mean']:.4f} -> {d['mean']:.4f}; worst client {w['client']}: "
        f"{w['deployed_uar']:.4f} (global worst {g['min']:.4f})"
    )
    if report["private"]:
        pr = report["privacy"]
        lines.append(f"epsilon at delta {pr['delta']:g}, {pr['accountant']} accountant, unit: {pr['unit']}")
    return "\n".join(lines)
