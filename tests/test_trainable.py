"""`convert --to none`: LayerNorm / RMSNorm removal with the freeze schedule, exported with no norm left (`--export
native`; the stock form: test_stock_export.py)."""

from __future__ import annotations

import json

import pytest



@pytest.fixture(scope="module")
def fast(tmp_path_factory) -> tuple[str, ...]:
    """Options for a few-step run on a small training text."""
    from normsurgery.reference.text import shakespeare_text

    text = tmp_path_factory.mktemp("text") / "train.txt"
    text.write_text(shakespeare_text("train")[:30_000], encoding="utf-8")
    return ("--gap", "1", "--heal", "2", "--batch-size", "2", "--seq-len", "32", "--text", str(text))


@pytest.mark.parametrize("name", ["gpt2", "llama", "gpt_neox", "phi", "phi3", "nemotron", "olmo"])
def test_removal_exports_a_norm_free_model_equal_to_the_trained_one(name, tiny_model, cli, clean_python, tmp_path, fast):
    out = tmp_path / "none"
    code, stdout, err = cli("convert", tiny_model(name), "--to", "none", "-o", out, *fast, "--export", "native",
                            "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["export_check"]["rel_logit_diff"] <= 1e-5 and report["export_check"]["top1_agreement"] == 1.0
    assert report["export"] == "native"
    steps = report["removal_steps"]
    freezes = [s for s in steps if s["scale"] is not None]
    assert len({s["unit"].split("[")[0] for s in freezes}) == report["removed"] and all(s["scale"] > 0 for s in freezes)
    paths = {s["unit"].split("[")[1].rstrip("]") for s in freezes}
    assert paths == ({"all"} if name == "gpt_neox" else {"all", "qk", "v"})  # NeoX's fused QKV interleaves heads
    assert [s["unit"] for s in steps[-3:]] == ["outliers", "special", "first"]  # the tokens kept apart, released last
    assert [s["step"] for s in steps] == list(range(len(steps)))  # one event per --gap step
    assert len(report["losses"]) == len(steps) - 1 + 2
    card = json.loads((out / "normsurgery.json").read_text())
    assert card["heldout_ce_before"] == report["heldout_ce_before"] and "removal_steps" in card
    assert card["loss_curve"] == "loss_curve.png" and (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = clean_python("norm_free", out)
    assert loaded["norm_modules"] == [] and loaded["cache_consistent"]


def test_same_seed_gives_byte_identical_shards(tiny_model, cli, tmp_path, fast):
    for run in ("a", "b"):
        assert cli("convert", tiny_model("gpt2"), "--to", "none", "-o", tmp_path / run, *fast)[0] == 0
    shards = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert shards and all((tmp_path / "a" / s).read_bytes() == (tmp_path / "b" / s).read_bytes() for s in shards)


@pytest.mark.parametrize("name, args, message", [
    ("opt_postln", (), "Post-LN"),
    ("gemma3", (), "sandwich, Peri-LN or embedding norms"),
    ("mixtral", (), "mixture-of-experts"),
    ("xglm", (), "position encodings are computed"),
    ("gpt2", ("--gap", "-1"), "--gap, --heal, --aux-weight and --spread-weight cannot be negative"),
    ("gpt2", ("--aux-weight", "-0.1"), "--gap, --heal, --aux-weight and --spread-weight cannot be negative"),
    ("gpt2", ("--spread-weight", "-1"), "--gap, --heal, --aux-weight and --spread-weight cannot be negative"),
    ("gpt2", ("--lr", "0"), "--lr must be a positive number"),
    ("gpt2", ("--loss", "mse"), "--loss must be kl, lm or kl+lm"),
])
def test_refusals_write_nothing(name, args, message, tiny_model, cli, tmp_path, fast):
    code, _, err = cli("convert", tiny_model(name), "--to", "none", "-o", tmp_path / "out", *fast, *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target, name, init", [("dyt", "gpt2", "linear"), ("derf", "llama", "linear"),
                                               ("dyt", "gpt_neox", "best-mse"), ("derf", "phi", "best-mse")])
def test_swaps_export_dyt_or_derf_with_calibrated_alpha(target, name, init, tiny_model, cli, clean_python, tmp_path,
                                                        fast):
    """The trained swaps are written as DyT/Derf (a `linear` start's gain factor folded into the stored gain: the
    export check compares the written model with the trained one) and load without normsurgery."""
    from safetensors import safe_open

    out = tmp_path / target
    code, stdout, err = cli("convert", tiny_model(name), "--to", target, "-o", out, *fast, "--json",
                            "--alpha-init", init)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["export_check"]["rel_logit_diff"] <= 1e-5 and report["options"]["alpha_init"] == init
    for start in report["alpha_init"]:
        if init == "linear":
            assert start["method"] == "linear" and start["gain"] == 10.0 and start["alpha"] > 0
        else:
            kept = start["mse_least_squares"] if start["method"] == "least-squares" else start["mse_scale"]
            assert start["alpha"] > 0 and kept == min(start["mse_scale"], start["mse_least_squares"])
    names = set()
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            names |= set(f.keys())
    assert sum(n.endswith(".alpha") for n in names) == report["swapped"]
    assert sum(n.endswith(".shift") for n in names) == (report["swapped"] if target == "derf" else 0)
    loaded = clean_python("norm_free", out)
    assert loaded["norm_modules"] == [] and loaded["cache_consistent"]
    assert loaded["swaps"] == ["DynamicErf" if target == "derf" else "DynamicTanh"]


GRANITE_SCALES = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")


def test_granite_scales_survive_fold_prune_and_the_exported_code(tiny_model, cli, clean_python, tmp_path, fast):
    """Granite's multipliers and logit scaling live in config.json only: the folded and pruned stock configs keep
    them, and so does the base config of a trained rewrite's exported code, whose loaded model computes with them."""
    from family_configs import FAMILY_CONFIGS

    want = {k: FAMILY_CONFIGS["granite"][1][k] for k in GRANITE_SCALES}
    assert all(v != 1.0 for v in want.values())  # a dropped value would show
    outputs = {"fold": ("fold",), "prune": ("prune", "--layers", "0"),
               "none": ("convert", "--to", "none", *fast, "--export", "native")}
    for operation, (command, *args) in outputs.items():
        code, _, err = cli(command, tiny_model("granite"), *args, "-o", tmp_path / operation)
        assert code == 0, err
        config = json.loads((tmp_path / operation / "config.json").read_text())
        assert {k: config.get("base_config", config)[k] for k in GRANITE_SCALES} == want, operation
    assert clean_python("norm_free", tmp_path / "none")["norm_modules"] == []


def test_alpha_fit_keeps_the_better_initialisation():
    import torch

    from normsurgery.arch.spec import Norm
    from normsurgery.trainable.swap import fit_alpha

    x = 3.0 * torch.randn(512, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    norm = Norm(name="n", weight="n.weight", bias=None, kind="rmsnorm", eps=1e-6, gain_offset=0.0, role="input")
    for target in ("dyt", "derf"):
        init = fit_alpha(x, norm, target)  # best-mse, the default
        assert init.mse_least_squares <= init.mse_scale and init.method == "least-squares" and init.gain == 1.0
        assert 0.05 < init.alpha < 2.0  # near 1/3 (the typical scale), not a degenerate fit


def test_linear_alpha_start_is_the_frozen_scale_map_up_to_three_typical_scales():
    """`--alpha-init linear`: gain x alpha-squashed input equals x / s (s the typical scale) within 3% for |x| up to
    3 s, so the swap starts where a frozen-scale norm would; only inputs far beyond the typical scale saturate."""
    import torch

    from normsurgery.arch.spec import Norm
    from normsurgery.trainable.swap import fit_alpha

    x = 3.0 * torch.randn(512, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    norm = Norm(name="n", weight="n.weight", bias=None, kind="rmsnorm", eps=1e-6, gain_offset=0.0, role="input")
    s = float(torch.sqrt(x.pow(2).mean(dim=-1)).mean())
    probe = torch.linspace(-3 * s, 3 * s, 101, dtype=torch.float64)
    for target, squash in (("dyt", torch.tanh), ("derf", torch.erf)):
        init = fit_alpha(x, norm, target, "linear")
        assert init.method == "linear" and init.gain == pytest.approx(10.0)
        start = init.gain * squash(init.alpha * probe)
        assert torch.allclose(start, probe / s, rtol=0.03, atol=1e-12)
        assert float(init.gain * squash(init.alpha * torch.tensor(100 * s))) < 15  # saturates far out


@pytest.mark.parametrize("family, option, limit", [
    ("gpt2", "aux_weight", 0.8),     # the final norm's spread about its mean: measured 0.0104 vs 0.0161
    ("llama", "spread_weight", 0.6),  # every frozen path's about its frozen scale: measured 0.043 vs 0.093
])
def test_auxiliary_losses_narrow_the_scale_spread_they_penalise(tiny_model, tmp_path, family, option, limit):
    """--aux-weight narrows the spread of the final norm's per-token scale (Baroni et al.); --spread-weight that of
    every frozen path about its frozen scale, each from its freeze on: after the same schedule, the spread on
    calibration text is smaller than without them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from normsurgery.finetune.engine import FinetuneOptions
    from normsurgery.reference.text import shakespeare_text
    from normsurgery.source import open_model
    from normsurgery.trainable.remove_ln import RemovalOptions, calibration_batches, remove_norms
    from normsurgery.trainable.stand_ins import ScaleGroup, frozen_spread, scale_spread

    folder = tiny_model(family)
    text = tmp_path / "train.txt"
    text.write_text(shakespeare_text("train")[:30_000], encoding="utf-8")
    source = open_model(str(folder), scan_finite=False)
    arch = source.arch
    source.close()
    tok = AutoTokenizer.from_pretrained(folder)
    spreads = {}
    for weight in (0.0, 10.0):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        weights = {"aux_weight": 0.0, "spread_weight": 0.0, option: weight}  # only the option under test
        options = RemovalOptions(gap=1, heal=20, **weights, finetune=FinetuneOptions(
            lr=1e-2, batch_size=2, seq_len=32, text=str(text), loss="lm", warmup=1))
        remove_norms(model, tok, arch, options, teacher=None)
        groups = [m for m in model.modules() if isinstance(m, ScaleGroup)]
        for group in groups:
            group.track = True
        with torch.no_grad():
            model(input_ids=calibration_batches(tok, 32, 4, 1)[0])
        assert all(g.frozen for g in groups)
        final = model.get_submodule(arch.final_norm.name).groups["all"]
        spreads[weight] = float(scale_spread(final) if option == "aux_weight"
                                else torch.stack([frozen_spread(g) for g in groups]).mean())
    assert spreads[10.0] < limit * spreads[0.0]


FSDP = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


def _on_two_processes(model, target: str, out, fast, **env: str) -> dict:
    """`convert --to TARGET` under `torchrun` (what `accelerate launch` runs on GPUs) with two CPU processes over
    gloo (DDP, or FSDP with `env=FSDP`); the report the main process printed."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **env}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "normsurgery", "convert", str(model), "--to", target, "-o", str(out), *fast, "--json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count('"export_check"') == 1  # one process reports (and writes)
    return json.loads(run.stdout[run.stdout.index("{"):])


def test_removal_trains_on_two_processes_and_writes_once(tiny_model, tmp_path, fast):
    """DDP: the main process exports, and the output is the same norm-free model format."""
    report = _on_two_processes(tiny_model("gpt2"), "none", tmp_path / "ddp", fast)
    assert report["processes"] == 2 and not report["fsdp"] and report["export_check"]["rel_logit_diff"] <= 1e-5
    assert json.loads((tmp_path / "ddp" / "normsurgery.json").read_text())["processes"] == 2


def test_removal_trains_sharded_under_fsdp_and_exports_the_gathered_model(tiny_model, clean_python, tmp_path, fast):
    """FSDP2 over two CPU processes: every decoder block sharded, the whole state gathered on the main process,
    which exports a model that computes what the sharded one computed."""
    out = tmp_path / "fsdp"
    report = _on_two_processes(tiny_model("llama"), "none", out, (*fast, "--export", "native"), **FSDP)
    assert report["processes"] == 2 and report["fsdp"] and report["export_check"]["rel_logit_diff"] <= 1e-5
    assert report["export_check"]["top1_agreement"] == 1.0
    loaded = clean_python("norm_free", out)
    assert loaded["norm_modules"] == [] and loaded["cache_consistent"]


def test_swap_trains_the_same_under_fsdp_as_under_ddp(tiny_model, clean_python, tmp_path, fast):
    """DyT on GPT-2 (centred, untied, fused c_attn; the final norm in the root's FSDP unit): the sharded run
    follows the replicated one step for step. The swap sets each alpha between steps, which must reach the shard
    the optimizer updates (a root left gathered after a forward once swallowed the final norm's)."""
    ddp = _on_two_processes(tiny_model("gpt2"), "dyt", tmp_path / "ddp", fast)
    fsdp = _on_two_processes(tiny_model("gpt2"), "dyt", tmp_path / "fsdp", fast, **FSDP)
    assert fsdp["fsdp"] and not ddp["fsdp"] and fsdp["processes"] == ddp["processes"] == 2
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-5)
    assert fsdp["heldout_ce_after"] == pytest.approx(ddp["heldout_ce_after"], rel=1e-5)
    assert [i["alpha"] for i in fsdp["alpha_init"]] == pytest.approx([i["alpha"] for i in ddp["alpha_init"]], rel=1e-6)
    assert fsdp["export_check"]["rel_logit_diff"] <= 1e-5
    assert clean_python("norm_free", tmp_path / "fsdp")["swaps"] == ["DynamicTanh"]


def test_bf16_trains_in_autocast_and_exports_what_float32_computes(tiny_model, cli, tmp_path, fast):
    """--mixed-precision bf16 (allowed on the CPU): the steps run in bfloat16 autocast, the weights stay float32,
    and the export check (a float32 forward) still holds at float32 precision."""
    code, stdout, err = cli("convert", tiny_model("llama"), "--to", "dyt", "-o", tmp_path / "bf16", *fast,
                            "--mixed-precision", "bf16", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["mixed_precision"] == "bf16" and report["export_check"]["rel_logit_diff"] <= 1e-5


def test_a_clearly_worse_result_is_pointed_out():
    from normsurgery.commands.common import console
    from normsurgery.commands.rewrite import _note_if_far

    with console.capture() as far:
        _note_if_far(4.0, 4.5)
    with console.capture() as close:
        _note_if_far(4.0, 4.05)
    assert "0.50 nats/token worse" in far.get() and "--heal" in far.get()
    assert close.get() == ""
