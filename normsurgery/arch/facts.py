"""What an `Architecture` is (norm placement) and which rewrites apply to it, with the reason when not.

These answers follow from the residual-stream picture alone, so `inspect` and every rewrite's
refusal share them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from normsurgery.arch.spec import Architecture, Linear, Norm

OPERATIONS: tuple[str, ...] = ("fold", "rmsnorm", "crmsnorm", "dyt", "none", "prune", "prune-sublayers")


@dataclass(frozen=True)
class Applicability:
    """Whether one operation applies, and why (or why not)."""

    operation: str
    applies: bool
    reason: str

    def as_dict(self) -> dict[str, object]:
        """Plain data for JSON output."""
        return asdict(self)


def norm_label(arch: Architecture) -> str:
    """The model's residual norm type, e.g. 'LayerNorm' or 'RMSNorm (1 + w)'."""
    norm = arch.all_norms()[0] if arch.all_norms() else None
    if norm is None:
        return "none"
    label = "LayerNorm" if norm.kind == "layernorm" else "RMSNorm"
    return f"{label} (1 + w)" if norm.gain_offset else label


def has_output_norms(arch: Architecture) -> bool:
    """Whether sublayer outputs are normalised before the residual add (sandwich / Peri-LN, OLMo2)."""
    return any(b.norms_with_role("output") for b in arch.blocks)


def has_direct_readers(arch: Architecture) -> bool:
    """Whether some linear reads the residual stream without a norm in between (OLMo2, Post-LN)."""
    return any(b.direct_readers for b in arch.blocks)


def has_qk_norm(arch: Architecture) -> bool:
    """Whether attention normalises queries and keys (left alone by every rewrite)."""
    return any(b.norms_with_role("qk") for b in arch.blocks)


def has_experts(arch: Architecture) -> bool:
    """Whether some block routes tokens to experts (a mixture-of-experts MLP)."""
    return any(b.experts for b in arch.blocks)


# why the trainable norm rewrites (dyt, derf, none) refuse a mixture-of-experts model
EXPERTS_FUSED = ("its routed experts are stacked parameters inside one experts module in transformers, which the exported "
                 "code cannot give biases, resize or bind reader by reader")


def swapped_norms(arch: Architecture) -> list[Norm]:
    """The norms rmsnorm and crmsnorm replace: each block's Pre-LN input norms and the final norm."""
    swap = [n for b in arch.blocks for n in b.norms_with_role("input")]
    return swap + ([arch.final_norm] if arch.final_norm else [])


def unbiasable_readers(arch: Architecture, norm: Norm) -> list[Linear]:
    """The readers of `norm` with no bias that cannot be given one: routed experts held in one stacked parameter,
    whose stock forward adds none (so a norm bias cannot fold into them)."""
    return [r for r in norm.readers if r.bias is None and arch.stacked(r)]


def bias_kept(arch: Architecture, norm: Norm) -> bool:
    """Whether the RMSNorm replacing `norm` keeps its bias, because some reader cannot take it (see above)."""
    return norm.bias is not None and bool(unbiasable_readers(arch, norm))


def crms_bias_problem(arch: Architecture) -> str | None:
    """Why CRMSNorm cannot be exact for this model's norm biases, or None: it must fold each bias into the readers,
    and some reader cannot take one."""
    norm = next((n for n in swapped_norms(arch) if bias_kept(arch, n)), None)
    if norm is None:
        return None
    readers = unbiasable_readers(arch, norm)
    return (f"CRMSNorm must fold each LayerNorm bias into the linears that read the norm (a norm over the d-1 stored "
            f"coordinates cannot add a d-dimensional bias), and {norm.name} is read by routed experts "
            f"({readers[0].weight.rsplit('.', 1)[0]} and {len(readers) - 1} more) that transformers holds in one "
            "stacked parameter without a bias, which its stock experts forward has no place to add; rmsnorm applies "
            "(its RMSNorm keeps the bias)")


# why the trained rewrites (dyt, derf and none centre a LayerNorm model's weights first) refuse one whose positions are
# computed; rmsnorm and crmsnorm apply, their exported code centring the positions (Family.computed_positions)
POSITIONS_COMPUTED = ("its position encodings are computed (sinusoids added to the residual by a formula, not stored "
                      "as a tensor), so no rewrite of the weights can make the residual zero-mean, which calibrating "
                      "and training the stand-ins of its LayerNorms needs; fold, rmsnorm and crmsnorm (whose exported "
                      "code centres the computed positions) and prune apply")


def is_parallel(arch: Architecture) -> bool:
    """Whether attention and MLP read the same residual (GPT-J, NeoX, Falcon, Phi)."""
    return any(b.parallel for b in arch.blocks)


def placement(arch: Architecture) -> str:
    """Where the norms sit: Pre-LN, Post-LN, Peri-LN (sandwich), or output-only (OLMo2), with 'parallel' noted."""
    if arch.post_ln:
        base = "Post-LN"
    elif has_output_norms(arch) and has_direct_readers(arch):
        base = "Post-sublayer (norms on sublayer outputs only)"
    elif has_output_norms(arch):
        base = "Peri-LN (sandwich)"
    else:
        base = "Pre-LN"
    return f"{base}, parallel attention+MLP" if is_parallel(arch) else base


def is_pre_ln(arch: Architecture) -> bool:
    """True when the residual is read only through norms (the condition for exact centering)."""
    return not (arch.post_ln or has_output_norms(arch) or has_direct_readers(arch))


def foldable_norms(arch: Architecture) -> list[str]:
    """Norms whose output feeds only linear layers, so their gain and bias fold into those layers."""
    return [n.name for n in arch.all_norms() if n.readers and n.role in ("input", "final", "latent")]


def applicability(arch: Architecture) -> list[Applicability]:
    """For each operation, whether it applies to this architecture and why."""
    pre_ln = is_pre_ln(arch)
    layernorm = norm_label(arch).startswith("LayerNorm")
    not_pre_ln = (
        f"the model is {placement(arch)}: the residual stream is not read only through norms, "
        "so centering it would change the outputs"
    )
    out: list[Applicability] = []

    folds = foldable_norms(arch)
    all_norms = [n for n in arch.all_norms() if n.role != "qk"]
    if not folds:
        out.append(Applicability("fold", False, f"no norm feeds only linear layers ({placement(arch)})"))
    elif len(folds) < len(all_norms):
        left = len(all_norms) - len(folds)
        out.append(Applicability("fold", True, f"{len(folds)} norms fold; {left} (output/residual/embedding norms) stay"))
    else:
        out.append(Applicability("fold", True, f"all {len(folds)} norms fold into their readers"))

    if not layernorm:
        out.append(Applicability("rmsnorm", False, "already RMSNorm: nothing to do"))
        out.append(
            Applicability(
                "crmsnorm",
                False,
                "CRMSNorm needs a zero-mean residual, which only LayerNorm models guarantee; "
                "centering an RMSNorm model's residual changes its outputs",
            )
        )
    elif not pre_ln:
        out.append(Applicability("rmsnorm", False, not_pre_ln))
        out.append(Applicability("crmsnorm", False, not_pre_ln))
    else:
        kept = sum(bias_kept(arch, n) for n in swapped_norms(arch))
        rms = "Pre-LN LayerNorm: exact after centering the writers"
        rms += " (each routed expert's output too)" if has_experts(arch) else ""
        rms += f"; {kept} norms read by routed experts keep their bias" if kept else ""
        computed = arch.computed_positions
        positions = f"; the exported code centres the positions {computed} computes" if computed else ""
        out.append(Applicability("rmsnorm", True, rms + positions))
        problem = crms_bias_problem(arch)
        crms = f"Pre-LN LayerNorm: exact with the residual stored in d-1 dimensions{positions}"
        out.append(Applicability("crmsnorm", problem is None, problem or crms))

    residual_others = [n.name for n in arch.all_norms() if n.role not in ("input", "final", "qk")]
    if has_experts(arch):
        out.append(Applicability("dyt", False, f"a mixture-of-experts model: {EXPERTS_FUSED}"))
        out.append(Applicability("none", False, f"a mixture-of-experts model: {EXPERTS_FUSED}"))
    elif arch.computed_positions and layernorm:
        out.append(Applicability("dyt", False, POSITIONS_COMPUTED))
        out.append(Applicability("none", False, POSITIONS_COMPUTED))
    elif arch.post_ln:
        out.append(Applicability("dyt", False, "Post-LN norms act on the residual itself; DyT/Derf swaps need Pre-LN"))
        out.append(Applicability("none", False, "Post-LN norms cannot be frozen to a fixed scale without changing the function"))
    elif residual_others:  # what trainable.stand_ins.removable_norms refuses
        why = (f"{residual_others[0]} is not a Pre-LN input norm or the final norm (a sandwich, Peri-LN or embedding "
               "norm), which {} cannot handle")
        out.append(Applicability("dyt", False, why.format("a DyT/Derf swap")))
        out.append(Applicability("none", False, why.format("LN removal")))
    else:
        out.append(Applicability("dyt", True, f"element-wise swap of {norm_label(arch)} for DyT/Derf, then a short heal"))
        if pre_ln:
            out.append(Applicability("none", True, "norms frozen to calibrated fixed scales one at a time, then folded"))
        else:
            out.append(Applicability("none", False, f"{placement(arch)}: output norms would remain; LN removal needs Pre-LN"))

    if arch.num_layers > 1:
        out.append(Applicability("prune", True, f"{arch.num_layers} blocks; up to {arch.num_layers - 1} can be removed"))
    else:
        out.append(Applicability("prune", False, "a single block cannot be pruned"))
    out.append(_sublayer_applicability(arch))
    refused = dict(arch.refused)
    return [Applicability(a.operation, False, refused[a.operation]) if a.applies and a.operation in refused else a
            for a in out]


def _sublayer_applicability(arch: Architecture) -> Applicability:
    """Whether `prune --what attention|mlp` applies: blocks with separate sub-layers, more than one of them."""
    from normsurgery.rewrite.sublayers import sublayer_problem

    problem = sublayer_problem(arch)
    if problem is not None:
        return Applicability("prune-sublayers", False, f"{problem}: prune --what attention|mlp needs sequential blocks")
    if arch.num_layers < 2:
        return Applicability("prune-sublayers", False, "a single block's attention or MLP cannot be pruned")
    return Applicability("prune-sublayers", True, "prune --what attention|mlp: sequential blocks, each sub-layer "
                                                  "removable on its own")
