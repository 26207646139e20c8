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
import math
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context

from fedmer import records as rk
from fedmer.config import ExperimentConfig
from fedmer.privacy.engine import HistoryEntry, PrivacyHistory, compute_epsilon
from fedmer.privacy.ledger import LedgerEntry, load_ledger

__all__ = ["EPSILON_CAP_KEY", "LEDGER_PATH_KEY", "NodePrivacy", "ledger_path", "node_cap"]

log = logging.getLogger(__name__)

#: node_config key a SuperNode uses to name its ledger file.
LEDGER_PATH_KEY = "ledger-path"
#: node_config key of the node's own lifetime epsilon cap: the server's run config cannot raise it.
EPSILON_CAP_KEY = "epsilon-cap"


def node_cap(node_config: Mapping[str, Any]) -> float | None:
    """The cap the node's operator set (``epsilon-cap``), or None; a bad value is refused, naming it."""
    if EPSILON_CAP_KEY not in node_config:
        return None
    raw = node_config[EPSILON_CAP_KEY]
    try:
        cap = float(raw)
    except (TypeError, ValueError):
        cap = math.nan
    if isinstance(raw, bool) or not cap >= 0:  # also NaN
        raise ValueError(f"invalid node config {EPSILON_CAP_KEY}={raw!r}: expected a number >= 0 (or inf)")
    return cap


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
        name: str | None = None,
    ) -> None:
        self.context = context
        self.privacy = cfg.privacy
        self.partition_id = partition_id
        self.ledger = ledger
        #: The node's name in its ledger and logs: its site (node config ``site``) or ``client-<pid>``.
        self.name = name or f"client-{partition_id}"
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

    def charge(self, planned: HistoryEntry, server_round: int, release: str = "") -> float:
        """Check ``planned`` (noise, rate, steps) against the cap, record it; the lifetime epsilon after.

        Raises :class:`fedmer.privacy.ledger.BudgetExceeded` when the cap would be passed.
        The node owns its cap: the one in its node config (``epsilon-cap``) or, without one, the
        one stored in its ledger. The run config's ``privacy.budget_cap`` may lower it for this
        run, never raise it; a new ledger without a node cap adopts the run's (simulation).

        ``release`` digests everything the round's output is a function of (seed, incoming
        model, round config, data; "" when the seed is the OS's and the output cannot repeat).
        A resumed run that trains a round this run already charged, on the same digest, computes
        the very same update again, bit for bit: releasing it twice is post-processing of the
        first release, so it is not charged again (nor accounted twice in this run's history).
        A different digest (another model, config or seed) is a new release, charged as such.
        """
        p = self.privacy
        owned = node_cap(self.context.node_config)
        ledger = load_ledger(self.ledger, node=self.name, accountant=p.accountant, delta=p.delta, cap=owned)
        if owned is None and not ledger.path.exists():
            ledger = replace(ledger, cap=p.budget_cap)
        if p.budget_cap > ledger.cap:
            log.warning(
                "%s: the run asks for an epsilon cap of %g but the node's own cap is %g; the node's holds",
                self.name, p.budget_cap, ledger.cap,
            )  # fmt: skip
        fresh = rk.PRIVACY_STATE not in self.context.state
        replayed = ledger.releases(self.run_tag, server_round, release) if fresh else ()
        if replayed and tuple(ledger.entries[replayed[-1]][:3]) != tuple(planned):
            replayed = ()  # same inputs yet another plan: not the same release; charge it
        if fresh:
            self._resume_history(e for i, e in enumerate(ledger.entries) if i not in replayed[-1:])
        if replayed:
            log.info(
                "%s: round %d of run %s replays a release already charged (same seed, model, config and "
                "data: the same update); not charged again, epsilon stays %.3f",
                self.name, server_round, self.run_tag, ledger.spent(),
            )  # fmt: skip
            return ledger.spent()
        cap = min(ledger.cap, p.budget_cap)
        after = replace(ledger, cap=cap).check_budget([planned])
        ledger = ledger.record([planned], run_id=self.run_tag, server_round=server_round, release=release)
        log.info("%s: ledger %s at epsilon %.3f (delta %g, cap %g)", self.name, ledger.path, after, p.delta,
                 cap)  # fmt: skip
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
