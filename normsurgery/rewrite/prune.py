"""Depth pruning: drop whole blocks, renumber the rest, re-index the per-block config.

Nothing is computed: the kept blocks' tensors are copied under their new indices, so the output is the original
model with the removed blocks skipped, exactly (the verification runs the original that way). A stock class
loads it, and rebuilds each layer's cache index from its position.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from normsurgery.arch import raw_key
from normsurgery.arch.layer_config import pruned_config_updates, refuse_unknown_lists
from normsurgery.arch.spec import Architecture
from normsurgery.errors import NormSurgeryError
from normsurgery.rewrite.plan import Plan, Step


def check_indices(count: int, blocks: list[int]) -> None:
    """A clear error for block indices that do not exist or repeat (whole blocks or sub-layers alike)."""
    bad = [i for i in blocks if not 0 <= i < count]
    if bad:
        raise NormSurgeryError(f"block(s) {', '.join(map(str, bad))} do not exist: this model has blocks 0..{count - 1}.")
    if len(set(blocks)) != len(blocks):
        raise NormSurgeryError(f"--layers names a block twice ({', '.join(map(str, blocks))}).")


def check_removal(arch: Architecture, remove: list[int]) -> list[int]:
    """The blocks to remove, sorted, or a clear error for indices that do not name a removable set."""
    count = arch.num_layers
    check_indices(count, remove)
    if not remove:
        raise NormSurgeryError("no block to remove: pass --remove K (K >= 1) or --layers.")
    if len(remove) >= count:
        raise NormSurgeryError(f"cannot remove {len(remove)} of {count} blocks: at least one must stay.")
    if "prune" in dict(arch.refused):
        raise NormSurgeryError(f"pruning this {arch.model_type} model is refused: {dict(arch.refused)['prune']}. "
                               "Nothing was written.")
    if arch.depth_dependent:
        raise NormSurgeryError(f"this model sets {', '.join(arch.depth_dependent)}, so each block computes with its own "
                               "index and removing one would change the others; pruning is refused.")
    return sorted(remove)


def plan_prune(arch: Architecture, raw: dict[str, Any], names: list[str], remove: list[int]) -> Plan:
    """Drop the blocks `remove` (0-based) from a checkpoint holding tensors `names`, rename the later blocks'
    tensors, re-index the config (`raw`: config.json; the per-block entries are re-indexed from the transformers
    config once it is built)."""
    remove = check_removal(arch, remove)
    refuse_unknown_lists(raw, arch.per_layer, arch.num_layers)
    keep = [b.index for b in arch.blocks if b.index not in remove]
    plan = Plan(operation="prune", skipped_blocks=tuple(remove))
    new_prefix = {old: arch.blocks[new].prefix for new, old in enumerate(keep)}
    by_prefix = {b.prefix: b.index for b in arch.blocks}
    for name in names:
        block = next((by_prefix[p] for p in by_prefix if name.startswith(p)), None)
        if block is None:
            continue
        if block in remove:
            plan.dropped.add(name)
        elif new_prefix[block] != arch.blocks[block].prefix:
            plan.renames[name] = new_prefix[block] + name[len(arch.blocks[block].prefix):]
    for name, axis in arch.per_block_slices:
        if name in names:
            plan.steps.append(Step(f"keep the kept blocks' slices of {name}", (name,),
                                   partial(_kept_slices, name=name, axis=axis, depth=arch.num_layers, keep=keep)))
    depth_key = next((k for k in dict(arch.config_keys).get("num_hidden_layers", ()) if k in raw), None)
    plan.config_updates_from = partial(pruned_config_updates, keys=arch.per_layer,
                                       num_layers_key=depth_key or raw_key(raw, "num_hidden_layers"), keep=keep,
                                       follow_depth=arch.origin == "traced")
    if arch.origin == "traced":
        plan.config_updates_from = partial(_same_kinds, plan.config_updates_from, keep=keep)
    return plan


def _kept_slices(inputs: dict[str, Any], name: str, axis: int, depth: int, keep: list[int]) -> dict[str, Any]:
    """A tensor holding one slice per block along `axis` (Family.per_block_slices), with the kept blocks' slices."""
    import torch

    tensor = inputs[name]
    if tensor.shape[axis] % depth:
        raise NormSurgeryError(f"{name} has {tensor.shape[axis]} entries along axis {axis}, not a multiple of the "
                               f"{depth} blocks its architecture gives one slice each; nothing was written.")
    sliced = tensor.unflatten(axis, (depth, -1)).index_select(axis, torch.tensor(keep))
    return {name: sliced.flatten(axis, axis + 1)}


def _same_kinds(updates_from: Callable[[Any], dict[str, Any]], config: Any, keep: list[int]) -> dict[str, Any]:
    """The config updates of a traced family's prune, checked: every kept block keeps its kind of block (a config
    rule by block index that the updates do not re-index would give a kept block another kind's modules)."""
    from normsurgery.adapt.signature import config_signatures

    updates = updates_from(config)
    remote = bool(getattr(config, "auto_map", None))
    try:
        pruned = type(config).from_dict({**config.to_dict(), **updates})
        before = config_signatures(config, remote)
        same = config_signatures(pruned, remote) == [before[i] for i in keep]
    except Exception as err:  # the pruned config does not build a model
        raise NormSurgeryError(f"the pruned {config.model_type} config does not build a model ({type(err).__name__}: "
                               f"{err}); nothing was written.") from None
    if not same:
        raise NormSurgeryError(
            f"removing these blocks would change the kind of a kept {config.model_type} block (its config chooses "
            "each block's kind by a rule on block indices that normsurgery cannot re-index for a traced model type); "
            "nothing was written. Remove other blocks, or declare the family with its per-block keys.")
    return updates

