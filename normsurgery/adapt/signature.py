"""The structural signature of each decoder block: which modules (and their classes) and parameters it holds.

Blocks with the same signature have the same tensors; tracing finds the layout of one block of each signature, and
a model of any depth is resolved block by block through its blocks' signatures (dense and MoE blocks interleaved,
attention and SSM mixers, ...)."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from typing import Any

from torch import nn


def block_list(model: nn.Module, n: int) -> tuple[str, list[nn.Module]]:
    """The ModuleList of decoder blocks: the first with one entry per layer (a language model's, in a composite
    model that also holds a vision or audio tower)."""
    found = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n and n > 0]
    found.sort(key=lambda x: not any(w in x[0] for w in ("language", "text", "decoder")))
    if found:
        return found[0][0], list(found[0][1])
    raise ValueError("no list of decoder blocks with one entry per layer")


def block_signature(block: nn.Module) -> str:
    """A short hash of a block's module paths with their classes and its parameter names with their ranks."""
    parts = [f"{path}:{type(m).__name__}" for path, m in block.named_modules()]
    parts += [f"{name}:{p.ndim}" for name, p in block.named_parameters(remove_duplicate=False)]
    return hashlib.sha1("\n".join(sorted(parts)).encode()).hexdigest()[:16]


def block_signatures(blocks: list[nn.Module]) -> list[str]:
    """The signature of each block."""
    return [block_signature(b) for b in blocks]


def config_signatures(config: Any, trust_remote_code: bool = False) -> list[str]:
    """The signature of each block of a model of `config`, built on the meta device (no memory, no weights)."""
    if hasattr(config, "composite"):  # a composite config read as its language model's (TextView)
        config = config.composite
    if not hasattr(type(config), "from_dict"):  # config.json read directly (ConfigView): the config behind it
        config = config.full()
    return list(_signatures(json.dumps(config.to_dict(), sort_keys=True, default=str), type(config),
                            trust_remote_code))


@lru_cache(maxsize=32)
def _signatures(raw: str, cls: type, trust_remote_code: bool) -> tuple[str, ...]:
    """config_signatures, memoised on the config's JSON (building a large model on meta takes about a second)."""
    import torch
    from transformers import AutoModelForCausalLM

    from normsurgery.arch.composite import text_view

    config = cls.from_dict(json.loads(raw))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    _, blocks = block_list(model, int(text_view(config).num_hidden_layers))
    return tuple(block_signatures(blocks))
