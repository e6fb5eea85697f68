"""The Python API: each call returns what the command prints with --json, raises the command's errors as
exceptions, prints nothing, creates missing parent folders; the in-memory fold equals the original and saves as
a stock model; the README's examples run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).parent.parent / "README.md"


def test_import_loads_neither_torch_nor_transformers():
    code = ("import sys, normsurgery as ns; ns.fold; ns.NormSurgeryError; "
            "print([m for m in ('torch', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_fold_writes_verifies_and_returns_the_result_quietly(tiny_model, tmp_path, capsys):
    import normsurgery as ns

    seen, llama = [], str(tiny_model("llama"))
    capsys.readouterr()  # building the fixture may print
    result = ns.fold(llama, tmp_path / "new" / "parents" / "out",
                     progress=lambda what, done, total: seen.append(what))
    assert result.check.passed and result.check.rel_logit_diff <= 1e-5 and result.folded
    assert (tmp_path / "new" / "parents" / "out" / "config.json").is_file()
    assert json.loads((tmp_path / "new" / "parents" / "out" / "normsurgery.json").read_text())["check"]["passed"]
    assert {"writing", "verifying"} <= set(seen)
    assert capsys.readouterr() == ("", "")  # printing is the CLI's


def test_convert_check_and_prune(tiny_model, tmp_path, capsys):
    import normsurgery as ns

    gpt2, llama = str(tiny_model("gpt2")), str(tiny_model("llama"))
    capsys.readouterr()
    converted = ns.convert(gpt2, tmp_path / "rms", to="rmsnorm")
    assert converted.remote_code and converted.check.passed
    report = ns.check(gpt2, str(tmp_path / "rms"))
    assert report.passed and report.rel_logit_diff <= 1e-5 and report.as_dict()["passed"]
    pruned = ns.prune(llama, tmp_path / "pruned", layers=[1])
    assert pruned["selection"]["blocks"] == [1] and pruned["check"]["passed"]
    assert capsys.readouterr() == ("", "")


def test_bad_input_raises_the_commands_error(tiny_model, tmp_path, cli):
    import normsurgery as ns

    gpt2 = str(tiny_model("gpt2"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(ns.NormSurgeryError) as raised:
        ns.fold(gpt2, tmp_path / "taken")
    code, _, err = cli("fold", gpt2, "-o", tmp_path / "taken")
    assert code == 2 and " ".join(str(raised.value).split()) in " ".join(err.split())
    with pytest.raises(ns.NormSurgeryError, match="--dtype 'float8' is not one of"):
        ns.fold(gpt2, tmp_path / "x", dtype="float8")
    with pytest.raises(ns.NormSurgeryError, match="has no option colour"):
        ns.convert(gpt2, tmp_path / "y", to="dyt", colour="red")
    with pytest.raises(ns.NormSurgeryError, match="to must be"):
        ns.convert(gpt2, tmp_path / "z", to="layernorm")  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("family", ["gpt2", "gpt2_untied", "llama", "llama_bias_tied", "gemma", "gpt_neox", "phi",
                                    "opt", "mixtral", "phimoe", "gpt_oss", "deepseek_v2"])
def test_fold_model_in_memory_is_exact_and_saves_as_a_stock_model(family, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    import normsurgery as ns

    folder = tiny_model(family)
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert ns.fold_model(model) is model
    ids = torch.randint(3, model.config.get_text_config().vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = original(ids).logits.double(), model(ids).logits.double()
    assert ((want - got).abs().max() / want.abs().max()).item() <= 1e-5
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def _readme_python_api_blocks() -> list[str]:
    """The code blocks of the README's 'Python API' section."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readmes_python_examples_run(tiny_model, tmp_path, monkeypatch):
    """Every example of the README's Python API section, with the reference models stood in for by tiny fixtures
    of their kind (gpt2-shakespeare: gpt2; smollm2-135m: the 4-block smollm3) and run from an empty folder."""
    blocks = _readme_python_api_blocks()
    assert blocks
    monkeypatch.chdir(tmp_path)
    stand_ins = {"gpt2-shakespeare": str(tiny_model("gpt2")), "smollm2-135m": str(tiny_model("smollm3")),
                 "HuggingFaceTB/SmolLM2-135M": str(tiny_model("smollm3")),
                 "openai-community/gpt2": str(tiny_model("gpt2"))}
    for block in blocks:
        for name, folder in stand_ins.items():
            block = block.replace(f'"{name}"', repr(folder))
        block = block.replace('budget="30min"', 'budget="2k", seq_len=32')  # seconds, not the real budget
        exec(compile(block, "README.md", "exec"), {})


@pytest.mark.parametrize("family, to", [("gpt2", "rmsnorm"), ("gpt2", "crmsnorm"), ("gpt2_untied", "crmsnorm"),
                                        ("opt", "rmsnorm"), ("bloom", "crmsnorm"), ("gpt_neox", "rmsnorm"),
                                        ("phi", "crmsnorm"), ("falcon", "rmsnorm"), ("dbrx", "rmsnorm"),
                                        ("dbrx", "crmsnorm"), ("phimoe", "rmsnorm"), ("xglm", "crmsnorm")])
def test_convert_model_in_memory_is_exact_and_saves_like_the_clis_output(family, to, tiny_model, tmp_path,
                                                                          clean_python):
    from transformers import AutoModelForCausalLM

    import normsurgery as ns

    folder = tiny_model(family)
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = ns.convert_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), to=to)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = original(ids).logits.double(), model(ids).logits.double()
    assert ((want - got).abs().max() / want.abs().max()).item() <= 1e-5
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["model_type"] == "normsurgery" and (tmp_path / "saved" / "modeling_normsurgery.py").is_file()
    loaded = clean_python("compare", folder, tmp_path / "saved")  # stock transformers, normsurgery not importable
    assert loaded["rel"] <= 1e-5 and loaded["same_generation"] and loaded["layernorms_left"] == []


def test_convert_model_refuses_what_it_cannot_do(tiny_model):
    from transformers import AutoModelForCausalLM

    import normsurgery as ns

    llama = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32)
    with pytest.raises(ns.NormSurgeryError, match="does not apply"):
        ns.convert_model(llama, to="rmsnorm")  # already RMSNorm
    with pytest.raises(ns.NormSurgeryError, match="run from a folder"):
        ns.convert_model(llama, to="dyt")  # type: ignore[arg-type]


def test_a_loaded_output_saved_again_loads_the_same_way(tiny_model, tmp_path, clean_python):
    """An output with its own modeling code, loaded and saved with save_pretrained, keeps that code and its
    surgery (the CRMSNorm shapes included)."""
    from transformers import AutoModelForCausalLM

    import normsurgery as ns

    folder = tiny_model("gpt2")
    ns.convert(str(folder), tmp_path / "crms", to="crmsnorm")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "crms", dtype=torch.float32, trust_remote_code=True)
    loaded.save_pretrained(tmp_path / "again")
    first, again = (json.loads((tmp_path / f / "config.json").read_text()) for f in ("crms", "again"))
    assert again["surgery"] == first["surgery"] and again["auto_map"] == first["auto_map"]
    result = clean_python("compare", folder, tmp_path / "again")
    assert result["rel"] <= 1e-5 and result["same_generation"]
