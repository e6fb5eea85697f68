"""The residual-stream picture of a decoder, as templates (per family) and as resolved tensor names (per model).

A family declares, relative to one block, which norms exist, which linears read each norm's output
(its readers), which linears write into the residual stream (writers), and the model-level pieces
(embeddings, final norm, unembedding). `Family.resolve(config)` turns that into an `Architecture`
that names every tensor of a concrete checkpoint; the rewrites only ever see an `Architecture`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal, Union

NormKind = Literal["layernorm", "rmsnorm"]
# input: Pre-LN norm read by a sublayer; output: sandwich/Peri-LN norm on a sublayer's output before the add;
# residual: Post-LN norm applied to the residual stream after the add; embedding: norm on the embeddings;
# final: the norm before the unembedding; qk: per-head norm inside attention (not on the residual).
# latent: a norm inside attention on a low-rank latent (DeepSeek's q_a_layernorm, kv_a_layernorm), read by linears
# but not on the residual: it folds into its readers and is left alone by centering
NormRole = Literal["input", "output", "residual", "embedding", "final", "qk", "latent"]

Config = Any  # a transformers PretrainedConfig
Flag = Union[bool, str, Callable[[Config], bool]]  # constant, config attribute name, or predicate
Count = Union[int, str, Callable[[Config], int]]  # a constant, a config attribute name, or a function of the config
DEFAULT_GROUP = "all"  # the reader group of a reader that declares none (LinearSlot.groups)


def flag(value: Flag, config: Config) -> bool:
    """Evaluate a declared flag against a config: a bool, a config attribute name, or a predicate."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return bool(getattr(config, value, False))
    return bool(value(config))


def count(value: Count, config: Config) -> int:
    """Evaluate a declared count (e.g. of experts) against a config."""
    if isinstance(value, int):
        return value
    return int(getattr(config, value) if isinstance(value, str) else value(config))


# ---------------------------------------------------------------- templates (declared per family)


@dataclass(frozen=True)
class LinearSlot:
    """A linear layer relative to a block (or to the model root): `path` is the module path."""

    path: str
    bias: Flag = False
    conv1d: bool = False  # HF Conv1D (GPT-2) stores the weight as (in, out)
    when: Flag = True  # whether the layer exists in this config
    # for a norm's reader: the path each slice (equal unless `widths`) of its output serves, ("qk",) for q_proj,
    # ("v",) for v_proj, ("qk", "qk", "v") for GPT-2's fused c_attn; () when the reader has one path (LN removal
    # freezes each path of an input norm on its own schedule, Baroni et al.)
    groups: tuple[str, ...] = ()
    # the `groups` slices' relative output widths where they differ, e.g. in heads (H, KV, KV) for Phi-3's GQA qkv_proj
    widths: tuple[int, ...] = ()
    # routed experts: the number of experts. With "{e}" in `path`, one 2D linear per expert (the hub's per-expert
    # tensors); without, one stacked tensor of all experts, weight (E, out, in) or (E, in, out) with `conv1d`, or
    # those flattened to 2D (DBRX's (E * out, in)), which every rewrite of a reader's or writer's rows or columns
    # takes as one linear
    experts: Count | None = None
    # the stored tensor names below `path`: ("weight", "bias") for a module, or gpt-oss's stacked experts'
    # ("gate_up_proj", "gate_up_proj_bias") on the experts module
    names: tuple[str, str] = ("weight", "bias")
    # per-expert linears that transformers fuses at load into one stacked parameter (its name relative to the block):
    # each expert's linears sharing it concatenated along their outputs in declaration order, the experts stacked
    loaded: str | None = None
    router: bool = False  # a router: its output chooses the experts (read by a norm like the experts themselves)


@dataclass(frozen=True)
class NormSlot:
    """A norm relative to a block; `readers` are the linears that read its output (empty for output norms)."""

    path: str
    role: NormRole = "input"
    readers: tuple[LinearSlot, ...] = ()
    when: Flag = True
    has_bias: Flag | None = None  # None: LayerNorms have a bias, RMSNorms do not
    has_weight: Flag = True  # False for a norm without a gain (OLMo's non-parametric LayerNorm)
    eps: float | None = None  # this norm's eps where it is not the family's (DeepSeek's latent norms keep 1e-6)


@dataclass(frozen=True)
class BlockLayout:
    """One decoder block: its norms, its writers, and whether attention and MLP read the same residual."""

    norms: tuple[NormSlot, ...]
    writers: tuple[LinearSlot, ...]
    parallel: bool = False
    direct_readers: tuple[LinearSlot, ...] = ()  # linears reading the residual without a norm (OLMo2)
    # other tensors of a block (names relative to it), neither norms nor linears, which every rewrite leaves alone
    # and prune renumbers with their block: e.g. Apertus's xIELU activation parameters
    others: tuple[str, ...] = ()
    # module attributes (paths relative to the block) that hold the residual width and that the stock forward
    # reshapes by, set to d-1 at load when CRMSNorm stores the residual in d-1 coordinates: DBRX's experts module
    width_attributes: tuple[str, ...] = ()
    # parameters (in memory, relative to the block) that transformers concatenates at load from stored tensors (in
    # `others`), e.g. OLMo-hybrid's conv1d from q_conv1d, k_conv1d and v_conv1d: for the engine, which reads them
    concatenated: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # stored tensors (relative to the block) that transformers splits at load into several parameters (in memory,
    # relative to the block; rows in this order), e.g. Sarvam-MoE's attention.query_key_value into self_attn.q_proj,
    # k_proj and v_proj: the declaration names the stored tensor, and the engine reads each parameter's rows of it
    split: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class Family:
    """Everything normsurgery knows about one model family, declared once."""

    name: str
    model_types: tuple[str, ...]
    layers: str  # module path of the block list, e.g. "model.layers"
    norm_kind: NormKind
    eps: Callable[[Config], float]
    token_embedding: str
    # one layout for every block, or a function of the config giving it, or one layout per block (MoE models whose
    # first blocks, or listed blocks, have a dense MLP)
    block: BlockLayout | Callable[[Config], BlockLayout | tuple[BlockLayout, ...]]
    final_norm: NormSlot | None
    unembed: LinearSlot
    position_embedding: str | None = None
    position_offset: int = 0  # OPT stores 2 unused rows before position 0
    # the module path of positions added to the residual from a formula (XGLM's sinusoids), held by no tensor: no
    # rewrite of the weights can centre them, so rmsnorm and crmsnorm have the exported code centre (and compress) the
    # module's output, and the trained rewrites, which centre the weights only, refuse a LayerNorm model with them
    computed_positions: str | None = None
    embedding_norm: NormSlot | None = None
    gain_offset: float = 0.0  # 1.0 when the effective gain is (1 + w) (Gemma 1-3)
    embed_scale: Callable[[Config], float] | None = None  # Gemma multiplies embeddings by sqrt(d)
    extra: tuple[LinearSlot, ...] = ()  # other model-level linears (OPT project_in/out)
    post_ln: Flag = False  # Post-LN: norms applied to the residual after each add
    # on-disk -> in-memory name changes transformers applies to stock classes only (regex -> replacement);
    # exported modeling code must pass them to from_pretrained itself
    key_renames: tuple[tuple[str, str], ...] = ()
    # attribute -> the config.json keys transformers reads it from, first present wins (its `attribute_map`
    # and legacy keys such as BLOOM's n_embed), so that config.json is read without transformers (ConfigView)
    config_keys: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # config attributes that hold one value per block (or are derived from block indices), re-indexed when
    # blocks are removed; normsurgery/arch/layer_config.py knows each one's format
    per_layer: tuple[str, ...] = ("layer_types",)
    # the per_layer attributes the transformers config class fills in when config.json lacks them (a class default
    # or a list expanded from a pattern): only these need transformers to be read (ConfigView); tested against
    # transformers for every family
    per_layer_filled: tuple[str, ...] = ()
    # config flags under which a block's computation depends on its index (removing one changes the others)
    depth_dependent: tuple[str, ...] = ()
    # module paths (regexes) whose parameters model code reads outside their own forward, in their parent's: the
    # bounded-memory engine brings them in for the parent's forward (DBRX's experts module reads its child's w1, v1
    # and w2; Llama 4 moves its input to the token embedding's device before embedding it); "REGEX@N" for code N
    # levels up (Gemma 4's model reads its language model's embedding: a traced family finds it)
    streamed_by_parent: tuple[str, ...] = ()
    notes: str = ""
    # "declared" (written in families.py and reviewed) or "traced" (derived at run time by tracing a tiny instance
    # of the model's config and proven on it; see normsurgery/adapt/runtime.py)
    origin: str = "declared"
    refused: tuple[tuple[str, str], ...] = ()  # operations a traced declaration's proof refused, and why
    # model-level tensors outside the language model that no text forward reads (a composite model's vision or
    # audio tower and its projector), which every rewrite leaves alone
    others: tuple[str, ...] = ()
    # model-level tensors (as stored) whose size along an axis is the depth times a per-block width, block i reading
    # the i-th slice only (Gemma 4's per-block input embeddings and their projection): pruning keeps the kept
    # blocks' slices; (tensor name, axis)
    per_block_slices: tuple[tuple[str, int], ...] = ()

    def resolve(self, config: Config) -> "Architecture":
        """Name every tensor of a model with this config (a composite config: of its language model)."""
        from normsurgery.arch.composite import text_view

        config = text_view(config)
        layouts = self.block(config) if callable(self.block) else self.block
        num_layers = int(config.num_hidden_layers)
        if isinstance(layouts, BlockLayout):
            layouts = (layouts,) * num_layers
        eps = float(self.eps(config))
        fused: dict[str, list[list[str]]] = {}

        def linear(slot: LinearSlot, prefix: str) -> tuple[Linear, ...]:
            if not flag(slot.when, config):
                return ()
            weight, bias = slot.names
            has_bias = flag(slot.bias, config)

            def made(base: str, experts: int = 0) -> Linear:
                return Linear(f"{base}.{weight}", f"{base}.{bias}" if has_bias else None, slot.conv1d, slot.groups,
                              slot.widths, experts, slot.router)

            if slot.experts is None:
                return (made(f"{prefix}{slot.path}"),)
            experts = count(slot.experts, config)
            if "{e}" not in slot.path:
                return (made(f"{prefix}{slot.path}", experts),)
            per_expert = tuple(made(f"{prefix}{slot.path.format(e=e)}") for e in range(experts))
            if slot.loaded:  # keyed by the in-memory name: the block's prefix renamed, the loaded path as it is
                parts = fused.setdefault(f"{_renamed(prefix, self.key_renames)}{slot.loaded}",
                                         [[] for _ in range(experts)])
                for e, lin in enumerate(per_expert):
                    parts[e].append(lin.weight)
            return per_expert

        def linears(slots: tuple[LinearSlot, ...], prefix: str) -> tuple[Linear, ...]:
            return tuple(x for s in slots for x in linear(s, prefix))

        def norm(slot: NormSlot | None, prefix: str, readers: tuple[Linear, ...] | None = None) -> Norm | None:
            if slot is None or not flag(slot.when, config):
                return None
            base = f"{prefix}{slot.path}"
            has_bias = self.norm_kind == "layernorm" if slot.has_bias is None else flag(slot.has_bias, config)
            return Norm(
                name=base,
                weight=f"{base}.weight" if flag(slot.has_weight, config) else None,
                bias=f"{base}.bias" if has_bias else None,
                kind=self.norm_kind,
                eps=eps if slot.eps is None else slot.eps,
                gain_offset=self.gain_offset,
                role=slot.role,
                readers=linears(slot.readers, prefix) if readers is None else readers,
            )

        if len(layouts) != num_layers:
            raise ValueError(f"{self.name}: {len(layouts)} block layouts for {num_layers} blocks")
        blocks = []
        concatenated: dict[str, tuple[str, ...]] = {}
        split: dict[str, tuple[str, ...]] = {}
        for i, layout in enumerate(layouts):
            prefix = f"{self.layers}.{i}."
            loaded = _renamed(prefix, self.key_renames)  # the block's in-memory prefix
            concatenated.update({f"{loaded}{m}": tuple(f"{prefix}{p}" for p in parts)
                                 for m, parts in layout.concatenated})
            split.update({f"{prefix}{t}": tuple(f"{loaded}{p}" for p in parts) for t, parts in layout.split})
            norms = tuple(n for n in (norm(s, prefix) for s in layout.norms) if n is not None)
            slots = layout.writers + tuple(r for n in layout.norms for r in n.readers)
            experts = max((count(x.experts, config) for x in slots if x.experts and flag(x.when, config)), default=0)
            blocks.append(
                Block(
                    index=i,
                    prefix=prefix,
                    norms=norms,
                    writers=linears(layout.writers, prefix),
                    direct_readers=linears(layout.direct_readers, prefix),
                    parallel=layout.parallel,
                    others=tuple(f"{prefix}{t}" for t in layout.others),
                    experts=experts,
                    width_attributes=tuple(f"{prefix}{a}" for a in layout.width_attributes),
                )
            )
        tied = bool(getattr(config, "tie_word_embeddings", False))
        unembed, = linear(self.unembed, "")
        final = norm(self.final_norm, "", readers=(unembed,)) if self.final_norm else None
        return Architecture(
            family=self.name,
            model_type=str(config.model_type),
            hidden_size=int(config.hidden_size),
            num_layers=num_layers,
            vocab_size=int(config.vocab_size),
            token_embedding=f"{self.token_embedding}.weight",
            position_embedding=f"{self.position_embedding}.weight" if self.position_embedding else None,
            position_offset=self.position_offset,
            computed_positions=self.computed_positions,
            embedding_norm=norm(self.embedding_norm, ""),
            embed_scale=float(self.embed_scale(config)) if self.embed_scale else 1.0,
            blocks=tuple(blocks),
            final_norm=final,
            unembed=unembed,
            tied=tied,
            extra=linears(self.extra, ""),
            post_ln=flag(self.post_ln, config),
            key_renames=dict(self.key_renames),
            fused={name: tuple(map(tuple, parts)) for name, parts in fused.items()},
            concatenated=concatenated,
            split=split,
            per_layer=self.per_layer,
            depth_dependent=tuple(k for k in self.depth_dependent if flag(k, config)),
            origin=self.origin,
            refused=self.refused,
            config_keys=self.config_keys,
            others=self.others,
            per_block_slices=self.per_block_slices,
        )


def _renamed(name: str, renames: Iterable[tuple[str, str]]) -> str:
    """A stored tensor name as transformers names it in memory (the family's key renames, in order)."""
    for pattern, replacement in renames:
        name = re.sub(pattern, replacement, name)
    return name


# ---------------------------------------------------------------- resolved (per model)


@dataclass(frozen=True)
class Linear:
    """A linear layer's tensors. Weight layout is (out, in), or (in, out) when `conv1d`."""

    weight: str
    bias: str | None
    conv1d: bool = False
    groups: tuple[str, ...] = ()  # the path each slice of the output serves (see LinearSlot)
    widths: tuple[int, ...] = ()  # the slices' relative widths where they differ; () for equal slices
    experts: int = 0  # a stacked tensor of this many experts: weight (E, out, in), or (E, in, out) when `conv1d`
    router: bool = False  # see LinearSlot.router

    def tensors(self) -> tuple[str, ...]:
        """The tensor names this layer owns."""
        return (self.weight,) + ((self.bias,) if self.bias else ())

    def group_slices(self, out_features: int) -> list[tuple[str, slice]]:
        """Each output slice and the group it serves (one DEFAULT_GROUP slice for a reader that declares none)."""
        groups = self.groups or (DEFAULT_GROUP,)
        widths = self.widths or (1,) * len(groups)
        unit, rest = divmod(out_features, sum(widths))
        if len(widths) != len(groups) or rest:
            raise ValueError(f"{self.weight}: relative widths {widths} do not split {out_features} outputs")
        starts = [unit * sum(widths[:i]) for i in range(len(widths))]
        return [(g, slice(s, s + unit * w)) for g, s, w in zip(groups, starts, widths)]


@dataclass(frozen=True)
class Norm:
    """A norm's tensors and the facts a rewrite needs: kind, eps, (1 + w) offset, role, readers."""

    name: str
    weight: str | None
    bias: str | None
    kind: NormKind
    eps: float
    gain_offset: float
    role: NormRole
    readers: tuple[Linear, ...] = ()

    def tensors(self) -> tuple[str, ...]:
        """The tensor names this norm owns (not its readers')."""
        return tuple(t for t in (self.weight, self.bias) if t)


def reader_groups(norm: Norm) -> list[str]:
    """The groups a norm's readers declare, in order of first appearance (DEFAULT_GROUP for readers that declare
    none): the paths LN removal freezes apart, and those an inert stock norm serves."""
    seen: list[str] = []
    for reader in norm.readers:
        for group in reader.groups or (DEFAULT_GROUP,):
            if group not in seen:
                seen.append(group)
    return seen or [DEFAULT_GROUP]


@dataclass(frozen=True)
class Block:
    """One resolved decoder block."""

    index: int
    prefix: str
    norms: tuple[Norm, ...]
    writers: tuple[Linear, ...]
    direct_readers: tuple[Linear, ...] = ()
    parallel: bool = False
    others: tuple[str, ...] = ()  # tensor names (see BlockLayout.others)
    experts: int = 0  # routed experts of a mixture-of-experts block; 0 for a dense one
    width_attributes: tuple[str, ...] = ()  # module attribute names (see BlockLayout.width_attributes)

    def norms_with_role(self, role: NormRole) -> tuple[Norm, ...]:
        """This block's norms of one role."""
        return tuple(n for n in self.norms if n.role == role)


@dataclass(frozen=True)
class Architecture:
    """The residual-stream picture of one concrete model: every tensor named and given a role."""

    family: str
    model_type: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    token_embedding: str
    position_embedding: str | None
    position_offset: int
    embedding_norm: Norm | None
    embed_scale: float
    blocks: tuple[Block, ...]
    final_norm: Norm | None
    unembed: Linear
    tied: bool
    extra: tuple[Linear, ...] = ()
    post_ln: bool = False
    key_renames: dict[str, str] = field(default_factory=dict)
    # in-memory stacked expert parameters transformers builds at load -> for each expert, the stored tensors
    # concatenated along their outputs (LinearSlot.loaded)
    fused: dict[str, tuple[tuple[str, ...], ...]] = field(default_factory=dict)
    # in-memory parameters transformers concatenates at load from stored tensors (BlockLayout.concatenated)
    concatenated: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # stored tensors transformers splits at load -> the in-memory parameters, rows in order (BlockLayout.split)
    split: dict[str, tuple[str, ...]] = field(default_factory=dict)
    per_layer: tuple[str, ...] = ()
    depth_dependent: tuple[str, ...] = ()  # the family's index-dependent flags that are on in this config
    computed_positions: str | None = None  # see Family.computed_positions
    origin: str = "declared"  # see Family.origin
    refused: tuple[tuple[str, str], ...] = ()  # see Family.refused
    config_keys: tuple[tuple[str, tuple[str, ...]], ...] = ()  # see Family.config_keys
    others: tuple[str, ...] = ()  # see Family.others
    per_block_slices: tuple[tuple[str, int], ...] = ()  # see Family.per_block_slices
    _roles: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def all_norms(self) -> list[Norm]:
        """Every norm in model order: embedding norm, block norms, final norm."""
        out = [self.embedding_norm] if self.embedding_norm else []
        for b in self.blocks:
            out.extend(b.norms)
        if self.final_norm:
            out.append(self.final_norm)
        return out

    def block_path(self, index: int) -> str:
        """The in-memory module path of block `index`."""
        return self.module_path(self.blocks[index].prefix.rstrip("."))

    def module_path(self, name: str) -> str:
        """The in-memory path of a module named as the checkpoint stores it (`key_renames` applied)."""
        return _renamed(name + ".", self.key_renames.items())[:-1]

    def stacked(self, linear: Linear) -> bool:
        """Whether `linear` is routed experts held in one stacked parameter, as stored or once transformers loads it."""
        return linear.experts > 0 or any(linear.weight in parts for experts in self.fused.values() for parts in experts)

    def as_loaded(self) -> "Architecture":
        """This model with its tensors named and shaped as stock transformers holds them in memory (`key_renames`
        applied, per-expert tensors stacked as `fused` says): the layout of a checkpoint saved from a loaded model's
        state dict, which transformers loads as it is."""
        def name(tensor: str) -> str:
            return _renamed(tensor, self.key_renames.items())

        owner = {part: stacked for stacked, experts in self.fused.items() for parts in experts for part in parts}

        def linears(group: tuple[Linear, ...]) -> tuple[Linear, ...]:
            out: list[Linear] = []
            for lin in group:
                stacked = owner.get(lin.weight)
                if stacked is None:
                    out.append(replace(lin, weight=name(lin.weight), bias=name(lin.bias) if lin.bias else None))
                elif all(x.weight != stacked for x in out):
                    out.append(Linear(stacked, None, experts=len(self.fused[stacked])))
            return tuple(out)

        def norm(n: Norm | None, readers: tuple[Linear, ...] | None = None) -> Norm | None:
            if n is None:
                return None
            return replace(n, name=name(n.name + ".").rstrip("."), weight=name(n.weight) if n.weight else None,
                           bias=name(n.bias) if n.bias else None, readers=linears(n.readers) if readers is None else readers)

        blocks = tuple(replace(b, norms=tuple(norm(n) for n in b.norms), writers=linears(b.writers),
                               direct_readers=linears(b.direct_readers), others=tuple(map(name, b.others)))
                       for b in self.blocks)
        unembed, = linears((self.unembed,))
        return replace(self, token_embedding=name(self.token_embedding),
                       position_embedding=name(self.position_embedding) if self.position_embedding else None,
                       embedding_norm=norm(self.embedding_norm), blocks=blocks,
                       final_norm=norm(self.final_norm, (unembed,)), unembed=unembed, extra=linears(self.extra),
                       others=tuple(map(name, self.others)),
                       per_block_slices=tuple((name(t), axis) for t, axis in self.per_block_slices),
                       key_renames={}, fused={}, _roles={})

    def roles(self) -> dict[str, str]:
        """Map every tensor name this model's checkpoint should hold to its role in the residual picture."""
        if self._roles:
            return self._roles
        roles: dict[str, str] = {self.token_embedding: "token_embedding"}
        if self.position_embedding:
            roles[self.position_embedding] = "position_embedding"
        for n in self.all_norms():
            for t in n.tensors():
                roles[t] = f"{n.role}_norm"
            for r in n.readers:
                for t in r.tensors():
                    roles.setdefault(t, "reader")
        for b in self.blocks:
            for w in b.writers:
                for t in w.tensors():
                    roles[t] = "writer"
            for r in b.direct_readers:
                for t in r.tensors():
                    roles[t] = "direct_reader"
            for t in b.others:
                roles[t] = "block_other"
        for x in self.extra:
            for t in x.tensors():
                roles[t] = "projection"
        for t in self.others:
            roles[t] = "model_other"
        if self.tied:
            roles.pop(self.unembed.weight, None)
            if self.unembed.bias:
                roles[self.unembed.bias] = "unembedding"
        else:
            for t in self.unembed.tensors():
                roles[t] = "unembedding"
        self._roles.update(roles)
        return roles
