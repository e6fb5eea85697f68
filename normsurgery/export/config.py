"""The config.json of a rewritten model: the stock config when the stock class can express the result,
else a `normsurgery` config that wraps it and registers the shipped modeling code through `auto_map`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from normsurgery.rewrite.plan import Surgery

MODELING_FILE = Path(__file__).with_name("modeling_normsurgery.py")
# Keys runtimes read that transformers 5 no longer writes, by model_type: each key and the key whose value it takes.
DROPPED_KEYS: dict[str, dict[str, str]] = {"gpt2": {"n_ctx": "n_positions"}}  # llama.cpp's GPT-2 converter reads n_ctx


def runtime_config(config: dict[str, Any]) -> dict[str, Any]:
    """`config` with what runtimes need and transformers may leave out: `architectures` (llama.cpp and vLLM pick
    their model by it), set to transformers' causal-LM class for the model_type where missing, and DROPPED_KEYS."""
    config = dict(config)
    model_type = config.get("model_type")
    for key, source in DROPPED_KEYS.get(model_type, {}).items():
        if config.get(key) is None and source in config:
            config[key] = config[source]
    code_class = (config.get("auto_map") or {}).get("AutoModelForCausalLM")
    if not config.get("architectures") and isinstance(code_class, str):  # a model whose code ships in its folder
        config["architectures"] = [code_class.rsplit(".", 1)[-1]]
    if not config.get("architectures"):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # imports torch

        if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    return config


def _code_only(config: dict[str, Any]) -> bool:
    """Whether the model exists only as the code its folder ships: an auto_map for a model type transformers does not
    know (a traced architecture; the user trusted the code)."""
    if "auto_map" not in config:
        return False
    from transformers import CONFIG_MAPPING

    return config.get("model_type") not in CONFIG_MAPPING


def rewritten_config(raw: dict[str, Any], updates: dict[str, Any], surgery: Surgery | None,
                     shapes: dict[str, list[int]]) -> dict[str, Any]:
    """The new config.json: `raw` with `updates` and what runtimes read (`runtime_config`), wrapped with the surgery
    (and the written `shapes` of its resized tensors) when the stock class cannot load it."""
    base = runtime_config({**raw, **updates})
    if not _code_only(base):  # a stock class loads it: the source's auto_map would run code it does not need
        base.pop("auto_map", None)
    if surgery is None:
        return base
    from normsurgery.export.modeling_normsurgery import wrap_config  # torch and transformers: only for a surgery

    return wrap_config(base, surgery.exported(shapes))
