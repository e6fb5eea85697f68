"""Architecture adapters: from a config to the residual-stream picture (`Architecture`) of that model."""

from __future__ import annotations

from typing import Any, Collection

from normsurgery.arch.config_view import ConfigView
from normsurgery.arch.families import FAMILIES
from normsurgery.arch.spec import Architecture, Block, Family, Linear, Norm
from normsurgery.errors import NormSurgeryError

FAMILY_BY_MODEL_TYPE: dict[str, Family] = {mt: f for f in FAMILIES for mt in f.model_types}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(FAMILY_BY_MODEL_TYPE))

__all__ = [
    "Architecture", "Block", "Family", "Linear", "Norm",
    "FAMILY_BY_MODEL_TYPE", "SUPPORTED_MODEL_TYPES", "family_for", "load_config", "config_view",
    "architecture_of", "raw_key",
]  # fmt: skip


def family_for(model_type: str) -> Family:
    """The family declaration for a `model_type`, or a clear error listing the supported ones."""
    try:
        return FAMILY_BY_MODEL_TYPE[model_type]
    except KeyError:
        raise NormSurgeryError(
            f"model_type {model_type!r} is not supported by normsurgery. Supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. A new family is one declaration in normsurgery/arch/families.py."
        ) from None


def _supported_model_type(raw: dict[str, Any], where: str) -> str:
    """The config's model_type, which must name a supported family."""
    model_type = raw.get("model_type")
    if not isinstance(model_type, str):
        raise NormSurgeryError(f"{where} has no 'model_type' string; it is not a Hugging Face model config.")
    family_for(model_type)
    return model_type


def load_config(raw: dict[str, Any], where: str = "config.json") -> Any:
    """Build the transformers config object for a raw config.json dict (the family must be supported)."""
    from transformers import CONFIG_MAPPING

    model_type = _supported_model_type(raw, where)
    try:
        return CONFIG_MAPPING[model_type].from_dict(dict(raw))
    except Exception as err:  # transformers validates values and raises many types
        raise NormSurgeryError(
            f"{where} could not be read as a {model_type} config: {err}. Fix the file or re-export the model."
        ) from None


def config_view(raw: dict[str, Any], where: str = "config.json") -> ConfigView:
    """A config.json read without transformers where it can be (see ConfigView); the family must be supported."""
    family = family_for(_supported_model_type(raw, where))
    return ConfigView(raw, dict(family.config_keys), lambda: load_config(raw, where),
                      absent_is_none=frozenset(family.per_layer) - frozenset(family.per_layer_filled))


def architecture_of(config: Any, stored: Collection[str] | None = None) -> Architecture:
    """The residual-stream picture of a model with this (supported) config; with the checkpoint's `stored` tensor
    names, in the layout they are stored in: the hub's (the family's declaration, e.g. one tensor per expert), or
    the one stock transformers holds in memory (experts stacked, key renames applied: a saved state dict)."""
    arch = family_for(config.model_type).resolve(config)
    if stored is None or not (arch.fused or arch.key_renames):
        return arch
    loaded = arch.as_loaded()
    names = set(stored)
    return loaded if set(loaded.roles()) <= names and not set(arch.roles()) <= names else arch


def raw_key(raw: dict[str, Any], attribute: str) -> str:
    """The config.json key that holds a config attribute (e.g. GPT-2's n_layer for num_hidden_layers)."""
    family = family_for(_supported_model_type(raw, "config.json"))
    aliases = dict(family.config_keys).get(attribute, ())
    return next((k for k in (*aliases, attribute) if k in raw), attribute)
