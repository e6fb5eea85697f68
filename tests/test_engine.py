"""The execution engine: models run streamed from their checkpoints in bounded memory, with the same figures as in
memory; budgets and devices that cannot work are refused before anything is written; a failing exact rewrite names
the first block whose output differs; start-up does not import torch for --help."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from normsurgery.engine.resources import resolve_runtime
from normsurgery.errors import CheckFailed, NormSurgeryError


def _f32_bytes(folder) -> int:
    """What the model's weights take in float32."""
    from normsurgery.checkpoint.reader import CheckpointReader

    with CheckpointReader.open(folder) as reader:
        return sum(math.prod(reader.info(n).shape) for n in reader.names()) * 4


def test_diagnose_under_a_budget_below_the_model_streams_and_agrees(tiny_model, cli):
    folder = tiny_model("llama")
    args = ("diagnose", folder, "--samples", "2", "--seq-len", "16", "--json")
    code, full, err = cli(*args)
    assert code == 0, err
    code, limited, err = cli(*args, "--max-memory", "950KB")
    assert code == 0, err
    a, b = json.loads(full), json.loads(limited)
    assert a["memory"]["streamed_bytes"] == 0
    # offloading happened: most weights stayed on disk and were read at every pass
    assert b["memory"]["resident_bytes"] < _f32_bytes(folder) / 2 and b["memory"]["streamed_bytes"] > 0
    assert b["block_influence"] == pytest.approx(a["block_influence"], abs=1e-6)
    assert b["skip_cost"] == pytest.approx(a["skip_cost"], abs=1e-5)
    assert b["norm_gains"] == a["norm_gains"]


def test_verified_fold_under_a_small_budget_gives_the_same_figures(tiny_model, cli, tmp_path):
    folder = tiny_model("llama", torch.bfloat16)
    code, full, err = cli("fold", folder, "-o", tmp_path / "a", "--json")
    assert code == 0, err
    code, limited, err = cli("fold", folder, "-o", tmp_path / "b", "--json", "--max-memory", "950KB")
    assert code == 0, err
    a, b = json.loads(full), json.loads(limited)
    assert b["check"]["memory"]["budget_bytes"] == 950_000 and b["check"]["memory"]["streamed"]
    for key in ("check", "maths_check", "storage_check"):
        assert b[key]["max_abs_logit_diff"] == pytest.approx(a[key]["max_abs_logit_diff"], rel=1e-6, abs=1e-9)
        assert b[key]["top1_agreement"] == a[key]["top1_agreement"]


def test_prune_remove_under_a_budget_agrees_with_memory(tiny_model, cli, tmp_path):
    folder = tiny_model("llama")
    common = ("prune", folder, "--remove", "1", "--keep-first", "0", "--keep-last", "0", "--samples", "2",
              "--seq-len", "16", "--dry-run", "--json")
    code, full, err = cli(*common)
    assert code == 0, err
    code, limited, err = cli(*common, "--max-memory", "950KB")
    assert code == 0, err
    a, b = json.loads(full), json.loads(limited)
    assert b["memory"]["streamed_bytes"] > 0 and a["memory"]["streamed_bytes"] == 0
    assert a["selection"]["blocks"] == b["selection"]["blocks"]
    for ca, cb in zip(a["selection"]["candidates"], b["selection"]["candidates"]):
        assert cb["loss"] == pytest.approx(ca["loss"], abs=1e-5)


def test_a_budget_below_one_layer_is_refused_and_nothing_written(tiny_model, cli, tmp_path):
    folder = tiny_model("llama")
    for args in (("check", folder, folder), ("fold", folder, "-o", tmp_path / "out"), ("diagnose", folder)):
        code, out, err = cli(*args, "--max-memory", "20KB")
        assert code == 2, err
        assert "too small to run this model" in err and "--max-memory" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_and_nothing_written(tiny_model, cli, tmp_path):
    folder = tiny_model("gpt2")
    for args in (("check", folder, folder), ("fold", folder, "-o", tmp_path / "out"), ("diagnose", folder),
                 ("prune", folder, "--layers", "0", "-o", tmp_path / "out"), ("convert", folder, "--to", "rmsnorm",
                                                                             "-o", tmp_path / "out")):
        code, out, err = cli(*args, "--device", "cuda")
        assert code == 2, (args, err)
        assert "no CUDA GPU" in err and "--device cpu" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(NormSurgeryError, match="not one of auto, cpu, cuda"):
        resolve_runtime("tpu")


def test_a_failing_fold_names_the_first_block_whose_output_differs(tiny_model, tmp_path):
    from normsurgery.rewrite.fold import plan_fold
    from normsurgery.source import open_model
    from normsurgery.surgery import apply_plan

    source = open_model(str(tiny_model("llama")))
    plan = plan_fold(source.arch)
    broken = next(s for s in plan.steps if ".layers.1." in s.label)
    compute = broken.compute

    def wrong(t):
        out = compute(t)
        name = next(n for n in out if n.endswith("q_proj.weight"))
        out[name] = out[name].clone()
        out[name][0, 0] += 0.5
        return out

    broken.compute = wrong
    with pytest.raises(CheckFailed, match=r"first block whose output differs is block 1\b"):
        apply_plan(source, plan, tmp_path / "out")
    source.close()
    assert not (tmp_path / "out").exists()


def test_help_and_version_import_neither_torch_nor_transformers():
    probe = ("import sys; from normsurgery.cli import main; sys.argv = ['normsurgery', '{arg}']\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print('LOADED', [m for m in ('torch', 'transformers') if m in sys.modules])")
    for arg in ("--help", "--version"):
        out = subprocess.run([sys.executable, "-c", probe.format(arg=arg)], capture_output=True, text=True, timeout=60)
        assert "LOADED []" in out.stdout, (arg, out.stdout[-500:], out.stderr[-2000:])


@pytest.mark.parametrize("name,target", [("gpt2", "crmsnorm"), ("dbrx", "crmsnorm"), ("phimoe", "rmsnorm")])
def test_check_streams_exported_remote_code_models_too(name, target, tiny_model, cli, tmp_path):
    """An export streams like its base family (DBRX's experts read in their parent's forward, Phi-MoE's per-expert
    tensors stacked at load), its own modeling code building the modules."""
    folder = tiny_model(name)
    code, _, err = cli("convert", folder, "--to", target, "-o", tmp_path / "out", "--no-verify")
    assert code == 0, err
    code, full, err = cli("check", folder, tmp_path / "out", "--json")
    assert code == 0, err
    code, limited, err = cli("check", folder, tmp_path / "out", "--json", "--max-memory", "950KB")
    assert code == 0, err
    a, b = json.loads(full), json.loads(limited)
    assert b["memory"]["streamed"] and b["memory"]["budget_bytes"] == 950_000
    from normsurgery.engine.loading import OpenModel

    with OpenModel(tmp_path / "out", resolve_runtime("cpu", "950KB")) as export:  # streamed, not loaded whole
        assert export.lazy.streaming and not export.lazy.notes
    assert b["max_abs_logit_diff"] == a["max_abs_logit_diff"] and b["rel_logit_diff"] <= 2e-5
