"""Synthetic checkpoints with real tensor names and shapes (random weights) for the speed/memory benchmarks.

Names and shapes come from stock transformers (a model built on the meta device from the config), so the
rewrites see exactly what they would see in a real checkpoint of that shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from normsurgery.checkpoint.writer import CheckpointWriter

SHAPES = {
    # ~2.4 GB in bf16: hidden 2048, 24 layers, GQA 32/4 heads, MLP 5632, vocab 32000, untied head.
    "llama-2.4gb": dict(model_type="llama", hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                        num_key_value_heads=4, intermediate_size=5632, vocab_size=32000, tie_word_embeddings=False,
                        max_position_embeddings=2048),
    # ~11.9 GB in bf16, 5.9B parameters: hidden 4096, 32 layers, GQA 32/8 heads, MLP 11008, vocab 32000, untied.
    "llama-6b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False,
                     max_position_embeddings=4096),
    # GPT-2 XL: 48 layers, d=1600, 25 heads, vocab 50257, tied (6.2 GB in fp32).
    "gpt2-xl": dict(model_type="gpt2", n_embd=1600, n_layer=48, n_head=25, vocab_size=50257, n_positions=1024),
    # A small Mixtral: 8 experts (top 2) of MLP 2816 at hidden 1024, 8 layers, GQA 16/4, vocab 32000 (1.3 GB in bf16),
    # stored one tensor per expert as on the hub: 24 expert tensors per layer.
    "mixtral-8e": dict(model_type="mixtral", hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                       num_key_value_heads=4, intermediate_size=2816, num_local_experts=8, num_experts_per_tok=2,
                       vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096),
}


def llama_of_layers(layers: int, shape: str = "llama-2.4gb") -> dict:
    """A Llama shape with a different depth (for RSS-vs-size curves)."""
    return {**SHAPES[shape], "num_hidden_layers": layers}


def build(out: Path, config_kwargs: dict, dtype: torch.dtype, shard: str = "1GB", seed: int = 0) -> Path:
    """Write a random checkpoint of the given shape, sharded, with its config (skips if already there)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "config.json").exists():
        return out
    kwargs = dict(config_kwargs)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    from normsurgery.checkpoint.writer import parse_size

    with CheckpointWriter(out, force=True, max_shard_size=parse_size(shard)) as writer:
        for name, meta in stored_shapes(model).items():
            if config.tie_word_embeddings and name == "lm_head.weight":
                continue
            if name.endswith("norm.weight") or ".ln_" in name and name.endswith("weight") or name.endswith("layernorm.weight"):
                tensor = 1 + 0.1 * torch.randn(meta, generator=gen)
            else:
                tensor = 0.02 * torch.randn(meta, generator=gen)
            writer.add(name, tensor.to(dtype))
        cfg = config.to_dict()
        cfg["dtype"] = str(dtype).replace("torch.", "")
        cfg["architectures"] = [type(model).__name__]  # as a saved model has (mergekit needs it)
        writer.write_json("config.json", cfg)
    return out


def stored_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    """The tensors a checkpoint of `model` stores: its state dict, or, for a family whose experts transformers stacks
    at load, the hub's names and per-expert shapes (the family's declaration read through the stacked parameters)."""
    from normsurgery.arch import architecture_of
    from normsurgery.rewrite.in_memory import ModelTensors

    arch = architecture_of(model.config)
    if not arch.fused:
        return {name: meta.shape for name, meta in model.state_dict().items()}
    tensors = ModelTensors(model, arch.key_renames, arch.fused)
    return {name: tensors.get(name).shape for name in arch.roles()}


def folder_bytes(path: Path) -> int:
    """Total size of the files in a folder."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


if __name__ == "__main__":
    import sys

    print(json.dumps(str(build(Path(sys.argv[1]), SHAPES[sys.argv[2]], getattr(torch, sys.argv[3])))))
