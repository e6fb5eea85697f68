"""How evenly each norm's per-token scale is spread: why one constant (LN removal) or one alpha (DyT) fits.

For every removable norm (the Pre-LN input norms and the final norm, from the family declaration) it prints the
per-token RMS of the residual entering the norm on calibration text: position 0 (the attention sink), the
median of the other tokens, their 99th percentile and maximum as multiples of that median, and the tokens above
ten times the median at one norm (`--probe`, default the middle block's first input norm).

    python bench/residual_scales.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import collections
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--split", default="calibration", choices=("calibration", "heldout"))
    parser.add_argument("--probe", default=None, help="the norm whose large tokens are listed")
    args = parser.parse_args()

    from normsurgery.engine.loading import load_model, load_tokenizer
    from normsurgery.engine.text import sample
    from normsurgery.source import open_model
    from normsurgery.trainable.stand_ins import removable_norms

    source = open_model(args.model)
    tokenizer = load_tokenizer(source.path)
    model = load_model(source.path, torch.float32).eval()
    ids = sample(tokenizer, seq_len=args.seq_len, sequences=args.sequences, split=args.split, seed=1)[0]
    norms = removable_norms(source.arch)
    probe = args.probe or next(n.name for n in norms if f".{len(source.arch.blocks) // 2}." in n.name)
    scales: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module: torch.nn.Module, inputs: tuple) -> None:
            x = inputs[0].float()
            if next(n for n in norms if n.name == name).kind == "layernorm":
                x = x - x.mean(-1, keepdim=True)
            scales[name] = x.pow(2).mean(-1).sqrt()
        return record

    for norm in norms:
        model.get_submodule(norm.name).register_forward_pre_hook(hook(norm.name))
    with torch.no_grad():
        model(input_ids=ids)
    print(f"# {args.model}: per-token RMS entering each norm, {args.sequences} x {args.seq_len} {args.split} tokens")
    print("| norm | position 0 | median (other tokens) | p99 / median | max / median |")
    print("|---|---|---|---|---|")
    for norm in norms:
        s = scales[norm.name]
        rest = s[:, 1:].flatten()
        median = rest.median()
        print(f"| {norm.name} | {float(s[:, 0].mean()):.3g} | {float(median):.3g} | "
              f"{float(rest.quantile(0.99) / median):.3g} | {float(rest.max() / median):.3g} |")
    s = scales[probe]
    large = s > 10 * s[:, 1:].median()
    large[:, 0] = False
    words = collections.Counter(tokenizer.decode([int(t)]) for t in ids[large])
    positions = collections.Counter(large.nonzero()[:, 1].tolist())
    largest = float(s[:, 1:].max() / s[:, 1:].median())
    print(f"\n{probe}: {int(large.sum())} of {large[:, 1:].numel()} tokens past position 0 above 10x the median "
          f"(largest {largest:.3g}x): {dict(words.most_common(8))}, at positions {dict(positions.most_common(8))}")


if __name__ == "__main__":
    main()
