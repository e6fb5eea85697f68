"""`normsurgery check`: identical models pass; a perturbed model fails with exit 1 and names the metric."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file, save_file


def _perturbed_copy(src, dst, scale=1e-2):
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    name = next(k for k in weights if k.endswith("mlp.c_fc.weight"))
    weights[name] = weights[name] + scale * torch.randn(weights[name].shape, generator=torch.Generator().manual_seed(1))
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_model_against_itself_passes(tiny_model, cli):
    folder = tiny_model("gpt2")
    code, out, err = cli("check", folder, folder, "--json", "--num-seqs", "2", "--seq-len", "16")
    assert code == 0, err
    report = json.loads(out)
    # two forwards of one model agree to the last bit on a quiet machine; once, under xdist load, they differed
    # by 1e-5 of the logit scale (float32 kernels can split work differently), so the bound allows that
    assert report["passed"] and report["rel_logit_diff"] <= 2e-5 and report["top1_agreement"] == 1.0
    assert report["mean_kl"] <= 1e-9
    assert report["logit_scale"] > 1.0  # fixtures have O(1) logits, so errors would show


def test_perturbed_model_fails_with_exit_1(tiny_model, cli, tmp_path):
    folder = tiny_model("gpt2")
    bad = _perturbed_copy(folder, tmp_path / "bad")
    code, out, err = cli("check", folder, bad, "--json", "--num-seqs", "2", "--seq-len", "16")
    assert code == 1
    report = json.loads(out)
    assert not report["passed"]
    assert any("logit diff" in f for f in report["failures"])
    assert "logit diff" in err and "Traceback" not in err


def test_loose_thresholds_pass_and_markdown(tiny_model, cli, tmp_path):
    folder = tiny_model("gpt2")
    bad = _perturbed_copy(folder, tmp_path / "bad", scale=1e-4)
    code, out, _ = cli("check", folder, bad, "--markdown", "--max-logit-diff", "0.1", "--min-top1", "0.5",
                       "--max-kl", "0.1", "--num-seqs", "2", "--seq-len", "16")
    assert code == 0
    assert out.startswith("**normsurgery check**") and "| top-1 agreement |" in out and "PASSED" in out


def test_check_with_text_file(tiny_model, cli, tmp_path):
    folder = tiny_model("llama")
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 20)
    code, out, err = cli("check", folder, folder, "--text", text, "--json", "--seq-len", "16", "--num-seqs", "2")
    assert code == 0, err
    assert json.loads(out)["tokens"] == "text"


def test_folder_without_tokenizer_checks_on_random_tokens(tiny_model, cli, tmp_path):
    """A bare weights folder (no tokenizer files) falls back to seeded random tokens, and a rewrite of it verifies."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model("gpt2") / name, bare / name)
    code, out, err = cli("check", bare, bare, "--json", "--num-seqs", "2", "--seq-len", "16")
    assert code == 0, err
    assert json.loads(out)["tokens"].startswith("random(")
    code, out, err = cli("convert", bare, "--to", "rmsnorm", "-o", tmp_path / "rms", "--json")
    assert code == 0, err
    assert json.loads(out)["check"]["tokens"].startswith("random(")
