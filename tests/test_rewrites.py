"""Exact rewrites on every family where they apply: same logits in float32, loadable without normsurgery,
greedy generation with the KV cache unchanged, refusals where they do not apply."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ALL_FIXTURES
from fixtures import config_for
from normsurgery.arch import architecture_of
from normsurgery.arch.facts import applicability

REL_TOLERANCE = 2e-5  # max |logit diff| / max |logit| in float32 (the bound; we land near 4e-7)


def _applies(name: str, op: str) -> bool:
    arch = architecture_of(config_for(name))
    return next(a for a in applicability(arch) if a.operation == op).applies


PAIRS = [(n, op) for n in ALL_FIXTURES for op in ("fold", "rmsnorm", "crmsnorm") if _applies(n, op)]

@pytest.mark.parametrize("name,op", PAIRS, ids=[f"{n}-{o}" for n, o in PAIRS])
def test_exact_rewrite(name, op, tiny_model, cli, clean_python, tmp_path):
    original = tiny_model(name)
    out = tmp_path / "out"
    args = ("fold", original) if op == "fold" else ("convert", original, "--to", op)
    code, stdout, stderr = cli(*args, "-o", out, "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    check = result["check"]
    assert check["top1_agreement"] == 1.0
    assert check["rel_logit_diff"] <= REL_TOLERANCE
    assert (out / "normsurgery.json").exists() and (out / "README.md").exists()
    assert json.loads((out / "normsurgery.json").read_text())["check"]["passed"]
    loaded = clean_python("compare", original, out)
    assert not loaded["normsurgery_importable"]
    assert loaded["rel"] <= REL_TOLERANCE
    assert loaded["same_generation"]
    if op != "fold":  # only the per-head QK LayerNorms inside attention stay (StableLM, Persimmon, Cohere)
        qk = [n.name for n in architecture_of(config_for(name)).all_norms() if n.role == "qk" and n.kind == "layernorm"]
        assert loaded["layernorms_left"] == sorted(qk)
        assert json.loads((out / "config.json").read_text())["auto_map"]
    else:
        assert "auto_map" not in json.loads((out / "config.json").read_text())  # a stock model


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_rmsnorm_on_rmsnorm_model_does_nothing(name, tiny_model, cli, tmp_path):
    code, out, _ = cli("convert", tiny_model(name), "--to", "rmsnorm", "-o", tmp_path / "out")
    assert code == 0 and "nothing to do" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,op,why", [
    ("llama", "crmsnorm", "zero-mean"),
    ("opt_postln", "rmsnorm", "Post-LN"),
    ("opt_postln", "crmsnorm", "Post-LN"),
    ("opt_postln", "fold", "nothing to fold"),
])
def test_refusals(name, op, why, tiny_model, cli, tmp_path):
    args = ("fold", tiny_model(name)) if op == "fold" else ("convert", tiny_model(name), "--to", op)
    code, _, err = cli(*args, "-o", tmp_path / "out")
    assert code == 2 and why in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bf16_reports_maths_and_storage_separately(tiny_model, cli, tmp_path):
    original = tiny_model("gpt2", torch.bfloat16)
    code, stdout, stderr = cli("convert", original, "--to", "rmsnorm", "-o", tmp_path / "out", "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["dtype"] == "bfloat16"
    assert result["maths_check"]["rel_logit_diff"] <= REL_TOLERANCE
    storage = result["storage_check"]["rel_logit_diff"]
    assert 0 < storage < 0.05  # bf16 has 8 bits of mantissa: rounding is visible but small
    assert result["check"]["top1_agreement"] > 0.9


def test_failed_verification_leaves_nothing(tiny_model, cli, tmp_path, monkeypatch):
    """A rewrite whose output does not match its source is not written: exit 1, no OUT, no temporary folder."""
    import normsurgery.rewrite.fold as fold
    from normsurgery.rewrite.maths import fold_into_reader

    def wrong(weight, bias, gain, norm_bias, *, conv1d):
        w, c = fold_into_reader(weight, bias, gain, norm_bias, conv1d=conv1d)
        return w * 1.01, c  # a 1% error in every reader

    monkeypatch.setattr(fold, "fold_into_reader", wrong)
    code, _, err = cli("fold", tiny_model("llama"), "-o", tmp_path / "out")
    assert code == 1 and "verification failed" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_config_read_differently_from_transformers_writes_nothing(tiny_model, cli, tmp_path, monkeypatch):
    """The quick config.json reading is confirmed against transformers' in the background, even with --no-verify."""
    import dataclasses

    from normsurgery.arch import FAMILY_BY_MODEL_TYPE

    wrong = dataclasses.replace(FAMILY_BY_MODEL_TYPE["gpt2"], config_keys=(("layer_norm_epsilon", ("initializer_range",)),))
    monkeypatch.setitem(FAMILY_BY_MODEL_TYPE, "gpt2", wrong)
    code, _, err = cli("fold", tiny_model("gpt2"), "-o", tmp_path / "out", "--no-verify")
    assert code != 0 and "differently from transformers" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_verification_threshold_is_an_option(tiny_model, cli, tmp_path):
    """`--max-logit-diff` sets the verification's limit: an impossible one fails the exact fold, a loose one passes."""
    code, _, err = cli("fold", tiny_model("llama"), "-o", tmp_path / "strict", "--max-logit-diff", "1e-30")
    assert code == 1 and "exceeds 1e-30" in err and not (tmp_path / "strict").exists()
    code, out, err = cli("fold", tiny_model("llama"), "-o", tmp_path / "loose", "--max-logit-diff", "1e-3", "--json")
    assert code == 0, err
    assert json.loads(out)["check"]["thresholds"]["max_rel_logit_diff"] == 1e-3
