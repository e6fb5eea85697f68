"""`normsurgery adapt MODEL_TYPE`: draft a family declaration by tracing a tiny random model, then prove it.

The draft is trusted only when tracing found nothing it cannot express and every proof check passes; a model type
that already has a family is also compared with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from normsurgery.adapt.draft import Draft
from normsurgery.arch.spec import Architecture, Family

if TYPE_CHECKING:  # the proof imports torch; this package is imported by normsurgery's light top level
    from normsurgery.adapt.prove import Check

__all__ = ["Adapted", "adapt", "differences"]


@dataclass
class Adapted:
    """A drafted declaration, its source text, and the proof."""

    draft: Draft
    source: str
    family: Family | None = None  # the rendered declaration, evaluated (what the proof ran on)
    checks: list[Check] = field(default_factory=list)
    declared_as: str | None = None  # the existing family of this model type, if any
    differs_from_declared: list[str] = field(default_factory=list)

    @property
    def proven(self) -> bool:
        """Whether the draft can be trusted: nothing left unexpressed and every check passed."""
        return not self.draft.problems and bool(self.checks) and all(c.passed for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for --json."""
        return {"model_type": self.draft.model_type, "proven": self.proven, "declaration": self.source,
                "problems": self.draft.problems, "notes": self.draft.notes,
                "checks": [c.as_dict() for c in self.checks], "declared_as": self.declared_as,
                "differs_from_declared": self.differs_from_declared}


def _tensor_sets(arch: Architecture) -> dict[str, set[str]]:
    """The tensor names an architecture gives each part of the residual picture."""
    norms = arch.all_norms()
    return {
        "norms": {f"{n.name} ({n.role})" for n in norms},
        "readers": {f"{n.name} -> {r.weight}" for n in norms for r in n.readers},
        "writers": {w.weight for b in arch.blocks for w in b.writers},
        "direct readers": {r.weight for b in arch.blocks for r in b.direct_readers},
        "embeddings": {t for t in (arch.token_embedding, arch.position_embedding) if t},
        "unembedding": set(arch.unembed.tensors()),
        "biases": {t for n in norms for t in n.tensors() if t.endswith("bias")}
        | {t for b in arch.blocks for w in b.writers for t in w.tensors()[1:]},
    }


def differences(drafted: Architecture, declared: Architecture) -> list[str]:
    """Where two architectures of the same model name different tensors (compared as sets), or differ in facts."""
    out = []
    a, b = _tensor_sets(drafted), _tensor_sets(declared)
    for part in a:
        extra, missing = sorted(a[part] - b[part]), sorted(b[part] - a[part])
        if extra or missing:
            out.append(f"{part}: drafted only {extra[:3]}, declared only {missing[:3]}")
    for fact in ("tied", "post_ln", "position_offset", "key_renames"):
        if getattr(drafted, fact) != getattr(declared, fact):
            out.append(f"{fact}: drafted {getattr(drafted, fact)!r}, declared {getattr(declared, fact)!r}")
    facts = [(n.kind, n.eps, n.gain_offset) for n in drafted.all_norms() if n.role != "qk"][:1]
    if facts != [(n.kind, n.eps, n.gain_offset) for n in declared.all_norms() if n.role != "qk"][:1]:
        out.append("norm kind, eps or gain offset differ")
    if any(x.parallel for x in drafted.blocks) != any(x.parallel for x in declared.blocks):
        out.append("parallel attention+MLP differs")
    return out


def _layout(draft: Draft) -> dict[str, set[str]]:
    """What a flag may change in a draft: its norms and their roles, readers, writers, and block facts."""
    return {
        "norms": {f"{n.path} ({n.role})" for n in draft.norms},
        "readers": {f"{n.path} -> {r.path}" for n in draft.norms for r in n.readers},
        "writers": {w.path for w in draft.writers},
        "direct readers": {r.path for r in draft.direct_readers},
        "block": ({"parallel attention+MLP"} if draft.parallel else set()) | ({"Post-LN"} if draft.post_ln else set()),
    }


def _variants(draft: Draft, layers: int, overrides: dict[str, Any] | None) -> list[str]:
    """For each boolean config flag that changes the layout when flipped, what it changes (the draft covers the
    tiny config's setting only; a family declares both with `when=` flags or a block function)."""
    from normsurgery.adapt.discover import draft_family, flags
    from normsurgery.errors import NormSurgeryError

    base = _layout(draft)
    notes = []
    for key, value in flags(draft.config).items():
        if "bias" in key:  # linked to the biases they switch
            continue
        try:
            other = draft_family(draft.model_type, layers=layers, overrides={**(overrides or {}), key: not value},
                                 explore=False)
        except NormSurgeryError:  # a flag the config or the model refuses to flip
            continue
        if other.problems:
            notes.append(f"with {key}={not value}: the drafter cannot express it ({other.problems[0]})")
            continue
        changes = []
        for part, now in _layout(other).items():
            added, removed = sorted(now - base[part]), sorted(base[part] - now)
            for sign, names in (("+", added), ("-", removed)):
                if names:
                    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                    changes.append(f"{sign}{part} {shown}")
        if changes:
            notes.append(f"with {key}={not value}: {'; '.join(changes)}")
    return notes


def adapt(model_type: str, *, layers: int = 2, overrides: dict[str, Any] | None = None) -> Adapted:
    """Draft `model_type`'s declaration, render it, note the layout variants its config flags select, and prove
    it unless tracing already found a problem."""
    from normsurgery.adapt.discover import draft_family
    from normsurgery.adapt.prove import prove
    from normsurgery.adapt.render import evaluate, render
    from normsurgery.arch import FAMILY_BY_MODEL_TYPE

    draft = draft_family(model_type, layers=layers, overrides=overrides)
    result = Adapted(draft, render(draft) if draft.layers and draft.token_embedding else "")  # a start for a hand edit
    if not draft.problems:
        draft.notes.extend(_variants(draft, layers, overrides))
    if draft.problems:
        return result
    if draft.layouts:  # blocks of several kinds: the proof runs on the traced kinds, the text is a start
        family = result.family = draft.family()
        draft.notes.append(f"blocks of {len(draft.layouts)} kinds: the text shows block 0's layout; normsurgery "
                           "traces this model type at run time, or declare a block function by hand")
    else:
        try:
            family = result.family = evaluate(result.source, model_type)  # the proof runs on the text to paste
        except Exception as err:  # a renderer bug: the text to paste must not be trusted
            from normsurgery.adapt.prove import Check

            result.checks = [Check("declaration text", False, f"{type(err).__name__}: {err}")]
            return result
    result.checks = prove(family, draft.config)
    existing = FAMILY_BY_MODEL_TYPE.get(model_type)
    if existing is not None:
        result.declared_as = existing.name
        result.differs_from_declared = differences(family.resolve(draft.config), existing.resolve(draft.config))
    return result
