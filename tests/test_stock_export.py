"""`convert --to none --export stock|native`: the norm-free model written as the family's stock class with inert
norms, equal to the native (norm-free, shipped code) form and to the trained stand-ins; refusals."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ALL_FIXTURES

# families --to none takes whose stock form is impossible, and why (rewrite/inert.py: stock_problem)
STOCK_REFUSED = {
    **dict.fromkeys(("apertus", "cohere", "hunyuan_v1_dense", "persimmon", "qwen3", "stablelm_parallel_qk"),
                    "which a huge value would switch off"),  # per-head QK-norms share the eps
    **dict.fromkeys(("biogpt", "olmo", "opt"), "fixes its norms' eps"),
    **dict.fromkeys(("codegen", "gpt_neo", "gptj"), "has no bias in the stock class"),
}


def _rel(want: torch.Tensor, got: torch.Tensor) -> float:
    return float((want - got).abs().max() / want.abs().max())


@torch.no_grad()
def _frozen_reference(folder, arch, norms, ids):
    """The original with every norm replaced by its trained stand-ins, each path frozen at its mean divisor on `ids`
    and released (what a finished removal computes); its logits and the scales (norm -> path -> scale)."""
    from transformers import AutoModelForCausalLM

    from normsurgery.trainable.remove_ln import RELEASES, measure
    from normsurgery.trainable.stand_ins import install

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    groups = install(model, norms, [], arch.key_renames)
    measure(model, list(groups.values()), [ids])
    scales: dict[str, dict[str, float]] = {}
    for group in groups.values():
        group.set_mix(1.0)
        for which in RELEASES:
            group.release(which)
        scales.setdefault(group.norm_name, {})[group.group] = float(group.scale)
    return model(ids).logits.double(), scales


def _write_both_forms(source, folder, norms, ids, tmp_path):
    """Write `norms` removed at their frozen scales both ways, to tmp_path/native and tmp_path/stock; the frozen
    stand-ins' logits on `ids`."""
    from normsurgery.rewrite.inert import plan_stock_remove
    from normsurgery.rewrite.remove import plan_remove_norms
    from normsurgery.surgery import apply_plan

    want, scales = _frozen_reference(folder, source.arch, norms, ids)
    apply_plan(source, plan_remove_norms(source.arch, scales), tmp_path / "native", verify=False)
    apply_plan(source, plan_stock_remove(source.arch, source.reader.config, scales), tmp_path / "stock", verify=False)
    return want


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_inert_stock_norms_compute_the_frozen_stand_ins(name, tiny_model, tmp_path):
    """For every family --to none takes: the stock form (eps 2^66 in config.json, no auto_map, the stock class)
    computes what the frozen stand-ins compute, and what the native form computes, to float32 round-off; or its
    refusal says why."""
    from transformers import AutoModelForCausalLM

    from normsurgery.errors import NormSurgeryError
    from normsurgery.rewrite.inert import STOCK_EPS, stock_problem
    from normsurgery.source import open_model
    from normsurgery.trainable.stand_ins import removable_norms

    folder = tiny_model(name)
    source = open_model(str(folder), scan_finite=False)
    try:
        try:
            norms = removable_norms(source.arch)
        except NormSurgeryError:
            return  # --to none refuses the model whatever the form
        why = stock_problem(source.arch, norms, torch.float32)
        assert (why is None) == (name not in STOCK_REFUSED), why
        if why is not None:
            assert STOCK_REFUSED[name] in why
            return
        ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
        want = _write_both_forms(source, folder, norms, ids, tmp_path)
    finally:
        source.close()
    config = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert "auto_map" not in config and STOCK_EPS in config.values()
    assert not (tmp_path / "stock" / "modeling_normsurgery.py").exists()
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "stock", dtype=torch.float32).eval()
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "native", dtype=torch.float32, trust_remote_code=True)
    with torch.no_grad():
        got, native_logits = stock(ids).logits.double(), native.eval()(ids).logits.double()
    assert _rel(want, got) <= 2e-6 and _rel(native_logits, got) <= 2e-6


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma"])
def test_bfloat16_stock_norms_keep_their_powers_of_two(name, tiny_model, tmp_path):
    """In bfloat16 the inert gains 2^33 (minus Gemma's offset, which rounds away) are stored exactly, and the stock
    form is as close to the float32 stand-ins as the native one (both round the same weights to bfloat16)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from normsurgery.arch.spec import reader_groups
    from normsurgery.rewrite.inert import STOCK_ROOT
    from normsurgery.source import open_model
    from normsurgery.trainable.stand_ins import removable_norms

    folder = tiny_model(name, torch.bfloat16)
    source = open_model(str(folder), scan_finite=False)
    try:
        norms = removable_norms(source.arch)
        ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
        want = _write_both_forms(source, folder, norms, ids, tmp_path)
    finally:
        source.close()
    inert = [n.weight for n in norms if len(reader_groups(n)) > 1]
    with safe_open(tmp_path / "stock" / "model.safetensors", "pt") as f:
        assert inert and all(f.get_tensor(w).dtype == torch.bfloat16 and bool((f.get_tensor(w) == STOCK_ROOT).all())
                             for w in inert)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "stock", dtype=torch.float32)(ids).logits.double()
        native = AutoModelForCausalLM.from_pretrained(tmp_path / "native", dtype=torch.float32,
                                                      trust_remote_code=True)(ids).logits.double()
    assert _rel(want, got) <= max(1e-2, 2 * _rel(want, native))


@pytest.fixture(scope="module")
def fast(tmp_path_factory) -> tuple[str, ...]:
    """Options for a few-step run on a small training text."""
    from normsurgery.reference.text import shakespeare_text

    text = tmp_path_factory.mktemp("text") / "train.txt"
    text.write_text(shakespeare_text("train")[:30_000], encoding="utf-8")
    return ("--gap", "1", "--heal", "2", "--batch-size", "2", "--seq-len", "32", "--text", str(text))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_default_writes_stock_equal_to_the_native_export_of_the_same_run(name, tiny_model, cli, clean_python,
                                                                          tmp_path, fast):
    """A LayerNorm and an RMSNorm family: by default the same seeded run is written stock, which loads without
    remote code where normsurgery cannot be imported, and equals its --export native twin to float32 round-off."""
    reports = {}
    for form, args in (("stock", ()), ("native", ("--export", "native"))):
        code, stdout, err = cli("convert", tiny_model(name), "--to", "none", "-o", tmp_path / form, *fast, *args,
                                "--json")
        assert code == 0, err
        reports[form] = json.loads(stdout)
        assert reports[form]["export"] == form and "export_note" not in reports[form]
        assert reports[form]["export_check"]["rel_logit_diff"] <= 1e-5
    assert reports["stock"]["losses"] == reports["native"]["losses"]  # the same training
    loaded = clean_python("stock_vs_native", tmp_path / "stock", tmp_path / "native")
    assert loaded["rel"] <= 1e-6, loaded
    assert loaded["class"] == ("GPT2LMHeadModel" if name == "gpt2" else "LlamaForCausalLM")
    assert not loaded["auto_map"] and loaded["norm_eps"] == [2.0**66] and loaded["cache_consistent"]
    assert not loaded["normsurgery_importable"]
    card = json.loads((tmp_path / "stock" / "normsurgery.json").read_text())
    assert card["export"] == "stock" and card["remote_code"] is False


def test_default_falls_back_to_native_and_says_why(tiny_model, cli, tmp_path, fast):
    """Qwen3's per-head QK-norms share the eps: a run that did not ask for a form writes native and notes why."""
    code, stdout, err = cli("convert", tiny_model("qwen3"), "--to", "none", "-o", tmp_path / "out", *fast)
    assert code == 0, err
    assert "note: writing --export native" in stdout and "QK-norms" in stdout
    report = json.loads((tmp_path / "out" / "normsurgery.json").read_text())
    assert report["export"] == "native" and "QK-norms" in report["export_note"]
    assert (tmp_path / "out" / "modeling_normsurgery.py").exists()


@pytest.mark.parametrize("name, args, message", [
    ("qwen3", ("--export", "stock"), "which a huge value would switch off"),
    ("opt", ("--export", "stock"), "fixes its norms' eps"),
    ("gptj", ("--export", "stock"), "has no bias in the stock class"),
    ("gpt2", ("--export", "sideways"), "--export must be stock or native"),
])
def test_impossible_stock_is_refused_before_training(name, args, message, tiny_model, cli, tmp_path, fast):
    code, stdout, err = cli("convert", tiny_model(name), "--to", "none", "-o", tmp_path / "out", *fast, *args)
    assert code == 2 and message in err and "Traceback" not in err and not stdout.strip()
    assert err.strip().startswith("error:") and "\n" not in err.strip()  # one paragraph
    assert not (tmp_path / "out").exists()


def test_float16_cannot_hold_the_inert_gain(tiny_model, cli, tmp_path, fast):
    code, _, err = cli("convert", tiny_model("gpt2", torch.float16), "--to", "none", "-o", tmp_path / "out", *fast,
                       "--export", "stock")
    assert code == 2 and "float16" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [("--to", "dyt", "--export", "stock"), ("--to", "rmsnorm", "--export", "native")])
def test_export_belongs_to_to_none(args, tiny_model, cli, tmp_path, fast):
    code, _, err = cli("convert", tiny_model("gpt2"), *args, "-o", tmp_path / "out", *(fast if "dyt" in args else ()))
    assert code == 2 and "--export applies to --to none only" in err and not (tmp_path / "out").exists()


def test_the_api_takes_export_for_convert_and_prune(tiny_model, tmp_path):
    """`ns.convert(..., to="none", export=...)` refuses an impossible stock form before training, as the CLI does;
    `ns.prune(..., export="stock")` writes the stock sub-layer prune."""
    import normsurgery as ns
    from normsurgery.errors import NormSurgeryError

    with pytest.raises(NormSurgeryError, match="float16"):
        ns.convert(str(tiny_model("gpt2", torch.float16)), tmp_path / "none", to="none", export="stock")
    report = ns.prune(str(tiny_model("llama")), tmp_path / "pruned", what="mlp", layers=[0], export="stock")
    assert report["export"] == "stock" and report["check"]["rel_logit_diff"] == 0.0
    assert not (tmp_path / "none").exists() and "auto_map" not in (tmp_path / "pruned" / "config.json").read_text()
