"""The planners on each family's Architecture, directly (no CLI, no files): every step reads tensors the model has
and writes tensors of their shapes (or ones the surgery adds or resizes), every norm is folded, swapped or kept
with a reason, and what a plan drops exists. Exactness is proven end to end in test_rewrites.py."""

from __future__ import annotations

import pytest
import torch

from family_configs import FAMILY_CONFIGS
from fixtures import config_for


def _model(name: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config_for(name)).eval()


def _plans(arch):
    """Every plan that applies to `arch`, by operation."""
    from normsurgery.arch.facts import applicability
    from normsurgery.rewrite.center import plan_center_swap
    from normsurgery.rewrite.fold import plan_fold
    from normsurgery.rewrite.remove import plan_remove_norms
    from normsurgery.arch.spec import reader_groups
    from normsurgery.trainable.stand_ins import removable_norms

    verdicts = {a.operation: a.applies for a in applicability(arch)}
    plans = {"fold": plan_fold(arch)} if verdicts.get("fold") else {}
    for target in ("rmsnorm", "crmsnorm"):
        if verdicts.get(target):
            plans[target] = plan_center_swap(arch, target)
    if verdicts.get("none"):
        plans["none"] = plan_remove_norms(arch, {n.name: {g: 1.5 for g in reader_groups(n)}
                                                 for n in removable_norms(arch)})
    return plans


@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_every_plan_reads_and_writes_tensors_the_model_has(name):
    from normsurgery.arch import architecture_of
    from normsurgery.rewrite.in_memory import ModelTensors, untie_unembedding
    from normsurgery.rewrite.plan import run_step

    model = _model(name)
    arch = architecture_of(model.config)
    plans = _plans(arch)
    assert plans or name == "opt_postln", f"no rewrite applies to {name}"
    for operation, plan in plans.items():
        if plan.config_updates.get("tie_word_embeddings") is False:
            untie_unembedding(model)
        tensors = ModelTensors(model, arch.key_renames, arch.fused)
        surgery = plan.surgery
        added = {f"{path}.bias" for path in surgery.add_bias} if surgery else set()
        resized = set(surgery.resized) if surgery else set()
        assert all(name in tensors for name in plan.dropped), operation
        for step in plan.steps:
            assert all(n in tensors for n in step.inputs), (operation, step.label)
            for out, value in run_step(step, tensors, lambda n: torch.float64).items():
                assert torch.isfinite(value).all(), (operation, out)
                if out in added:
                    continue
                assert out in tensors, (operation, step.label, out)
                assert out in resized or value.shape == tensors.get(out).shape, (operation, out)
        accounted = set(plan.folded) | {line.split(":")[0] for line in plan.kept}
        assert {n.name for n in arch.all_norms() if n.role != "qk"} <= accounted | set(surgery.norms if surgery else ()), operation
        for path in surgery.centred if surgery else ():  # computed positions: a module the exported code can hook
            assert not list(model.get_submodule(path).parameters()), (operation, path)


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma2", "smollm3", "falcon", "olmo2"])
def test_prune_plan_drops_a_block_and_renumbers_the_rest(name):
    from normsurgery.arch import architecture_of
    from normsurgery.rewrite.prune import plan_prune

    model = _model(name)
    arch = architecture_of(model.config)
    names = list(model.state_dict())
    plan = plan_prune(arch, model.config.to_dict(), names, [0])
    prefix = arch.blocks[0].prefix
    assert plan.dropped == {n for n in names if n.startswith(prefix)} and plan.skipped_blocks == (0,)
    last = arch.blocks[-1].prefix
    assert all(plan.renames[n].startswith(arch.blocks[-2].prefix) for n in names if n.startswith(last))
    assert plan.all_config_updates(model.config)[_layers_key(model.config)] == arch.num_layers - 1
    assert not plan.steps  # a copy of kept tensors, never a computation


def _layers_key(config) -> str:
    return "n_layer" if "n_layer" in config.to_dict() else "num_hidden_layers"


@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_inspect_says_a_trainable_rewrite_applies_exactly_when_the_command_takes_the_model(name):
    """`inspect` once said --to none and dyt applied to BLOOM, whose embedding norm the commands refuse."""
    from normsurgery.arch import architecture_of
    from normsurgery.arch.facts import applicability
    from normsurgery.errors import NormSurgeryError
    from normsurgery.trainable.stand_ins import removable_norms

    arch = architecture_of(config_for(name))
    try:
        removable_norms(arch)
        taken = True
    except NormSurgeryError:
        taken = False
    verdicts = {a.operation: a.applies for a in applicability(arch)}
    assert verdicts["dyt"] == taken  # every Pre-LN placement the commands take can be swapped
    assert taken or not verdicts["none"]  # removal needs Pre-LN besides (parallel blocks are still taken)
