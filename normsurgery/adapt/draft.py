"""The drafted declaration of a family: what tracing found, as data that builds a `Family` and renders as source."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Union

from normsurgery.arch.spec import BlockLayout, Family, LinearSlot, NormKind, NormRole, NormSlot

Width = Union[int, str]  # a relative width: a constant, or a config attribute (a head count)


@dataclass(frozen=True)
class LinDraft:
    """A linear layer found by tracing; `bias` is a constant or the config attribute that switches it."""

    path: str
    bias: bool | str = False
    conv1d: bool = False
    groups: tuple[str, ...] = ()
    widths: tuple[Width, ...] = ()
    repeat: Width = 1  # the `groups` pattern repeats this many times (per head in Persimmon's fused projection)

    def depends_on_config(self) -> bool:
        """Whether the slot needs the config to be built (its widths or repetition follow head counts)."""
        return isinstance(self.repeat, str) or any(isinstance(w, str) for w in self.widths)

    def slot(self, config: Any) -> LinearSlot:
        """The declaration's slot for this config."""
        def value(w: Width) -> int:
            return int(getattr(config, w)) if isinstance(w, str) else w

        return LinearSlot(self.path, bias=self.bias, conv1d=self.conv1d, groups=self.groups * value(self.repeat),
                          widths=tuple(value(w) for w in self.widths) * value(self.repeat) if self.widths else ())


@dataclass(frozen=True)
class NormDraft:
    """A norm found by tracing, its role and its readers."""

    path: str
    role: NormRole
    readers: tuple[LinDraft, ...] = ()
    has_weight: bool = True
    has_bias: bool = False


@dataclass
class Draft:
    """Everything tracing found about a model type's residual stream; `problems` say why it cannot be trusted as is."""

    model_type: str
    config: Any  # the tiny transformers config it was found on
    layers: str = ""
    norm_kind: NormKind = "rmsnorm"
    eps: float = 1e-5
    eps_attr: str | None = None  # the config attribute holding eps, when one does
    gain_offset: float = 0.0
    token_embedding: str = ""
    position_embedding: str | None = None
    position_offset: int = 0
    embedding_norm: NormDraft | None = None
    embed_sqrt_d: bool = False
    norms: tuple[NormDraft, ...] = ()
    writers: tuple[LinDraft, ...] = ()
    direct_readers: tuple[LinDraft, ...] = ()
    parallel: bool = False
    others: tuple[str, ...] = ()
    final_norm: NormDraft | None = None
    unembed: LinDraft = LinDraft("lm_head")
    post_ln: bool = False
    key_renames: tuple[tuple[str, str], ...] = ()
    config_keys: tuple[tuple[str, tuple[str, ...]], ...] = ()  # attributes config.json holds under another key
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def block(self, config: Any) -> BlockLayout:
        """The block layout for a config."""
        def norm(n: NormDraft) -> NormSlot:
            return _norm_slot(n, self.norm_kind, tuple(r.slot(config) for r in n.readers))

        return BlockLayout(norms=tuple(norm(n) for n in self.norms), writers=tuple(w.slot(config) for w in self.writers),
                           parallel=self.parallel, direct_readers=tuple(r.slot(config) for r in self.direct_readers),
                           others=self.others)

    def family(self) -> Family:
        """The drafted declaration as a `Family` (not registered)."""
        eps_attr, eps = self.eps_attr, self.eps
        return Family(
            name=self.model_type,
            model_types=(self.model_type,),
            layers=self.layers,
            norm_kind=self.norm_kind,
            eps=(lambda c: getattr(c, eps_attr)) if eps_attr else (lambda c: eps),
            token_embedding=self.token_embedding,
            block=self.block,
            final_norm=_norm_slot(self.final_norm, self.norm_kind, ()) if self.final_norm else None,
            unembed=self.unembed.slot(self.config),
            position_embedding=self.position_embedding,
            position_offset=self.position_offset,
            embedding_norm=_norm_slot(self.embedding_norm, self.norm_kind, ()) if self.embedding_norm else None,
            gain_offset=self.gain_offset,
            embed_scale=(lambda c: math.sqrt(c.hidden_size)) if self.embed_sqrt_d else None,
            post_ln=self.post_ln,
            key_renames=self.key_renames,
            config_keys=self.config_keys,
        )


def _norm_slot(n: NormDraft, kind: NormKind, readers: tuple[LinearSlot, ...]) -> NormSlot:
    """A norm's slot; has_bias is declared only where it differs from the kind's default (LayerNorms have one)."""
    default_bias = kind == "layernorm"
    return NormSlot(n.path, role=n.role, readers=readers, has_weight=n.has_weight,
                    has_bias=None if n.has_bias == default_bias else n.has_bias)
