"""Read a model's config.json without importing transformers (about two seconds of start-up, torch included).

`ConfigView` answers the attributes a family declaration reads straight from config.json, under the keys
transformers reads them from. An attribute config.json does not have (a hub config.json written by an older
transformers lacks the attributes added since, and those equal to the base config's defaults) is the config class's
default: from normsurgery/arch/class_defaults.py for the attributes the declarations read, including the per-block
keys a class fills in from a pattern (`Family.per_layer_filled`), else from the full transformers config, built
only then. `absent_is_none` attributes, which the config class never fills in (e.g. Llama's per-block
`layer_types`), are None when config.json lacks them. Callers that keep the view's answer compare it with the full
config's in the background (`normsurgery.source`), so a divergence cannot pass unnoticed where the output is
verified.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable


class ConfigView:
    """Attribute access to a raw config.json dict: its values, else the class defaults given (`defaults`, `derived`),
    else the full transformers config's."""

    def __init__(self, raw: dict[str, Any], keys: dict[str, tuple[str, ...]], full: Callable[[], Any],
                 absent_is_none: frozenset[str] = frozenset(), defaults: Mapping[str, Any] | None = None,
                 derived: Mapping[str, Callable[[ConfigView], Any]] | None = None) -> None:
        self._raw = raw
        self._keys = keys
        self._full = full
        self._absent_is_none = absent_is_none
        self._defaults = defaults or {}  # attribute -> the class's constant default
        self._derived = derived or {}  # attribute -> how the class fills it in from other values
        self._loaded: Any = None

    def full(self) -> Any:
        """The transformers config behind the view (built on first use)."""
        if self._loaded is None:
            self._loaded = self._full()
        return self._loaded

    def stored(self, name: str, default: Any) -> Any:
        """config.json's value of an attribute (under any key transformers reads it from), else `default`."""
        for key in self._keys.get(name, (name,)):
            if key in self._raw:
                return self._raw[key]
        return default

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in _OWN:  # (_OWN: not yet set, while unpickling or copying)
            raise AttributeError(name)
        if name in self._derived and self._loaded is None:  # what the class makes of config.json's value, or its own
            try:
                return self._derived[name](self)
            except Exception:  # a value the class reads otherwise (or refuses): the full config says
                pass
        elif name not in self._derived:
            value = self.stored(name, _ABSENT)
            if value is not _ABSENT:
                return value
            if name in self._absent_is_none:
                return None
            if name in self._defaults and self._loaded is None:
                return self._defaults[name]
        return getattr(self.full(), name)


_ABSENT = object()
_OWN = frozenset({"_raw", "_keys", "_full", "_absent_is_none", "_defaults", "_derived", "_loaded"})

