"""`prune` and `diagnose`: removed blocks, renumbered tensors, re-indexed configs, measured statistics, selection."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conftest import ALL_FIXTURES


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_pruned_model_equals_the_original_with_that_block_skipped(name, tiny_model, cli, clean_python, tmp_path):
    out = tmp_path / "pruned"
    code, stdout, err = cli("prune", tiny_model(name), "--layers", "0", "-o", out, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["check"]["rel_logit_diff"] <= 1e-6 and report["check"]["top1_agreement"] == 1.0
    assert not (out / "modeling_normsurgery.py").exists()
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    loaded = clean_python("pruned", tiny_model(name), out, "0")  # loaded without trust_remote_code
    assert loaded["rel"] <= 1e-6 and loaded["same_generation"]
    assert loaded["num_layers"] == report["kept_blocks"]
    assert loaded["layer_indices"] in ([], list(range(report["kept_blocks"])))


@pytest.mark.parametrize("name, layers, expected", [
    ("gemma2", "0", {"layer_types": ["full_attention"]}),
    ("smollm3", "1,3", {"no_rope_layers": [1, 1], "layer_types": ["full_attention"] * 2}),
    ("gpt_neo", "0", {"attention_layers": ["local"], "attention_types": [[["local"], 1]]}),
    ("qwen2", "1", {"max_window_layers": 1, "layer_types": ["full_attention"]}),
    ("exaone4", "1,2", {"layer_types": ["sliding_attention", "full_attention"]}),
    ("ministral", "0", {"layer_types": ["full_attention", "sliding_attention", "full_attention"]}),
    ("gpt_oss", "0", {"layer_types": ["full_attention"]}),
    # blocks 0, 2 sparse, 1 dense (mlp_only_layers); qwen3_moe: sparse every 2nd block (1, 3); the pattern is listed
    ("qwen2_moe", "0", {"mlp_only_layers": [0], "decoder_sparse_step": 1, "max_window_layers": 2}),
    ("qwen3_moe", "0", {"mlp_only_layers": [1], "decoder_sparse_step": 1}),
    ("qwen3_moe", "1,3", {"mlp_only_layers": [0, 1], "decoder_sparse_step": 1}),
    ("deepseek_v2", "1", {"first_k_dense_replace": 1}),  # block 0 dense, 1 and 2 sparse
    ("deepseek_v3", "0", {"first_k_dense_replace": 0}),
    # blocks 1, 3 sparse; 0, 2 rotary with chunked attention, 1, 3 NoPE with full attention
    ("llama4_text", "0", {"moe_layers": [0, 2], "no_rope_layers": [0, 1, 0],
                          "layer_types": ["full_attention", "chunked_attention", "full_attention"]}),
    ("llama4_text", "1,2", {"moe_layers": [1], "no_rope_layers": [1, 0],
                            "layer_types": ["chunked_attention", "full_attention"]}),
])
def test_per_layer_config_lists_follow_their_blocks(name, layers, expected, tiny_model, cli, tmp_path):
    out = tmp_path / "pruned"
    code, _, err = cli("prune", tiny_model(name), "--layers", layers, "-o", out)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in expected} == expected


def _edited_copy(folder, tmp_path, **changes):
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("args, message", [
    (("--remove", "2"), "cannot remove 2 of 2 blocks"),
    (("--layers", "0,1"), "cannot remove 2 of 2 blocks"),
    (("--layers", "5"), "block(s) 5 do not exist"),
    (("--layers", "a,b"), "--layers takes 0-based block indices"),
    (("--layers", "0", "--remove", "1"), "not both or neither"),
    ((), "not both or neither"),
    (("--remove", "1", "--by", "magic"), "--by must be one of"),
    (("--remove", "1", "--by", "skip-cost"), "needs the skip costs measured"),
    (("--layers", "0", "--heal-steps", "-1"), "--heal-steps cannot be negative"),
])
def test_bad_requests_are_refused_and_write_nothing(args, message, tiny_model, cli, tmp_path):
    code, _, err = cli("prune", tiny_model("llama"), *args, "--keep-first", "0", "--keep-last", "0",
                       "--samples", "2", "--seq-len", "16", "-o", tmp_path / "out")
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_depth_dependent_and_unknown_per_layer_configs_are_refused(tiny_model, cli, tmp_path):
    scaled = _edited_copy(tiny_model("gpt2"), tmp_path, scale_attn_by_inverse_layer_idx=True)
    code, _, err = cli("prune", scaled, "--layers", "0", "-o", tmp_path / "a")
    assert code == 2 and "scale_attn_by_inverse_layer_idx" in err
    shutil.rmtree(scaled)
    odd = _edited_copy(tiny_model("llama"), tmp_path, my_layer_widths=[4, 8])
    code, _, err = cli("prune", odd, "--layers", "0", "-o", tmp_path / "b")
    assert code == 2 and "my_layer_widths" in err and not (tmp_path / "b").exists()


def test_statistics_match_an_independent_computation(tiny_model):
    """BI and angular distances from hooks equal those from transformers' hidden states, with the final norm
    replaced by the identity so that the last state is the raw residual."""
    from transformers import AutoModelForCausalLM

    from normsurgery.depth.measure import measure
    from normsurgery.source import open_model

    folder = tiny_model("llama")
    source = open_model(str(folder), scan_finite=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (3, 10), generator=torch.Generator().manual_seed(1))
    stats = measure(model, source.arch, ids, label="tiny", batch_size=2, skip_cost=True)
    source.close()
    model.model.norm = torch.nn.Identity()
    with torch.no_grad():
        hs = [h.double() for h in model(input_ids=ids, output_hidden_states=True).hidden_states]
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=-1)  # noqa: E731
    L = len(hs) - 1
    for l in range(L):
        assert stats.block_influence[l] == pytest.approx(float(1 - cos(hs[l], hs[l + 1]).mean()), abs=1e-6)  # float32 states, batched differently
    for n in range(1, L + 1):
        for l in range(L - n + 1):
            last = torch.arccos(cos(hs[l][:, -1], hs[l + n][:, -1]).clamp(-1, 1)) / math.pi
            every = torch.arccos(cos(hs[l], hs[l + n]).clamp(-1, 1)) / math.pi
            assert stats.angular_last[n - 1][l] == pytest.approx(float(last.mean()), abs=1e-6)
            assert stats.angular_all[n - 1][l] == pytest.approx(float(every.mean()), abs=1e-6)
    assert stats.residual_rms[-1] == pytest.approx(float(hs[-1].pow(2).mean(-1).sqrt().mean()), rel=1e-6)
    assert len(stats.skip_cost) == L and all(math.isfinite(c) for c in stats.skip_cost)


def _stats(bi, angular_last):
    from normsurgery.depth.stats import LayerStats

    L = len(bi)
    return LayerStats(model="m", family="llama", num_layers=L, norm_placement="Pre-LN", tokens=1, sequences=1,
                      base_ce=1.0, block_influence=bi, angular_last=angular_last, angular_all=angular_last,
                      residual_rms=[1.0] * (L + 1), relative_update=[0.1] * L, update_cosine=[0.0] * L)


def test_selection_by_metric_respects_the_guards():
    from normsurgery.depth.select import candidates

    bi = [0.01, 0.5, 0.1, 0.05, 0.3, 0.02]
    spans = [[0.9, 0.5, 0.2, 0.4, 0.3, 0.1], [0.9, 0.6, 0.3, 0.5, 0.35], [0.9, 0.7, 0.6, 0.8]] + [[1.0] * (6 - n) for n in range(3, 6)]
    stats = _stats(bi, spans)
    assert candidates(stats, 2, "bi")[0].blocks == (2, 3)  # blocks 0 and 5 are guarded
    assert candidates(stats, 2, "bi", keep_first=0, keep_last=0)[0].blocks == (0, 5)
    assert [c.blocks for c in candidates(stats, 2, "angular")] == [(2, 3), (3, 4), (1, 2)]
    assert candidates(stats, 2, "last")[0].blocks == (3, 4)
    auto = candidates(stats, 2, "auto")
    assert len({c.blocks for c in auto}) == len(auto) <= 3


def test_prune_chooses_by_calibration_loss_and_diagnose_reports(tiny_model, cli, tmp_path):
    folder = tiny_model("smollm3")
    code, stdout, err = cli("prune", folder, "--remove", "1", "--samples", "2", "--seq-len", "16", "--dry-run", "--json")
    assert code == 0, err
    selection = json.loads(stdout)["selection"]
    losses = {tuple(c["blocks"]): c["loss"] for c in selection["candidates"]}
    assert tuple(selection["blocks"]) == min(losses, key=losses.get)
    assert all(1 <= b <= 2 for b in selection["blocks"])
    html, png = tmp_path / "r.html", tmp_path / "png"
    code, stdout, err = cli("diagnose", folder, "--samples", "2", "--seq-len", "16", "--html", html, "--png", png,
                            "--json")
    assert code == 0, err
    stats = json.loads(stdout)
    assert len(stats["block_influence"]) == 4 and len(stats["skip_cost"]) == 4
    assert html.read_text().startswith("<!DOCTYPE html>") and len(list(png.glob("*.png"))) == 4
    code, stdout, _ = cli("diagnose", folder, "--samples", "2", "--seq-len", "16", "--no-skip-cost")
    assert code == 0 and "Block Influence" in stdout


def test_heal_distils_the_pruned_model_and_writes_a_stock_model(tiny_model, cli, clean_python, tmp_path):
    from normsurgery.reference.text import shakespeare_text

    text = tmp_path / "train.txt"
    text.write_text(shakespeare_text("train")[:20_000], encoding="utf-8")
    out = tmp_path / "healed"
    code, stdout, err = cli("prune", tiny_model("llama"), "--layers", "1", "-o", out, "--heal-steps", "3",
                            "--lr", "1e-2", "--batch-size", "2", "--seq-len", "32", "--text", text, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    heal = report["heal"]
    assert len(heal["losses"]) == 3 and heal["losses"][-1] < heal["losses"][0]
    assert report["export_check"]["rel_logit_diff"] <= 1e-5
    assert not (out / "modeling_normsurgery.py").exists() and (out / "loss_curve.png").exists()
    assert not any(p.name.endswith(".unhealed") for p in tmp_path.iterdir())
    assert clean_python("norm_free", out)["cache_consistent"]


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("name, layers", [("gemma2", "0"), ("smollm3", "1,3"), ("gpt_neo", "0"), ("qwen2", "1"),
                                          ("llama", "0"), ("mistral", "1")])
def test_per_layer_config_from_a_minimal_config_json(name, layers, verify, tiny_model, cli, tmp_path):
    """A hub config.json usually lacks the per-block lists its config class fills in: pruned with or without
    verification (the unverified copy reads config.json without transformers), the output's config equals the
    full-config result."""
    from normsurgery.arch import FAMILY_BY_MODEL_TYPE

    folder = tiny_model(name)
    config = json.loads((folder / "config.json").read_text())
    minimal = _edited_copy(folder, tmp_path)
    family = FAMILY_BY_MODEL_TYPE[config["model_type"]]
    stripped = {k: v for k, v in config.items() if k not in family.per_layer}
    (minimal / "config.json").write_text(json.dumps(stripped))
    code, _, err = cli("prune", folder, "--layers", layers, "-o", tmp_path / "full")
    assert code == 0, err
    code, _, err = cli("prune", minimal, "--layers", layers, "-o", tmp_path / "minimal",
                       *(() if verify else ("--no-verify",)))
    assert code == 0, err
    full = json.loads((tmp_path / "full" / "config.json").read_text())
    got = json.loads((tmp_path / "minimal" / "config.json").read_text())
    for key in family.per_layer:
        assert got.get(key) == full.get(key), key


def test_unverified_prune_copies_stored_bytes_without_torch(tiny_model, tmp_path):
    """`prune --layers --no-verify` starts like a file copy: neither torch nor transformers is imported, and every
    kept tensor is byte-identical to its source under its new name."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    folder, out = tiny_model("llama"), tmp_path / "pruned"
    probe = ("import sys; from normsurgery.cli import main\n"
             f"sys.argv = ['normsurgery', 'prune', {str(folder)!r}, '--layers', '0', '-o', {str(out)!r}, '--no-verify']\n"
             "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
             "print('LOADED', [m for m in ('torch', 'transformers') if m in sys.modules])")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "LOADED []" in run.stdout, (run.stdout[-500:], run.stderr[-2000:])
    source, pruned = load_file(folder / "model.safetensors"), load_file(out / "model.safetensors")
    renamed = {k.replace("layers.1.", "layers.0."): v for k, v in source.items() if "layers.0." not in k}
    assert pruned.keys() == renamed.keys()
    assert all(torch.equal(pruned[k], renamed[k]) and pruned[k].dtype == renamed[k].dtype for k in pruned)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1


# Runs `normsurgery prune FOLDER --layers L --no-verify -o OUT` for each job in one interpreter, with torch and
# transformers refused at import (each attempt recorded with the job that made it and where), then writes the exit
# codes, the attempts and which of the two ended up imported anyway.
_NO_TORCH_PROBE = r'''
import importlib.abc, json, sys, traceback

jobs, report = json.loads(sys.argv[1]), sys.argv[2]
current, attempts = [None], {}


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            where = [f"{f.filename.rsplit('normsurgery/', 1)[-1]}:{f.lineno}" for f in traceback.extract_stack()[:-1]
                     if "/normsurgery/" in f.filename]
            attempts.setdefault(current[0], []).append(f"{name} <- {' <- '.join(reversed(where[-6:]))}")
            raise ImportError(f"an unverified prune imported {name}")
        return None


sys.meta_path.insert(0, Refuse())
from normsurgery.cli import main

codes = {}
for name, (folder, layers, out) in jobs.items():
    current[0] = name
    sys.argv = ["normsurgery", "prune", folder, "--layers", layers, "-o", out, "--no-verify"]
    try:
        main()
        codes[name] = 0
    except SystemExit as e:
        codes[name] = e.code
    except BaseException as e:
        codes[name] = repr(e)
with open(report, "w") as f:
    json.dump({"codes": codes, "attempts": attempts,
               "loaded": [m for m in ("torch", "transformers") if m in sys.modules]}, f)
'''

HUB_CHECKPOINTS = [*ALL_FIXTURES, "smollm2_hub"]


@pytest.fixture(scope="module")
def unverified_hub_prunes(tmp_path_factory):
    """Every fixture's family as a hub-style checkpoint (its config.json as an older transformers wrote it; see
    fixtures.hub_config), plus SmolLM2-135M's hub config.json at a tiny size, each pruned unverified in one
    interpreter that refuses torch and transformers: name -> (source, output, removed blocks, the probe's report)."""
    import subprocess
    import sys

    from fixtures import SMOLLM2_HUB, hub_config, write_hub_checkpoint

    root = tmp_path_factory.mktemp("hub-prunes")
    jobs = {}
    for name in HUB_CHECKPOINTS:
        raw = SMOLLM2_HUB if name == "smollm2_hub" else hub_config(name)
        write_hub_checkpoint(raw, root / "in" / name)
        layers = "10,11,12,13" if name == "smollm2_hub" else "0"  # the command on SmolLM2
        jobs[name] = (str(root / "in" / name), layers, str(root / "out" / name))
    report = root / "report.json"
    run = subprocess.run([sys.executable, "-c", _NO_TORCH_PROBE, json.dumps(jobs), str(report)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and report.exists(), run.stderr[-3000:]
    result = json.loads(report.read_text())
    return {name: (root / "in" / name, root / "out" / name, [int(b) for b in layers.split(",")], result)
            for name, (_, layers, _) in jobs.items()}


@pytest.mark.parametrize("name", HUB_CHECKPOINTS)
def test_unverified_prune_of_a_hub_config_imports_neither_torch_nor_transformers(name, unverified_hub_prunes):
    """The guard for every declared family: a hub config.json lacks the attributes its class fills in or added later
    (eps, biases, tie_word_embeddings, layer_types, ...), and `prune --layers --no-verify` must still read it, and
    copy the stored bytes, without torch or transformers; each kept tensor is byte-identical under its new name."""
    from safetensors import safe_open

    from normsurgery.arch import architecture_of, load_config

    source, out, removed, result = unverified_hub_prunes[name]
    assert result["attempts"].get(name) is None, "\n".join(result["attempts"][name])
    assert result["codes"][name] == 0, result["codes"][name]
    assert result["loaded"] == [], result["loaded"]
    raw = json.loads((source / "config.json").read_text())
    arch = architecture_of(load_config(raw))
    keep = [b for b in range(arch.num_layers) if b not in removed]
    expected = {}  # the source's tensors, the removed blocks' dropped and the later blocks' renumbered
    with safe_open(source / "model.safetensors", "pt") as f:
        for key in f.keys():
            block = next((b for b in arch.blocks if key.startswith(b.prefix)), None)
            if block is None:
                expected[key] = f.get_tensor(key)
            elif block.index in keep:
                expected[arch.blocks[keep.index(block.index)].prefix + key[len(block.prefix):]] = f.get_tensor(key)
    with safe_open(out / "model.safetensors", "pt") as f:
        got = {key: f.get_tensor(key) for key in f.keys()}
    assert got.keys() == expected.keys()
    assert all(got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]) for k in got)
    config = json.loads((out / "config.json").read_text())
    depth_key = next(k for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if k in raw)
    assert config[depth_key] == len(keep)
