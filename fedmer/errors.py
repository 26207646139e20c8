"""The one error type a bad setting raises, shared by the config and the registries."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what is allowed."""
