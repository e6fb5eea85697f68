"""One declaration per model family: where its norms, readers and writers are. Add a family here.

Paths are module paths (tensor names without `.weight`/`.bias`), relative to one block for block
layouts and to the model root otherwise. Biases are declared as constants, config attribute names
or predicates, never guessed from shapes.
"""

from __future__ import annotations

import math
from typing import Callable

from normsurgery.arch.spec import BlockLayout, Config, Count, Family, LinearSlot as Lin, NormKind, NormSlot as NormAt


def _qkv(path: str, bias: object = False) -> tuple[Lin, ...]:
    """Separate q, k and v projections (`path` with {p} for the letter): q and k on the attention-pattern path."""
    return tuple(Lin(path.format(p=p), bias=bias, groups=("v",) if p == "v" else ("qk",)) for p in "qkv")


def _attr(name: str, default: float | None = None):
    """A config reader for an eps-like attribute."""
    return lambda c: getattr(c, name) if default is None else getattr(c, name, default)


# ------------------------------------------------------------------ LayerNorm, sequential Pre-LN

GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    config_keys=(("hidden_size", ("n_embd",)), ("num_hidden_layers", ("n_layer",))),
    depth_dependent=("scale_attn_by_inverse_layer_idx",),
    layers="transformer.h",
    norm_kind="layernorm",
    eps=_attr("layer_norm_epsilon"),
    token_embedding="transformer.wte",
    position_embedding="transformer.wpe",
    block=BlockLayout(
        norms=(
            NormAt("ln_1", readers=(Lin("attn.c_attn", bias=True, conv1d=True, groups=("qk", "qk", "v")),)),
            NormAt("ln_2", readers=(Lin("mlp.c_fc", bias=True, conv1d=True),)),
        ),
        writers=(Lin("attn.c_proj", bias=True, conv1d=True), Lin("mlp.c_proj", bias=True, conv1d=True)),
    ),
    final_norm=NormAt("transformer.ln_f", role="final"),
    unembed=Lin("lm_head"),
)

GPT_NEO = Family(
    name="gpt_neo",
    model_types=("gpt_neo",),
    config_keys=(("num_hidden_layers", ("num_layers",)),),
    per_layer=("attention_layers",),
    per_layer_filled=("attention_layers",),  # expanded from attention_types
    layers="transformer.h",
    norm_kind="layernorm",
    eps=_attr("layer_norm_epsilon"),
    token_embedding="transformer.wte",
    position_embedding="transformer.wpe",
    block=BlockLayout(
        norms=(
            NormAt("ln_1", readers=_qkv("attn.attention.{p}_proj")),
            NormAt("ln_2", readers=(Lin("mlp.c_fc", bias=True),)),
        ),
        writers=(Lin("attn.attention.out_proj", bias=True), Lin("mlp.c_proj", bias=True)),
    ),
    final_norm=NormAt("transformer.ln_f", role="final"),
    unembed=Lin("lm_head"),
)


def _opt_block(c: Config) -> BlockLayout:
    """OPT: Pre-LN unless `do_layer_norm_before` is false (OPT-350m), where the norms follow each add."""
    qkv = _qkv("self_attn.{p}_proj", bias="enable_bias")
    fc1 = Lin("fc1", bias="enable_bias")
    writers = (Lin("self_attn.out_proj", bias="enable_bias"), Lin("fc2", bias="enable_bias"))
    if c.do_layer_norm_before:
        return BlockLayout(
            norms=(NormAt("self_attn_layer_norm", readers=qkv), NormAt("final_layer_norm", readers=(fc1,))),
            writers=writers,
        )
    return BlockLayout(
        norms=(NormAt("self_attn_layer_norm", role="residual"), NormAt("final_layer_norm", role="residual")),
        writers=writers,
        direct_readers=qkv + (fc1,),
    )


def _opt_projects(c: Config) -> bool:
    return c.word_embed_proj_dim != c.hidden_size


OPT = Family(
    name="opt",
    model_types=("opt",),
    layers="model.decoder.layers",
    norm_kind="layernorm",
    eps=lambda c: 1e-5,  # OPT builds nn.LayerNorm with its default eps; the config has no eps field
    token_embedding="model.decoder.embed_tokens",
    position_embedding="model.decoder.embed_positions",
    position_offset=2,
    block=_opt_block,
    final_norm=NormAt(
        "model.decoder.final_layer_norm",
        role="final",
        when=lambda c: c.do_layer_norm_before and not getattr(c, "_remove_final_layer_norm", False),
    ),
    unembed=Lin("lm_head"),
    extra=(Lin("model.decoder.project_in", when=_opt_projects), Lin("model.decoder.project_out", when=_opt_projects)),
    post_ln=lambda c: not c.do_layer_norm_before,
    notes="positions are stored with an offset of 2 rows",
)

BLOOM = Family(
    name="bloom",
    model_types=("bloom",),
    config_keys=(("hidden_size", ("n_embed", "hidden_size")), ("num_hidden_layers", ("n_layer",))),
    layers="transformer.h",
    norm_kind="layernorm",
    eps=_attr("layer_norm_epsilon"),
    token_embedding="transformer.word_embeddings",
    embedding_norm=NormAt("transformer.word_embeddings_layernorm", role="embedding"),
    block=BlockLayout(
        norms=(
            NormAt("input_layernorm", readers=(Lin("self_attention.query_key_value", bias=True),)),
            NormAt("post_attention_layernorm", readers=(Lin("mlp.dense_h_to_4h", bias=True),)),
        ),
        writers=(Lin("self_attention.dense", bias=True), Lin("mlp.dense_4h_to_h", bias=True)),
    ),
    final_norm=NormAt("transformer.ln_f", role="final"),
    unembed=Lin("lm_head"),
    # the residual carries the norm's output instead of its input: not a Pre-LN model
    post_ln="apply_residual_connection_post_layernorm",
    notes="ALiBi positions; a LayerNorm on the token embeddings",
)

STARCODER2 = Family(
    name="starcoder2",
    model_types=("starcoder2",),
    layers="model.layers",
    norm_kind="layernorm",
    eps=_attr("norm_epsilon"),
    token_embedding="model.embed_tokens",
    block=BlockLayout(
        norms=(
            NormAt("input_layernorm", readers=_qkv("self_attn.{p}_proj", bias="use_bias")),
            NormAt("post_attention_layernorm", readers=(Lin("mlp.c_fc", bias="use_bias"),)),
        ),
        writers=(Lin("self_attn.o_proj", bias="use_bias"), Lin("mlp.c_proj", bias="use_bias")),
    ),
    final_norm=NormAt("model.norm", role="final"),
    unembed=Lin("lm_head"),
    notes="rotary positions; optional sliding window",
)


def _stablelm_block(c: Config) -> BlockLayout:
    """StableLM: sequential (two norms) or, with `use_parallel_residual`, one norm read by attention and MLP; with
    `qk_layernorm`, one LayerNorm per query and key head, on the attention path (left alone by every rewrite)."""
    qkv = _qkv("self_attn.{p}_proj", bias="use_qkv_bias")
    mlp = (Lin("mlp.gate_proj"), Lin("mlp.up_proj"))
    if c.use_parallel_residual:
        norms = (NormAt("input_layernorm", readers=qkv + mlp),)
    else:
        norms = (NormAt("input_layernorm", readers=qkv), NormAt("post_attention_layernorm", readers=mlp))
    if c.qk_layernorm:
        heads = (("q", c.num_attention_heads), ("k", c.num_key_value_heads))
        norms += tuple(NormAt(f"self_attn.{p}_layernorm.norms.{h}", role="qk", has_bias=False)
                       for p, n in heads for h in range(n))
    return BlockLayout(norms=norms, writers=(Lin("self_attn.o_proj"), Lin("mlp.down_proj")),
                       parallel=bool(c.use_parallel_residual))


STABLELM = Family(
    name="stablelm",
    model_types=("stablelm",),
    layers="model.layers",
    norm_kind="layernorm",
    eps=_attr("layer_norm_eps"),
    token_embedding="model.embed_tokens",
    block=_stablelm_block,
    final_norm=NormAt("model.norm", role="final"),
    unembed=Lin("lm_head"),
    notes="partial rotary; optional parallel residual; optional per-head QK LayerNorms (qk role, left alone)",
)


def _persimmon_block(c: Config) -> BlockLayout:
    """Persimmon: sequential; the fused query_key_value holds (q, k, v) per head; optional QK LayerNorm."""
    qkv = Lin("self_attn.query_key_value", bias=True, groups=("qk", "qk", "v") * c.num_attention_heads)
    norms = (
        NormAt("input_layernorm", readers=(qkv,)),
        NormAt("post_attention_layernorm", readers=(Lin("mlp.dense_h_to_4h", bias=True),)),
    )
    if c.qk_layernorm:
        norms += (NormAt("self_attn.q_layernorm", role="qk"), NormAt("self_attn.k_layernorm", role="qk"))
    return BlockLayout(norms=norms, writers=(Lin("self_attn.dense", bias=True), Lin("mlp.dense_4h_to_h", bias=True)))


PERSIMMON = Family(
    name="persimmon",
    model_types=("persimmon",),
    layers="model.layers",
    norm_kind="layernorm",
    eps=_attr("layer_norm_eps"),
    token_embedding="model.embed_tokens",
    block=_persimmon_block,
    final_norm=NormAt("model.final_layernorm", role="final"),
    unembed=Lin("lm_head"),
    notes="partial rotary; optional QK LayerNorm (qk role, left alone)",
)

NEMOTRON = Family(
    name="nemotron",
    model_types=("nemotron",),
    layers="model.layers",
    norm_kind="layernorm",
    eps=_attr("norm_eps"),
    token_embedding="model.embed_tokens",
    block=BlockLayout(
        norms=(
            NormAt("input_layernorm", readers=_qkv("self_attn.{p}_proj", bias="attention_bias")),
            NormAt("post_attention_layernorm", readers=(Lin("mlp.up_proj", bias="mlp_bias"),)),
        ),
        writers=(Lin("self_attn.o_proj", bias="attention_bias"), Lin("mlp.down_proj", bias="mlp_bias")),
    ),
    final_norm=NormAt("model.norm", role="final"),
    unembed=Lin("lm_head"),
    gain_offset=1.0,
    notes="LayerNorm with (1 + w) gains (LayerNorm1P); partial rotary; squared-ReLU MLP without a gate",
)

OLMO = Family(
    name="olmo",
    model_types=("olmo",),
    layers="model.layers",
    norm_kind="layernorm",
    eps=lambda c: 1e-5,  # OlmoLayerNorm fixes eps; the config has no eps field
    token_embedding="model.embed_tokens",
    block=BlockLayout(
        norms=(
            NormAt("input_layernorm", readers=_qkv("self_attn.{p}_proj", bias="attention_bias"), has_weight=False,
                   has_bias=False),
            NormAt("post_attention_layernorm", readers=(Lin("mlp.gate_proj"), Lin("mlp.up_proj")), has_weight=False,
                   has_bias=False),
        ),
        writers=(Lin("self_attn.o_proj", bias="attention_bias"), Lin("mlp.down_proj")),
    ),
    final_norm=NormAt("model.norm", role="final", has_weight=False, has_bias=False),
    unembed=Lin("lm_head"),
    notes="non-parametric LayerNorm (no gain, no bias): fold has nothing to move; optional clip_qkv after q, k, v",
)

MPT = Family(
    name="mpt",
    model_types=("mpt",),
    config_keys=(("hidden_size", ("d_model",)), ("num_hidden_layers", ("n_layers",))),
    layers="transformer.blocks",
    norm_kind="layernorm",
    eps=_attr("layer_norm_epsilon"),
    token_embedding="transformer.wte",
    block=BlockLayout(
        norms=(
            NormAt("norm_1", readers=(Lin("attn.Wqkv", groups=("qk", "qk", "v")),), has_bias=False),
            NormAt("norm_2", readers=(Lin("ffn.up_proj"),), has_bias=False),
        ),
        writers=(Lin("attn.out_proj"), Lin("ffn.down_proj")),
    ),
    final_norm=NormAt("transformer.norm_f", role="final", has_bias=False),
    unembed=Lin("lm_head"),
    notes="ALiBi positions; LayerNorms without bias; optional clip_qkv after the fused Wqkv",
)

BIOGPT = Family(
    name="biogpt",
    model_types=("biogpt",),
    layers="biogpt.layers",
    norm_kind="layernorm",
    eps=lambda c: 1e-5,  # BioGPT builds nn.LayerNorm with its default eps, not the config's layer_norm_eps
    token_embedding="biogpt.embed_tokens",
    position_embedding="biogpt.embed_positions",
    position_offset=2,
    embed_scale=lambda c: math.sqrt(c.hidden_size) if c.scale_embedding else 1.0,
    block=BlockLayout(
        norms=(
            NormAt("self_attn_layer_norm", readers=_qkv("self_attn.{p}_proj", bias=True)),
            NormAt("final_layer_norm", readers=(Lin("fc1", bias=True),)),
        ),
        writers=(Lin("self_attn.out_proj", bias=True), Lin("fc2", bias=True)),
    ),
    final_norm=NormAt("biogpt.layer_norm", role="final"),
    unembed=Lin("output_projection"),
    notes="learned positions stored with an offset of 2 rows; embeddings scaled by sqrt(d) with scale_embedding",
)


def _bigcode_block(c: Config) -> BlockLayout:
    """GPT-BigCode: GPT-2's block with nn.Linear layers; a multi-query c_attn holds q (d wide), then one key and
    one value head; otherwise (q, k, v) per head."""
    if c.multi_query:  # widths in heads
        c_attn = Lin("attn.c_attn", bias=True, groups=("qk", "qk", "v"), widths=(c.num_attention_heads, 1, 1))
    else:
        c_attn = Lin("attn.c_attn", bias=True, groups=("qk", "qk", "v") * c.num_attention_heads)
    return BlockLayout(
        norms=(NormAt("ln_1", readers=(c_attn,)), NormAt("ln_2", readers=(Lin("mlp.c_fc", bias=True),))),
        writers=(Lin("attn.c_proj", bias=True), Lin("mlp.c_proj", bias=True)),
    )


GPT_BIGCODE = Family(
    name="gpt_bigcode",
    model_types=("gpt_bigcode",),
    config_keys=(("hidden_size", ("n_embd",)), ("num_hidden_layers", ("n_layer",)),
                 ("num_attention_heads", ("n_head",))),
    layers="transformer.h",
    norm_kind="layernorm",
    eps=_attr("layer_norm_epsilon"),
    token_embedding="transformer.wte",
    position_embedding="transformer.wpe",
    block=_bigcode_block,
    final_norm=NormAt("transformer.ln_f", role="final"),
    unembed=Lin("lm_head"),
    notes="multi-query attention: the fused c_attn's q, k and v slices differ in width",
)

XGLM = Family(
    name="xglm",
    model_types=("xglm",),
    config_keys=(("hidden_size", ("d_model",)), ("num_hidden_layers", ("num_layers",)),
                 ("num_attention_heads", ("attention_heads",))),  # its attribute_map
    per_layer=(),
    layers="model.layers",
    norm_kind="layernorm",
    eps=lambda c: 1e-5,  # XGLM builds nn.LayerNorm with its default eps; the config has no eps field
    token_embedding="model.embed_tokens",
    computed_positions="model.embed_positions",  # sinusoids (offset 2) computed at run time, not stored
    embed_scale=lambda c: math.sqrt(c.hidden_size) if c.scale_embedding else 1.0,
    block=BlockLayout(
        norms=(
            NormAt("self_attn_layer_norm", readers=_qkv("self_attn.{p}_proj", bias=True)),
            NormAt("final_layer_norm", readers=(Lin("fc1", bias=True),)),
        ),
        writers=(Lin("self_attn.out_proj", bias=True), Lin("fc2", bias=True)),
    ),
    final_norm=NormAt("model.layer_norm", role="final"),
    unembed=Lin("lm_head"),
    notes="computed sinusoidal positions (rmsnorm and crmsnorm: the exported code centres them; no dyt, derf or none); "
          "embeddings scaled by sqrt(d) with scale_embedding",
)

# ------------------------------------------------------------------ LayerNorm, parallel attention + MLP


def _neox_block(c: Config) -> BlockLayout:
    """GPT-NeoX/Pythia: two norms; parallel or sequential by `use_parallel_residual`."""
    return BlockLayout(
        norms=(
            NormAt("input_layernorm", readers=(Lin("attention.query_key_value", bias="attention_bias"),)),
            NormAt("post_attention_layernorm", readers=(Lin("mlp.dense_h_to_4h", bias=True),)),
        ),
        writers=(Lin("attention.dense", bias="attention_bias"), Lin("mlp.dense_4h_to_h", bias=True)),
        parallel=bool(c.use_parallel_residual),
    )


GPT_NEOX = Family(
    name="gpt_neox",
    model_types=("gpt_neox",),
    layers="gpt_neox.layers",
    norm_kind="layernorm",
    eps=_attr("layer_norm_eps"),
    token_embedding="gpt_neox.embed_in",
    block=_neox_block,
    final_norm=NormAt("gpt_neox.final_layer_norm", role="final"),
    unembed=Lin("embed_out"),  # transformers keeps this on-disk name for `lm_head`
    key_renames=((r"^embed_out\.", "lm_head."),),
    notes="rotary positions",
)

GPTJ = Family(
    name="gptj",
    model_types=("gptj",),
    config_keys=(("hidden_size", ("n_embd",)), ("num_hidden_layers", ("n_layer",))),
    layers="transformer.h",
    norm_kind="layernorm",
    eps=_attr("layer_norm_epsilon"),
    token_embedding="transformer.wte",
    block=BlockLayout(
        norms=(NormAt("ln_1", readers=_qkv("attn.{p}_proj") + (Lin("mlp.fc_in", bias=True),)),),
        writers=(Lin("attn.out_proj"), Lin("mlp.fc_out", bias=True)),
        parallel=True,
    ),
    final_norm=NormAt("transformer.ln_f", role="final"),
    unembed=Lin("lm_head", bias=True),
    notes="one norm shared by attention and MLP; rotary positions",
)


def _falcon_block(c: Config) -> BlockLayout:
    """Falcon: sequential with two norms, or parallel with one shared norm or two (new architecture)."""
    qkv = Lin("self_attention.query_key_value", bias="bias")
    fc = Lin("mlp.dense_h_to_4h", bias="bias")
    writers = (Lin("self_attention.dense", bias="bias"), Lin("mlp.dense_4h_to_h", bias="bias"))
    if not c.parallel_attn:
        return BlockLayout(
            norms=(NormAt("input_layernorm", readers=(qkv,)), NormAt("post_attention_layernorm", readers=(fc,))),
            writers=writers,
        )
    num_ln = c.num_ln_in_parallel_attn or (2 if c.new_decoder_architecture else 1)
    if num_ln == 2:
        return BlockLayout(
            norms=(NormAt("ln_attn", readers=(qkv,)), NormAt("ln_mlp", readers=(fc,))), writers=writers, parallel=True
        )
    return BlockLayout(norms=(NormAt("input_layernorm", readers=(qkv, fc)),), writers=writers, parallel=True)


FALCON = Family(
    name="falcon",
    model_types=("falcon",),
    config_keys=(("hidden_size", ("n_embed", "hidden_size")),),
    layers="transformer.h",
    norm_kind="layernorm",
    eps=_attr("layer_norm_epsilon"),
    token_embedding="transformer.word_embeddings",
    block=_falcon_block,
    final_norm=NormAt("transformer.ln_f", role="final"),
    unembed=Lin("lm_head"),
    notes="rotary or ALiBi positions",
)

PHI = Family(
    name="phi",
    model_types=("phi",),
    layers="model.layers",
    norm_kind="layernorm",
    eps=_attr("layer_norm_eps"),
    token_embedding="model.embed_tokens",
    block=BlockLayout(
        norms=(
            NormAt(
                "input_layernorm",
                readers=_qkv("self_attn.{p}_proj", bias=True) + (Lin("mlp.fc1", bias=True),),
            ),
            NormAt("self_attn.q_layernorm", role="qk", when="qk_layernorm"),
            NormAt("self_attn.k_layernorm", role="qk", when="qk_layernorm"),
        ),
        writers=(Lin("self_attn.dense", bias=True), Lin("mlp.fc2", bias=True)),
        parallel=True,
    ),
    final_norm=NormAt("model.final_layernorm", role="final"),
    unembed=Lin("lm_head", bias=True),
    notes="one norm shared by attention and MLP; partial rotary",
)

CODEGEN = Family(
    name="codegen",
    model_types=("codegen",),
    config_keys=(("hidden_size", ("n_embd",)), ("num_hidden_layers", ("n_layer",))),
    layers="transformer.h",
    norm_kind="layernorm",
    eps=_attr("layer_norm_epsilon"),
    token_embedding="transformer.wte",
    block=BlockLayout(
        # qkv_proj's output is 4 (mp_num) chunks, each (q, v, k) of d/4
        norms=(NormAt("ln_1", readers=(Lin("attn.qkv_proj", groups=("qk", "v", "qk") * 4),
                                       Lin("mlp.fc_in", bias=True))),),
        writers=(Lin("attn.out_proj"), Lin("mlp.fc_out", bias=True)),
        parallel=True,
    ),
    final_norm=NormAt("transformer.ln_f", role="final"),
    unembed=Lin("lm_head", bias=True),
    notes="GPT-J's parallel block with a fused qkv_proj in 4 chunks of (q, v, k); rotary positions",
)


def _cohere(name: str, qk_norm: bool, per_layer_filled: tuple[str, ...], notes: str) -> Family:
    """Cohere / Cohere2: one bias-free LayerNorm read by attention and MLP in parallel; logits times logit_scale
    (a config value, kept by every rewrite)."""
    norms = (NormAt("input_layernorm", readers=_qkv("self_attn.{p}_proj", bias="attention_bias")
                    + (Lin("mlp.gate_proj"), Lin("mlp.up_proj")), has_bias=False),)
    if qk_norm:
        norms += (NormAt("self_attn.q_norm", role="qk", when="use_qk_norm", has_bias=False),
                  NormAt("self_attn.k_norm", role="qk", when="use_qk_norm", has_bias=False))
    return Family(
        name=name,
        model_types=(name,),
        layers="model.layers",
        norm_kind="layernorm",
        eps=_attr("layer_norm_eps"),
        token_embedding="model.embed_tokens",
        block=BlockLayout(norms=norms, writers=(Lin("self_attn.o_proj", bias="attention_bias"), Lin("mlp.down_proj")),
                          parallel=True),
        final_norm=NormAt("model.norm", role="final", has_bias=False),
        unembed=Lin("lm_head"),
        per_layer_filled=per_layer_filled,
        notes=notes,
    )


COHERE = _cohere("cohere", True, (), "bias-free LayerNorm; parallel attention+MLP; logit_scale; optional QK-norm "
                 "(qk role, left alone)")
COHERE2 = _cohere("cohere2", False, ("layer_types",), "bias-free LayerNorm; parallel attention+MLP; logit_scale; "
                  "sliding-window layers")

# ------------------------------------------------------------------ RMSNorm, Llama layout


_QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")


def _llama_block(
    qkv_bias: object = "attention_bias", o_bias: object = "attention_bias", mlp_bias: object = "mlp_bias",
    qk_norm: tuple[str, ...] = (),
) -> BlockLayout:
    """The Llama block: input norm -> q, k, v; post-attention norm -> gate, up; writers o and down; `qk_norm`: the
    per-head norms of q and k inside attention (left alone)."""
    norms = (
        NormAt("input_layernorm", readers=_qkv("self_attn.{p}_proj", bias=qkv_bias)),
        NormAt("post_attention_layernorm", readers=(Lin("mlp.gate_proj", bias=mlp_bias), Lin("mlp.up_proj", bias=mlp_bias))),
    ) + tuple(NormAt(path, role="qk") for path in qk_norm)
    return BlockLayout(norms=norms, writers=(Lin("self_attn.o_proj", bias=o_bias), Lin("mlp.down_proj", bias=mlp_bias)))


def _llama_like(name: str, block: BlockLayout | Callable[[Config], BlockLayout], *,
                per_layer: tuple[str, ...] = ("layer_types",), per_layer_filled: tuple[str, ...] = (),
                config_keys: tuple[tuple[str, tuple[str, ...]], ...] = (), notes: str = "") -> Family:
    """A family with Llama's module names outside the blocks: model.embed_tokens, model.layers, model.norm, lm_head."""
    return Family(
        name=name,
        model_types=(name,),
        config_keys=config_keys,
        layers="model.layers",
        norm_kind="rmsnorm",
        eps=_attr("rms_norm_eps"),
        token_embedding="model.embed_tokens",
        block=block,
        final_norm=NormAt("model.norm", role="final"),
        unembed=Lin("lm_head"),
        per_layer=per_layer,
        per_layer_filled=per_layer_filled,
        notes=notes,
    )


LLAMA = _llama_like("llama", _llama_block())
MISTRAL = _llama_like("mistral", _llama_block(False, False, False))
_SLIDING_FROM = ("layer_types", "max_window_layers")  # layer_types expanded from max_window_layers (default 28)
QWEN2 = _llama_like("qwen2", _llama_block(True, False, False), per_layer=_SLIDING_FROM, per_layer_filled=_SLIDING_FROM)
QWEN3 = _llama_like("qwen3", _llama_block(mlp_bias=False, qk_norm=_QK_NORMS), per_layer=_SLIDING_FROM,
                    per_layer_filled=_SLIDING_FROM, notes="per-head QK-norm")
SMOLLM3 = _llama_like("smollm3", _llama_block(), per_layer=("layer_types", "no_rope_layers"),
                      per_layer_filled=("layer_types", "no_rope_layers"), notes="some layers without rotary positions")
GRANITE = _llama_like("granite", _llama_block(),
                      notes="embedding, residual and attention multipliers and logit scaling: config values the stock "
                            "class applies outside the norms, kept by every rewrite")
MINISTRAL = _llama_like("ministral", _llama_block(False, False, False), per_layer_filled=("layer_types",),
                        notes="sliding-window layers listed in layer_types")
HELIUM = _llama_like("helium", _llama_block(o_bias=False))
ERNIE4_5 = _llama_like("ernie4_5", _llama_block("use_bias", "use_bias", "use_bias"))
SEED_OSS = _llama_like("seed_oss", _llama_block(o_bias="attention_out_bias"))
HUNYUAN_V1_DENSE = _llama_like("hunyuan_v1_dense", _llama_block(mlp_bias=False, qk_norm=(
    "self_attn.query_layernorm", "self_attn.key_layernorm")), notes="per-head QK-norm, after the rotary embedding")
# the Llama implementation under InternLM3's config, whose original config.json names the biases qkv_bias and bias
INTERNLM3 = _llama_like("internlm3", _llama_block(), config_keys=(
    ("attention_bias", ("qkv_bias", "attention_bias")), ("mlp_bias", ("bias", "mlp_bias"))))


def _glm_block(sandwich: bool) -> BlockLayout:
    """GLM: the Llama block with one fused gate_up_proj reader and no o_proj bias; GLM-4 adds sandwich norms on the
    attention and MLP outputs (post_self_attn_layernorm, post_mlp_layernorm)."""
    norms = (
        NormAt("input_layernorm", readers=_qkv("self_attn.{p}_proj", bias="attention_bias")),
        NormAt("post_attention_layernorm", readers=(Lin("mlp.gate_up_proj"),)),
    )
    if sandwich:
        norms += (NormAt("post_self_attn_layernorm", role="output"), NormAt("post_mlp_layernorm", role="output"))
    return BlockLayout(norms=norms, writers=(Lin("self_attn.o_proj"), Lin("mlp.down_proj")))


GLM = _llama_like("glm", _glm_block(False), notes="fused gate_up_proj; partial rotary")
GLM4 = _llama_like("glm4", _glm_block(True), notes="sandwich norms on attention and MLP outputs; fused gate_up_proj")

_XIELU = ("mlp.act_fn.alpha_p", "mlp.act_fn.alpha_n", "mlp.act_fn.beta", "mlp.act_fn.eps")


def _apertus_block(c: Config) -> BlockLayout:
    """Apertus: Llama-like with its own norm names, an ungated MLP (up_proj only) and per-head QK-norm; the xIELU
    activation holds parameters of its own."""
    return BlockLayout(
        norms=(
            NormAt("attention_layernorm", readers=_qkv("self_attn.{p}_proj", bias="attention_bias")),
            NormAt("feedforward_layernorm", readers=(Lin("mlp.up_proj"),)),
        ) + tuple(NormAt(path, role="qk") for path in _QK_NORMS),
        writers=(Lin("self_attn.o_proj", bias="attention_bias"), Lin("mlp.down_proj")),
        others=_XIELU if c.hidden_act == "xielu" else (),
    )


APERTUS = _llama_like("apertus", _apertus_block, notes="per-head QK-norm; xIELU activation parameters left alone")


def _phi3_block(c: Config) -> BlockLayout:
    """Phi-3: the Llama block with fused projections: qkv_proj (q, k, v slices, unequal under GQA), gate_up_proj."""
    heads = (c.num_attention_heads, c.num_key_value_heads, c.num_key_value_heads)
    return BlockLayout(
        norms=(
            NormAt("input_layernorm", readers=(Lin("self_attn.qkv_proj", groups=("qk", "qk", "v"), widths=heads),)),
            NormAt("post_attention_layernorm", readers=(Lin("mlp.gate_up_proj"),)),
        ),
        writers=(Lin("self_attn.o_proj"), Lin("mlp.down_proj")),
    )


PHI3 = _llama_like("phi3", _phi3_block, notes="fused qkv_proj (GQA: unequal q, k, v slices) and gate_up_proj")

# ------------------------------------------------------------------ RMSNorm with (1 + w) gains: Gemma


def _gemma_block(sandwich: bool, qk_norm: bool) -> BlockLayout:
    """Gemma 1: Llama block. Gemma 2/3: sandwich norms around attention and MLP outputs."""
    if not sandwich:
        return _llama_block(mlp_bias=False)
    norms = (
        NormAt("input_layernorm", readers=_qkv("self_attn.{p}_proj", bias="attention_bias")),
        NormAt("post_attention_layernorm", role="output"),
        NormAt("pre_feedforward_layernorm", readers=(Lin("mlp.gate_proj"), Lin("mlp.up_proj"))),
        NormAt("post_feedforward_layernorm", role="output"),
    )
    if qk_norm:
        norms += (NormAt("self_attn.q_norm", role="qk"), NormAt("self_attn.k_norm", role="qk"))
    return BlockLayout(norms=norms, writers=(Lin("self_attn.o_proj", bias="attention_bias"), Lin("mlp.down_proj")))


def _gemma(name: str, model_types: tuple[str, ...], block: BlockLayout, notes: str,
           filled: tuple[str, ...] = ()) -> Family:
    return Family(
        name=name,
        model_types=model_types,
        layers="model.layers",
        norm_kind="rmsnorm",
        eps=_attr("rms_norm_eps"),
        token_embedding="model.embed_tokens",
        block=block,
        final_norm=NormAt("model.norm", role="final"),
        unembed=Lin("lm_head"),
        gain_offset=1.0,
        embed_scale=lambda c: math.sqrt(c.hidden_size),
        per_layer_filled=filled,
        notes=notes,
    )


GEMMA = _gemma("gemma", ("gemma",), _gemma_block(False, False), "gains are (1 + w); embeddings scaled by sqrt(d)")
GEMMA2 = _gemma("gemma2", ("gemma2",), _gemma_block(True, False), "sandwich norms; (1 + w) gains; logit soft-capping",
                ("layer_types",))
GEMMA3 = _gemma("gemma3", ("gemma3_text",), _gemma_block(True, True), "sandwich norms; (1 + w) gains; QK-norm",
                ("layer_types",))

# ------------------------------------------------------------------ RMSNorm on sublayer outputs only: OLMo2, EXAONE 4


def _output_norm_block(bias: object) -> BlockLayout:
    """No norm before a sublayer: q, k, v, gate and up read the residual directly, each sublayer's output is
    normalised before the add (left alone), and q and k are normalised inside attention."""
    return BlockLayout(
        norms=(
            NormAt("post_attention_layernorm", role="output"),
            NormAt("post_feedforward_layernorm", role="output"),
        ) + tuple(NormAt(path, role="qk") for path in _QK_NORMS),
        writers=(Lin("self_attn.o_proj", bias=bias), Lin("mlp.down_proj")),
        direct_readers=tuple(Lin(f"self_attn.{p}_proj", bias=bias) for p in "qkv")
        + (Lin("mlp.gate_proj"), Lin("mlp.up_proj")),
    )


OLMO2 = _llama_like("olmo2", _output_norm_block("attention_bias"),
                    notes="norms on sublayer outputs only; QK-norm over all heads")
EXAONE4 = _llama_like("exaone4", _output_norm_block(False), per_layer_filled=("layer_types",),
                      notes="norms on sublayer outputs only; per-head QK-norm; global layers without rotary positions "
                            "when sliding_window is set")

# ------------------------------------------------------------------ mixture of experts
#
# The router reads the post-attention norm's output like the experts, so it is one of the norm's readers (a fold
# scales its columns too, and the same experts are chosen). Experts are declared as stored on disk: one tensor per
# expert ("{e}" in the path, expanded from the config's expert count; transformers stacks them into one parameter
# at load, `loaded`), or one stacked (E, ., .) tensor (granitemoe, gpt-oss).


def _routed(path: str, experts: Count, gate: str, up: str, down: str, loaded: str) -> tuple[tuple[Lin, ...], Lin]:
    """Gated expert MLPs stored one tensor per expert (`path` with {e}): the readers gate and up, which transformers
    fuses at load into `{loaded}.gate_up_proj` (gate first), and the writer down, into `{loaded}.down_proj`."""
    readers = tuple(Lin(f"{path}.{name}", experts=experts, loaded=f"{loaded}.gate_up_proj") for name in (gate, up))
    return readers, Lin(f"{path}.{down}", experts=experts, loaded=f"{loaded}.down_proj")


def _moe_block(attention: tuple[Lin, ...], mlp_readers: tuple[Lin, ...], writers: tuple[Lin, ...], *,
               qk_norm: tuple[str, ...] = (), others: tuple[str, ...] = ()) -> BlockLayout:
    """A Llama-layout block: input norm -> `attention`, post-attention norm -> `mlp_readers` (router, experts, a
    shared expert and its gate), writers o_proj and the MLP's down projections."""
    return BlockLayout(
        norms=(NormAt("input_layernorm", readers=attention), NormAt("post_attention_layernorm", readers=mlp_readers))
        + tuple(NormAt(path, role="qk") for path in qk_norm),
        writers=writers,
        others=others,
    )


def _moe(name: str, block: BlockLayout | Callable[[Config], BlockLayout | tuple[BlockLayout, ...]], *,
         norm_kind: NormKind = "rmsnorm", unembed_bias: object = False, key_renames: tuple[tuple[str, str], ...] = (),
         per_layer: tuple[str, ...] = ("layer_types",), per_layer_filled: tuple[str, ...] = (),
         config_keys: tuple[tuple[str, tuple[str, ...]], ...] = (), notes: str = "") -> Family:
    """A mixture-of-experts family with Llama's module names outside the blocks."""
    return Family(
        name=name,
        model_types=(name,),
        config_keys=config_keys,
        layers="model.layers",
        norm_kind=norm_kind,
        eps=_attr("rms_norm_eps"),  # also the eps of Phi-MoE's LayerNorms
        token_embedding="model.embed_tokens",
        block=block,
        final_norm=NormAt("model.norm", role="final"),
        unembed=Lin("lm_head", bias=unembed_bias),
        key_renames=key_renames,
        per_layer=per_layer,
        per_layer_filled=per_layer_filled,
        notes=notes,
    )


def _mixtral_block(bias: object) -> BlockLayout:
    """Mixtral / Phi-MoE: a router (block_sparse_moe.gate) and per-expert w1 (gate), w3 (up), w2 (down)."""
    readers, down = _routed("block_sparse_moe.experts.{e}", "num_local_experts", "w1", "w3", "w2", "mlp.experts")
    return _moe_block(_qkv("self_attn.{p}_proj", bias=bias), (Lin("block_sparse_moe.gate", router=True),) + readers,
                      (Lin("self_attn.o_proj", bias=bias), down))


MIXTRAL = _moe("mixtral", _mixtral_block(False), key_renames=((r"\.block_sparse_moe\.gate\.", ".mlp.gate."),),
               notes="routed experts (per-expert tensors on disk, stacked by transformers at load); the router folds "
                     "with the experts")
PHIMOE = _moe("phimoe", _mixtral_block("attention_bias"), norm_kind="layernorm", unembed_bias="lm_head_bias",
              key_renames=((r"\.block_sparse_moe\.gate\.", ".mlp.router."),),
              notes="LayerNorm with routed experts: fold, rmsnorm (the norms the experts read keep their bias: the "
                    "stock stacked experts module has none to take it) and prune; crmsnorm refused (it must fold the "
                    "bias into the experts)")


def _qwen_moe_block(c: Config, qkv_bias: object, o_bias: object, qk_norm: tuple[str, ...],
                    shared: bool) -> tuple[BlockLayout, ...]:
    """Qwen2-MoE / Qwen3-MoE: sparse blocks (router, experts, Qwen2's shared expert and its sigmoid gate) on the
    decoder_sparse_step pattern, and dense ones (a Llama MLP) listed in mlp_only_layers."""
    attention = _qkv("self_attn.{p}_proj", bias=qkv_bias)
    o_proj = Lin("self_attn.o_proj", bias=o_bias)
    readers, down = _routed("mlp.experts.{e}", "num_experts", "gate_proj", "up_proj", "down_proj", "mlp.experts")
    sparse_readers, sparse_writers = (Lin("mlp.gate", router=True),) + readers, (down,)
    if shared:
        sparse_readers += (Lin("mlp.shared_expert.gate_proj"), Lin("mlp.shared_expert.up_proj"),
                           Lin("mlp.shared_expert_gate"))
        sparse_writers += (Lin("mlp.shared_expert.down_proj"),)
    dense = _moe_block(attention, (Lin("mlp.gate_proj"), Lin("mlp.up_proj")), (o_proj, Lin("mlp.down_proj")),
                       qk_norm=qk_norm)
    sparse = _moe_block(attention, sparse_readers, (o_proj,) + sparse_writers, qk_norm=qk_norm)
    return tuple(sparse if i not in c.mlp_only_layers and c.num_experts > 0 and (i + 1) % c.decoder_sparse_step == 0
                 else dense for i in range(int(c.num_hidden_layers)))


_QWEN_MOE_LAYERS = _SLIDING_FROM + ("mlp_only_layers",)
QWEN2_MOE = _moe("qwen2_moe", lambda c: _qwen_moe_block(c, "qkv_bias", False, (), True), per_layer=_QWEN_MOE_LAYERS,
                 per_layer_filled=_QWEN_MOE_LAYERS,
                 notes="routed experts with a shared expert and its gate (all read the post-attention norm); dense "
                       "blocks in mlp_only_layers")
QWEN3_MOE = _moe("qwen3_moe", lambda c: _qwen_moe_block(c, "attention_bias", "attention_bias", _QK_NORMS, False),
                 per_layer=("mlp_only_layers",), per_layer_filled=("mlp_only_layers",),
                 config_keys=(("num_experts", ("num_local_experts", "num_experts")),),  # its attribute_map
                 notes="routed experts; per-head QK-norm; dense blocks in mlp_only_layers")


def _olmoe_block() -> BlockLayout:
    """OLMoE: Llama attention with QK-norm over all heads (q_norm, k_norm: full width), routed experts."""
    readers, down = _routed("mlp.experts.{e}", "num_experts", "gate_proj", "up_proj", "down_proj", "mlp.experts")
    return _moe_block(_qkv("self_attn.{p}_proj", bias="attention_bias"), (Lin("mlp.gate", router=True),) + readers,
                      (Lin("self_attn.o_proj", bias="attention_bias"), down), qk_norm=_QK_NORMS)


OLMOE = _moe("olmoe", _olmoe_block(), per_layer=(), notes="routed experts; QK-norm over all heads; optional clip_qkv")


def _granitemoe_block() -> BlockLayout:
    """GraniteMoE: experts stored stacked, input_linear (E, 2I, d) holding gate and up, output_linear (E, d, I)."""
    experts = "num_local_experts"
    return _moe_block(
        _qkv("self_attn.{p}_proj", bias="attention_bias"),
        (Lin("block_sparse_moe.router.layer", router=True), Lin("block_sparse_moe.input_linear", experts=experts)),
        (Lin("self_attn.o_proj", bias="attention_bias"), Lin("block_sparse_moe.output_linear", experts=experts)),
    )


GRANITEMOE = _moe("granitemoe", _granitemoe_block(), per_layer=(), key_renames=(
    (r"\.block_sparse_moe\.input_linear\.weight$", ".block_sparse_moe.experts.gate_up_proj"),
    (r"\.block_sparse_moe\.output_linear\.weight$", ".block_sparse_moe.experts.down_proj"),
    (r"\.block_sparse_moe\.router\.layer\.", ".block_sparse_moe.router."),
), notes="stacked experts; embedding, residual and attention multipliers and logit scaling (config values, kept)")


def _gpt_oss_block() -> BlockLayout:
    """gpt-oss: biased attention with a learnt sink logit per head (self_attn.sinks, left alone); experts stored
    stacked as (E, in, out) with biases, gate and up interleaved in gate_up_proj; a router with a bias."""
    experts = "num_local_experts"
    return _moe_block(
        _qkv("self_attn.{p}_proj", bias="attention_bias"),
        (Lin("mlp.router", bias=True, router=True),
         Lin("mlp.experts", bias=True, conv1d=True, experts=experts, names=("gate_up_proj", "gate_up_proj_bias"))),
        (Lin("self_attn.o_proj", bias="attention_bias"),
         Lin("mlp.experts", bias=True, conv1d=True, experts=experts, names=("down_proj", "down_proj_bias"))),
        others=("self_attn.sinks",),
    )


GPT_OSS = _moe("gpt_oss", _gpt_oss_block(), per_layer_filled=("layer_types",),
               notes="stacked experts with biases; attention sinks (left alone); sliding and full layers")


def _shared(c: Config) -> bool:
    """Whether DeepSeek's sparse blocks have shared experts."""
    return bool(c.n_shared_experts)


def _deepseek_block(c: Config, mlp_bias: object, others: tuple[str, ...]) -> tuple[BlockLayout, ...]:
    """DeepSeek V2/V3: multi-head latent attention, whose latent norms (q_a_layernorm, kv_a_layernorm: eps 1e-6) fold
    into q_b_proj and kv_b_proj; only the first kv_lora_rank outputs of kv_a_proj_with_mqa pass kv_a_layernorm, its
    rotary part goes to the keys as it is. Blocks below first_k_dense_replace have a dense MLP, the others a router,
    routed experts and shared experts."""
    bias = "attention_bias"
    if c.q_lora_rank is None:
        queries: tuple[Lin, ...] = (Lin("self_attn.q_proj", groups=("qk",)),)
        latent: tuple[NormAt, ...] = ()
    else:
        queries = (Lin("self_attn.q_a_proj", bias=bias, groups=("qk",)),)
        latent = (NormAt("self_attn.q_a_layernorm", role="latent", readers=(Lin("self_attn.q_b_proj"),), eps=1e-6),)
    latent += (NormAt("self_attn.kv_a_layernorm", role="latent", readers=(Lin("self_attn.kv_b_proj"),), eps=1e-6),)
    attention = queries + (Lin("self_attn.kv_a_proj_with_mqa", bias=bias),)
    o_proj = Lin("self_attn.o_proj", bias=bias)
    readers, down = _routed("mlp.experts.{e}", "n_routed_experts", "gate_proj", "up_proj", "down_proj", "mlp.experts")
    sparse = _moe_block(
        attention,
        (Lin("mlp.gate", router=True),) + readers + tuple(Lin(f"mlp.shared_experts.{p}", bias=mlp_bias, when=_shared)
                                                           for p in ("gate_proj", "up_proj")),
        (o_proj, down, Lin("mlp.shared_experts.down_proj", bias=mlp_bias, when=_shared)), others=others)
    dense = _moe_block(attention, (Lin("mlp.gate_proj", bias=mlp_bias), Lin("mlp.up_proj", bias=mlp_bias)),
                       (o_proj, Lin("mlp.down_proj", bias=mlp_bias)))
    return tuple(BlockLayout(norms=b.norms + latent, writers=b.writers, others=b.others)
                 for b in (dense if i < c.first_k_dense_replace else sparse for i in range(int(c.num_hidden_layers))))


_DENSE_FIRST = ("first_k_dense_replace",)
DEEPSEEK_V2 = _moe("deepseek_v2", lambda c: _deepseek_block(c, "mlp_bias", ()), per_layer=_DENSE_FIRST,
                   per_layer_filled=_DENSE_FIRST, notes="multi-head latent attention (latent norms fold into q_b_proj, "
                   "kv_b_proj); routed and shared experts; dense first blocks")
DEEPSEEK_V3 = _moe("deepseek_v3", lambda c: _deepseek_block(c, False, ("mlp.gate.e_score_correction_bias",)),
                   per_layer=_DENSE_FIRST, per_layer_filled=_DENSE_FIRST,
                   notes="multi-head latent attention (latent norms fold into q_b_proj, kv_b_proj); routed and shared "
                         "experts, the router's selection bias left alone; dense first blocks")


def _nested(c: Config, section: str, key: str) -> object:
    """A value of a nested sub-config (DBRX's attn_config, ffn_config): from the transformers config's sub-config,
    or from config.json's dict read without transformers (ConfigView), the sub-config class's default if absent
    (normsurgery/arch/class_defaults.py, else transformers')."""
    part = getattr(c, section)
    if isinstance(part, dict):
        if key in part:
            return part[key]
        from normsurgery.arch.class_defaults import SUB_DEFAULTS

        defaults = SUB_DEFAULTS.get((c.model_type, section), {})
        if key in defaults:
            return defaults[key]
        from transformers import CONFIG_MAPPING

        part = CONFIG_MAPPING[c.model_type].sub_configs[section](**part)
    return getattr(part, key)


def _dbrx_experts(c: Config) -> int:
    """DBRX's number of routed experts."""
    return int(_nested(c, "ffn_config", "moe_num_experts"))


def _dbrx_block(c: Config) -> BlockLayout:
    """DBRX: bias-free LayerNorms around attention (one fused Wqkv: d query outputs, then the key and the value
    heads; optional clip_qkv) and routed experts stored fused as 2D tensors of the experts' rows stacked: w1 (gate)
    and v1 (up) (E * I, d), each expert's (out, in), read as one linear; w2 (E * I, d), each expert's (in, out)."""
    kv = int(_nested(c, "attn_config", "kv_n_heads"))
    experts = _dbrx_experts
    mlp = "ffn.experts.mlp"
    return BlockLayout(
        norms=(
            NormAt("norm_attn_norm.norm_1", has_bias=False, readers=(
                Lin("norm_attn_norm.attn.Wqkv", groups=("qk", "qk", "v"), widths=(c.num_attention_heads, kv, kv)),)),
            NormAt("norm_attn_norm.norm_2", has_bias=False, readers=(
                Lin("ffn.router.layer", router=True), Lin(mlp, experts=experts, names=("w1", "w1_bias")),
                Lin(mlp, experts=experts, names=("v1", "v1_bias")))),
        ),
        writers=(Lin("norm_attn_norm.attn.out_proj"), Lin(mlp, conv1d=True, experts=experts, names=("w2", "w2_bias"))),
        width_attributes=("ffn.experts.hidden_size",),  # DbrxExperts reshapes its input and output by it
    )


DBRX = Family(
    name="dbrx",
    model_types=("dbrx",),
    config_keys=(("hidden_size", ("d_model",)), ("num_hidden_layers", ("n_layers",)),
                 ("num_attention_heads", ("n_heads",))),  # its attribute_map
    per_layer=(),
    layers="transformer.blocks",
    norm_kind="layernorm",
    eps=lambda c: 1e-5,  # DBRX builds nn.LayerNorm with its default eps; the config has no eps field
    token_embedding="transformer.wte",
    block=_dbrx_block,
    streamed_by_parent=(r"\.ffn\.experts\.mlp$",),  # DbrxExperts reads its child's w1, v1, w2
    final_norm=NormAt("transformer.norm_f", role="final", has_bias=False),
    unembed=Lin("lm_head"),
    notes="bias-free LayerNorms with routed experts stored as fused 2D tensors (w1, v1, w2): fold, rmsnorm, crmsnorm "
          "and prune (the router reads the norm like its experts; CRMSNorm resizes the fused experts)",
)


def _llama4_block(c: Config) -> tuple[BlockLayout, ...]:
    """Llama 4 (text): blocks listed in moe_layers have a router, routed experts stored stacked (E, in, out)
    (gate_up_proj: gate then up; down_proj) and a shared expert, all reading the post-attention norm (the routed experts take their
    input pre-scaled by the router's score); the others a dense MLP. Rotary blocks (no_rope_layers[i] = 1) normalise
    queries and keys with a weightless RMSNorm (qk_norm, use_qk_norm); NoPE blocks have none."""
    experts = "num_local_experts"
    attention = _qkv("self_attn.{p}_proj", bias="attention_bias")
    o_proj = Lin("self_attn.o_proj", bias="attention_bias")
    sparse = _moe_block(
        attention,
        (Lin("feed_forward.router", router=True),
         Lin("feed_forward.experts", conv1d=True, experts=experts, names=("gate_up_proj", "gate_up_proj_bias")),
         Lin("feed_forward.shared_expert.gate_proj"), Lin("feed_forward.shared_expert.up_proj")),
        (o_proj, Lin("feed_forward.experts", conv1d=True, experts=experts, names=("down_proj", "down_proj_bias")),
         Lin("feed_forward.shared_expert.down_proj")))
    dense = _moe_block(attention, (Lin("feed_forward.gate_proj"), Lin("feed_forward.up_proj")),
                       (o_proj, Lin("feed_forward.down_proj")))
    qk_norm = (NormAt("self_attn.qk_norm", role="qk", has_weight=False),)
    return tuple(BlockLayout(norms=b.norms + (qk_norm if c.use_qk_norm and c.no_rope_layers[i] else ()),
                             writers=b.writers)
                 for i, b in enumerate(sparse if i in c.moe_layers else dense for i in range(int(c.num_hidden_layers))))


_LLAMA4_LAYERS = ("layer_types", "no_rope_layers", "moe_layers")
LLAMA4_TEXT = Family(
    name="llama4_text",
    model_types=("llama4_text",),
    per_layer=_LLAMA4_LAYERS,
    per_layer_filled=_LLAMA4_LAYERS,  # from attention_chunk_size, no_rope_layer_interval, interleave_moe_layer_step
    layers="model.layers",
    norm_kind="rmsnorm",
    eps=_attr("rms_norm_eps"),
    token_embedding="model.embed_tokens",
    block=_llama4_block,
    streamed_by_parent=(r"^model\.embed_tokens$",),  # Llama4TextModel moves its input to the embedding's device
    final_norm=NormAt("model.norm", role="final"),
    unembed=Lin("lm_head"),
    notes="routed experts (stacked) with a shared expert in moe_layers, dense blocks between; NoPE blocks "
          "(no_rope_layers) without the weightless QK-norm of the rotary ones; chunked attention (layer_types)",
)

FAMILIES: tuple[Family, ...] = (
    GPT2, GPT_NEO, GPT_NEOX, GPTJ, OPT, BLOOM, FALCON, PHI,
    LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA, GEMMA2, GEMMA3, OLMO2, SMOLLM3,
    STARCODER2, STABLELM, PERSIMMON, NEMOTRON, OLMO, MPT, BIOGPT, GPT_BIGCODE, XGLM, CODEGEN, COHERE, COHERE2, PHI3,
    GRANITE, GLM, GLM4, EXAONE4, HELIUM, ERNIE4_5, SEED_OSS, APERTUS, MINISTRAL, HUNYUAN_V1_DENSE, INTERNLM3,
    MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, GRANITEMOE, PHIMOE, GPT_OSS, DEEPSEEK_V2, DEEPSEEK_V3,
    DBRX, LLAMA4_TEXT,
)  # fmt: skip
