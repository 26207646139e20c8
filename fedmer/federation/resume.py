"""What a server must carry across a resume besides the model: strategy state and sampling RNGs.

Flower's strategies keep state between rounds in plain attributes: FedAdam/FedYogi/FedAdagrad
their moments ``m_t``/``v_t`` and ``current_arrays``, FedAvgM its ``momentum_vector``, the DP
wrappers their (adaptive) ``clipping_norm`` and, with fixed clipping, an RDP accountant that has
composed every release so far. :func:`strategy_state` walks the wrapper chain (``inner``,
``strategy``, ``dp``) and captures exactly those, as tensors and plain values (what
``torch.load(weights_only=True)`` reads back); :func:`restore_strategy_state` puts them into a
freshly built strategy of the same config. Sampling uses the module-level ``random`` (Flower's
samplers) and server-side noise NumPy's global generator, so both are saved with torch's.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import strategy as fs

from fedmer.federation.sampling import SAMPLER
from fedmer.federation.strategies import AccountedStrategy
from fedmer.results.checkpoint import RoundCheckpoint
from fedmer.results.rounds import RoundReport

__all__ = [
    "PRIVACY_KEYS",
    "capture_rng",
    "reports_from_dicts",
    "reports_to_dicts",
    "restore_rng",
    "restore_server",
    "restore_strategy_state",
    "round_checkpoint",
    "strategy_state",
]

log = logging.getLogger(__name__)

#: The round-row columns a checkpoint keeps as its privacy summary.
PRIVACY_KEYS = ("epsilon_max", "epsilon_mean", "delta", "accountant", "client_epsilon")
#: Attributes Flower's strategies and DP wrappers change between rounds.
STATE_ATTRS = ("m_t", "v_t", "current_arrays", "momentum_vector", "clipping_norm")
#: Attributes through which one strategy wraps another.
CHILD_ATTRS = ("inner", "strategy", "dp")
_ARRAYS, _NDARRAY, _LIST = "__arrayrecord__", "__ndarray__", "__ndarrays__"


def _chain(strategy: fs.Strategy) -> dict[str, fs.Strategy]:
    """Every strategy in the wrapper chain, keyed by its attribute path ("" for the outermost)."""
    out: dict[str, fs.Strategy] = {}
    todo: list[tuple[str, fs.Strategy]] = [("", strategy)]
    seen: set[int] = set()
    while todo:
        path, obj = todo.pop(0)
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        out[path] = obj
        for name in CHILD_ATTRS:
            child = vars(obj).get(name)
            if isinstance(child, fs.Strategy):
                todo.append((f"{path}.{name}".lstrip("."), child))
    return out


def _encode(value: Any) -> Any:
    if isinstance(value, ArrayRecord):
        return {_ARRAYS: value.to_torch_state_dict()}
    if isinstance(value, np.ndarray):
        return {_NDARRAY: torch.from_numpy(np.array(value, copy=True))}
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and all(isinstance(v, np.ndarray) for v in value):
        return {_LIST: [torch.from_numpy(np.array(v, copy=True)) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint strategy state of type {type(value).__name__}")


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if _ARRAYS in value:
            return ArrayRecord(value[_ARRAYS])
        if _NDARRAY in value:
            return value[_NDARRAY].numpy()
        if _LIST in value:
            return [t.numpy() for t in value[_LIST]]
        return {k: _decode(v) for k, v in value.items()}
    return value


def strategy_state(strategy: fs.Strategy) -> dict[str, Any]:
    """``{path: {"class": name, attr: value, "accountant": state}}`` for the whole chain."""
    state: dict[str, Any] = {}
    for path, obj in _chain(strategy).items():
        attrs = vars(obj)
        entry: dict[str, Any] = {"class": type(obj).__name__}
        entry.update({a: _encode(attrs[a]) for a in STATE_ATTRS if a in attrs})
        accountant = attrs.get("accountant")
        if accountant is not None and callable(getattr(accountant, "state_dict", None)):
            entry["accountant"] = accountant.state_dict()
        state[path] = entry
    return state


def restore_strategy_state(strategy: fs.Strategy, state: dict[str, Any]) -> None:
    """Put :func:`strategy_state`'s values into ``strategy`` (built from the same config)."""
    chain = _chain(strategy)
    if set(chain) != set(state):
        raise ValueError(f"strategy chain {sorted(chain)} differs from the checkpoint's {sorted(state)}")
    for path, entry in state.items():
        obj = chain[path]
        if type(obj).__name__ != entry["class"]:
            found, saved = type(obj).__name__, entry["class"]
            raise ValueError(f"strategy {path or '<outer>'} is a {found}, the checkpoint's a {saved}")
        for attr in STATE_ATTRS:
            if attr in entry:
                setattr(obj, attr, _decode(entry[attr]))
        if "accountant" in entry:
            obj.accountant.load_state_dict(entry["accountant"])  # type: ignore[attr-defined]


def capture_rng() -> dict[str, Any]:
    """Python's, NumPy's and torch's global generator states, and Flower's sampler's (plain values)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    return {
        "python": random.getstate(),
        "sampler": SAMPLER.getstate(),
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng`: the next sample is the one the interrupted run would have drawn."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    # a checkpoint from before the sampler had its own stream sampled from Python's global one
    version, internal, gauss = state.get("sampler", state["python"])
    SAMPLER.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def reports_to_dicts(reports: list[RoundReport]) -> list[dict[str, Any]]:
    """Round reports as plain dicts (client metric values are numbers)."""
    return [asdict(r) for r in reports]


def reports_from_dicts(rows: list[dict[str, Any]]) -> dict[int, RoundReport]:
    """The ``AccountedStrategy.rounds`` a checkpoint held, keyed by round."""
    return {int(r["server_round"]): RoundReport(**r) for r in rows}


def restore_server(
    ckpt: RoundCheckpoint, model: torch.nn.Module, strategy: AccountedStrategy
) -> dict[str, Any]:
    """Load ``ckpt``'s model, strategy state, round reports and round offset; return the summary extras.

    The RNGs are left to :func:`restore_rng`, called last, right before the rounds start.
    """
    model.load_state_dict(ckpt.model)
    restore_strategy_state(strategy, ckpt.strategy)
    strategy.rounds = reports_from_dicts(ckpt.rounds)
    strategy.round_offset = ckpt.server_round
    resumed = [*ckpt.extra.get("resumed_after_rounds", []), ckpt.server_round]
    return {**ckpt.extra, "resumed_after_rounds": resumed}


def round_checkpoint(
    base: RoundCheckpoint,
    row: dict[str, Any],
    detail: dict[str, Any],
    arrays: dict[str, torch.Tensor],
    strategy: AccountedStrategy,
    **fields: Any,
) -> RoundCheckpoint:
    """The checkpoint after the round of ``row``: ``base`` (config, run id) plus the live state.

    ``arrays`` is the global model exactly as the strategy holds it (dtype included: FedAdam's
    step returns float64 arrays, and a resumed run must send what the killed one would have).

    ``fields`` sets the rest (``extra``, ``elapsed_s``).
    """
    privacy = {k: row.get(k) for k in PRIVACY_KEYS}
    privacy["client_epsilons"] = detail.get("client_epsilons")
    return replace(
        base,
        server_round=int(row["round"]),
        model=arrays,
        strategy=strategy_state(strategy),
        rng=capture_rng(),
        rounds=reports_to_dicts(list(strategy.rounds.values())),
        privacy=privacy,
        **fields,
    )
