"""A node's privacy state, owned by one object: the run's accountant history and the node's ledger.

Two records of spend exist on a node and must never disagree: the accountant history of
*this run* (kept in Flower's ``Context.state``, so epsilon accumulates over every round the
node joins), and the node's *ledger* file (every run, every round, with its cap).
:class:`NodePrivacy` is the only code that reads or writes either. Every release is charged
before anything leaves the node: :meth:`NodePrivacy.charge` checks the planned spend against
the cap and writes it to the ledger first, so a node that crashes mid-round has still paid for
what it may have released.

Where the ledger lives: a real SuperNode names its file in its node config
(``--node-config "ledger-path=/var/lib/fedmer/ledger.json"``), so it survives runs and the
server cannot move it; in simulation the caller passes a default under the run folder.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context

from fedmer import records as rk
from fedmer.config import ExperimentConfig
from fedmer.privacy.engine import HistoryEntry, PrivacyHistory, compute_epsilon
from fedmer.privacy.ledger import LedgerEntry, load_ledger

__all__ = ["LEDGER_PATH_KEY", "NodePrivacy", "ledger_path"]

log = logging.getLogger(__name__)

#: node_config key a SuperNode uses to name its ledger file.
LEDGER_PATH_KEY = "ledger-path"


def ledger_path(node_config: Mapping[str, Any], default: Path) -> Path:
    """The node's own ledger file (``ledger-path`` in its node config), else ``default``."""
    if LEDGER_PATH_KEY in node_config:
        return Path(str(node_config[LEDGER_PATH_KEY])).expanduser()
    return default


class NodePrivacy:
    """One node's spend in this run (``Context.state``) and over its lifetime (its ledger)."""

    def __init__(
        self,
        context: Context,
        cfg: ExperimentConfig,
        partition_id: int,
        ledger: Path,
        run_tag: str | None = None,
    ) -> None:
        self.context = context
        self.privacy = cfg.privacy
        self.partition_id = partition_id
        self.ledger = ledger
        #: What the ledger tags this run's entries with: Flower's run id, or the id of the run a
        #: resumed run continues (a resume gets a new Flower run id but is the same run).
        self.run_tag = run_tag or str(context.run_id)

    @property
    def history(self) -> PrivacyHistory:
        """This run's accountant history on this node (empty before its first release)."""
        state = self.context.state
        if rk.PRIVACY_STATE not in state:
            return PrivacyHistory()
        return PrivacyHistory.from_lists(dict(state[rk.PRIVACY_STATE]))

    def charge(self, planned: HistoryEntry, server_round: int) -> float:
        """Check ``planned`` (noise, rate, steps) against the cap, record it; the lifetime epsilon after.

        Raises :class:`fedmer.privacy.ledger.BudgetExceeded` when the cap would be passed.
        """
        p = self.privacy
        ledger = load_ledger(
            self.ledger,
            node=f"client-{self.partition_id}",
            accountant=p.accountant,
            delta=p.delta,
            cap=p.budget_cap,
        )
        if rk.PRIVACY_STATE not in self.context.state:
            self._resume_history(ledger.entries)
        after = ledger.check_budget([planned])
        ledger = ledger.record([planned], run_id=self.run_tag, server_round=server_round)
        log.info(
            "client %d: ledger %s now at epsilon %.3f (delta %g, cap %g)",
            self.partition_id,
            ledger.path,
            after,
            p.delta,
            p.budget_cap,
        )
        return after

    def _resume_history(self, entries: Iterable[LedgerEntry]) -> None:
        """A fresh ``Context.state`` in a run the ledger already charged: the run was resumed.

        Its accountant history is then every ledger entry tagged with this run, the spend of
        a round whose result was lost included (it was charged before anything could leave the
        node), so epsilon goes on from what was truly spent, neither reset nor counted twice.
        """
        spent = [(e.noise, e.rate, e.steps) for e in entries if e.run_id == self.run_tag]
        if spent:
            self.commit(PrivacyHistory(tuple(spent)))
            log.info(
                "client %d: run %s resumed; %d ledger entries already spent in it (epsilon %.3f)",
                self.partition_id,
                self.run_tag,
                len(spent),
                self.epsilon(),
            )

    def commit(self, history: PrivacyHistory) -> None:
        """Store this run's history after a release (the accountant resumes from it next time)."""
        # dict(): a copy typed with ConfigRecord's own value union (dict is invariant in its values)
        self.context.state[rk.PRIVACY_STATE] = ConfigRecord(dict(history.to_lists()))

    def epsilon(self) -> float:
        """This run's cumulative epsilon on this node, at the run's delta and accountant."""
        return compute_epsilon(self.history, self.privacy.delta, self.privacy.accountant)
