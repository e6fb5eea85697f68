"""Which of LN removal's releases makes a model with frozen norms blow up, and where: no training at all.

LN removal keeps three things apart until the end of its schedule (trainable/stand_ins.py): a bound on any
token's normalised input (3x an ordinary token's), and scales of their own for position 0 (the attention sink)
and for the tokenizer's special tokens. This freezes every path of a set of norms at its scale on the original
model (as `convert --to none` does, measured on the calibration text) and releases each combination of the
three, measuring held-out cross-entropy; then, with only the bound released, it follows the residual stream
block by block and reports how many tokens exceed 100x the block's median RMS and where the first non-finite
value appears.

    python bench/release_ablation.py --model smollm2-135m
    python bench/release_ablation.py --model gpt2-shakespeare --sets all
"""

from __future__ import annotations

import argparse
import json
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

COMBINATIONS = [(), ("special", "first"), ("outliers",), ("outliers", "special", "first")]
MASSIVE = 100.0  # a token this many times the block's median residual RMS is counted as blown up


def set_releases(groups: list, released: tuple[str, ...]) -> None:
    """Release exactly `released` (the others kept apart) on every frozen path."""
    for group in groups:
        for which in ("outliers", "special", "first"):
            group.release(which, 1.0 if which in released else 0.0)


@torch.no_grad()
def growth(model: torch.nn.Module, blocks: list[torch.nn.Module], batch: torch.Tensor) -> list[dict]:
    """Per block: the residual's median RMS over tokens after position 0, how many tokens exceed MASSIVE x it or
    are not finite, and position 0's RMS."""
    seen: dict[int, torch.Tensor] = {}
    handles = [b.register_forward_hook(lambda _m, _a, out, i=i: seen.__setitem__(
        i, (out[0] if isinstance(out, tuple) else out).float().pow(2).mean(-1).sqrt())) for i, b in enumerate(blocks)]
    try:
        model(input_ids=batch)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for i in range(len(blocks)):
        rms = seen[i]
        rest = rms[:, 1:]
        finite = rest[torch.isfinite(rest)]
        median = float(finite.median()) if finite.numel() else float("nan")
        bad = ~torch.isfinite(rest) | (rest > MASSIVE * median)
        rows.append({"block": i, "median": median, "position0": float(rms[:, 0].mean()),
                     "blown_up": int(bad.sum()), "not_finite": int((~torch.isfinite(rest)).sum())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sets", default="mlp,attention,all", help="norm sets to freeze (swap_ablation.SETS)")
    parser.add_argument("--tokens", type=int, default=2048, help="held-out tokens of each text")
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()

    from normsurgery.engine.forward import cross_entropy
    from normsurgery.trainable.stand_ins import ScaleGroup, loaded_module, removable_norms

    import swap_ablation

    source, tokenizer, original, texts, base = swap_ablation.reference(args.model, args.seq_len, args.tokens)
    print("| norms frozen | released | " + " | ".join(f"{k} change" for k in base) + " |")
    print("|---|---|" + "---|" * len(base))
    norms = removable_norms(source.arch)
    result: dict = {"model": args.model, "original": base, "rows": [], "growth": {}}
    for which in args.sets.split(","):
        model = swap_ablation.frozen(original, source, tokenizer, swap_ablation.chosen(source.arch, norms, which),
                                     released=False)
        groups = [m for m in model.modules() if isinstance(m, ScaleGroup)]
        for released in COMBINATIONS:
            set_releases(groups, released)
            with torch.no_grad():
                changes = {name: cross_entropy(model, batches) - base[name] for name, batches in texts.items()}
            result["rows"].append({"norms": which, "released": list(released), **changes})
            print(f"| {which} | {', '.join(released) or 'nothing'} | "
                  + " | ".join(f"{v:+.3f}" for v in changes.values()) + " |", flush=True)
        set_releases(groups, ("outliers",))
        blocks = [loaded_module(model, b.prefix.rstrip("."), source.arch.key_renames) for b in source.arch.blocks]
        result["growth"][which] = {name: growth(model, blocks, batches[0]) for name, batches in texts.items()}
    for which, by_text in result["growth"].items():
        for name, rows in by_text.items():
            first = next((r["block"] for r in rows if r["not_finite"]), None)
            massive = [f"{r['block']}:{r['blown_up']}" for r in rows if r["blown_up"]][:6]
            print(f"# {which} frozen, bound released, {name}: first non-finite block {first}; "
                  f"blocks:tokens above {MASSIVE:g}x median {' '.join(massive) or 'none'}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
