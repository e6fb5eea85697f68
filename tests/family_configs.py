"""Tiny configs, one per supported family (and per layout variant), for fixtures built with stock transformers."""

from __future__ import annotations

from typing import Any

_COMMON_VOCAB = 320  # the test tokenizer's size

# name -> (model_type, config kwargs). Sizes are tiny but keep every structural feature of the family.
FAMILY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("gpt2", dict(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=_COMMON_VOCAB)),
    "gpt2_untied": ("gpt2", dict(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=_COMMON_VOCAB, tie_word_embeddings=False)),
    "gpt_neo": ("gpt_neo", dict(num_layers=2, hidden_size=32, num_heads=4, max_position_embeddings=64, vocab_size=_COMMON_VOCAB,
                                attention_types=[[["global", "local"], 1]], window_size=8)),
    "gpt_neox": ("gpt_neox", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=64, vocab_size=_COMMON_VOCAB, use_parallel_residual=True, rotary_pct=0.5)),
    "gpt_neox_sequential": ("gpt_neox", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                             max_position_embeddings=64, vocab_size=_COMMON_VOCAB, use_parallel_residual=False)),
    "gptj": ("gptj", dict(n_layer=2, n_embd=32, n_head=4, n_positions=64, rotary_dim=4, vocab_size=_COMMON_VOCAB)),
    "opt": ("opt", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64, max_position_embeddings=64,
                        vocab_size=_COMMON_VOCAB, word_embed_proj_dim=32)),
    "opt_postln": ("opt", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64, max_position_embeddings=64,
                               vocab_size=_COMMON_VOCAB, word_embed_proj_dim=16, do_layer_norm_before=False)),
    "bloom": ("bloom", dict(n_layer=2, hidden_size=32, n_head=4, vocab_size=_COMMON_VOCAB)),
    "falcon": ("falcon", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=_COMMON_VOCAB,
                              new_decoder_architecture=True, num_kv_heads=2, alibi=False, bias=False)),
    "falcon_single_ln": ("falcon", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=_COMMON_VOCAB,
                                        new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1)),
    "falcon_old": ("falcon", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=_COMMON_VOCAB,
                                  new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False)),
    "falcon_sequential": ("falcon", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=_COMMON_VOCAB,
                                         new_decoder_architecture=False, multi_query=False, parallel_attn=False, bias=True)),
    "phi": ("phi", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64, vocab_size=_COMMON_VOCAB, partial_rotary_factor=0.5)),
    "llama": ("llama", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=64, max_position_embeddings=64, vocab_size=_COMMON_VOCAB)),
    "llama_bias_tied": ("llama", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, max_position_embeddings=64, vocab_size=_COMMON_VOCAB,
                                      attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "mistral": ("mistral", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=64, max_position_embeddings=64, vocab_size=_COMMON_VOCAB, sliding_window=16)),
    "qwen2": ("qwen2", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=64, max_position_embeddings=64, vocab_size=_COMMON_VOCAB, tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            intermediate_size=64, max_position_embeddings=64, vocab_size=_COMMON_VOCAB)),
    "gemma": ("gemma", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            intermediate_size=64, max_position_embeddings=64, vocab_size=_COMMON_VOCAB)),
    "gemma2": ("gemma2", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              intermediate_size=64, max_position_embeddings=64, vocab_size=_COMMON_VOCAB, sliding_window=16)),
    "gemma3": ("gemma3_text", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   intermediate_size=64, max_position_embeddings=64, vocab_size=_COMMON_VOCAB, sliding_window=16)),
    "olmo2": ("olmo2", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=64, max_position_embeddings=64, vocab_size=_COMMON_VOCAB)),
    "smollm3": ("smollm3", dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=64, max_position_embeddings=64, vocab_size=_COMMON_VOCAB)),
}
