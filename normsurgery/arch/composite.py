"""Composite configs (a language model inside a multimodal one, under `text_config`): the language model's
attributes read through the composite config, so that a residual picture of the language model resolves from it."""

from __future__ import annotations

from typing import Any

# sub-configs that hold a composite model's language model, in order of preference
TEXT_KEYS = ("text_config", "language_config", "llm_config", "decoder")


def text_key(config: Any) -> str | None:
    """The attribute of a composite config that holds its language model's config, or None for a plain config."""
    if isinstance(config, TextView) or hasattr(config, "num_hidden_layers"):
        return None
    for key in TEXT_KEYS:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "num_hidden_layers") and hasattr(sub, "hidden_size"):
            return key
    return None


class TextView:
    """A composite config read as its language model's: attributes from the sub-config first, then the composite's
    own; `model_type` and `tie_word_embeddings` (which govern the composite class) from the composite where it
    sets them."""

    OWN = ("model_type", "auto_map", "_name_or_path")

    def __init__(self, config: Any, key: str) -> None:
        self._config = config
        self._key = key
        self._sub = getattr(config, key)

    @property
    def composite(self) -> Any:
        """The composite config itself."""
        return self._config

    @property
    def text_key(self) -> str:
        """Where the language model's config sits in the composite."""
        return self._key

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name in self.OWN or (name == "tie_word_embeddings" and name in self._config.to_dict()):
            return getattr(self._config, name)
        try:
            return getattr(self._sub, name)
        except AttributeError:
            return getattr(self._config, name)

    def to_dict(self) -> dict[str, Any]:
        """The language model's config values (what a family's declaration reads)."""
        return self._sub.to_dict()


def text_view(config: Any) -> Any:
    """`config` itself, or a TextView of it when it is composite."""
    key = text_key(config)
    return config if key is None else TextView(config, key)
