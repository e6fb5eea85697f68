"""`normsurgery inspect` on every family's fixture: the facts and the applicability of each operation."""

from __future__ import annotations

import json

import pytest

from conftest import ALL_FIXTURES
from family_configs import FAMILY_CONFIGS
from normsurgery.arch import raw_key

# the fixture configs' expert counts (DBRX's in its ffn_config)
EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")

# Pre-LN LayerNorm fixtures refused CRMSNorm, and why: Phi-MoE's norm biases would have to fold into its stacked experts
CRMS_REFUSED = {"phimoe": "stacked parameter without a bias"}

EXPECTED_PLACEMENT = {
    "gpt2": "Pre-LN",
    "gpt_neox": "Pre-LN, parallel attention+MLP",
    "gpt_neox_sequential": "Pre-LN",
    "gptj": "Pre-LN, parallel attention+MLP",
    "opt_postln": "Post-LN",
    "falcon_sequential": "Pre-LN",
    "falcon_old": "Pre-LN, parallel attention+MLP",
    "phi": "Pre-LN, parallel attention+MLP",
    "stablelm_parallel_qk": "Pre-LN, parallel attention+MLP",
    "cohere": "Pre-LN, parallel attention+MLP",
    "codegen": "Pre-LN, parallel attention+MLP",
    "starcoder2": "Pre-LN",
    "llama": "Pre-LN",
    "gemma2": "Peri-LN (sandwich)",
    "gemma3": "Peri-LN (sandwich)",
    "olmo2": "Post-sublayer (norms on sublayer outputs only)",
}


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_inspect_json_every_family(name, tiny_model, cli):
    code, out, err = cli("inspect", tiny_model(name), "--json")
    assert code == 0, err
    facts = json.loads(out)
    config = json.loads((tiny_model(name) / "config.json").read_text())
    assert facts["model_type"] == config["model_type"]
    assert facts["layers"] == config[raw_key(config, "num_hidden_layers")]
    assert facts["parameters"] > 0 and facts["dtype"] == "float32" and facts["weights_finite"]
    ops = {o["operation"]: o for o in facts["operations"]}
    assert set(ops) == {"fold", "rmsnorm", "crmsnorm", "dyt", "none", "prune", "prune-sublayers"}
    assert all(o["reason"] for o in ops.values())
    if name in EXPECTED_PLACEMENT:
        assert facts["placement"] == EXPECTED_PLACEMENT[name]
    layernorm = facts["norm"].startswith("LayerNorm")  # "LayerNorm (1 + w)" for Nemotron
    pre_ln = facts["placement"].startswith("Pre-LN")
    kwargs = FAMILY_CONFIGS[name][1]
    kwargs = {**kwargs, **kwargs.get("ffn_config", {})}
    assert facts["experts"] == next((v for k, v in kwargs.items() if k in EXPERT_COUNTS), 0)
    centrable = layernorm and pre_ln
    assert ops["rmsnorm"]["applies"] == centrable
    assert ops["crmsnorm"]["applies"] == (centrable and name not in CRMS_REFUSED)
    if name in CRMS_REFUSED:
        assert CRMS_REFUSED[name] in ops["crmsnorm"]["reason"] and "keep their bias" in ops["rmsnorm"]["reason"]
    if centrable and facts["experts"]:  # LayerNorm MoE (DBRX, Phi-MoE): the experts are centred with the writers
        assert "routed expert" in ops["rmsnorm"]["reason"]
    if facts["computed_positions"]:  # XGLM's sinusoids: centred by the exported code; the trained rewrites refuse
        assert all("centres the positions" in ops[op]["reason"] for op in ("rmsnorm", "crmsnorm"))
        assert all("computed" in ops[op]["reason"] and not ops[op]["applies"] for op in ("dyt", "none"))
    if not layernorm:
        assert "already RMSNorm" in ops["rmsnorm"]["reason"]


def test_inspect_facts_of_special_layouts(tiny_model, cli):
    facts = lambda n: json.loads(cli("inspect", tiny_model(n), "--json")[1])  # noqa: E731
    gemma = facts("gemma")
    assert gemma["norm"] == "RMSNorm (1 + w)" and gemma["tied_embeddings"]
    assert facts("qwen3")["qk_norm"] and not facts("llama")["qk_norm"]
    assert facts("bloom")["embedding_norm"]
    post = {o["operation"]: o for o in facts("opt_postln")["operations"]}
    assert not post["rmsnorm"]["applies"] and "Post-LN" in post["rmsnorm"]["reason"]
    assert not post["fold"]["applies"]
    olmo = {o["operation"]: o for o in facts("olmo2")["operations"]}
    assert olmo["fold"]["applies"] and "stay" in olmo["fold"]["reason"]


def test_inspect_table_for_people(tiny_model, cli):
    code, out, _ = cli("inspect", tiny_model("gpt2"))
    assert code == 0
    assert "placement" in out and "Pre-LN" in out and "crmsnorm" in out
