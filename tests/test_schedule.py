"""The trainable rewrites' moving parts: reader-path stand-ins, their special scales, and budget-sized schedules."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("name", ["gpt2", "llama", "gpt_neox", "phi"])
def test_live_stand_ins_compute_what_the_norms_computed(name, tiny_model):
    """Pass-through norms with each reader group (GPT-2's fused c_attn split in three) normalising for itself give
    the original logits: the stand-ins change nothing until a freeze."""
    import torch
    from transformers import AutoModelForCausalLM

    from normsurgery.source import open_model
    from normsurgery.trainable.stand_ins import install, removable_norms

    folder = tiny_model(name)
    source = open_model(str(folder), scan_finite=False)
    arch = source.arch
    source.close()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, arch.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        groups = install(model, removable_norms(arch), [], arch.key_renames)
        after = model(input_ids=ids).logits
    assert len(groups) > len(removable_norms(arch)) or name == "gpt_neox"  # input norms split into paths
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-5)


def test_a_frozen_path_keeps_position_0_and_special_tokens_apart_until_released():
    import torch

    from normsurgery.arch.spec import Norm
    from normsurgery.trainable.stand_ins import NormPassthrough, TokenContext

    norm = Norm(name="n", weight=None, bias=None, kind="rmsnorm", eps=0.0, gain_offset=0.0, role="input")
    context = TokenContext([7])
    group = NormPassthrough(norm, torch.nn.Identity(), context, ["all"]).groups["all"]
    ids = torch.tensor([[1, 2, 7, 3]])
    x = torch.ones(1, 4, 2) * torch.tensor([100.0, 1.0, 10.0, 1.0])[None, :, None]  # sink, ordinary, special, ordinary
    context.see(ids)
    group.start_collecting()
    group(x)
    assert group.measure() == pytest.approx(1.0)
    assert float(group.first) == pytest.approx(100.0) and float(group.special) == pytest.approx(10.0)
    group.set_mix(1.0)
    group.forget()
    assert torch.allclose(group(x), torch.ones(1, 4, 2))  # every token on its own frozen scale
    group.release("special")
    group.release("first")
    group.forget()
    assert torch.allclose(group(x)[0, :, 0], torch.tensor([3.0, 1.0, 3.0, 1.0]))  # bounded at 3x an ordinary token
    group.release("outliers")
    group.forget()
    assert torch.allclose(group(x)[0, :, 0], torch.tensor([100.0, 1.0, 10.0, 1.0]))  # one scale for all
    assert group.frozen


def test_the_token_bound_carries_no_gradient():
    """A token held at the bound trains as if its path were the linear map it exports: the gradient is 1/divisor,
    not a norm's (which would be zero along the token itself and teach the model to lean on the bound)."""
    import torch

    from normsurgery.arch.spec import Norm
    from normsurgery.trainable.stand_ins import NormPassthrough, TokenContext

    norm = Norm(name="n", weight=None, bias=None, kind="rmsnorm", eps=0.0, gain_offset=0.0, role="input")
    group = NormPassthrough(norm, torch.nn.Identity(), TokenContext([]), ["all"]).groups["all"]
    x = torch.ones(1, 3, 2) * torch.tensor([1.0, 1.0, 100.0])[None, :, None]  # the last token at 100x the scale
    group.start_collecting()
    group(x)
    group.scale.fill_(1.0)
    group.collect = False
    group.set_mix(1.0)
    group.forget()
    x.requires_grad_(True)
    y = group(x)
    assert torch.allclose(y[0, 2], torch.full((2,), 3.0))  # held at the bound
    y.sum().backward()
    assert torch.allclose(x.grad[0], torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.03, 0.03]]))


@pytest.mark.parametrize("text, seconds, tokens", [
    ("30min", 1800, None), ("2h", 7200, None), ("90s", 90, None), ("20M", None, 20_000_000), ("500k", None, 500_000),
    ("1e6 tokens", None, 1_000_000),
])
def test_budgets_parse(text, seconds, tokens):
    from normsurgery.trainable.budget import parse_budget

    budget = parse_budget(text)
    assert budget.seconds == seconds and budget.tokens == tokens


@pytest.mark.parametrize("text", ["soon", "-5min", "0", "30 parsecs", "30m"])
def test_a_bad_budget_is_refused(text):
    from normsurgery.errors import NormSurgeryError
    from normsurgery.trainable.budget import parse_budget

    with pytest.raises(NormSurgeryError, match="--budget"):
        parse_budget(text)


def test_learning_rate_falls_with_size():
    from normsurgery.trainable.budget import sized_lr

    rates = [sized_lr(n) for n in (1_350_000, 124_000_000, 1_500_000_000, 70_000_000_000)]
    assert rates[0] == pytest.approx(3e-3, rel=0.01) and rates == sorted(rates, reverse=True)
    assert 4e-4 < rates[1] < 8e-4 and 1.5e-4 < rates[2] < 4e-4 and rates[3] >= 1e-4  # Baroni: 6e-4 small, 1e-4 XL


def test_schedules_fit_the_budget():
    from normsurgery.trainable.budget import Budget, size_schedule
    from normsurgery.trainable.remove_ln import RemovalOptions, total_steps

    def used(units):
        return lambda g, p, r: total_steps(units, RemovalOptions(gap=g, heal=0, per_freeze=p, ramp=r))

    common = dict(parameters=135_000_000, step_tokens=1024, seconds_per_event=0.0, fixed_seconds=0.0, used=used(91))
    roomy = size_schedule(91, 3, budget=Budget(tokens=1024 * 3000), seconds_per_step=1.0, **common)
    assert roomy.per_freeze == 1 and roomy.ramp == 4 * roomy.gap and roomy.steps <= 3000
    assert roomy.steps == total_steps(91, RemovalOptions(gap=roomy.gap, heal=roomy.heal, ramp=roomy.ramp))
    tight = size_schedule(91, 3, budget=Budget(seconds=40), seconds_per_step=1.0, **common)
    assert tight.per_freeze > 1 and tight.gap == 1 and tight.steps <= 41
    tiny = size_schedule(13, 3, budget=Budget(seconds=3600), parameters=1_350_000, step_tokens=1024,
                         seconds_per_step=0.01, seconds_per_event=0.0, fixed_seconds=0.0, used=used(13))
    assert tiny.gap == 30 and tiny.heal == 300  # capped: what the 1.35M model needs, not an hour of steps
    fitted = size_schedule(91, 3, budget=Budget(seconds=400), seconds_per_step=1.0, seconds_per_unit=2.0, **common)
    unfitted = size_schedule(91, 3, budget=Budget(seconds=400), seconds_per_step=1.0, **common)
    assert fitted.steps <= 400 - 91 * 2 < unfitted.steps  # each unit's fit is paid from the budget's steps
    assert fitted.estimate_seconds == pytest.approx(fitted.steps * 1.0 + 91 * 2.0) and fitted.estimate_seconds <= 400


def test_the_sizer_times_a_real_alpha_fit():
    from normsurgery.arch.spec import Norm
    from normsurgery.trainable.swap import time_fit

    norm = Norm(name="n", weight="n.weight", bias=None, kind="rmsnorm", eps=1e-6, gain_offset=0.0, role="input")
    assert 0 < time_fit(norm, "dyt", 64) < time_fit(norm, "derf", 576) * 50


def test_a_gradual_freeze_ramps_geometrically_and_ends_exact():
    import torch

    from normsurgery.arch.spec import Norm
    from normsurgery.trainable.remove_ln import RemovalOptions, ramp_fraction, schedule
    from normsurgery.trainable.stand_ins import NormPassthrough, TokenContext

    norm = Norm(name="n", weight=None, bias=None, kind="rmsnorm", eps=0.0, gain_offset=0.0, role="input")
    group = NormPassthrough(norm, torch.nn.Identity(), TokenContext([]), ["all"]).groups["all"]
    x = torch.tensor([[[1.0, 1.0], [4.0, 4.0], [4.0, 4.0]]])  # live divisors 1 (position 0), 4, 4
    group.start_collecting()
    group(x)
    assert group.measure() == 4.0
    group.release("first", 1.0)
    group.release("outliers", 1.0)
    for fraction, expected in ((0.5, 2.0), (1.0, 4.0)):  # position 0: live 1 -> constant 4, geometrically
        group.set_mix(fraction)
        group.forget()
        assert float(group(x)[0, 0, 0]) == pytest.approx(1.0 / expected)
    assert not group.frozen and [ramp_fraction(k, 4) for k in (-1, 0, 3, 9)] == [0.0, 0.25, 1.0, 1.0]
    due = schedule(["a", "b", "c"], RemovalOptions(gap=2, ramp=3))
    assert due == {0: [["a"]], 2: [["b"]], 4: [["c"]], 8: [["outliers"]], 10: [["special"]], 12: [["first"]]}


def test_convert_refuses_a_bad_budget_before_loading(tiny_model, cli, tmp_path):
    code, _, err = cli("convert", tiny_model("gpt2"), "--to", "none", "-o", tmp_path / "out", "--budget", "soon")
    assert code == 2 and "--budget" in err and "Traceback" not in err and not (tmp_path / "out").exists()


def test_convert_says_what_it_chose_before_it_starts(tiny_model, cli, tmp_path):
    from normsurgery.reference.text import shakespeare_text

    text = tmp_path / "train.txt"
    text.write_text(shakespeare_text("train")[:30_000], encoding="utf-8")
    code, out, err = cli("convert", tiny_model("llama"), "--to", "none", "-o", tmp_path / "none", "--budget", "3k",
                         "--seq-len", "32", "--text", text)
    assert code == 0, err
    assert "norm paths to freeze" in out and "steps, about" in out and "lr 0.003" in out
    assert "note: the budget allows fewer steps" in out  # 3k tokens: 3 steps of 1k tokens for more paths


def test_a_budget_far_below_what_the_model_needs_is_pointed_out_before_it_starts():
    """smollm2-135m at 30 CPU minutes gets 1 step per path where about 300 are meant: the command says so up front;
    the budget our 1.35M-parameter model gets by default is not flagged."""
    from normsurgery.finetune.engine import FinetuneOptions
    from normsurgery.trainable.budget import Sized
    from normsurgery.trainable.pipeline import describe_plan

    options = FinetuneOptions(lr=6e-4, batch_size=4, seq_len=256)
    short = describe_plan(Sized(300, 1, 90, 1, 4, 6.5, 1800), "norm paths to freeze", 91, options, 134_515_008, "cpu")
    enough = describe_plan(Sized(3000, 30, 300, 1, 120, 0.1, 400), "norm paths to freeze", 37, options, 1_350_000,
                           "cpu")
    said = " ".join(" ".join(short.notes).split())
    assert "gets 1 step(s) of 1k tokens" in said and "about 299" in said and "--budget" in said
    assert short.steps == 300 and "300 steps" in short.summary
    assert not enough.notes


def test_a_fine_tune_whose_loss_explodes_stops_with_the_clear_error(tiny_model):
    """A loss past any model's (here an lr that wrecks the model at once) stops the run at that step, before it
    wastes the rest of the budget on a model that cannot come back."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from normsurgery.errors import NormSurgeryError
    from normsurgery.finetune.engine import FinetuneOptions, finetune

    folder = tiny_model("gpt2")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    options = FinetuneOptions(steps=20, lr=1e4, batch_size=2, seq_len=32, warmup=1, grad_clip=0.0)
    with pytest.raises(NormSurgeryError, match="diverged at step"):
        finetune(model, AutoTokenizer.from_pretrained(folder), options, teacher=teacher)
