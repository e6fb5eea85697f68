"""Architecture adapters: from a config to the residual-stream picture (`Architecture`) of that model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Collection

from normsurgery.arch.class_defaults import DEFAULTS, DERIVED
from normsurgery.arch.config_view import ConfigView
from normsurgery.arch.families import FAMILIES
from normsurgery.arch.spec import Architecture, Block, Family, Linear, Norm
from normsurgery.errors import NormSurgeryError

FAMILY_BY_MODEL_TYPE: dict[str, Family] = {mt: f for f in FAMILIES for mt in f.model_types}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(FAMILY_BY_MODEL_TYPE))

__all__ = [
    "Architecture", "Block", "Family", "Linear", "Norm",
    "FAMILY_BY_MODEL_TYPE", "SUPPORTED_MODEL_TYPES", "family_for", "load_config", "config_view",
    "architecture_of", "family_of", "raw_key", "register_tracer",
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


def _model_type(raw: dict[str, Any], where: str) -> str:
    """The config's model_type string."""
    model_type = raw.get("model_type")
    if not isinstance(model_type, str):
        raise NormSurgeryError(f"{where} has no 'model_type' string; it is not a Hugging Face model config.")
    return model_type


def load_config(raw: dict[str, Any], where: str = "config.json", *, folder: Path | None = None,
                trust_remote_code: bool = False) -> Any:
    """Build the transformers config object for a raw config.json dict: its transformers class, or the class its
    own code defines (`auto_map`, only with `trust_remote_code`; `folder` holds that code)."""
    from transformers import CONFIG_MAPPING

    model_type = _model_type(raw, where)
    if "auto_map" in raw and model_type not in CONFIG_MAPPING and folder is not None:  # its code ships with it
        if not trust_remote_code:
            raise NormSurgeryError(
                f"{where} registers its own modeling code (auto_map) for model_type {model_type!r}, which this "
                "transformers does not know. Reading it runs that code: pass --trust-remote-code (trust_remote_code="
                "True in Python) if you trust it.")
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(folder, trust_remote_code=True)
        except Exception as err:  # remote code fails in many ways
            raise NormSurgeryError(f"{where} could not be read with its own code: {err}. Fix the folder's "
                                   "configuration code or config.json.") from None
    if model_type not in CONFIG_MAPPING:
        import transformers

        raise NormSurgeryError(
            f"model_type {model_type!r} in {where} is not one that transformers {transformers.__version__} knows, and "
            "the folder registers no modeling code of its own (auto_map). Upgrade transformers, or fix config.json.")
    cls = CONFIG_MAPPING[model_type]
    decode = getattr(cls, "_decode_special_floats", lambda x: x)  # transformers writes inf as {"__float__": ...}
    try:
        return cls.from_dict(decode(dict(raw)))
    except Exception as err:  # transformers validates values and raises many types
        raise NormSurgeryError(
            f"{where} could not be read as a {model_type} config: {err}. Fix the file or re-export the model."
        ) from None


# what gives a model type without a declaration its family: normsurgery.adapt.runtime.traced_family (which traces
# and proves it with the whole tool), registered by the package's top level so that this layer imports none of it
_TRACER: list[Callable[[Any], Family]] = []


def register_tracer(tracer: Callable[[Any], Family]) -> None:
    """Set the function that derives the family of a config no declaration covers."""
    _TRACER[:] = [tracer]


def family_of(config: Any) -> Family:
    """The family of a config: its declaration, else the declaration traced (once, then cached) from a tiny
    instance of the config and proven on it; a NormSurgeryError when neither exists."""
    declared = FAMILY_BY_MODEL_TYPE.get(str(getattr(config, "model_type", "")))
    if declared is not None:
        return declared
    if not _TRACER:
        raise NormSurgeryError(f"model_type {getattr(config, 'model_type', None)!r} has no declared family and "
                               "tracing is not available in this process (import normsurgery first).")
    return _TRACER[0](config)


def config_view(raw: dict[str, Any], where: str = "config.json") -> ConfigView | None:
    """A config.json read without transformers where it can be (see ConfigView), for a declared family; None for
    a model type without one (its architecture needs the transformers config)."""
    model_type = _model_type(raw, where)
    family = FAMILY_BY_MODEL_TYPE.get(model_type)
    if family is None or "auto_map" in raw:
        return None
    return ConfigView(raw, dict(family.config_keys), lambda: load_config(raw, where),
                      absent_is_none=frozenset(family.per_layer) - frozenset(family.per_layer_filled),
                      defaults=DEFAULTS.get(model_type), derived=DERIVED.get(model_type))


def architecture_of(config: Any, stored: Collection[str] | None = None) -> Architecture:
    """The residual-stream picture of a model with this config; with the checkpoint's `stored` tensor
    names, in the layout they are stored in: the hub's (the family's declaration, e.g. one tensor per expert), or
    the one stock transformers holds in memory (experts stacked, key renames applied: a saved state dict)."""
    arch = family_of(config).resolve(config)
    if stored is None or not (arch.fused or arch.key_renames):
        return arch
    loaded = arch.as_loaded()
    names = set(stored)
    return loaded if set(loaded.roles()) <= names and not set(arch.roles()) <= names else arch


def raw_key(raw: dict[str, Any], attribute: str) -> str:
    """The config.json key that holds a config attribute (e.g. GPT-2's n_layer for num_hidden_layers)."""
    family = FAMILY_BY_MODEL_TYPE.get(_model_type(raw, "config.json"))
    aliases = dict(family.config_keys).get(attribute, ()) if family is not None else ()  # traced: arch.config_keys
    return next((k for k in (*aliases, attribute) if k in raw), attribute)
