"""The config.json of a rewritten model: the stock config when the stock class can express the result,
else a `normsurgery` config that wraps it and registers the shipped modeling code through `auto_map`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODELING_FILE = Path(__file__).with_name("modeling_normsurgery.py")
AUTO_MAP = {
    "AutoConfig": "modeling_normsurgery.NormSurgeryConfig",
    "AutoModelForCausalLM": "modeling_normsurgery.NormSurgeryForCausalLM",
}
# Copied to the wrapper's top level so tools that read a config without loading the model see them.
_SHARED_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings", "n_positions",
    "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "transformers_version",
)  # fmt: skip


def rewritten_config(
    raw: dict[str, Any], updates: dict[str, Any], surgery: dict[str, Any] | None, shapes: dict[str, list[int]]
) -> dict[str, Any]:
    """The new config.json: `raw` with `updates`, wrapped with the surgery when the stock class cannot load it."""
    base = {**raw, **updates}
    base.pop("auto_map", None)
    if surgery is None:
        return base
    surgery = {k: v for k, v in surgery.items() if k != "resized"}
    surgery["shapes"] = {name: shapes[name] for name in sorted(shapes)}
    wrapper = {k: base[k] for k in _SHARED_KEYS if k in base}
    wrapper.update(
        {
            "model_type": "normsurgery",
            "architectures": ["NormSurgeryForCausalLM"],
            "auto_map": dict(AUTO_MAP),
            "base_config": base,
            "surgery": surgery,
        }
    )
    return wrapper
