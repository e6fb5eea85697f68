"""Fold norm gains and biases into the linear layers that read them; the model stays its stock class.

After folding, each folded norm computes the bare normalisation (gain 1, or 0 for (1 + w) gains).
A norm bias moves into its readers' biases when every reader has one; otherwise it stays in the norm
as b / g (exact), since the stock class has nowhere else to hold it.
"""

from __future__ import annotations

import torch

from normsurgery.arch.facts import foldable_norms
from normsurgery.arch.spec import Architecture, Norm
from normsurgery.errors import NormSurgeryError
from normsurgery.rewrite.center import norm_step_inputs, reader_source
from normsurgery.rewrite.maths import effective_gain, fold_into_reader
from normsurgery.rewrite.plan import Plan, Step

Tensor = torch.Tensor

# Below this, dividing the bias by the gain would lose precision or overflow.
MIN_GAIN_FOR_BIAS = 1e-6


def _fold_step(norm: Norm, arch: Architecture, untie_from: str | None) -> Step:
    """One norm and all its readers; `untie_from` names the embedding a tied unembedding shares."""
    bias_to_readers = norm.bias is None or all(r.bias is not None for r in norm.readers)

    def compute(t: dict[str, Tensor]) -> dict[str, Tensor]:
        gain = effective_gain(t.get(norm.weight) if norm.weight else None, norm.gain_offset, arch.hidden_size)
        d = gain.shape[0]  # the residual width, or a latent's (DeepSeek's q_a_layernorm)
        bias = t.get(norm.bias) if norm.bias else None
        out: dict[str, Tensor] = {}
        for r in norm.readers:
            weight = t[reader_source(r, arch, untie_from)]
            w, c = fold_into_reader(
                weight, t[r.bias] if r.bias else None, gain, bias if bias_to_readers else None, conv1d=r.conv1d
            )
            out[r.weight] = w
            if r.bias:
                out[r.bias] = c
        if norm.weight:
            out[norm.weight] = torch.full((d,), 1.0 - norm.gain_offset, dtype=torch.float64)
        if norm.bias:
            if bias_to_readers:
                out[norm.bias] = torch.zeros(d, dtype=torch.float64)
            else:
                if gain.abs().min() < MIN_GAIN_FOR_BIAS:
                    raise NormSurgeryError(
                        f"cannot fold {norm.name}: a reader has no bias to take the norm's bias, and a gain is "
                        f"~0 (|g| = {gain.abs().min().item():.2g}), so the bias cannot stay in the norm as b/g. "
                        "Use `convert --to rmsnorm`, whose exported code adds the missing biases."
                    )
                out[norm.bias] = bias.to(torch.float64) / gain
        return out

    return Step(label=f"fold {norm.name}", inputs=norm_step_inputs(norm, arch, untie_from), compute=compute)


def plan_fold(arch: Architecture) -> Plan:
    """Fold every norm whose output feeds only linear layers; list the norms that stay and why."""
    foldable = set(foldable_norms(arch))
    if not foldable:
        raise NormSurgeryError(
            f"nothing to fold in this {arch.family} model: no norm feeds only linear layers (its norms sit on "
            "the residual stream or on sublayer outputs). `normsurgery inspect` shows the placement."
        )
    plan = Plan(operation="fold")
    for norm in arch.all_norms():
        if norm.role == "qk":
            continue
        if norm.name not in foldable:
            what = {"output": "normalises a sublayer output before the residual add",
                    "residual": "normalises the residual stream itself (Post-LN)",
                    "embedding": "normalises the embeddings, which the residual carries"}[norm.role]
            plan.kept.append(f"{norm.name}: {what}")
            continue
        untie = arch.token_embedding if (arch.tied and norm is arch.final_norm) else None
        plan.steps.append(_fold_step(norm, arch, untie))
        plan.folded.append(norm.name)
        if norm.bias and any(r.bias is None for r in norm.readers):
            plan.kept.append(f"{norm.name}: bias kept in the norm as b/g (a reader has no bias)")
    if arch.tied and arch.final_norm is not None and arch.final_norm.name in foldable:
        plan.config_updates["tie_word_embeddings"] = False
    return plan
