"""Normalization removal, the exact part: norms frozen to a fixed scale are linear, so they fold away.

A LayerNorm with its per-token std replaced by a constant s computes g * P x / s + b. With every writer
centred (exact in a Pre-LN model, see center.py) P x = x, so the norm is the affine map (g / s) x + b, which
folds into its readers like any gain and bias; an RMSNorm frozen the same way is g x / s. What is left
has no normalization at all: the exported code swaps each removed norm for an identity.
"""

from __future__ import annotations

import torch

from normsurgery.arch.spec import Architecture, Norm
from normsurgery.rewrite.center import (
    bias_name,
    center_embedding_step,
    center_position_step,
    center_writer_step,
    norm_step_inputs,
    reader_source,
)
from normsurgery.rewrite.maths import effective_gain, fold_into_reader
from normsurgery.rewrite.plan import Plan, Step, Surgery, module_path

Tensor = torch.Tensor


def frozen_norm_step(norm: Norm, arch: Architecture, scales: dict[str, float], untie_from: str | None) -> Step:
    """Fold a frozen norm's (g / s) and b into its readers, each output slice of a reader with the scale `s` of
    the group it serves (`Linear.group_slices`)."""
    def compute(t: dict[str, Tensor]) -> dict[str, Tensor]:
        gain = effective_gain(t.get(norm.weight) if norm.weight else None, norm.gain_offset, arch.hidden_size)
        gain = gain.to(torch.float64)
        bias = t.get(norm.bias) if norm.bias else None
        out: dict[str, Tensor] = {}
        for r in norm.readers:
            weight = t[reader_source(r, arch, untie_from)]
            parts = []
            for group, part in r.group_slices(weight.shape[1 if r.conv1d else 0]):  # each slice with its group's scale
                parts.append(fold_into_reader(weight[:, part] if r.conv1d else weight[part],
                                              t[r.bias][part] if r.bias else None, gain / scales[group], bias,
                                              conv1d=r.conv1d))
            if len(parts) == 1:
                w, c = parts[0]
            else:
                w = torch.cat([p[0] for p in parts], dim=1 if r.conv1d else 0)
                c = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
            out[r.weight] = w
            if c is not None:
                out[bias_name(r)] = c
        return out

    return Step(f"remove {norm.name}", norm_step_inputs(norm, arch, untie_from), compute)


def plan_remove_norms(arch: Architecture, scales: dict[str, dict[str, float]]) -> Plan:
    """The plan that folds every norm named in `scales` (frozen at one scale per reader group) away; LayerNorm
    models are centred first. The caller has checked that these are all the model's input and final norms."""
    plan = Plan(operation="none")
    if any(n.kind == "layernorm" and n.name in scales for n in arch.all_norms()):
        plan.steps.append(center_embedding_step(arch, "rmsnorm"))
        if arch.position_embedding:
            plan.steps.append(center_position_step(arch.position_embedding, "rmsnorm"))
        for block in arch.blocks:
            plan.steps += [center_writer_step(w, "rmsnorm") for w in block.writers]
    norms: dict[str, dict] = {}
    add_bias: list[str] = []
    for norm in arch.all_norms():
        if norm.name not in scales:
            continue
        untie = arch.token_embedding if (arch.tied and norm is arch.final_norm) else None
        plan.steps.append(frozen_norm_step(norm, arch, scales[norm.name], untie))
        plan.folded.append(norm.name)
        plan.dropped.update(norm.tensors())
        norms[norm.name] = {"kind": "identity"}
        add_bias += [module_path(r.weight) for r in norm.readers if r.bias is None and norm.bias]
    if arch.tied:
        plan.config_updates["tie_word_embeddings"] = False
    plan.surgery = Surgery.of("none", arch, norms, add_bias)
    return plan
