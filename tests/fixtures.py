"""Tiny random models of every family, saved as real Hugging Face folders with an offline-trained tokenizer.

Norm gains and biases are perturbed away from 1/0 and weights are scaled so that activations and
logits are O(1): a rewrite that mishandles a gain, a bias or an orientation shows in the logits.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from family_configs import FAMILY_CONFIGS

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2, as the fixture configs declare
TOKENIZER_TEXT = (
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. "
    "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date. "
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. "
    "Now is the winter of our discontent made glorious summer by this sun of York. "
    "All the world's a stage, and all the men and women merely players; they have their exits "
    "and their entrances, and one man in his time plays many parts. 0123456789 +-*/=()[]{}<>"
)


@lru_cache(maxsize=1)
def tokenizer():
    """A byte-level BPE tokenizer of exactly the fixture vocabulary size, trained offline and deterministically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    vocab_size = FAMILY_CONFIGS["gpt2"][1]["vocab_size"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TOKENIZER_TEXT] * 4, trainer=trainer)
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def config_for(name: str):
    """The transformers config of one fixture."""
    from transformers import AutoConfig

    model_type, kwargs = FAMILY_CONFIGS[name]
    kwargs = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **kwargs}
    return AutoConfig.for_model(model_type, **kwargs)


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter: norm gains around 1 (or 0 for (1 + w) gains), biases non-zero, weights O(1/sqrt(fan_in))."""
    from normsurgery.adapt.tiny import perturb
    from normsurgery.arch import architecture_of

    arch = architecture_of(model.config)
    perturb(model, {n.weight: n.gain_offset for n in arch.all_norms() if n.weight},
            {n.bias for n in arch.all_norms() if n.bias}, {arch.token_embedding, arch.position_embedding}, seed)


def build_fixture(name: str, out: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Build fixture `name` into `out` (a fresh folder): config, safetensors weights, tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_for(name))
    perturb_(model, seed)
    model.to(dtype).eval()
    model.save_pretrained(out)
    tokenizer().save_pretrained(out)
    return out


def save_as_loaded(folder: Path, out: Path) -> Path:
    """A copy of a fixture whose weights are stored as stock transformers holds them in memory (its state dict:
    experts stacked, on-disk renames undone), a layout transformers also loads."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    out.mkdir()
    for f in folder.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    return out


HUB_TRANSFORMERS = "4.44.2"  # the transformers a hub-style config.json says wrote it

# SmolLM2-135M's config.json as the hub ships it (transformers 4.40 wrote it: no mlp_bias, no head_dim, no
# layer_types), at a tiny size; 16 blocks so that the issue's `--layers 10,11,12,13` applies
SMOLLM2_HUB = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
    "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
    "max_position_embeddings": 2048, "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 16,
    "num_key_value_heads": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0", "use_cache": True,
    "vocab_size": 320,
}


def hub_config(name: str) -> dict:
    """config.json for fixture `name` as the hub ships such a model: what an older transformers saved (only the values
    that differ from the base config's defaults, and only the attributes its class had then), so no norm eps, no
    tie_word_embeddings at the class default, no per-block list the class fills in (layer_types, ...) unless the model
    sets it, none of the attributes added since (mlp_bias, head_dim, ...); with the architectures, torch_dtype and the
    legacy rope keys (a rope_scaling for Llama)."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type, kwargs = FAMILY_CONFIGS[name]
    raw = {"architectures": [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]], "model_type": model_type,
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **kwargs, "torch_dtype": "bfloat16",
           "transformers_version": HUB_TRANSFORMERS, "use_cache": True}
    if hasattr(CONFIG_MAPPING[model_type], "rope_parameters") and "rope_parameters" not in kwargs:
        scaling = {"rope_type": "linear", "factor": 2.0} if model_type == "llama" else None
        raw.update(rope_theta=10000.0, rope_scaling=scaling)
    return raw


def write_hub_checkpoint(raw: dict, out: Path, seed: int = 0) -> Path:
    """A checkpoint folder with config.json `raw` and every tensor its architecture names, in the layout the hub
    stores (one tensor per expert), random bf16 values of a token size (the shapes are not what matters here)."""
    import json

    from safetensors.torch import save_file

    from normsurgery.arch import architecture_of, load_config

    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    names = sorted(architecture_of(load_config(raw)).roles())
    generator = torch.Generator().manual_seed(seed)
    save_file({n: torch.randn(2, 3, generator=generator).to(torch.bfloat16) for n in names},
              out / "model.safetensors", metadata={"format": "pt"})
    return out
