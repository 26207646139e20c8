"""A node's persistent privacy budget: every DP-SGD step it ever took, in one JSON file.

``Context.state`` forgets a node's accountant history when the run ends, so a vehicle
or hospital that joins ten runs would otherwise report ten fresh epsilons. The ledger
keeps the history of *all* runs, each entry tagged with the run and round that spent it,
and refuses (``BudgetExceeded``) a round that would take the node past its cap.

Safety rules: a corrupt, truncated or inconsistent file raises ``LedgerError`` and is
never reset (resetting would forget spent privacy); writes go to a temp file in the same
folder, are fsynced and then ``os.replace``d, so a crash leaves the old or the new file,
never half of one. One writer per file: in simulation each virtual node has its own
ledger file; an ``fcntl`` lock on ``<file>.lock`` plus a check that the file has not
changed since it was loaded guard against a second writer by mistake.

Tamper evidence: the file carries ``entry_count`` and ``chain``, a SHA-256 hash chain over
its header and every entry in order. A ledger whose entries were edited, removed, reordered
or emptied no longer matches and is refused (``LedgerError``): the node will not train until
an operator restores it. This catches accidents and naive edits (a truncated copy, a hand-
emptied list), not an operator who recomputes the chain: the node's disk is the node's own.

Once per round, not once per read: a process keeps the ledger it last read or wrote, per
path, with the file's stamp (device, inode, size, mtime and ctime in ns, and its first
:data:`_HEAD_BYTES` bytes, which hold ``entry_count`` and the chain's head). A read whose
stamp still matches returns that ledger without parsing or re-hashing the history; any
change on disk (another writer, a restore, an edit) changes the stamp and the file is read
and verified again. The chain of a ledger that grew by a few entries is extended from the
known head, not recomputed over every entry.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from fedmer.atomic import atomic_write
from fedmer.privacy.engine import PrivacyHistory, compute_epsilon

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: one writer per file is then on the caller
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "BUDGET_MARKER",
    "SCHEMA_VERSION",
    "UNIT",
    "BudgetExceeded",
    "LedgerEntry",
    "LedgerError",
    "PrivacyLedger",
    "history_increment",
    "ledger_summary",
    "load_ledger",
    "read_ledger",
    "show_ledger",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
#: 1: before the hash chain; 2: before release digests. Both are upgraded to 3 on their next write.
_READABLE_SCHEMAS = (1, 2, 3)
FORMAT = "fedmer-privacy-ledger"
#: What one unit of privacy protects: epsilon is per sample, not per person or per node.
UNIT = "one sample of this node's data"
_ACCOUNTANTS = ("rdp", "prv")
_COLUMNS = ("noise", "rate", "steps", "run_id", "round")
#: Schema 3's extra column: each entry's release digest ("" when its release is not reproducible).
_RELEASE = "release"


class LedgerError(ValueError):
    """The ledger file is missing, corrupt or inconsistent; the message names the file."""


#: Starts every BudgetExceeded message, so a server can tell a refusal from a failure
#: in an error reply, whatever runtime wrapped the exception.
BUDGET_MARKER = "privacy budget exceeded"


class BudgetExceeded(Exception):  # noqa: N818 - the public name reads as the event it reports
    """A planned round would take the node past its epsilon cap."""

    def __init__(self, node: str, spent: float, planned: float, cap: float, delta: float) -> None:
        self.node, self.spent, self.planned, self.cap, self.delta = node, spent, planned, cap, delta
        super().__init__(
            f"{BUDGET_MARKER}: node {node!r} would reach epsilon {planned:.4g} (delta {delta:g}) "
            "after this round, "
            f"over its cap of {cap:.4g}; spent so far {spent:.4g}"
        )


#: Bytes at the start of a ledger file that its stamp holds: the header, with ``entry_count`` and
#: ``chain`` (``_dumps`` writes them before the entries), and all of a small ledger.
_HEAD_BYTES = 4096
#: Ledgers a process keeps in memory (one per node it serves; a miss only costs a re-read).
_KEPT = 256


class _Stamp(NamedTuple):
    """What identifies one version of a ledger file without parsing it."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    head: bytes


#: Per process: absolute path -> (stamp of the file as last read or written, that ledger).
_KEPT_LEDGERS: OrderedDict[str, tuple[_Stamp, PrivacyLedger]] = OrderedDict()
_KEPT_LOCK = threading.Lock()


class LedgerEntry(NamedTuple):
    """One accountant entry plus where it came from.

    ``release`` is a digest of everything that determines what the round released (seed,
    incoming model, round config, the node's data), set only when that is reproducible (a
    seed not drawn from the OS): a resumed run that trains the same round on the same inputs
    releases the very same update again, which costs nothing more (see
    :meth:`fedmer.privacy.budget.NodePrivacy.charge`). ``""``: a fresh release every time.
    """

    noise: float
    rate: float
    steps: int
    run_id: str
    server_round: int
    release: str = ""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _encode_inf(value: float) -> float | str:
    """JSON has no infinity: an uncapped budget or an unbounded spend is written "inf"."""
    return "inf" if math.isinf(value) else value


@dataclass(frozen=True)
class PrivacyLedger:
    """An immutable view of one node's ledger; ``record`` returns the next one and saves it."""

    path: Path
    node: str
    accountant: str
    delta: float
    cap: float = math.inf
    entries: tuple[LedgerEntry, ...] = ()
    created: str = field(default_factory=_now)
    updated: str | None = None
    #: (header, entries, chain) of a prefix of ``entries`` whose hash chain is known, so a
    #: ledger that grew by a few entries extends the chain instead of rehashing its history.
    _chained: tuple[tuple[str, str, float, str], tuple[LedgerEntry, ...], str] | None = field(
        default=None, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        if self.accountant not in _ACCOUNTANTS:
            raise LedgerError(f"{self.path}: accountant {self.accountant!r} is not one of rdp, prv")
        if not (0 < self.delta < 1 and self.cap >= 0):  # also rejects NaN
            raise LedgerError(f"{self.path}: need 0 < delta < 1 and cap >= 0, got {self.delta}, {self.cap}")

    @property
    def history(self) -> PrivacyHistory:
        """Every entry, same (noise, rate) grouped: what to account and to seed Opacus with."""
        return _grouped((e.noise, e.rate, e.steps) for e in self.entries)

    @functools.cached_property
    def _spent(self) -> float:
        return compute_epsilon(self.history, self.delta, self.accountant)

    def spent(self) -> float:
        """Epsilon at ``delta`` over every entry of every run (cached: PRV takes ~1 s)."""
        return self._spent

    def chain(self) -> str:
        """The SHA-256 hash chain over the header and every entry, extended from a known prefix."""
        header = (self.node, self.accountant, self.delta, self.created)
        if self._chained is not None:
            known_header, prefix, digest = self._chained
            if known_header == header and self.entries[: len(prefix)] == prefix:
                return _chain(*header, self.entries[len(prefix) :], start=digest)
        return _chain(*header, self.entries)

    def _with_chain(self) -> PrivacyLedger:
        """This ledger remembering its own chain (computed once, reused by every later write)."""
        return replace(self, _chained=((self.node, self.accountant, self.delta, self.created), self.entries,
                                       self.chain()))  # fmt: skip

    def would_exceed(self, planned: Sequence[tuple[float, float, int]]) -> tuple[bool, float]:
        """Whether adding ``planned`` (noise, rate, steps) passes the cap, and the epsilon after it."""
        after = compute_epsilon(_grouped([*self.history.entries, *planned]), self.delta, self.accountant)
        return after > self.cap, after

    def check_budget(self, planned: Sequence[tuple[float, float, int]]) -> float:
        """Epsilon after ``planned``; raises ``BudgetExceeded`` before any training if over the cap."""
        exceeded, after = self.would_exceed(planned)
        if exceeded:
            raise BudgetExceeded(self.node, self.spent(), after, self.cap, self.delta)
        return after

    def record(
        self,
        entries: Sequence[tuple[float, float, int]],
        run_id: str | int,
        server_round: int,
        release: str = "",
    ) -> PrivacyLedger:
        """Append spend that happened and persist it atomically; never refused (it is spent)."""
        new = tuple(
            LedgerEntry(float(n), float(r), int(s), str(run_id), int(server_round), release)
            for n, r, s in entries
        )
        for e in new:
            _check_entry(self.path, e)
        with _locked(self.path):
            # read_ledger re-reads only if the file changed since this process last read or wrote it
            on_disk = read_ledger(self.path).entries if self.path.exists() else ()
            if on_disk != self.entries:
                raise LedgerError(
                    f"{self.path}: changed on disk since it was loaded ({len(on_disk)} entries there, "
                    f"{len(self.entries)} here); another writer? reload it before recording"
                )
            nxt = replace(self, entries=self.entries + new, updated=_now())._with_chain()
            _atomic_write(self.path, nxt.to_json())
            _keep(self.path, nxt)
        log.info(
            "ledger %s: node %s spent epsilon %.4g (delta %g)", self.path, self.node, nxt.spent(), self.delta
        )
        return nxt

    def releases(self, run_id: str, server_round: int, release: str) -> tuple[int, ...]:
        """Indices of this run's entries for ``server_round`` charged for the release ``release``."""
        if not release:
            return ()
        return tuple(
            i
            for i, e in enumerate(self.entries)
            if e.run_id == run_id and e.server_round == server_round and e.release == release
        )

    def to_json(self) -> dict[str, Any]:
        cols: dict[str, list[Any]] = {c: [] for c in (*_COLUMNS, _RELEASE)}
        for e in self.entries:
            for c, v in zip((*_COLUMNS, _RELEASE), e, strict=True):
                cols[c].append(v)
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "node": self.node,
            "accountant": self.accountant,
            "delta": self.delta,
            "cap": _encode_inf(self.cap),
            "spent_epsilon": _encode_inf(self.spent()),
            "unit": UNIT,
            "created": self.created,
            "updated": self.updated,
            "entry_count": len(self.entries),
            "chain": self.chain(),
            "entries": cols,
        }


def _chain(
    node: str,
    accountant: str,
    delta: float,
    created: str,
    entries: Iterable[LedgerEntry],
    start: str | None = None,
) -> str:
    """SHA-256 hash chain over the header and every entry, in order (see the module docstring).

    ``start`` is the chain over the header and the entries before ``entries``, when known.
    """
    digest = start
    if digest is None:
        digest = hashlib.sha256(json.dumps([FORMAT, node, accountant, delta, created]).encode()).hexdigest()
    for e in entries:
        # an entry without a release digest hashes as in schema 2, so those chains still verify
        fields = list(e) if e.release else list(e[:5])
        digest = hashlib.sha256((digest + json.dumps(fields)).encode()).hexdigest()
    return digest


def _grouped(entries: Iterable[tuple[float, float, int]]) -> PrivacyHistory:
    """Sum the steps of identical (noise, rate): composition is order-free, so epsilon is the
    same (to ~1e-12, RDP and PRV), but accounting costs O(settings), not O(rounds): 40
    separate PRV entries take ~12 s, one merged entry 0.3 s."""
    steps: dict[tuple[float, float], int] = {}
    for n, r, k in entries:
        steps[(float(n), float(r))] = steps.get((float(n), float(r)), 0) + int(k)
    return PrivacyHistory(tuple((n, r, k) for (n, r), k in steps.items()))


def history_increment(before: PrivacyHistory, after: PrivacyHistory) -> tuple[tuple[float, float, int], ...]:
    """What ``after`` added to ``before``: Opacus merges a repeated (noise, rate) into the last entry."""
    b, a = before.entries, after.entries
    ok = len(a) >= len(b) and a[: max(len(b) - 1, 0)] == b[: max(len(b) - 1, 0)]
    if b and ok:
        last, same = b[-1], a[len(b) - 1]
        ok = same[:2] == last[:2] and same[2] >= last[2]
    if not ok:
        raise ValueError(f"accountant history {a} does not extend {b}")
    head = [(b[-1][0], b[-1][1], a[len(b) - 1][2] - b[-1][2])] if b else []
    return tuple(e for e in (*head, *a[len(b) :]) if e[2] > 0)


def _check_entry(path: Path, e: LedgerEntry) -> None:
    if not (
        e.noise >= 0 and math.isfinite(e.noise) and 0 < e.rate <= 1 and e.steps > 0 and e.server_round >= 0
    ):
        raise LedgerError(f"{path}: invalid entry {tuple(e)} (need noise >= 0, 0 < rate <= 1, steps > 0)")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``<path>.lock`` (kept, not deleted: deleting lock files races)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _dumps(payload: dict[str, Any]) -> str:
    """Indented JSON, but each entry column on one line: a long ledger stays readable."""
    head = json.dumps({k: v for k, v in payload.items() if k != "entries"}, indent=2, allow_nan=False)
    cols = ",\n".join(
        f"    {json.dumps(c)}: {json.dumps(v, allow_nan=False)}" for c, v in payload["entries"].items()
    )
    return f'{head[:-2]},\n  "entries": {{\n{cols}\n  }}\n}}\n'


def _atomic_write(path: Path, payload: dict[str, Any]) -> None:
    """Temp file in the same folder, fsync, ``os.replace``, fsync the folder: old or new, never half."""
    atomic_write(path, lambda fh: fh.write(_dumps(payload)))


def _number(path: Path, key: str, value: Any, *, inf_ok: bool = False) -> float:
    if inf_ok and value == "inf":
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LedgerError(f"{path}: {key}={value!r} is not a finite number")
    return float(value)


def _parse(path: Path, raw: Any) -> PrivacyLedger:
    """Validate the decoded JSON against the schema; every failure names the file and the field."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise LedgerError(f'{path}: not a FedMER privacy ledger (no "format": "{FORMAT}")')
    if raw.get("schema_version") not in _READABLE_SCHEMAS:
        raise LedgerError(
            f"{path}: schema_version {raw.get('schema_version')!r} is not supported (this FedMER reads "
            f"{', '.join(map(str, _READABLE_SCHEMAS))})"
        )
    missing = [k for k in ("node", "accountant", "delta", "cap", "created", "entries") if k not in raw]
    if missing:
        raise LedgerError(f"{path}: missing field(s) {', '.join(missing)}")
    delta = _number(path, "delta", raw["delta"])
    cap = _number(path, "cap", raw["cap"], inf_ok=True)
    cols = raw["entries"]
    if not isinstance(cols, dict) or any(not isinstance(cols.get(c), list) for c in _COLUMNS):
        raise LedgerError(f'{path}: "entries" must hold the list columns {", ".join(_COLUMNS)}')
    lengths = {c: len(cols[c]) for c in _COLUMNS}
    if len(set(lengths.values())) != 1:
        raise LedgerError(f"{path}: entry columns differ in length {lengths}: truncated or edited by hand")
    releases = cols.get(_RELEASE) if raw["schema_version"] >= 3 else [""] * lengths["noise"]
    if not isinstance(releases, list) or len(releases) != lengths["noise"]:
        raise LedgerError(f'{path}: the "{_RELEASE}" column must be a list as long as the others')
    entries = []
    for i, (n, r, s, run, rnd, rel) in enumerate(zip(*(cols[c] for c in _COLUMNS), releases, strict=True)):
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (s, rnd)) or not isinstance(run, str):
            raise LedgerError(f"{path}: entry {i} has non-integer steps/round or a non-string run_id")
        if not isinstance(rel, str):
            raise LedgerError(f"{path}: entry {i} has a non-string {_RELEASE} digest {rel!r}")
        e = LedgerEntry(_number(path, f"noise[{i}]", n), _number(path, f"rate[{i}]", r), s, run, rnd, rel)
        _check_entry(path, e)
        entries.append(e)
    node, acc, created, updated = (
        str(raw["node"]),
        str(raw["accountant"]),
        str(raw["created"]),
        raw.get("updated"),
    )
    ledger = PrivacyLedger(path, node, acc, delta, cap, tuple(entries), created, updated)  # validates rest
    if raw["schema_version"] >= 2:
        _check_chain(path, raw, ledger)
        return replace(ledger, _chained=((node, acc, delta, created), ledger.entries, raw["chain"]))
    log.warning("%s: ledger schema 1 has no hash chain; it gets one on its next write", path)
    return ledger


def _check_chain(path: Path, raw: dict[str, Any], ledger: PrivacyLedger) -> None:
    """Refuse a ledger whose entries no longer match its count and hash chain (edited or truncated)."""
    restore = (
        "the node refuses to train until an operator restores the ledger from a backup (never delete it: "
        "that would reset the node's spent budget)"
    )
    if raw.get("entry_count") != len(ledger.entries):
        raise LedgerError(
            f"{path}: holds {len(ledger.entries)} entries but records "
            f"entry_count={raw.get('entry_count')!r}: its history was truncated or edited; {restore}"
        )
    if raw.get("chain") != ledger.chain():
        raise LedgerError(
            f"{path}: its entries do not match their hash chain: its history was edited; {restore}"
        )


def _stamp(path: Path) -> _Stamp | None:
    """The file's identity and head, or None when it cannot be opened (then it is read the slow way)."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            head = fh.read(_HEAD_BYTES)
    except OSError:
        return None
    return _Stamp(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, head)


def _keep(path: Path, ledger: PrivacyLedger, stamp: _Stamp | None = None) -> None:
    """Remember ``ledger`` as what ``path`` holds at ``stamp`` (default: now, just written).

    ``record`` calls it under the ledger's lock right after its write, so the stamp is of that
    write; a hand edit racing that instant could go unseen until the file changes again
    (FedMER's own writers take the lock).
    """
    stamp = stamp if stamp is not None else _stamp(path)
    key = os.path.abspath(path)
    with _KEPT_LOCK:
        if stamp is None:
            _KEPT_LEDGERS.pop(key, None)
            return
        _KEPT_LEDGERS[key] = (stamp, ledger)
        _KEPT_LEDGERS.move_to_end(key)
        while len(_KEPT_LEDGERS) > _KEPT:
            _KEPT_LEDGERS.popitem(last=False)


def read_ledger(path: str | os.PathLike[str]) -> PrivacyLedger:
    """Load an existing ledger with its own settings; a missing or corrupt file is a ``LedgerError``.

    Returns the ledger this process last read or wrote at ``path`` when the file's stamp
    (inode, size, mtime, ctime, head with the chain) is unchanged; otherwise reads and verifies it.
    """
    path = Path(path)
    key = os.path.abspath(path)
    stamp = _stamp(path)
    with _KEPT_LOCK:
        kept = _KEPT_LEDGERS.get(key)
    if kept is not None and stamp is not None and kept[0] == stamp:
        return kept[1] if kept[1].path == path else replace(kept[1], path=path)
    if kept is not None:
        log.info("ledger %s changed on disk since this process last read or wrote it: reading it again", path)
    ledger = _read(path)
    if stamp is not None:  # taken before the read: a change during it is seen on the next read
        _keep(path, ledger, stamp)
    return ledger


def _read(path: Path) -> PrivacyLedger:
    """Read, parse and verify the file (no process cache)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LedgerError(f"{path}: no privacy ledger at this path") from None
    except (OSError, UnicodeDecodeError) as err:
        raise LedgerError(f"{path}: cannot read the privacy ledger ({err})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise LedgerError(
            f"{path}: corrupt or truncated privacy ledger ({err}); restore it from a backup, "
            "do not delete it (that would reset the node's spent budget)"
        ) from None
    return _parse(path, raw)


def load_ledger(
    path: str | os.PathLike[str], *, node: str, accountant: str, delta: float, cap: float | None = None
) -> PrivacyLedger:
    """The node's ledger, or a fresh (unsaved) one; settings must match how the spend was accounted.

    ``cap=None`` keeps the stored cap (infinite for a new ledger); a given cap replaces it
    (the node's policy), logged when it changes. A different accountant or delta is an
    error: epsilons under different accountings cannot be summed or compared to one cap.
    """
    path = Path(path)
    if not path.exists():
        return PrivacyLedger(path, node, accountant, float(delta), math.inf if cap is None else float(cap))
    led = read_ledger(path)
    if led.node != node:
        raise LedgerError(f"{path}: belongs to node {led.node!r}, not {node!r}")
    if led.accountant != accountant or not math.isclose(led.delta, delta, rel_tol=1e-12):
        raise LedgerError(
            f"{path}: spend was accounted with {led.accountant} at delta={led.delta:g}, this run asks "
            f"for {accountant} at delta={delta:g}; use the ledger's settings (a budget must be "
            "accounted consistently) or start a new ledger file for a new privacy unit"
        )
    if cap is not None and float(cap) != led.cap:
        log.warning("ledger %s: cap for node %s changes from %g to %g", path, node, led.cap, cap)
        led = replace(led, cap=float(cap))
    return led


def ledger_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything ``fedmer privacy show`` prints, as JSON-ready values (infinity as "inf")."""
    led = read_ledger(path)
    spent = led.spent()
    return {
        "path": str(led.path),
        "node": led.node,
        "accountant": led.accountant,
        "delta": led.delta,
        "cap": _encode_inf(led.cap),
        "spent_epsilon": _encode_inf(spent),
        "remaining_epsilon": _encode_inf(max(led.cap - spent, 0.0) if math.isfinite(spent) else 0.0),
        "unit": UNIT,
        "runs": len({e.run_id for e in led.entries}),
        "rounds": len({(e.run_id, e.server_round) for e in led.entries if e.server_round > 0}),
        # round 0: spends outside training rounds (the feature-statistics release, personalization)
        "entries_outside_rounds": sum(1 for e in led.entries if e.server_round <= 0),
        "entries": len(led.entries),
        "total_steps": led.history.steps,
        "created": led.created,
        "updated": led.updated,
    }


def _fmt(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:.4g}"


def show_ledger(path: str | os.PathLike[str]) -> str:
    """A human-readable summary: who, how accounted, how much spent of what cap, from where."""
    s = ledger_summary(path)
    remaining = "" if s["cap"] == "inf" else f" (remaining {_fmt(s['remaining_epsilon'])})"
    lines = [
        f"privacy ledger {s['path']}",
        f"  node:        {s['node']}",
        f"  spent:       epsilon = {_fmt(s['spent_epsilon'])} at delta = {s['delta']:g} "
        f"({s['accountant']} accountant)",
        f"  unit:        {s['unit']}",
        f"  cap:         epsilon <= {_fmt(s['cap'])}{remaining}",
        f"  history:     {s['rounds']} training rounds in {s['runs']} runs, {s['total_steps']} accountant "
        f"steps ({s['entries']} entries, {s['entries_outside_rounds']} outside training rounds: "
        "statistics releases, personalization)",
        f"  created:     {s['created']}",
        f"  updated:     {s['updated'] or 'never'}",
    ]
    return "\n".join(lines)
