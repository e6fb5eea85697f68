"""The drafted declaration of a family: what tracing found, as data that builds a `Family` and renders as source."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Union

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
    names: tuple[str, str] = ("weight", "bias")  # the stored tensors below `path` (a parameter of a module that is
    # not a linear layer, e.g. a router's weight or an experts module's stacked gate_up_proj)
    experts: int = 0  # routed experts held stacked (`path` without {e}) or one tensor each (`path` with {e})
    loaded: str | None = None  # per-expert tensors that transformers stacks at load into this parameter

    def depends_on_config(self) -> bool:
        """Whether the slot needs the config to be built (its widths or repetition follow head counts)."""
        return isinstance(self.repeat, str) or any(isinstance(w, str) for w in self.widths)

    def slot(self, config: Any) -> LinearSlot:
        """The declaration's slot for this config."""
        def value(w: Width) -> int:
            return int(getattr(config, w)) if isinstance(w, str) else w

        return LinearSlot(self.path, bias=self.bias, conv1d=self.conv1d, groups=self.groups * value(self.repeat),
                          widths=tuple(value(w) for w in self.widths) * value(self.repeat) if self.widths else (),
                          experts=self.experts or None, names=self.names, loaded=self.loaded)


@dataclass(frozen=True)
class NormDraft:
    """A norm found by tracing, its role and its readers."""

    path: str
    role: NormRole
    readers: tuple[LinDraft, ...] = ()
    has_weight: bool = True
    has_bias: bool = False


@dataclass(frozen=True)
class LayoutDraft:
    """One kind of block: its norms, writers, linears reading the residual without a norm, and other tensors."""

    norms: tuple[NormDraft, ...] = ()
    writers: tuple[LinDraft, ...] = ()
    direct_readers: tuple[LinDraft, ...] = ()
    parallel: bool = False
    others: tuple[str, ...] = ()
    concatenated: tuple[tuple[str, tuple[str, ...]], ...] = ()  # see BlockLayout.concatenated
    split: tuple[tuple[str, tuple[str, ...]], ...] = ()  # see BlockLayout.split

    def slot(self, config: Any, kind: NormKind) -> BlockLayout:
        """The block layout for a config."""
        def norm(n: NormDraft) -> NormSlot:
            return _norm_slot(n, kind, tuple(r.slot(config) for r in n.readers))

        return BlockLayout(norms=tuple(norm(n) for n in self.norms), writers=tuple(w.slot(config) for w in self.writers),
                           parallel=self.parallel, direct_readers=tuple(r.slot(config) for r in self.direct_readers),
                           others=self.others, concatenated=self.concatenated, split=self.split)


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
    streamed_by_parent: tuple[str, ...] = ()  # regexes of modules whose parameters their parent's code reads
    per_layer: tuple[str, ...] = ("layer_types",)  # config keys with one value per block (re-indexed by prune)
    concatenated: tuple[tuple[str, tuple[str, ...]], ...] = ()  # block 0's (LayoutDraft.concatenated)
    split: tuple[tuple[str, tuple[str, ...]], ...] = ()  # block 0's (LayoutDraft.split)
    model_others: tuple[str, ...] = ()  # model-level tensors off the residual stream (a vision tower, side linears)
    per_block_slices: tuple[tuple[str, int], ...] = ()  # see Family.per_block_slices
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unconverted: tuple[str, ...] = ()  # parameters no stored tensor explains (discover._unconverted), not cached
    # blocks of several kinds (dense and MoE, attention and SSM mixers): one layout per kind, the structural
    # signature of each (module paths and classes below the block, see adapt.signature), and `kinds`, which gives a
    # config's blocks their kind indices; empty when every block has the layout above
    layouts: tuple[LayoutDraft, ...] = ()
    signatures: tuple[str, ...] = ()
    kinds: Callable[[Any], list[int]] | None = None

    @property
    def layout(self) -> LayoutDraft:
        """Block 0's layout (every block's, unless `layouts` lists several kinds)."""
        return LayoutDraft(self.norms, self.writers, self.direct_readers, self.parallel, self.others,
                           self.concatenated, self.split)

    def block(self, config: Any) -> BlockLayout | tuple[BlockLayout, ...]:
        """The block layout for a config, or one per block when blocks differ."""
        if len(self.layouts) <= 1:
            return self.layout.slot(config, self.norm_kind)
        if self.kinds is None:
            raise ValueError(f"{self.model_type}: blocks of {len(self.layouts)} kinds and no way to tell them apart")
        slots = [layout.slot(config, self.norm_kind) for layout in self.layouts]
        return tuple(slots[k] for k in self.kinds(config))

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
            streamed_by_parent=self.streamed_by_parent,
            per_layer=self.per_layer,
            others=self.model_others,
            per_block_slices=self.per_block_slices,
            origin="traced",
        )


def _norm_slot(n: NormDraft, kind: NormKind, readers: tuple[LinearSlot, ...]) -> NormSlot:
    """A norm's slot; has_bias is declared only where it differs from the kind's default (LayerNorms have one)."""
    default_bias = kind == "layernorm"
    return NormSlot(n.path, role=n.role, readers=readers, has_weight=n.has_weight,
                    has_bias=None if n.has_bias == default_bias else n.has_bias)


def _lin_from(data: dict[str, Any]) -> LinDraft:
    """A LinDraft from its JSON form (tuples were written as lists)."""
    return LinDraft(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _norm_from(data: dict[str, Any] | None) -> NormDraft | None:
    """A NormDraft from its JSON form."""
    if data is None:
        return None
    return NormDraft(**{**data, "readers": tuple(_lin_from(r) for r in data["readers"])})


def _layout_from(data: dict[str, Any]) -> LayoutDraft:
    """A LayoutDraft from its JSON form."""
    return LayoutDraft(norms=tuple(_norm_from(n) for n in data["norms"]),  # type: ignore[misc]
                       writers=tuple(_lin_from(w) for w in data["writers"]),
                       direct_readers=tuple(_lin_from(r) for r in data["direct_readers"]),
                       parallel=data["parallel"], others=tuple(data["others"]),
                       concatenated=tuple((m, tuple(p)) for m, p in data["concatenated"]),
                       split=tuple((t, tuple(p)) for t, p in data.get("split", ())))


def draft_to_json(draft: Draft) -> dict[str, Any]:
    """A proven draft as plain data (for the cache of traced families); the config is not kept."""
    from dataclasses import asdict

    skip = {"config", "kinds", "notes", "problems", "unconverted", "norms", "writers", "direct_readers", "parallel",
            "others", "concatenated", "split"}
    data = {k: asdict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in vars(draft).items() if k not in skip}
    data["layout"] = asdict(draft.layout)
    data["layouts"] = [asdict(layout) for layout in draft.layouts]
    data["embedding_norm"] = asdict(draft.embedding_norm) if draft.embedding_norm else None
    data["final_norm"] = asdict(draft.final_norm) if draft.final_norm else None
    return data


def draft_from_json(data: dict[str, Any], config: Any) -> Draft:
    """The draft `draft_to_json` wrote, for a model of `config` (its kinds of block found again by signature)."""
    layout = _layout_from(data["layout"])
    draft = Draft(
        model_type=data["model_type"], config=config, layers=data["layers"], norm_kind=data["norm_kind"],
        eps=data["eps"], eps_attr=data["eps_attr"], gain_offset=data["gain_offset"],
        token_embedding=data["token_embedding"], position_embedding=data["position_embedding"],
        position_offset=data["position_offset"], embedding_norm=_norm_from(data["embedding_norm"]),
        embed_sqrt_d=data["embed_sqrt_d"], norms=layout.norms, writers=layout.writers,
        direct_readers=layout.direct_readers, parallel=layout.parallel, others=layout.others,
        concatenated=layout.concatenated, split=layout.split,
        final_norm=_norm_from(data["final_norm"]), unembed=_lin_from(data["unembed"]), post_ln=data["post_ln"],
        key_renames=tuple(tuple(x) for x in data["key_renames"]),  # type: ignore[misc]
        config_keys=tuple((a, tuple(k)) for a, k in data["config_keys"]),
        streamed_by_parent=tuple(data["streamed_by_parent"]), per_layer=tuple(data["per_layer"]),
        model_others=tuple(data["model_others"]),
        per_block_slices=tuple((name, int(axis)) for name, axis in data.get("per_block_slices", ())),
        layouts=tuple(_layout_from(x) for x in data["layouts"]), signatures=tuple(data["signatures"]))
    return draft
