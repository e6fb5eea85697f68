"""Pre-LN LayerNorm -> Pre-RMSNorm or Pre-CRMSNorm, exactly: center every writer, then swap the norms.

In a Pre-LN model the residual is read only through norms and LN(x) = LN(Px), so making every writer
zero-mean (positions computed by a module, which no weight holds: its output, by the exported code) changes no norm
output (a routed expert's too: each expert's output centred, any router-weighted sum of
them is). On a zero-mean residual LN(x) = g * x / rms(x) + b, an RMSNorm whose bias folds into the readers, or
stays in the RMSNorm where a reader cannot take one (stacked routed experts). CRMSNorm also drops the residual's
last coordinate (minus the sum of the others), so readers absorb it and the norm adds (sum x)^2 back into the
mean square.
"""

from __future__ import annotations

from typing import Literal

import torch

from normsurgery.arch.facts import applicability, bias_kept, swapped_norms
from normsurgery.arch.spec import Architecture, Linear, Norm
from normsurgery.errors import NormSurgeryError
from normsurgery.rewrite.maths import (
    center_rows,
    center_writer,
    compress_reader,
    effective_gain,
    fold_into_reader,
)
from normsurgery.rewrite.plan import Plan, Step, Surgery, module_path

Tensor = torch.Tensor
Target = Literal["rmsnorm", "crmsnorm"]


def bias_name(linear: Linear) -> str:
    """The bias tensor name of a linear, existing or about to be added."""
    return linear.bias or linear.weight[: -len("weight")] + "bias"


def reader_source(reader: Linear, arch: Architecture, untie_from: str | None) -> str:
    """The tensor a reader's weight is read from: the token embedding when a tied unembedding is being untied."""
    return untie_from if (untie_from and reader.weight == arch.unembed.weight) else reader.weight


def norm_step_inputs(norm: Norm, arch: Architecture, untie_from: str | None) -> tuple[str, ...]:
    """What a step rewriting a norm and its readers reads: the norm's tensors, its readers' weights and biases."""
    inputs = list(norm.tensors())
    for r in norm.readers:
        inputs += [reader_source(r, arch, untie_from)] + ([r.bias] if r.bias else [])
    return tuple(dict.fromkeys(inputs))


def center_embedding_step(arch: Architecture, target: Target) -> Step:
    """Token embeddings: bake an embedding LayerNorm in (BLOOM), center, and drop the last coordinate for CRMS."""
    norm = arch.embedding_norm
    inputs = (arch.token_embedding,) + (norm.tensors() if norm else ())

    def compute(t: dict[str, Tensor]) -> dict[str, Tensor]:
        baked = None
        if norm:
            gain = effective_gain(t.get(norm.weight) if norm.weight else None, norm.gain_offset, arch.hidden_size)
            baked = (gain, t.get(norm.bias) if norm.bias else None, norm.eps)
        table = center_rows(t[arch.token_embedding], drop_last=target == "crmsnorm", layer_norm=baked)
        return {arch.token_embedding: table}

    return Step(f"center {arch.token_embedding}", inputs, compute)


def center_position_step(name: str, target: Target) -> Step:
    """Learned position embeddings: centre (and drop the last coordinate for CRMS)."""
    def compute(t: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: center_rows(t[name], drop_last=target == "crmsnorm")}

    return Step(f"center {name}", (name,), compute)


def center_writer_step(writer: Linear, target: Target) -> Step:
    """A linear that writes into the residual: centre its output (and drop the last coordinate for CRMS)."""
    def compute(t: dict[str, Tensor]) -> dict[str, Tensor]:
        w, c = center_writer(t[writer.weight], t[writer.bias] if writer.bias else None, conv1d=writer.conv1d,
                             drop_last=target == "crmsnorm")
        return {writer.weight: w, **({writer.bias: c} if writer.bias else {})}

    return Step(f"center {module_path(writer.weight)}", writer.tensors(), compute)


def _norm_step(norm: Norm, arch: Architecture, target: Target, untie_from: str | None, keep_bias: bool) -> Step:
    """A norm's readers: RMS keeps the gain in the norm and folds the bias (unless `keep_bias`); CRMS folds both
    and compresses."""
    def compute(t: dict[str, Tensor]) -> dict[str, Tensor]:
        bias = t.get(norm.bias) if norm.bias and not keep_bias else None
        gain = None
        if target == "crmsnorm":
            gain = effective_gain(t.get(norm.weight) if norm.weight else None, norm.gain_offset, arch.hidden_size)
        out: dict[str, Tensor] = {}
        for r in norm.readers:
            weight = t[reader_source(r, arch, untie_from)]
            # The bias shift W b uses the reader before compression; RMS keeps the gain in its norm.
            w, c = fold_into_reader(weight, t[r.bias] if r.bias else None, None, bias, conv1d=r.conv1d)
            if target == "crmsnorm":  # gain and compression in one float64 pass, rounded once
                w = compress_reader(weight, gain, conv1d=r.conv1d)
            out[r.weight] = w
            if c is not None:
                out[bias_name(r)] = c
        if target == "rmsnorm" and norm.weight:  # the RMSNorm's plain gain: (1 + w) for a (1 + w) norm (Nemotron)
            out[norm.weight] = effective_gain(t[norm.weight], norm.gain_offset, arch.hidden_size)
        if keep_bias:  # written by the step, so that a rewrite in memory puts it into the new RMSNorm too
            out[norm.bias] = t[norm.bias]
        return out

    return Step(f"{target} {norm.name}", norm_step_inputs(norm, arch, untie_from), compute)


def plan_center_swap(arch: Architecture, target: Target) -> Plan:
    """The full Pre-LN -> Pre-RMSNorm / Pre-CRMSNorm plan, with the module surgery the exported code applies."""
    verdict = next(a for a in applicability(arch) if a.operation == target)
    if not verdict.applies:
        raise NormSurgeryError(f"--to {target} does not apply to this {arch.family} model: {verdict.reason}.")
    plan = Plan(operation=target)
    d = arch.hidden_size
    norms: dict[str, dict] = {}
    add_bias: list[str] = []

    plan.steps.append(center_embedding_step(arch, target))
    if arch.embedding_norm:
        plan.dropped.update(arch.embedding_norm.tensors())
        norms[arch.embedding_norm.name] = {"kind": "identity"}
    if arch.position_embedding:
        plan.steps.append(center_position_step(arch.position_embedding, target))
    for block in arch.blocks:
        for writer in block.writers:
            plan.steps.append(center_writer_step(writer, target))
    for norm in swapped_norms(arch):
        untie = arch.token_embedding if (arch.tied and norm is arch.final_norm) else None
        keep_bias = target == "rmsnorm" and bias_kept(arch, norm)  # CRMS never gets here with one (facts)
        plan.steps.append(_norm_step(norm, arch, target, untie, keep_bias))
        plan.folded.append(norm.name)
        plan.dropped.update([norm.bias] if norm.bias and not keep_bias else [])
        if target == "crmsnorm" and norm.weight:
            plan.dropped.add(norm.weight)
        norms[norm.name] = {"kind": target, "eps": norm.eps, "dim": d, "affine": target == "rmsnorm" and norm.weight is not None}
        if keep_bias:
            norms[norm.name]["bias"] = True
        for r in norm.readers:
            if r.bias is None and norm.bias and not keep_bias:
                add_bias.append(module_path(r.weight))
    if arch.tied:
        plan.config_updates["tie_word_embeddings"] = False
    crms = target == "crmsnorm"
    # positions computed by a module (no tensor to centre): the exported code centres its output like a writer's
    centred = {arch.computed_positions: {"drop_last": crms}} if arch.computed_positions else {}
    plan.surgery = Surgery.of(target, arch, norms, add_bias, crms_resized(arch) if crms else [],
                              {a: d - 1 for b in arch.blocks for a in b.width_attributes} if crms else {}, centred)
    return plan


def crms_resized(arch: Architecture) -> list[str]:
    """The tensors whose residual dimension shrinks from d to d-1 under CRMS."""
    names = [arch.token_embedding] + ([arch.position_embedding] if arch.position_embedding else [])
    for block in arch.blocks:
        for w in block.writers:
            names += list(w.tensors())
    for norm in arch.all_norms():
        if norm.role in ("input", "final"):
            names += [r.weight for r in norm.readers]
    return names
