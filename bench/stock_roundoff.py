"""How exactly an inert stock norm (`convert --to none --export stock`) computes its frozen stand-in, on real text.

For every removable norm of each model it takes the residual entering the norm (calibration text, the original
model), freezes the norm at its mean divisor as the removal's stand-ins do (g * P x / s + b, computed in float32
as trainable/stand_ins.py does), builds the family's stock module with eps 2^66 and gain 2^33 g / s
(rewrite/inert.py), and prints the largest difference over all norms and tokens, relative to the stand-in's
largest output, and the largest per-token mean square entering a norm (the form is exact below 2^42).

    python bench/stock_roundoff.py gpt2-shakespeare smollm2-135m
"""

from __future__ import annotations

import argparse
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@torch.no_grad()
def roundoff(spec: str, sequences: int, seq_len: int) -> tuple[int, float, float]:
    """(norms, max relative difference stock vs stand-in, largest per-token mean square) for one model."""
    from transformers import AutoModelForCausalLM

    from normsurgery.engine.loading import load_tokenizer
    from normsurgery.engine.text import sample
    from normsurgery.rewrite.inert import STOCK_EPS, STOCK_ROOT
    from normsurgery.source import open_model
    from normsurgery.trainable.stand_ins import removable_norms

    source = open_model(spec, scan_finite=False)
    source.close()
    norms = removable_norms(source.arch)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    ids = sample(load_tokenizer(source.path), seq_len=seq_len, sequences=sequences, seed=1)[0]
    inputs: dict[str, torch.Tensor] = {}
    for norm in norms:
        model.get_submodule(norm.name).register_forward_hook(
            lambda _m, args, _out, name=norm.name: inputs.__setitem__(name, args[0].float()))
    model(ids)
    worst = largest = 0.0
    for norm in norms:
        module, x = model.get_submodule(norm.name), inputs[norm.name]
        y = x - x.mean(-1, keepdim=True) if norm.kind == "layernorm" else x
        scale = float(torch.sqrt(y.pow(2).mean(-1) + norm.eps).double().mean())
        gain = module.weight.float() + norm.gain_offset
        bias = module.bias.float() if norm.bias else 0.0
        want = y / scale * gain + bias
        stock = type(module)(source.arch.hidden_size, eps=STOCK_EPS) if norm.kind == "rmsnorm" else \
            torch.nn.LayerNorm(source.arch.hidden_size, eps=STOCK_EPS, bias=bool(norm.bias))
        stock.weight.copy_(gain.double() * STOCK_ROOT / scale - norm.gain_offset)
        if norm.bias:
            stock.bias.copy_(module.bias)
        worst = max(worst, float((want - stock(x)).abs().max() / want.abs().max()))
        largest = max(largest, float(y.pow(2).mean(-1).max()))
    return len(norms), worst, largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    for spec in args.models:
        count, worst, largest = roundoff(spec, args.sequences, args.seq_len)
        print(f"{spec}: {count} norms, {args.sequences} x {args.seq_len} tokens: max |stock - stand-in| / max "
              f"|stand-in| = {worst:.2e}; largest per-token mean square entering a norm {largest:.3g} (2^42 = "
              f"{2.0**42:.3g})")


if __name__ == "__main__":
    main()
