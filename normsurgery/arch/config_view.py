"""Read a model's config.json without importing transformers (about two seconds of start-up).

`ConfigView` answers the attributes a family declaration reads straight from config.json, under the keys
transformers reads them from; an attribute config.json does not have (a class default) comes from the full
transformers config, built only then, except `absent_is_none` attributes, which the config class never fills in
(e.g. Llama's per-block `layer_types`): those are None when config.json lacks them. Callers that keep the view's
answer compare it with the full config's in the background (`normsurgery.source`), so a divergence can never pass
unnoticed.
"""

from __future__ import annotations

from typing import Any, Callable


class ConfigView:
    """Attribute access to a raw config.json dict, falling back to the full transformers config for defaults."""

    def __init__(self, raw: dict[str, Any], keys: dict[str, tuple[str, ...]], full: Callable[[], Any],
                 absent_is_none: frozenset[str] = frozenset()) -> None:
        self._raw = raw
        self._keys = keys
        self._full = full
        self._absent_is_none = absent_is_none
        self._loaded: Any = None

    def full(self) -> Any:
        """The transformers config behind the view (built on first use)."""
        if self._loaded is None:
            self._loaded = self._full()
        return self._loaded

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        for key in self._keys.get(name, (name,)):
            if key in self._raw:
                return self._raw[key]
        if name in self._absent_is_none:
            return None
        if self._loaded is None:
            self._loaded = self._full()
        return getattr(self._loaded, name)

