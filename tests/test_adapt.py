"""`normsurgery adapt`: drafts traced from tiny random models name what the hand-written declarations name, and the
proof passes only for a declaration that is right."""

from __future__ import annotations

import json

import pytest

from fixtures import config_for
from normsurgery.adapt import adapt, differences
from normsurgery.adapt.prove import prove
from normsurgery.arch import family_for

# sequential Pre-LN with Conv1D and fused c_attn, Llama, fused GQA qkv_proj (widths follow head counts), NeoX
# (parallel, per-head fused qkv, on-disk rename), Cohere (parallel, one norm), OLMo2 (output norms, direct readers,
# QK-norm), Gemma ((1 + w) gains, sqrt(d) embeddings), Gemma 2 (sandwich norms), OPT (position offset), Persimmon
DECLARED = ["gpt2", "llama", "phi3", "gpt_neox", "cohere", "olmo2", "gemma", "gemma2", "opt", "persimmon"]
# fixtures whose config differs from the tiny default only in sizes and head counts
SAME_LAYOUT = {"gpt2": "gpt2", "llama": "llama", "phi3": "phi3", "gpt_neox": "gpt_neox", "gemma": "gemma",
               "opt": "opt"}


@pytest.mark.parametrize("model_type", DECLARED)
def test_draft_of_a_declared_family_is_proven_and_names_the_same_tensors(model_type):
    result = adapt(model_type)
    assert result.proven, (result.draft.problems, [c for c in result.checks if not c.passed])
    assert result.declared_as == family_for(model_type).name
    assert result.differs_from_declared == []
    if model_type in SAME_LAYOUT:  # the declaration, not just the traced instance: resolved on the test fixture
        config = config_for(SAME_LAYOUT[model_type])
        assert differences(result.family.resolve(config), family_for(model_type).resolve(config)) == []


def test_a_family_not_yet_declared_is_drafted_and_proven(cli):
    """Arcee: Llama's layout with an ungated MLP (up_proj alone reads the post-attention norm)."""
    with pytest.raises(Exception):
        family_for("arcee")
    code, out, err = cli("adapt", "arcee")
    assert code == 0, err
    assert 'ARCEE = Family(' in out and 'Lin("mlp.up_proj", bias="mlp_bias")' in out and "proven" in out
    assert "FAIL" not in out


def test_flags_that_change_the_layout_are_noted():
    """The draft covers the tiny config's setting; a flag that selects another layout says what it changes."""
    notes = adapt("gpt_neox").draft.notes
    assert any(n.startswith("with use_parallel_residual=False") and "parallel" in n for n in notes)


def test_json_output_holds_the_declaration_and_checks(cli):
    code, out, _ = cli("adapt", "gpt2", "--json")
    result = json.loads(out)
    assert code == 0 and result["proven"] and result["declared_as"] == "gpt2"
    assert 'conv1d=True, groups=("qk", "qk", "v")' in result["declaration"]
    assert 'config_keys=(("hidden_size", ("n_embd",)), ("num_hidden_layers", ("n_layer",)))' in result["declaration"]
    assert {c["name"] for c in result["checks"]} >= {"tensor names", "config.json alone", "norm facts", "fold, in memory",
                                                      "fold, file to file", "convert to rmsnorm, file to file"}


def test_experts_stacked_at_load_are_drafted_per_expert_and_proven():
    """Mixtral: transformers stacks the per-expert w1/w3 tensors into one gate_up_proj parameter at load."""
    result = adapt("mixtral")
    assert result.proven, (result.draft.problems, [c for c in result.checks if not c.passed])
    readers = [r for n in result.draft.norms for r in n.readers]
    assert {(r.path, r.loaded) for r in readers if r.experts} == {
        ("block_sparse_moe.experts.{e}.w1", "mlp.experts.gate_up_proj"),
        ("block_sparse_moe.experts.{e}.w3", "mlp.experts.gate_up_proj")}


def test_a_wrong_declaration_fails_its_proof():
    """Gemma drafted without its (1 + w) gain: the norm facts and every fold check fail."""
    draft = adapt("gemma").draft
    draft.gain_offset = 0.0
    checks = {c.name: c.passed for c in prove(draft.family(), draft.config)}
    assert not checks["norm facts"] and not checks["fold, in memory"] and not checks["fold, file to file"]


@pytest.mark.parametrize("model_type,code,says", [
    ("no_such_model", 2, "not a model type"),
    ("t5", 2, "no causal-LM class"),
    ("xglm", 1, "position encodings computed rather than stored"),
])
def test_what_cannot_be_drafted_says_why(cli, model_type, code, says):
    got, out, err = cli("adapt", model_type)
    assert got == code and says in " ".join((out + err).split()) and "Traceback" not in err
