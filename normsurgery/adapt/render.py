"""A `Draft` as source text in the style of normsurgery/arch/families.py, ready to paste there."""

from __future__ import annotations

import json

from normsurgery.adapt.draft import Draft, LinDraft, NormDraft, Width
from normsurgery.arch.spec import Family


def _py(value: object) -> str:
    """A constant as source, strings in double quotes (the style of families.py)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple):
        inner = ", ".join(_py(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return repr(value)


def _width(w: Width) -> str:
    """A width or repetition: a literal, or the config attribute it follows."""
    return f"c.{w}" if isinstance(w, str) else str(w)


def _lin(lin: LinDraft) -> str:
    """A `Lin(...)` expression."""
    args = [_py(lin.path)]
    if lin.bias is not False:
        args.append(f"bias={_py(lin.bias)}")
    if lin.conv1d:
        args.append("conv1d=True")
    times = "" if lin.repeat == 1 else f" * {_width(lin.repeat)}"
    if lin.groups:
        args.append(f"groups={_py(lin.groups)}{times}")
    if lin.widths:
        args.append(f"widths=({', '.join(_width(w) for w in lin.widths)}){times}")
    if lin.experts:
        args.append(f"experts={lin.experts}")
    if lin.names != ("weight", "bias"):
        args.append(f"names={_py(lin.names)}")
    if lin.loaded:
        args.append(f"loaded={_py(lin.loaded)}")
    return f"Lin({', '.join(args)})"


def _norm(norm: NormDraft, kind: str, indent: str) -> str:
    """A `NormAt(...)` expression."""
    args = [_py(norm.path)]
    if norm.role != "input":
        args.append(f"role={_py(norm.role)}")
    if norm.readers:
        inner = f",\n{indent}    ".join(_lin(r) for r in norm.readers)
        args.append(f"readers=(\n{indent}    {inner},\n{indent})")
    if not norm.has_weight:
        args.append("has_weight=False")
    if norm.has_bias != (kind == "layernorm"):
        args.append(f"has_bias={norm.has_bias}")
    return f"NormAt({', '.join(args)})"


def _block(draft: Draft, indent: str) -> str:
    """A `BlockLayout(...)` expression."""
    i2, i3 = indent + "    ", indent + "        "
    lines = ["BlockLayout(", f"{i2}norms=("]
    lines += [f"{i3}{_norm(n, draft.norm_kind, i3)}," for n in draft.norms]
    lines.append(f"{i2}),")
    for name, linears in (("writers", draft.writers), ("direct_readers", draft.direct_readers)):
        if linears or name == "writers":
            lines += [f"{i2}{name}=(", *(f"{i3}{_lin(x)}," for x in linears), f"{i2}),"]
    if draft.parallel:
        lines.append(f"{i2}parallel=True,")
    if draft.others:
        lines.append(f"{i2}others={_py(draft.others)},")
    lines.append(f"{indent})")
    return "\n".join(lines)


def constant_name(model_type: str) -> str:
    """The module-level name a declaration is assigned to, e.g. GPT_NEOX."""
    return model_type.upper().replace("-", "_")


def render(draft: Draft) -> str:
    """The drafted declaration: a `Family(...)` assignment (and a block function when widths follow the config)."""
    const = constant_name(draft.model_type)
    out: list[str] = []
    needs_config = any(r.depends_on_config() for n in draft.norms for r in n.readers)
    if needs_config:
        out += [f"def _{draft.model_type}_block(c: Config) -> BlockLayout:",
                f'    """{draft.model_type}: fused projections whose slices follow the head counts."""',
                f"    return {_block(draft, '    ')}", "", ""]
    eps = f"_attr({_py(draft.eps_attr)})" if draft.eps_attr else f"lambda c: {draft.eps!r}"
    fields = [
        f"name={_py(draft.model_type)}",
        f"model_types={_py((draft.model_type,))}",
        f"layers={_py(draft.layers)}",
        f"norm_kind={_py(draft.norm_kind)}",
        f"eps={eps}",
        f"token_embedding={_py(draft.token_embedding)}",
    ]
    if draft.position_embedding:
        fields.append(f"position_embedding={_py(draft.position_embedding)}")
    if draft.position_offset:
        fields.append(f"position_offset={draft.position_offset}")
    if draft.embedding_norm:
        fields.append(f"embedding_norm={_norm(draft.embedding_norm, draft.norm_kind, '    ')}")
    fields.append(f"block=_{draft.model_type}_block" if needs_config else f"block={_block(draft, '    ')}")
    if draft.final_norm:
        fields.append(f"final_norm={_norm(draft.final_norm, draft.norm_kind, '    ')}")
    else:
        fields.append("final_norm=None")
    fields.append(f"unembed={_lin(draft.unembed)}")
    if draft.gain_offset:
        fields.append(f"gain_offset={draft.gain_offset}")
    if draft.embed_sqrt_d:
        fields.append("embed_scale=lambda c: math.sqrt(c.hidden_size)")
    if draft.post_ln:
        fields.append("post_ln=True")
    if draft.config_keys:
        fields.append(f"config_keys={_py(draft.config_keys)}")
    if draft.key_renames:
        renames = ", ".join(f'(r"{pattern}", {_py(to)})' for pattern, to in draft.key_renames)
        fields.append(f"key_renames=({renames},)")
    out.append(f"{const} = Family(")
    out += [f"    {f},{'  # the modules fix eps; the config has no field for it' if f.startswith('eps=lambda') else ''}"
            for f in fields]
    out.append(")")
    return "\n".join(out)


def evaluate(source: str, model_type: str) -> Family:
    """The Family a rendered declaration defines, evaluated where families.py would evaluate it (so that the proof
    runs on exactly the text that is pasted)."""
    from normsurgery.arch import families

    namespace = dict(vars(families))
    exec(compile(source, "<drafted declaration>", "exec"), namespace)  # our own rendered text
    return namespace[constant_name(model_type)]
