"""The shared fine-tune engine on a tiny real model: it learns, it is deterministic, it resumes exactly."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from normsurgery.errors import NormSurgeryError
from normsurgery.reference.text import shakespeare_text
from normsurgery.finetune.engine import FinetuneOptions, finetune, refuse_sharded
from normsurgery.engine.text import load_text


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(shakespeare_text("train")[:20_000], encoding="utf-8")
    return path


@pytest.fixture
def model_and_tokenizer(tiny_model):
    folder = tiny_model("llama")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


def _options(text_file, **kw) -> FinetuneOptions:
    return FinetuneOptions(**{"steps": 6, "lr": 1e-2, "batch_size": 2, "seq_len": 32, "text": str(text_file),
                              "warmup": 1, **kw})


def test_distillation_to_itself_starts_at_zero_and_lm_loss_falls(model_and_tokenizer, text_file):
    model, tok = model_and_tokenizer
    result = finetune(model, tok, _options(text_file, steps=1), teacher=copy.deepcopy(model))
    assert abs(result.losses[0]) < 1e-6
    result = finetune(model, tok, _options(text_file, steps=30, loss="lm"))
    assert sum(result.losses[-5:]) < sum(result.losses[:5])


def test_same_seed_same_weights(tiny_model, text_file):
    folder = tiny_model("llama")
    tok = AutoTokenizer.from_pretrained(folder)
    runs = []
    for _ in range(2):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        finetune(model, tok, _options(text_file, loss="lm"))
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_resumed_run_equals_an_uninterrupted_one(tiny_model, text_file, tmp_path):
    folder = tiny_model("llama")
    tok = AutoTokenizer.from_pretrained(folder)
    teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    straight = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.nn.init.normal_(straight.model.norm.weight)  # something to distil back
    start = copy.deepcopy(straight.state_dict())
    finetune(straight, tok, _options(text_file), teacher=teacher)

    def stop_at_four(step: int, loss: float) -> None:
        if step == 4:
            raise KeyboardInterrupt

    interrupted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    interrupted.load_state_dict(start)
    options = _options(text_file, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=3)
    with pytest.raises(KeyboardInterrupt):
        finetune(interrupted, tok, options, teacher=teacher, on_step=stop_at_four)
    assert json.loads((tmp_path / "ckpt" / "normsurgery_finetune.json").read_text())["step"] == 3
    resumed = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    resumed.load_state_dict(start)
    result = finetune(resumed, tok, options, teacher=teacher)
    assert result.first_step == 3 and len(result.losses) == 3
    want, got = straight.state_dict(), resumed.state_dict()
    assert all(torch.allclose(want[k], got[k], rtol=0, atol=1e-7) for k in want)


@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "--steps must be at least 1"),
    ({"lr": -1.0}, "--lr must be a positive number"),
    ({"loss": "mse"}, "--loss must be kl, lm or kl+lm"),
    ({"loss": "kl"}, "needs the original model as teacher"),
    ({"seq_len": 10**7}, "fewer than one window"),
])
def test_bad_options_are_explained(model_and_tokenizer, text_file, change, message):
    model, tok = model_and_tokenizer
    with pytest.raises(NormSurgeryError, match=re.escape(message)):
        finetune(model, tok, _options(text_file, **{"loss": "lm", **change}))


@pytest.mark.parametrize("kind", ["DEEPSPEED", "MEGATRON_LM"])
def test_deepspeed_and_megatron_are_refused_before_any_step(kind):
    from accelerate.utils import DistributedType

    for supported in ("MULTI_CPU", "MULTI_GPU", "FSDP"):
        refuse_sharded(DistributedType[supported])
    with pytest.raises(NormSurgeryError, match="which normsurgery does not support. Use FSDP version 2"):
        refuse_sharded(DistributedType[kind])


def test_fsdp_version_1_and_checkpoints_under_fsdp_are_refused(monkeypatch, tmp_path):
    from normsurgery.finetune.sharding import fsdp_wanted

    assert not fsdp_wanted()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(NormSurgeryError, match="FSDP version 1; .* version 2 only"):
        fsdp_wanted()
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fsdp_wanted()
    FinetuneOptions().validate()
    with pytest.raises(NormSurgeryError, match="--checkpoint-dir is not supported under FSDP"):
        FinetuneOptions(checkpoint_dir=tmp_path).validate()


def test_mixed_precision_is_bf16_on_gpus_that_have_it_and_float32_on_the_cpu():
    from normsurgery.finetune.engine import bf16_autocast

    cpu = torch.device("cpu")
    assert not bf16_autocast(FinetuneOptions(mixed_precision="auto"), cpu)
    assert bf16_autocast(FinetuneOptions(mixed_precision="bf16"), cpu)
    assert not bf16_autocast(FinetuneOptions(mixed_precision="no"), cpu)
    with pytest.raises(NormSurgeryError, match="--mixed-precision must be auto, no or bf16"):
        FinetuneOptions(mixed_precision="fp16").validate()  # type: ignore[arg-type]


def test_text_sources(tmp_path):
    good = tmp_path / "t.jsonl"
    good.write_text('{"text": "To be"}\n\n{"text": "or not"}\n')
    assert load_text(str(good))[0] == "To be\n\nor not"
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\n["no"]\n')
    with pytest.raises(NormSurgeryError, match="b.jsonl:2"):
        load_text(str(bad))
    with pytest.raises(NormSurgeryError, match="is not a file"):
        load_text(str(tmp_path / "missing.txt"))
    assert "heldout" not in load_text(None)[1] and "training split" in load_text(None)[1]


@pytest.mark.parametrize("context, given, expected", [
    (256, (None, None), (256, 4)),  # unset: the whole context, about 1024 tokens per step
    (8192, (None, None), (1024, 1)),  # a long context: at most 1024 tokens per sequence
    (None, (None, None), (1024, 1)),  # no declared context
    (256, (512, None), (256, 4)),  # longer than the context: shortened
    (256, (64, 3), (64, 3)),  # given and fitting: kept
])
def test_unset_sequence_length_covers_the_models_context(context, given, expected):
    """A fine-tune trains the positions it sees: an unset --seq-len takes the model's whole context (at most
    1024), and an unset --batch-size keeps about 1024 tokens per step."""
    from types import SimpleNamespace

    from normsurgery.finetune.engine import FinetuneOptions

    options = FinetuneOptions(seq_len=given[0], batch_size=given[1])
    options.validate()
    options.fit_context(SimpleNamespace(max_position_embeddings=context) if context else SimpleNamespace())
    assert (options.seq_len, options.batch_size) == expected


def test_fsdp_splits_the_training_state_but_not_the_timed_step():
    from normsurgery.finetune.engine import training_bytes

    kl = FinetuneOptions(loss="kl")
    assert training_bytes(1000, kl) == 20_000  # weights, gradients, AdamW's two moments, the teacher
    assert training_bytes(1000, kl, shards=4) == 12_000  # convert's timed step: the whole model's weights, gradients, teacher
    assert training_bytes(1000, kl, shards=4, timed=False) == 5_000  # the heal times no step
