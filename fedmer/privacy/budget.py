"""A node's budget for one round: find its ledger, check the cap, record the spend.

The ClientApp calls :func:`open_budget` before training. The round's DP-SGD steps are
known in advance (Poisson sampling runs ``len(loader)`` steps per epoch), so the spend
is checked against the cap and written to the ledger *before* training: a node that
crashes mid-round has still paid for what it may have released.

Where the ledger lives: a real SuperNode names its file in its node config
(``--node-config "ledger-path=/var/lib/fedmer/ledger.json"``), so it survives runs and
the server cannot move it; in simulation each virtual node gets
``<run folder>/ledgers/client-<partition>.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from fedmer.config import ExperimentConfig
from fedmer.privacy.engine import PrivacyHistory
from fedmer.privacy.ledger import PrivacyLedger, load_ledger

__all__ = ["LEDGER_PATH_KEY", "NodeBudget", "ledger_path", "open_budget"]

log = logging.getLogger(__name__)

#: node_config key a SuperNode uses to name its ledger file.
LEDGER_PATH_KEY = "ledger-path"


def ledger_path(context: Context, cfg: ExperimentConfig, partition_id: int) -> Path:
    """The node's own ledger file, or the simulation default under the run folder."""
    if LEDGER_PATH_KEY in context.node_config:
        return Path(str(context.node_config[LEDGER_PATH_KEY])).expanduser()
    run_dir = Path(cfg.output_dir.replace("{run_id}", str(context.run_id))).expanduser()
    return run_dir / "ledgers" / f"client-{partition_id}.json"


@dataclass(frozen=True)
class NodeBudget:
    """The ledger after this round's planned spend was checked and recorded."""

    ledger: PrivacyLedger
    epsilon_after: float

    @property
    def history(self) -> PrivacyHistory:
        return self.ledger.history


def open_budget(
    context: Context,
    cfg: ExperimentConfig,
    partition_id: int,
    planned: tuple[float, float, int],
    server_round: int,
) -> NodeBudget:
    """Check ``planned`` (noise, sample rate, steps) against the cap; record it; or raise BudgetExceeded."""
    p = cfg.privacy
    ledger = load_ledger(
        ledger_path(context, cfg, partition_id),
        node=f"client-{partition_id}",
        accountant=p.accountant,
        delta=p.delta,
        cap=p.budget_cap,
    )
    after = ledger.check_budget([planned])
    ledger = ledger.record([planned], run_id=context.run_id, server_round=server_round)
    log.info(
        "client %d: ledger %s now at epsilon %.3f (delta %g, cap %g)",
        partition_id,
        ledger.path,
        after,
        p.delta,
        p.budget_cap,
    )
    return NodeBudget(ledger, after)
