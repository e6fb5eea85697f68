"""Every written config.json is complete for runtimes (llama.cpp, vLLM): `architectures` names a class transformers
(or the shipped modeling code) has, and GPT-2 keeps the `n_ctx` transformers 5 no longer writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from fixtures import config_for, tokenizer
from normsurgery.export import modeling_normsurgery
from normsurgery.export.config import runtime_config
from normsurgery.reference import gpt2_shakespeare
from normsurgery.reference.gguf_model import build_from_gguf


def _config(folder: Path) -> dict:
    """The config.json of a written folder."""
    return json.loads((folder / "config.json").read_text())


def _stock_class(config: dict) -> str:
    """The one class `architectures` names, checked to be transformers' causal-LM class for the model_type."""
    (name,) = config["architectures"]
    assert name == MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]] and hasattr(transformers, name)
    return name


def _without_architectures(folder: Path, out: Path) -> Path:
    """A copy of a fixture whose config.json has `"architectures": null` and no `n_ctx`, as a GGUF-built one had."""
    shutil.copytree(folder, out)
    config = {k: v for k, v in _config(out).items() if k != "n_ctx"}
    (out / "config.json").write_text(json.dumps({**config, "architectures": None}))
    return out


def test_runtime_config_keeps_what_the_source_says():
    config = {"model_type": "gpt2", "architectures": ["GPT2ForSequenceClassification"], "n_positions": 8, "n_ctx": 4}
    assert runtime_config(config) == config


def test_gguf_reference_build_names_its_class(tmp_path, monkeypatch):
    """The GGUF builder (smollm2-135m, gemma3-270m) with transformers' GGUF loader replaced by a tiny llama whose
    config, like a GGUF-loaded one, names no class."""
    model = transformers.AutoModelForCausalLM.from_config(config_for("llama"))
    assert model.config.to_dict()["architectures"] is None
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *_, **__: model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *_, **__: tokenizer())
    out = build_from_gguf(tmp_path / "model.gguf", tmp_path / "built", "card", {"name": "tiny"})
    assert _stock_class(_config(out)) == "LlamaForCausalLM"


def test_gpt2_reference_build_names_its_class(tmp_path, monkeypatch):
    """gpt2-shakespeare's writer, on an untrained tiny GPT-2 (the card, which needs training figures, left out)."""
    monkeypatch.setattr(gpt2_shakespeare, "card", lambda facts: "card")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=4096)
    gpt2_shakespeare.save(transformers.GPT2LMHeadModel(config), gpt2_shakespeare.load_tokenizer(), {}, tmp_path / "out")
    written = _config(tmp_path / "out")
    assert _stock_class(written) == "GPT2LMHeadModel" and written["n_ctx"] == written["n_positions"] == 32


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_fold_of_a_source_without_architectures_names_its_class(name, tiny_model, cli, tmp_path):
    source = _without_architectures(tiny_model(name), tmp_path / "source")
    code, _, err = cli("fold", source, "-o", tmp_path / "out", "--json")
    assert code == 0, err
    written = _config(tmp_path / "out")
    _stock_class(written)
    assert name != "gpt2" or written["n_ctx"] == written["n_positions"]


def test_convert_output_names_the_shipped_class(tiny_model, cli, tmp_path):
    """An output with its own modeling code names that code's class; the stock config it wraps names the stock one."""
    source = _without_architectures(tiny_model("gpt2"), tmp_path / "source")
    code, _, err = cli("convert", source, "--to", "rmsnorm", "-o", tmp_path / "out", "--json")
    assert code == 0, err
    written = _config(tmp_path / "out")
    (name,) = written["architectures"]
    assert written["auto_map"]["AutoModelForCausalLM"] == f"modeling_normsurgery.{name}"
    assert hasattr(modeling_normsurgery, name)
    assert _stock_class(written["base_config"]) == "GPT2LMHeadModel" and written["base_config"]["n_ctx"] > 0
