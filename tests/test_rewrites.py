"""Exact rewrites on every family where they apply: same logits in float32, loadable without normsurgery,
greedy generation with the KV cache unchanged, refusals where they do not apply."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ALL_FIXTURES
from fixtures import config_for
from normsurgery.arch import architecture_of
from normsurgery.arch.facts import applicability, has_experts

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


MOE = [n for n in ALL_FIXTURES if has_experts(architecture_of(config_for(n)))]


def _routing(folder) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, ...]]]:
    """Every router's weight and its outputs (logits, scores, chosen experts) on fixed tokens, from stock transformers
    (with the folder's own modeling code where it has some)."""
    from transformers import AutoModelForCausalLM

    from normsurgery.rewrite.in_memory import ModelTensors

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True).eval()
    arch = architecture_of(model.config)
    tensors = ModelTensors(model, arch.key_renames, arch.fused)
    routers = [r for b in arch.blocks for n in b.norms for r in n.readers if r.router]
    outputs: list[tuple[torch.Tensor, ...]] = []
    for router in routers:
        module = model.get_submodule(tensors.loaded_name(router.weight).rsplit(".", 1)[0])
        module.register_forward_hook(lambda _m, _a, out: outputs.append(out if isinstance(out, tuple) else (out,)))
    with torch.no_grad():
        model(torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)))
    return [tensors.get(r.weight).clone() for r in routers], outputs


def _top2(logits: torch.Tensor) -> torch.Tensor:
    """The two experts each token is sent to (the fixtures route to 2), in index order."""
    return logits.topk(2, dim=-1).indices.sort(-1).values


@pytest.mark.parametrize("name", MOE)
def test_fold_keeps_every_routing_choice(name, tiny_model, cli, tmp_path):
    """The router reads the post-attention norm like the experts: the fold rescales its columns, and it then computes
    the same logits and sends every token to the same experts."""
    original = tiny_model(name)
    code, _, err = cli("fold", original, "-o", tmp_path / "out")
    assert code == 0, err
    weights, before = _routing(original)
    folded_weights, after = _routing(tmp_path / "out")
    assert weights and not any(torch.equal(a, b) for a, b in zip(weights, folded_weights))
    _assert_same_routing(before, after)


CENTERED_MOE = [(n, op) for n in MOE for op in ("rmsnorm", "crmsnorm") if _applies(n, op)]


@pytest.mark.parametrize("name,op", CENTERED_MOE, ids=[f"{n}-{o}" for n, o in CENTERED_MOE])
def test_norm_swap_keeps_every_routing_choice(name, op, tiny_model, cli, tmp_path):
    """Centering every writer (each routed expert's output rows too) and swapping the norms leaves every router's
    input as it was (CRMSNorm: in d-1 coordinates, the router compressed with it): the same logits, the same experts."""
    original = tiny_model(name)
    code, _, err = cli("convert", original, "--to", op, "-o", tmp_path / "out")
    assert code == 0, err
    weights, before = _routing(original)
    swapped_weights, after = _routing(tmp_path / "out")
    resized = [b.shape[-1] for b in swapped_weights]
    assert weights and resized == [a.shape[-1] - (op == "crmsnorm") for a in weights]
    _assert_same_routing(before, after)


def _assert_same_routing(before: list[tuple[torch.Tensor, ...]], after: list[tuple[torch.Tensor, ...]]) -> None:
    """Every router's outputs agree: its floating outputs closely, its chosen experts exactly."""
    assert len(before) == len(after) >= 1
    chosen = 0
    for old, new in zip(before, after):
        for a, b in zip(old, new):
            if a.dtype.is_floating_point:
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item())
            else:
                assert torch.equal(a, b)
                chosen += 1
        if all(a.dtype.is_floating_point for a in old):
            # DBRX's and Llama 4's routers return their logits last (after Llama 4's scores); the block takes the top 2
            assert torch.equal(_top2(old[-1]), _top2(new[-1]))
            chosen += 1
    assert chosen >= len(before)  # every router's chosen experts were compared


STORED_OTHERWISE = [n for n in MOE if architecture_of(config_for(n)).as_loaded() != architecture_of(config_for(n))]


@pytest.mark.parametrize("name", STORED_OTHERWISE)
def test_fold_and_prune_take_experts_stored_as_loaded(name, tiny_model, cli, clean_python, tmp_path):
    """A checkpoint saved from a loaded model's state dict holds the experts stacked (and the routers renamed) as
    transformers holds them in memory; transformers loads it, and so do fold and prune, writing that layout."""
    from safetensors import safe_open

    from fixtures import save_as_loaded

    stacked = save_as_loaded(tiny_model(name), tmp_path / "stacked")
    with safe_open(stacked / "model.safetensors", "pt") as f:
        names = set(f.keys())
    arch = architecture_of(config_for(name))
    assert set(arch.as_loaded().roles()) == names and not set(arch.roles()) <= names
    for command, extra in (("fold", ()), ("prune", ("--layers", "0"))):
        out = tmp_path / command
        code, stdout, err = cli(command, stacked, *extra, "-o", out, "--json")
        assert code == 0, err
        check = json.loads(stdout)["check"]
        assert check["top1_agreement"] == 1.0 and check["rel_logit_diff"] <= REL_TOLERANCE
        with safe_open(out / "model.safetensors", "pt") as f:
            written = set(f.keys())
        assert written == names if command == "fold" else not any(".experts.0." in n for n in written)
    loaded = clean_python("compare", stacked, tmp_path / "fold")
    assert loaded["rel"] <= REL_TOLERANCE and loaded["same_generation"]


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
    ("phimoe", "crmsnorm", "stacked parameter without a bias"),
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
