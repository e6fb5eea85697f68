"""The default check sample (DEFAULT_NUM_SEQS x DEFAULT_SEQ_LEN tokens) catches one changed element in every kind of
tensor: a norm's reader and a writer, a norm gain and bias, an embedding row the sample uses, a position it reaches,
and the unembedding. The change is 1% of the tensor's largest |value|, far below what a broken rewrite does."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from normsurgery.arch import architecture_of
from normsurgery.engine.text import check_sample
from normsurgery.engine.lazy_model import model_config
from normsurgery.thresholds import DEFAULT_NUM_SEQS, DEFAULT_SEQ_LEN


def _tensor_of_kind(folder, kind: str) -> tuple[str, tuple[int, ...] | None]:
    """The tensor name of a kind, and (for embeddings) the row the sample is known to reach."""
    config = model_config(folder)
    arch = architecture_of(config)
    block = arch.blocks[1]
    norm = next(n for n in block.norms if n.readers)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    tokens, _ = check_sample(folder, meta, text=None, seq_len=DEFAULT_SEQ_LEN, num_seqs=DEFAULT_NUM_SEQS)
    return {
        "reader": (norm.readers[0].weight, None),
        "writer": (block.writers[0].weight, None),
        "norm gain": (norm.weight, None),
        "norm bias": (norm.bias, None),
        "embedding": (arch.token_embedding, (int(tokens[2, 5]),)),
        "position embedding": (arch.position_embedding, (DEFAULT_SEQ_LEN - 1,)),
        "unembedding": (arch.unembed.weight, None),
    }[kind]


def _one_element_changed(src, dst, name: str, row: tuple[int, ...] | None):
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    tensor = weights[name].clone()
    gen = torch.Generator().manual_seed(7)
    index = tuple(row or ()) + tuple(int(torch.randint(0, s, (1,), generator=gen)) for s in tensor.shape[len(row or ()):])
    tensor[index] += 0.01 * tensor.abs().max()
    weights[name] = tensor
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


CASES = [("gpt2", k) for k in ("reader", "writer", "norm gain", "norm bias", "embedding", "position embedding")] + [
    ("gpt2_untied", "unembedding"), ("llama", "reader"), ("llama", "writer"), ("llama", "norm gain"),
    ("llama", "embedding"), ("llama", "unembedding")]


@pytest.mark.parametrize("fixture,kind", CASES, ids=[f"{f}-{k.replace(' ', '_')}" for f, k in CASES])
def test_default_sample_catches_one_changed_element(tiny_model, cli, tmp_path, fixture, kind):
    folder = tiny_model(fixture)
    name, row = _tensor_of_kind(folder, kind)
    assert name is not None
    bad = _one_element_changed(folder, tmp_path / "bad", name, row)
    code, out, err = cli("check", folder, bad, "--json")
    report = json.loads(out)
    assert code == 1 and not report["passed"], (kind, report["rel_logit_diff"])
    assert (report["num_sequences"], report["sequence_length"]) == (DEFAULT_NUM_SEQS, DEFAULT_SEQ_LEN)
