"""Resolve ``package.module:function`` names from a run config."""

from __future__ import annotations

import importlib

from swarmrt.config import ConfigError


def resolve(spec: str, field: str):
    """Import ``package.module:function``; a :class:`ConfigError` naming ``field`` when it is not there."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{field}: cannot import module {module_name!r}: {e}") from None
    found = getattr(module, attr, None)
    if not callable(found):
        raise ConfigError(f"{field}: {module_name!r} has no callable {attr!r}")
    return found
