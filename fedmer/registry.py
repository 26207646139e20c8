"""String-keyed registries: what a config key may name, and the object each name selects.

The config accepts exactly what a registry holds, so a dataset added with
``register_dataset("mine")`` (or a fusion, encoder, objective or strategy registered the same
way) is a valid ``data.name=mine`` at once; no second list of names to keep in step.

The registries live here, at the bottom beside :mod:`fedmer.config`, so the config can consult
them without importing the layers above it. Each names the modules that register its
built-ins (its *providers*); they are imported on the first lookup, the way a plugin system
loads its plugins, so the arrows of the import graph still point down.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from fedmer.errors import ConfigError

__all__ = ["AUX_LOSSES", "DATASETS", "ENCODERS", "FUSIONS", "STRATEGIES", "Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Names for one config key, each bound to an object and optional metadata."""

    def __init__(self, key: str, providers: tuple[str, ...] = (), builtin: tuple[str, ...] = ()) -> None:
        self.key = key  # the config key this registry answers, e.g. "data.name"
        self._providers = providers
        self._builtin = builtin  # names that select no object (e.g. aux loss "none")
        self._loaded = not providers
        self._entries: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, obj: T | None = None, **meta: Any) -> Callable[[T], T]:
        """Bind ``name`` to ``obj`` (or decorate it); registering a name twice is an error."""

        def add(value: T) -> T:
            if name in self._entries and self._entries[name] is not value:
                raise ValueError(f"{self.key}={name!r} is already registered")
            self._entries[name] = value
            self._meta[name] = dict(meta)
            return value

        if obj is not None:
            add(obj)
        return add

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._providers:
                importlib.import_module(module)

    def names(self) -> tuple[str, ...]:
        """Every name this key accepts, sorted (built-in placeholders first)."""
        self._load()
        return (*self._builtin, *sorted(self._entries))

    def check(self, name: object) -> None:
        """Raise :class:`ConfigError` naming the key, the value and the valid names."""
        if name not in self.names():
            raise ConfigError(f"invalid {self.key}={name!r}: expected one of {', '.join(self.names())}")

    def get(self, name: str) -> T:
        """The object registered as ``name``; an unknown name fails listing the valid ones."""
        self.check(name)
        return self._entries[name]

    def meta(self, name: str) -> dict[str, Any]:
        """Metadata given when ``name`` was registered (e.g. a dataset's modalities)."""
        self.check(name)
        return self._meta.get(name, {})

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return sorted(self._entries.items())


#: ``data.name``: loader ``(DataConfig, num_sites, seed) -> DatasetSplit``; meta ``modalities``.
DATASETS: Registry[Any] = Registry("data.name", providers=("fedmer.data",))
#: ``model.encoder``: factory ``(in_dim, hidden) -> encoder``.
ENCODERS: Registry[Any] = Registry("model.encoder", providers=("fedmer.models",))
#: ``model.fusion``: factory ``(num_modalities, hidden, num_outputs) -> Fusion``.
FUSIONS: Registry[Any] = Registry("model.fusion", providers=("fedmer.models",))
#: ``model.aux_loss``: factory ``(num_modalities, hidden, num_classes) -> AuxObjective``.
AUX_LOSSES: Registry[Any] = Registry("model.aux_loss", providers=("fedmer.models",), builtin=("none",))
#: ``strategy.name``: factory ``(cfg, common kwargs[, cls]) -> flwr Strategy``; meta ``client_dp``,
#: ``server_optimizer`` and ``min_clients`` (replies needed to tolerate ``num_malicious``).
STRATEGIES: Registry[Any] = Registry("strategy.name", providers=("fedmer.federation.strategies",))
