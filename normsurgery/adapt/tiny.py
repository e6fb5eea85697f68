"""A tiny random instance of any transformers causal-LM model type, built offline from its config class."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from normsurgery.arch.layer_config import depth_counts, names_blocks
from normsurgery.errors import NormSurgeryError

VOCAB = 320
# canonical attribute -> tiny value; hidden 64 with 8 query and 2 key/value heads keeps head counts apart from each
# other and from common constants (CodeGen's 4 chunks), so that drafted widths can name the attribute they follow
SMALL: dict[str, int] = {
    "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 128,
    "vocab_size": VOCAB, "max_position_embeddings": 64, "rotary_dim": 4, "sliding_window": 16, "window_size": 16,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32, "ffn_dim": 128, "n_inner": 128, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip


def config_class(model_type: str) -> Any:
    """The transformers config class of a causal-LM model type, or a clear error."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING:
        raise NormSurgeryError(
            f"{model_type!r} is not a model type this transformers knows (no model code is downloaded or run from "
            "a hub repository). Give the model_type of a config.json, e.g. llama, gpt2 or qwen3.")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise NormSurgeryError(
            f"{model_type!r} has no causal-LM class in transformers (AutoModelForCausalLM); normsurgery rewrites "
            "decoder language models only. For a multimodal model, give its text model's type (e.g. gemma3_text).")
    return CONFIG_MAPPING[model_type]


def _covering(lists: list[list[Any]], layers: int) -> list[int]:
    """Block indices to keep: the first block of each kind in every per-block list (so that every kind of block is
    traced), then the first others, `layers` at least."""
    keep = {next(i for i, x in enumerate(values) if x == v) for values in lists for v in values}
    rest = (i for i in range(max((len(v) for v in lists), default=layers)) if i not in keep)
    while len(keep) < layers:
        keep.add(next(rest, len(keep)))
    return sorted(keep)


def tiny_config(model_type: str, layers: int = 2, overrides: dict[str, Any] | None = None) -> Any:
    """The model type's default config shrunk to a tiny size: known sizes set under the class's own key names,
    and every other integer that equalled the default hidden size, intermediate size or depth following it."""
    from transformers.utils import logging

    logging.set_verbosity_error()  # warnings about the tiny sizes themselves
    cls = config_class(model_type)
    default = cls()
    from normsurgery.arch.composite import text_key

    if text_key(default) is not None:  # a composite (multimodal) config: its language model made tiny
        return tiny_like(default, layers, shrink=True)
    raw = default.to_dict()
    names = dict(getattr(cls, "attribute_map", {}) or {})
    wanted = {**SMALL, "num_hidden_layers": layers}
    wanted.update({k: v for k, v in (overrides or {}).items() if k in wanted})  # sizes the others follow
    if isinstance(raw.get("qk_rope_head_dim"), int):  # multi-head latent attention: head_dim is the rotary width
        wanted.pop("head_dim")
    kwargs: dict[str, Any] = {}
    for canonical, value in wanted.items():
        native = names.get(canonical, canonical)
        if native in raw:
            kwargs[native] = value
    depth = int(default.num_hidden_layers)
    lists = {k: v for k, v in raw.items() if isinstance(v, list) and len(v) == depth and k != "architectures"
             and all(isinstance(x, (str, bool)) for x in v)}  # a kind per block (not a list of block indices)
    keep = _covering(list(lists.values()), layers)
    if lists:
        kwargs[names.get("num_hidden_layers", "num_hidden_layers")] = len(keep)
        kwargs.update({k: [v[i] for i in keep] for k, v in lists.items()})
    follows = {"hidden_size": wanted["hidden_size"], "intermediate_size": wanted["intermediate_size"],
               "num_hidden_layers": len(keep)}
    for canonical, value in follows.items():
        old = getattr(default, canonical, None)
        if not isinstance(old, int) or isinstance(old, bool):
            continue
        for key, v in raw.items():
            if key not in kwargs and type(v) is int and v == old:
                kwargs[key] = value
    kwargs.update(overrides or {})
    try:
        config = cls(**kwargs)
    except Exception as err:  # config classes validate their values with many exception types
        raise NormSurgeryError(f"could not build a tiny {model_type} config ({err}); pass --set KEY=VALUE to give the "
                               "values it needs.") from None
    wanted["num_hidden_layers"] = len(keep)
    for canonical in ("hidden_size", "num_hidden_layers"):
        if getattr(config, canonical, None) != wanted[canonical]:
            raise NormSurgeryError(f"could not shrink {model_type}'s {canonical} (still {getattr(config, canonical, None)});"
                                   " pass --set KEY=VALUE with its config key.")
    config._attn_implementation = "eager"  # attention scores are then a softmax the tracer sees
    return config


def tiny_model(config: Any, seed: int = 0, trust_remote_code: bool = False) -> nn.Module:
    """The causal-LM class of `config` with random weights (a fixed seed), in float32 eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    try:
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                trust_remote_code=trust_remote_code).float().eval()
    except Exception as err:  # model constructors fail in many ways on odd configs
        raise NormSurgeryError(f"transformers could not build a tiny {config.model_type} model ({err}); pass --set "
                               "KEY=VALUE to change the config values it needs.") from None


@torch.no_grad()
def perturb(model: nn.Module, gains: dict[str, float], biases: set[str], embeddings: set[str], seed: int = 0) -> None:
    """Re-draw every parameter as the test fixtures do: norm gains around 1 (around 0 for (1 + w) gains, `gains`
    maps each to its offset), norm biases and other vectors non-zero, weights O(1/sqrt(fan_in))."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name in gains:
            p.copy_(1.0 - gains[name] + 0.5 * (torch.rand(p.shape, generator=gen) * 2 - 1))
        elif name in biases:
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        elif p.ndim == 1:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        elif name in embeddings:
            p.copy_(torch.randn(p.shape, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))


# config attributes whose value is a count of modules or tensors (kept, so that a tiny model holds the real names)
COUNTS = frozenset({"num_experts", "num_local_experts", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
                    "num_attention_heads", "num_key_value_heads", "moe_num_experts", "num_shared_experts"})
MAX_PARAMETERS = 30_000_000  # a tiny instance with the real widths larger than this is traced with shrunk widths


def layer_lists(raw: dict[str, Any], depth: int) -> list[str]:
    """The config keys holding one value per block."""
    return [k for k, v in raw.items() if isinstance(v, list) and len(v) == depth and k != "architectures"
            and all(isinstance(x, (str, bool, int, float)) for x in v) and not names_blocks(v, depth)]


def layer_dicts(raw: dict[str, Any], depth: int) -> list[str]:
    """The config keys holding settings by block index (e.g. Gemma 4's per_layer_config)."""
    return [k for k, v in raw.items() if isinstance(v, dict) and v and k not in ("id2label", "label2id")
            and all(str(i).isdigit() and int(i) < depth for i in v)]


def parameter_count(config: Any, trust_remote_code: bool) -> int:
    """The parameter count of a model of `config`, built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def meta_shapes(config: Any, trust_remote_code: bool) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter and buffer of a model of `config`, built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def tiny_like(config: Any, layers: int, *, shrink: bool, trust_remote_code: bool = False) -> Any:
    """`config` with its first `layers` blocks only (per-block lists cut to them), a small vocabulary and, with
    `shrink`, small widths (the hidden size, the MLP and expert widths); counts of heads and experts stay, so the
    tiny model's tensors are named as the real model's. A composite config's language model is cut so, and its
    other towers keep one block each."""
    from transformers.utils import logging

    from normsurgery.arch.composite import text_key, text_view

    logging.set_verbosity_error()
    raw = config.to_dict()
    key = text_key(config)
    depth = int(text_view(config).num_hidden_layers)
    if key is None:
        raw.update(_cut(raw, type(config), depth, layers, shrink))
    else:
        raw[key] = {**raw[key], **_cut(raw[key], type(getattr(config, key)), depth, layers, shrink)}
        for other, sub in raw.items():
            if other != key and isinstance(sub, dict) and type(sub.get("num_hidden_layers")) is int:
                raw[other] = {**sub, "num_hidden_layers": 1, **{k: v[:1] for k, v in sub.items() if isinstance(
                    v, list) and len(v) == sub["num_hidden_layers"] and not names_blocks(v, sub["num_hidden_layers"])}}
    try:
        tiny = type(config).from_dict(raw)
    except Exception as err:  # config classes validate their values with many exception types
        raise NormSurgeryError(f"could not build a tiny {config.model_type} config ({err})") from None
    tiny._attn_implementation = "eager"
    return tiny


def _cut(raw: dict[str, Any], cls: type, depth: int, layers: int, shrink: bool) -> dict[str, Any]:
    """The changes that make a (language model's) config dict of `depth` blocks tiny: see tiny_like. A depth that
    the config derives from a per-block list (Nemotron-H's layers_block_type) follows that list's cut."""
    names = dict(getattr(cls, "attribute_map", {}) or {})

    def get(canonical: str) -> Any:
        return raw.get(names.get(canonical, canonical))

    depth_key = names.get("num_hidden_layers", "num_hidden_layers")
    changes: dict[str, Any] = {depth_key: layers} if depth_key in raw else {}
    changes.update({k: layers for k in depth_counts(raw, depth)})  # the model's own depth key, whatever its name
    changes.update({k: raw[k][:layers] for k in layer_lists(raw, depth)})
    changes.update({k: {i: v for i, v in raw[k].items() if int(i) < layers} for k in layer_dicts(raw, depth)})
    vocab_key = names.get("vocab_size", "vocab_size")
    if int(raw.get(vocab_key) or 0) > 4 * VOCAB:
        changes[vocab_key] = VOCAB
        changes.update({k: v % VOCAB for k, v in raw.items() if k.endswith("token_id") and type(v) is int})
    vocab = int(changes.get(vocab_key, raw.get(vocab_key) or VOCAB))
    # other vocabularies the input ids index (Gemma 4's per-block input embeddings), no larger than the main one
    changes.update({k: vocab for k, v in raw.items() if k.startswith("vocab_size") and k != vocab_key
                    and type(v) is int and v > max(vocab, 4 * VOCAB)})
    if shrink:
        hidden = int(get("hidden_size"))
        heads = int(get("num_attention_heads") or 0)
        head_dim = raw.get("head_dim")
        explicit = isinstance(head_dim, int) and (not heads or head_dim * heads != hidden)
        small = heads * max(2, 64 // heads) if heads else 64  # divisible by the head count, as configs check
        for k, v in raw.items():
            if k in COUNTS or k in changes or type(v) is not int or v <= 1:
                continue
            if v == hidden:
                changes[k] = small
            elif "intermediate" in k or "ffn" in k or k in ("n_inner", "d_ff"):
                changes[k] = 32
        if not explicit and isinstance(head_dim, int):
            changes["head_dim"] = small // heads
    return changes
