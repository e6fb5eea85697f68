"""Config keys that depend on block indices, re-indexed for a model that keeps only some of its blocks.

A family lists its keys in `Family.per_layer`; this module knows each key's format. Values are read from the
transformers config (where defaults and patterns are already expanded, e.g. Gemma 3's `layer_types` from its
sliding-window pattern) and written out explicitly, so that each kept block keeps the attention type, rotary
setting or window of the weights it holds (mergekit copies such lists verbatim and shifts them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

from normsurgery.errors import NormSurgeryError


def _per_block(value: Any, keep: list[int]) -> list[Any]:
    """A list with one entry per block: the kept blocks' entries."""
    return [value[i] for i in keep]


def _count_below(value: Any, keep: list[int]) -> int:
    """A block-index threshold (Qwen's max_window_layers: blocks at or above it slide): the kept blocks below it."""
    return sum(1 for i in keep if i < int(value))


REINDEX: dict[str, Callable[[Any, list[int]], Any]] = {
    "layer_types": _per_block,
    "no_rope_layers": _per_block,
    "attention_layers": _per_block,
    "max_window_layers": _count_below,
    "first_k_dense_replace": _count_below,  # DeepSeek: the blocks below it have a dense MLP (kept blocks stay in order)
}


def _dense_blocks(config: Any, keep: list[int]) -> dict[str, Any]:
    """Qwen-MoE's dense blocks: those in mlp_only_layers or off the decoder_sparse_step pattern. A pattern does not
    survive renumbering, so the kept dense blocks are listed and every other block is sparse."""
    step = int(config.decoder_sparse_step)
    dense = [new for new, old in enumerate(keep) if old in config.mlp_only_layers or (old + 1) % step]
    return {"mlp_only_layers": dense, "decoder_sparse_step": 1}


def _moe_blocks(config: Any, keep: list[int]) -> dict[str, Any]:
    """Llama 4's moe_layers, a list of block indices (which overrides interleave_moe_layer_step): the kept ones,
    renumbered."""
    listed = {int(i) for i in config.moe_layers}
    return {"moe_layers": [new for new, old in enumerate(keep) if old in listed]}


# keys re-indexed together with others they depend on: key -> (config, keep) -> every update
REINDEX_WITH_CONFIG: dict[str, Callable[[Any, list[int]], dict[str, Any]]] = {
    "mlp_only_layers": _dense_blocks,
    "moe_layers": _moe_blocks,
}


def names_blocks(values: Any, depth: int) -> bool:
    """Whether a list names blocks (increasing block indices, e.g. Zamba 2's hybrid_layer_ids) rather than giving each
    block a value (e.g. a head count per block)."""
    return (isinstance(values, (list, tuple)) and bool(values) and all(type(x) is int for x in values)
            and list(values) == sorted(set(values)) and all(0 <= x < depth for x in values))


def block_index_lists(raw: Mapping[str, Any], depth: int) -> list[str]:
    """The config keys that list blocks by index (their names speak of layers or blocks: token ids are lists of small
    integers too)."""
    return [k for k, v in raw.items() if ("layer" in k or "block" in k) and names_blocks(v, depth)]


def _listed(value: Any, keep: list[int]) -> list[int]:
    """A list of block indices: the kept ones, renumbered."""
    listed = {int(i) for i in value}
    return [new for new, old in enumerate(keep) if old in listed]


def depth_counts(raw: Mapping[str, Any], depth: int) -> list[str]:
    """The config keys whose value is the depth, by their names a count of layers (not first_k_dense_replace,
    num_nextn_predict_layers or max_window_layers, which only equal the depth by chance)."""
    return [k for k, v in raw.items() if type(v) is int and v == depth and ("layer" in k or "depth" in k)
            and not k.startswith(("first", "num_nextn", "max"))]


def _run_lengths(types: list[str]) -> list[list[Any]]:
    """GPT-Neo's `attention_types` format for an explicit per-block list: [[[type], run length], ...]."""
    runs: list[list[Any]] = []
    for t in types:
        if runs and runs[-1][0] == [t]:
            runs[-1][1] += 1
        else:
            runs.append([[t], 1])
    return runs


def refuse_unknown_lists(raw: dict[str, Any], keys: tuple[str, ...], num_layers: int) -> None:
    """Refuse a config.json that holds a list with one entry per block that is not among `keys`: writing it
    unchanged would silently give kept blocks the settings of the removed ones."""
    known = {*keys, "architectures", *(("attention_types",) if "attention_layers" in keys else ())}
    unknown = [k for k, v in raw.items() if isinstance(v, list) and len(v) == num_layers and k not in known
               and num_layers > 1]
    if unknown:
        raise NormSurgeryError(f"config.json holds {', '.join(unknown)} with one entry per block, which normsurgery does "
                               f"not know how to re-index for a {raw.get('model_type')} model; nothing was written. "
                               "Please report it (a family lists such keys in normsurgery/arch/families.py, per_layer).")


def pruned_config_updates(config: Any, keys: tuple[str, ...], num_layers_key: str, keep: list[int],
                          follow_depth: bool = False) -> dict[str, Any]:
    """The config.json changes for a model keeping blocks `keep` (old indices, in order) of `config`'s (the
    transformers config, whose defaults and patterns are expanded); a composite config's go into its language
    model's sub-config. With `follow_depth` (a traced family, whose depth key the tracer may not have told apart
    from another count equal to it, e.g. Whisper's decoder_layers and encoder_layers), every layer count equal to
    the depth follows it, as the tracer's tiny instance cut them."""
    from normsurgery.arch.composite import text_view

    view = text_view(config)
    if view is not config:
        sub = view.to_dict()
        depth_key = dict(getattr(type(getattr(config, view.text_key)), "attribute_map", {}) or {}).get(
            "num_hidden_layers", "num_hidden_layers")
        return {view.text_key: {**sub, **pruned_config_updates(view, keys, depth_key, keep, follow_depth)}}
    num_layers = int(config.num_hidden_layers)
    updates: dict[str, Any] = {num_layers_key: len(keep)}
    if follow_depth and hasattr(config, "to_dict"):
        updates.update({k: len(keep) for k in depth_counts(config.to_dict(), num_layers)})
    stored_values: dict[str, Any] = {}  # a traced family's keys as config.json holds them (read once, when needed)
    for key in keys:
        value = getattr(config, key, None)
        if value is None:
            continue
        if key in REINDEX_WITH_CONFIG:
            updates.update(REINDEX_WITH_CONFIG[key](config, keep))
            continue
        if key not in REINDEX and names_blocks(value, num_layers) and key in block_index_lists({key: value},
                                                                                              num_layers):
            updates[key] = _listed(value, keep)  # a traced family's list of block indices
            continue
        if isinstance(value, (list, tuple)) and len(value) != num_layers:
            raise NormSurgeryError(f"config {key} has {len(value)} entries for {num_layers} blocks; fix config.json "
                                   "before pruning.")
        if key not in REINDEX and not stored_values and hasattr(config, "to_dict"):
            stored_values.update(config.to_dict())
        stored = stored_values.get(key, value)
        if key not in REINDEX and isinstance(stored, Mapping):  # settings by block index (a traced family's key)
            by_index = {int(i): v for i, v in stored.items()}
            updates[key] = {str(new): by_index[old] for new, old in enumerate(keep) if old in by_index}
            continue
        reindex = REINDEX.get(key, _per_block)  # a traced family's keys: any list with one entry per block
        if key not in REINDEX and not isinstance(value, (list, tuple)):
            raise NormSurgeryError(f"config {key} is not a list with one entry per block; normsurgery does not know "
                                   "how to re-index it.")
        updates[key] = reindex(list(value) if isinstance(value, (list, tuple)) else value, keep)
        if key == "attention_layers":
            updates["attention_types"] = _run_lengths(updates[key])
    return updates
