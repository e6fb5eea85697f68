"""What a declared family's transformers config class gives for an attribute that config.json lacks, known without
importing transformers (1.3 s or more of start-up, torch included).

A config.json on the hub holds what the transformers that wrote it saved: the attributes its class had then, less
those equal to the base config's defaults. A Llama config from transformers 4.40 has no `mlp_bias` and no
`head_dim`; a GPT-2 one no `tie_word_embeddings` and no `scale_attn_by_inverse_layer_idx`; a Gemma 2 or Qwen2 one
no `layer_types`. `ConfigView` answers those from here:

- `DEFAULTS`: the class's default of each attribute a family declaration (or pruning's config re-indexing) reads,
  where the class sets it to that constant whatever the other values are;
- `DERIVED`: the per-block keys a class fills in from other values (`Family.per_layer_filled`: a pattern, or a list
  built from an interval), computed as its `__post_init__` computes them, from config.json's values and the class's
  defaults of those;
- `SUB_DEFAULTS`: defaults inside a nested sub-config (DBRX's attn_config and ffn_config).

An attribute found in none of them is read from the transformers config (built then), so a missing entry costs
start-up time, never a wrong answer. Every entry is tested against the installed transformers
(tests/test_arch.py), and the paths that trust these answers compare them with the full config in the background
(normsurgery.source), except the unverified prune, which copies stored bytes.
"""

from __future__ import annotations

from typing import Any, Callable

# model_type -> attribute -> the class default (transformers 5)
DEFAULTS: dict[str, dict[str, Any]] = {
    "apertus": {"attention_bias": False, "hidden_act": "xielu", "rms_norm_eps": 1e-05, "tie_word_embeddings": False},
    "biogpt": {"layer_norm_eps": 1e-12, "scale_embedding": True, "tie_word_embeddings": True},
    "bloom": {"apply_residual_connection_post_layernorm": False, "layer_norm_epsilon": 1e-05,
              "tie_word_embeddings": True},
    "codegen": {"layer_norm_epsilon": 1e-05, "tie_word_embeddings": False},
    "cohere": {"attention_bias": False, "layer_norm_eps": 1e-05, "tie_word_embeddings": True, "use_qk_norm": False},
    "cohere2": {"attention_bias": False, "layer_norm_eps": 1e-05, "tie_word_embeddings": True},
    "dbrx": {"tie_word_embeddings": False},
    "deepseek_v2": {"attention_bias": False, "first_k_dense_replace": 0, "mlp_bias": False, "rms_norm_eps": 1e-06,
                    "tie_word_embeddings": False},
    "deepseek_v3": {"attention_bias": False, "first_k_dense_replace": 3, "rms_norm_eps": 1e-06,
                    "tie_word_embeddings": False},
    "ernie4_5": {"rms_norm_eps": 1e-05, "tie_word_embeddings": True, "use_bias": False},
    "exaone4": {"rms_norm_eps": 1e-05, "tie_word_embeddings": False},
    "falcon": {"bias": False, "layer_norm_epsilon": 1e-05, "multi_query": True, "new_decoder_architecture": False,
               "num_ln_in_parallel_attn": None, "parallel_attn": True, "tie_word_embeddings": True},
    "gemma": {"attention_bias": False, "rms_norm_eps": 1e-06, "tie_word_embeddings": True},
    "gemma2": {"attention_bias": False, "rms_norm_eps": 1e-06, "tie_word_embeddings": True},
    "gemma3_text": {"attention_bias": False, "rms_norm_eps": 1e-06, "tie_word_embeddings": True},
    "glm": {"attention_bias": True, "rms_norm_eps": 1.5625e-07, "tie_word_embeddings": False},
    "glm4": {"attention_bias": True, "rms_norm_eps": 1.5625e-07, "tie_word_embeddings": False},
    "gpt2": {"layer_norm_epsilon": 1e-05, "scale_attn_by_inverse_layer_idx": False, "tie_word_embeddings": True},
    "gpt_bigcode": {"layer_norm_epsilon": 1e-05, "multi_query": True, "tie_word_embeddings": True},
    "gpt_neo": {"layer_norm_epsilon": 1e-05, "tie_word_embeddings": True},
    "gpt_neox": {"attention_bias": True, "layer_norm_eps": 1e-05, "tie_word_embeddings": False,
                 "use_parallel_residual": True},
    "gpt_oss": {"attention_bias": True, "rms_norm_eps": 1e-05, "tie_word_embeddings": False},
    "gptj": {"layer_norm_epsilon": 1e-05, "tie_word_embeddings": False},
    "granite": {"attention_bias": False, "mlp_bias": False, "rms_norm_eps": 1e-06, "tie_word_embeddings": False},
    "granitemoe": {"attention_bias": False, "rms_norm_eps": 1e-06, "tie_word_embeddings": False},
    "helium": {"attention_bias": False, "mlp_bias": False, "rms_norm_eps": 1e-08, "tie_word_embeddings": False},
    "hunyuan_v1_dense": {"attention_bias": False, "rms_norm_eps": 1e-05, "tie_word_embeddings": False},
    "internlm3": {"attention_bias": False, "mlp_bias": False, "rms_norm_eps": 1e-05, "tie_word_embeddings": False},
    "llama": {"attention_bias": False, "mlp_bias": False, "rms_norm_eps": 1e-06, "tie_word_embeddings": False},
    "llama4_text": {"attention_bias": False, "rms_norm_eps": 1e-05, "tie_word_embeddings": False,
                    "use_qk_norm": True},
    "ministral": {"rms_norm_eps": 1e-06, "tie_word_embeddings": False},
    "mistral": {"rms_norm_eps": 1e-06, "tie_word_embeddings": False},
    "mixtral": {"rms_norm_eps": 1e-05, "tie_word_embeddings": False},
    "mpt": {"layer_norm_epsilon": 1e-05, "tie_word_embeddings": True},
    "nemotron": {"attention_bias": False, "mlp_bias": False, "norm_eps": 1e-05, "tie_word_embeddings": False},
    "olmo": {"attention_bias": False, "tie_word_embeddings": False},
    "olmo2": {"attention_bias": False, "rms_norm_eps": 1e-05, "tie_word_embeddings": False},
    "olmoe": {"attention_bias": False, "rms_norm_eps": 1e-05, "tie_word_embeddings": False},
    "opt": {"_remove_final_layer_norm": False, "do_layer_norm_before": True, "enable_bias": True,
            "tie_word_embeddings": True},
    "persimmon": {"layer_norm_eps": 1e-05, "qk_layernorm": True, "tie_word_embeddings": False},
    "phi": {"layer_norm_eps": 1e-05, "qk_layernorm": False, "tie_word_embeddings": False},
    "phi3": {"rms_norm_eps": 1e-05, "tie_word_embeddings": False},
    "phimoe": {"attention_bias": False, "lm_head_bias": False, "rms_norm_eps": 1e-05, "tie_word_embeddings": False},
    "qwen2": {"max_window_layers": 28, "rms_norm_eps": 1e-06, "tie_word_embeddings": False},
    "qwen2_moe": {"decoder_sparse_step": 1, "max_window_layers": 28, "qkv_bias": True, "rms_norm_eps": 1e-06,
                  "tie_word_embeddings": False},
    "qwen3": {"attention_bias": False, "max_window_layers": 28, "rms_norm_eps": 1e-06, "tie_word_embeddings": False},
    "qwen3_moe": {"attention_bias": False, "decoder_sparse_step": 1, "rms_norm_eps": 1e-06,
                  "tie_word_embeddings": False},
    "seed_oss": {"attention_bias": True, "attention_out_bias": False, "mlp_bias": False, "rms_norm_eps": 1e-06,
                 "tie_word_embeddings": False},
    "smollm3": {"attention_bias": False, "mlp_bias": False, "rms_norm_eps": 1e-06, "tie_word_embeddings": True},
    "stablelm": {"layer_norm_eps": 1e-05, "qk_layernorm": False, "tie_word_embeddings": False,
                 "use_parallel_residual": False, "use_qkv_bias": False},
    "starcoder2": {"norm_epsilon": 1e-05, "tie_word_embeddings": True, "use_bias": True},
    "xglm": {"scale_embedding": True, "tie_word_embeddings": True},
}

# (model_type, sub-config attribute) -> key -> the sub-config class's default
SUB_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("dbrx", "attn_config"): {"kv_n_heads": 1},
    ("dbrx", "ffn_config"): {"moe_num_experts": 4},
}


# ------------------------------------------------------------------ per-block keys the class fills in
# Each takes the ConfigView (`c.stored(key, default)`: config.json's value, else the class's field default) and
# mirrors the class's __post_init__, config.json's own value of the key included (kept, or replaced as the class
# replaces it: GPT-Neo's attention_layers always comes from attention_types, Llama 4's no_rope_layers when empty);
# one that raises (a value the class would refuse or read otherwise) leaves the answer to the transformers config.


def _layer_types(fill: Callable[[Any], list[str]]) -> Callable[[Any], list[str]]:
    """config.json's layer_types where it is not null (every class keeps it), else `fill`'s."""

    def value(c: Any) -> list[str]:
        stored = c.stored("layer_types", None)
        return fill(c) if stored is None else stored

    return value


def _every_nth_full(period: int, pattern_key: str | None = None) -> Callable[[Any], list[str]]:
    """Every `period`-th block full attention, the others sliding (Gemma 2, gpt-oss: 2; Gemma 3: the legacy
    `sliding_window_pattern` key, 6 by default; Cohere 2: 4)."""

    def fill(c: Any) -> list[str]:
        step = c.stored(pattern_key, period) if pattern_key else period
        return ["sliding_attention" if (i + 1) % step else "full_attention" for i in range(int(c.num_hidden_layers))]

    return fill


def _exaone4_layer_types(c: Any) -> list[str]:
    step = c.stored("sliding_window_pattern", 4) if c.stored("sliding_window", 4096) is not None else 0
    if not isinstance(step, int) or isinstance(step, bool):
        raise TypeError("a sliding_window_pattern string: the class reads it")
    n = int(c.num_hidden_layers)
    return ["sliding_attention" if (i + 1) % step != 0 and i < n else "full_attention" for i in range(n)]


def _ministral_layer_types(c: Any) -> list[str]:
    kind = "sliding_attention" if c.stored("sliding_window", 4096) is not None else "full_attention"
    return [kind] * int(c.num_hidden_layers)


def _qwen_layer_types(c: Any) -> list[str]:
    """Qwen2, Qwen3: sliding from block max_window_layers on, when use_sliding_window."""
    window = c.stored("sliding_window", 4096) if c.stored("use_sliding_window", False) else None
    first = c.stored("max_window_layers", 28)
    return ["sliding_attention" if window is not None and i >= first else "full_attention"
            for i in range(int(c.num_hidden_layers))]


def _qwen2_moe_layer_types(c: Any) -> list[str]:
    """Qwen2-MoE: every other block below max_window_layers slides, when use_sliding_window."""
    slides, first = c.stored("use_sliding_window", False), c.stored("max_window_layers", 28)
    return ["sliding_attention" if (i + 1) % 2 and i < first and slides else "full_attention"
            for i in range(int(c.num_hidden_layers))]


def _none_is_empty(c: Any) -> list[int]:
    """Qwen-MoE's mlp_only_layers: none listed is an empty list."""
    value = c.stored("mlp_only_layers", None)
    return [] if value is None else value


def _smollm3_no_rope_layers(c: Any) -> list[int]:
    value = c.stored("no_rope_layers", None)
    if value is not None:
        return value
    every = c.stored("no_rope_layer_interval", 4)
    return [int((i + 1) % every != 0) for i in range(int(c.num_hidden_layers))]


def _smollm3_layer_types(c: Any) -> list[str]:
    rope = _smollm3_no_rope_layers(c)
    slides = c.stored("use_sliding_window", False) and c.stored("sliding_window", None) is not None
    return ["sliding_attention" if slides and not rope[i] else "full_attention"
            for i in range(int(c.num_hidden_layers))]


def _llama4_no_rope_layers(c: Any) -> list[int]:
    value = c.stored("no_rope_layers", None)
    if value:
        return value
    every = c.stored("no_rope_layer_interval", 4)
    return [int((i + 1) % every != 0) for i in range(int(c.num_hidden_layers))]


def _llama4_moe_layers(c: Any) -> list[int]:
    value = c.stored("moe_layers", None)
    if value is not None:
        return value
    step = c.stored("interleave_moe_layer_step", 1)
    return list(range(step - 1, int(c.num_hidden_layers), step))


def _llama4_layer_types(c: Any) -> list[str]:
    chunked = c.stored("attention_chunk_size", 8192) is not None
    return ["chunked_attention" if no_rope and chunked else "full_attention" for no_rope in _llama4_no_rope_layers(c)]


def _gpt_neo_attention_layers(c: Any) -> list[str]:
    """GPT-Neo expands attention_types ([[kinds, repeats], ...]) into one kind per block."""
    runs = c.stored("attention_types", None)
    if runs is None:
        runs = [[["global", "local"], 12]]
    return [kind for kinds, repeats in runs for _ in range(repeats) for kind in kinds]


# model_type -> per-block attribute -> what its class makes of it: config.json's value, kept or replaced, or filled in
DERIVED: dict[str, dict[str, Callable[[Any], Any]]] = {
    "cohere2": {"layer_types": _layer_types(_every_nth_full(4, "sliding_window_pattern"))},
    "exaone4": {"layer_types": _layer_types(_exaone4_layer_types)},
    "gemma2": {"layer_types": _layer_types(_every_nth_full(2))},
    "gemma3_text": {"layer_types": _layer_types(_every_nth_full(6, "sliding_window_pattern"))},
    "gpt_neo": {"attention_layers": _gpt_neo_attention_layers},
    "gpt_oss": {"layer_types": _layer_types(_every_nth_full(2))},
    "llama4_text": {"layer_types": _layer_types(_llama4_layer_types), "no_rope_layers": _llama4_no_rope_layers,
                    "moe_layers": _llama4_moe_layers},
    "ministral": {"layer_types": _layer_types(_ministral_layer_types)},
    "qwen2": {"layer_types": _layer_types(_qwen_layer_types)},
    "qwen2_moe": {"layer_types": _layer_types(_qwen2_moe_layer_types), "mlp_only_layers": _none_is_empty},
    "qwen3": {"layer_types": _layer_types(_qwen_layer_types)},
    "qwen3_moe": {"mlp_only_layers": _none_is_empty},
    "smollm3": {"layer_types": _layer_types(_smollm3_layer_types), "no_rope_layers": _smollm3_no_rope_layers},
}
