"""Model types that no family declares are traced at run time, proven on a tiny instance, cached, and then folded,
pruned and converted exactly like a declared family. One type per kind of layout (the whole mapping is swept by
bench/arch_sweep.py), and a checkpoint whose code ships in its own folder with module names no family uses."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from normsurgery.adapt.tiny import tiny_config, tiny_model

REMOTE_CODE = Path(__file__).parent / "remote_model" / "modeling_tinylm.py"
# dense and MoE blocks interleaved (first_k_dense_replace); experts stacked in memory and saved per expert, under other
# names (a key rename of a 3-D tensor); short-convolution hybrid; a pure SSM (Mamba's in_proj/out_proj); a LayerNorm
# MoE (rmsnorm exact, crmsnorm refused by its proof); linear-attention hybrid whose convolution transformers
# concatenates at load; a composite config (Gemma 3: the language model under text_config, saved under another
# prefix, beside a vision tower left alone); per-block input embeddings held in model-level tensors one slice per
# block, which pruning slices (Gemma 4); a fused query_key_value stored whole that transformers splits at load into
# q_proj, k_proj and v_proj (Sarvam-MoE); a block list stored under another name with per-expert tensors that
# transformers stacks (Nemotron-H's backbone.layers, a Mamba/attention/MoE hybrid); a residual scaled by a learned
# weight per feature before each add (Doge)
TYPES = ["glm4_moe", "granitemoeshared", "lfm2", "mamba", "cohere2_moe", "olmo_hybrid", "gemma3", "gemma4_text",
         "sarvam_moe", "nemotron_h", "doge"]


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Each test traces in its own cache folder and process registry."""
    from normsurgery.adapt import runtime

    monkeypatch.setenv("NORMSURGERY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(runtime, "_TRACED", {})


def _checkpoint(model_type: str, folder: Path) -> Path:
    """A tiny random checkpoint of a model type, saved by transformers."""
    tiny_model(tiny_config(model_type, layers=3)).save_pretrained(folder)
    return folder


def _json(out: str) -> dict:
    return json.loads(out)


@pytest.mark.parametrize("model_type", TYPES)
def test_an_undeclared_type_is_traced_proven_and_rewritten_exactly(cli, tmp_path, model_type):
    model = _checkpoint(model_type, tmp_path / "model")
    code, out, err = cli("inspect", model, "--json")
    assert code == 0, err
    facts = _json(out)
    assert facts["declaration"] == "traced and proven"
    applies = {op["operation"]: op["applies"] for op in facts["operations"]}
    assert applies["fold"] and applies["prune"]
    code, out, err = cli("fold", model, "-o", tmp_path / "fold", "--json")
    assert code == 0, err
    assert _json(out)["check"]["passed"]
    code, out, err = cli("prune", model, "--layers", "1", "-o", tmp_path / "prune", "--json")
    assert code == 0, err
    assert _json(out)["check"]["passed"]  # equal to the original with block 1 skipped
    for target in ("rmsnorm", "crmsnorm") if facts["norm"] == "LayerNorm" else ():
        code, out, err = cli("convert", model, "--to", target, "-o", tmp_path / target, "--json")
        if applies[target]:
            assert code == 0 and _json(out)["check"]["passed"], err
        else:
            assert code == 2 and "Traceback" not in err


def test_an_operation_whose_proof_fails_is_refused_alone_with_the_proofs_reason(cli, tmp_path):
    """Cohere2-MoE (LayerNorm, experts stacked at load): rmsnorm is proven; crmsnorm's exported code cannot resize the
    stacked experts, its proof fails, and only crmsnorm is refused, saying so."""
    model = _checkpoint("cohere2_moe", tmp_path / "model")
    ops = {op["operation"]: op for op in _json(cli("inspect", model, "--json")[1])["operations"]}
    assert ops["rmsnorm"]["applies"] and ops["fold"]["applies"] and ops["prune"]["applies"]
    assert not ops["crmsnorm"]["applies"] and "failed the proof of convert to crmsnorm" in ops["crmsnorm"]["reason"]
    code, _, err = cli("convert", model, "--to", "crmsnorm", "-o", tmp_path / "out")
    assert code == 2 and "proof" in err and "Traceback" not in err and not (tmp_path / "out").exists()


def test_the_proven_declaration_is_cached_and_reused_without_tracing(cli, tmp_path, monkeypatch):
    from normsurgery.adapt import runtime

    model = _checkpoint("glm4_moe", tmp_path / "model")
    assert cli("inspect", model, "--json")[0] == 0
    cached = list(runtime.traced_folder().glob("glm4_moe-*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["draft"]["layouts"]
    monkeypatch.setattr(runtime, "_TRACED", {})

    def no_trace(*args, **kwargs):
        raise AssertionError("traced again")

    monkeypatch.setattr(runtime, "trace", no_trace)
    code, out, err = cli("fold", model, "-o", tmp_path / "fold", "--json")
    assert code == 0 and _json(out)["check"]["passed"], err


@pytest.mark.parametrize("model_type,says", [("bert", "encoder-only"), ("bart", "encoder-decoder")])
def test_what_is_not_a_decoder_is_refused_in_one_paragraph(cli, tmp_path, model_type, says):
    model = _checkpoint(model_type, tmp_path / "model")
    code, out, err = cli("fold", model, "-o", tmp_path / "out")
    assert code == 2 and says in " ".join(err.split()) and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def remote_model(tmp_path) -> Path:
    """A Pre-LN LayerNorm decoder whose code ships in its folder (auto_map), norms perturbed off identity."""
    spec = importlib.util.spec_from_file_location("modeling_tinylm", REMOTE_CODE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.TinyLMForCausalLM(module.TinyLMConfig())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pre_" in name or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    folder = tmp_path / "remote"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_tinylm.TinyLMConfig",
                          "AutoModelForCausalLM": "modeling_tinylm.TinyLMForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(REMOTE_CODE, folder)
    return folder


def test_a_model_whose_code_ships_in_its_folder_is_rewritten_exactly(cli, tmp_path, remote_model, clean_python):
    code, _, err = cli("inspect", remote_model)
    assert code == 2 and "--trust-remote-code" in err and "Traceback" not in err
    code, out, err = cli("inspect", remote_model, "--json", "--trust-remote-code")
    assert code == 0, err
    facts = _json(out)
    assert facts["declaration"] == "traced and proven" and facts["norm"] == "LayerNorm"
    code, out, err = cli("fold", remote_model, "-o", tmp_path / "fold", "--json", "--trust-remote-code")
    assert code == 0 and _json(out)["check"]["passed"], err
    assert (tmp_path / "fold" / "modeling_tinylm.py").is_file()
    assert "auto_map" in json.loads((tmp_path / "fold" / "config.json").read_text())
    code, out, err = cli("prune", remote_model, "--layers", "1", "-o", tmp_path / "prune", "--json",
                         "--trust-remote-code")
    assert code == 0 and _json(out)["check"]["passed"], err
    assert json.loads((tmp_path / "prune" / "config.json").read_text())["depth"] == 2
    for target in ("rmsnorm", "crmsnorm"):  # a LayerNorm model: the exact conversions, its own code kept beside ours
        code, out, err = cli("convert", remote_model, "--to", target, "-o", tmp_path / target, "--json",
                             "--trust-remote-code")
        assert code == 0 and _json(out)["check"]["passed"], err
        loaded = clean_python("logits_with_code", remote_model, tmp_path / target)
        assert loaded["rel"] < 2e-5 and not loaded["normsurgery_importable"]
        assert loaded["class"] == "TinyLMForCausalLM"  # the folder's class, patched by the shipped code
    loaded = clean_python("logits_with_code", remote_model, tmp_path / "fold")
    assert loaded["rel"] < 2e-5


def test_a_prune_that_would_change_a_kept_blocks_kind_is_refused(cli, tmp_path):
    """Jamba chooses each block's mixer (attention or Mamba) by a rule on block indices (attn_layer_period/offset),
    which no per-block list carries: removing block 1 would turn kept blocks into the other kind."""
    model = _checkpoint("jamba", tmp_path / "model")
    code, _, err = cli("prune", model, "--layers", "1", "-o", tmp_path / "out")
    assert code == 2 and "kind" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_settings_by_block_index_are_reindexed_for_the_kept_blocks():
    from normsurgery.arch.layer_config import pruned_config_updates

    class Config:
        num_hidden_layers = 4
        per_layer_config = {"1": {"head_dim": 32}, "3": {"head_dim": 64}}  # Gemma 4's format
        kinds = ["a", "b", "a", "b"]

    updates = pruned_config_updates(Config(), ("per_layer_config", "kinds"), "num_hidden_layers", [0, 1, 3])
    assert updates == {"num_hidden_layers": 3, "per_layer_config": {"1": {"head_dim": 32}, "2": {"head_dim": 64}},
                       "kinds": ["a", "b", "b"]}


def test_a_model_whose_blocks_compute_with_their_index_is_refused_pruning_and_still_folded(cli, tmp_path):
    """DiffLlama's attention mixes with a constant set from the block's index: no pruned model equals the original
    with a block skipped, which the trace's own prune proof finds before anything is streamed."""
    model = _checkpoint("diffllama", tmp_path / "model")
    code, _, err = cli("prune", model, "--layers", "1", "-o", tmp_path / "out")
    assert code == 2 and "own block index or the model's depth" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    code, out, err = cli("fold", model, "-o", tmp_path / "fold", "--json")
    assert code == 0 and _json(out)["check"]["passed"], err


def test_lists_of_block_indices_and_every_layer_count_follow_a_traced_prune():
    from normsurgery.arch.layer_config import pruned_config_updates

    class Config:
        def __init__(self) -> None:
            self.num_hidden_layers = 4
            self.hybrid_layer_ids = [1, 3]  # Zamba 2: blocks listed by index
            self.decoder_layers = self.encoder_layers = 4  # Whisper's causal LM: the depth under two names
            self.eos_token_id = [1, 2]  # small integers that name no block

        def to_dict(self) -> dict:
            return dict(vars(self))

    updates = pruned_config_updates(Config(), ("hybrid_layer_ids",), "num_hidden_layers", [0, 2, 3],
                                    follow_depth=True)
    assert updates == {"num_hidden_layers": 3, "decoder_layers": 3, "encoder_layers": 3, "hybrid_layer_ids": [2]}


def test_a_skipped_block_that_returns_a_list_passes_its_input_through():
    import torch

    from normsurgery.depth.skip import _pass_through

    x = torch.ones(1, 2, 3)
    out = _pass_through(None, (x,), {}, [torch.zeros(1, 2, 3), "attention"])  # GPT-1's blocks return a list
    assert isinstance(out, list) and out[0] is x and out[1] == "attention"


def test_a_norm_is_found_by_what_it_computes_whatever_its_class_is_called():
    import torch
    from torch import nn

    from normsurgery.adapt.discover import is_norm

    class Centre(nn.Module):  # a LayerNorm by another name, as a remote model may write it
        def __init__(self) -> None:
            super().__init__()
            self.g, self.b = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.zeros(8))

        def forward(self, x):
            x = x - x.mean(-1, keepdim=True)
            return self.g * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) + self.b

    class Gain(nn.Module):  # a learned per-channel scale is no norm
        def __init__(self) -> None:
            super().__init__()
            self.g = nn.Parameter(torch.rand(8) + 0.5)

        def forward(self, x):
            return self.g * x

    assert is_norm(Centre()) and not is_norm(Gain()) and not is_norm(nn.Linear(8, 8))


def test_a_cached_declaration_is_not_reused_for_a_config_with_another_kind_of_block(cli, tmp_path):
    """Two LFM2 checkpoints of one layout but for their layer types: the first holds convolution blocks only, so its
    trace never saw an attention block, and the second must be traced again, not resolved with the first's."""
    only_conv = tiny_config("lfm2", layers=3, overrides={"layer_types": ["conv"] * 3})
    mixed = tiny_config("lfm2", layers=3, overrides={"layer_types": ["conv", "full_attention", "conv"]})
    tiny_model(only_conv).save_pretrained(tmp_path / "conv")
    tiny_model(mixed).save_pretrained(tmp_path / "mixed")
    code, _, err = cli("inspect", tmp_path / "conv")
    assert code == 0, err
    code, out, err = cli("fold", tmp_path / "mixed", "-o", tmp_path / "fold", "--json")
    assert code == 0 and _json(out)["check"]["passed"], err


def test_a_checkpoint_that_transformers_converts_beyond_renames_is_refused_with_that_cause(cli, tmp_path):
    """Ergo's checkpoints store its router transposed and its residual gates as a function of their weights:
    transformers converts them at load, which no declaration can name, and the refusal says so."""
    model = _checkpoint("ergo", tmp_path / "model")
    code, _, err = cli("inspect", model)
    assert code == 2 and "converts these tensors at load" in err and "Traceback" not in err
