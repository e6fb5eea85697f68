"""Which way of choosing blocks loses least, and how much forward time pruning gives back, on one model.

For each K, every selection method chooses K blocks on the calibration text (Shakespeare calibration split) and
the held-out cross-entropy (held-out plays) of the model with those blocks skipped is measured; `auto` is the
default (best candidates of every metric, re-measured by calibration loss). Optionally heals the default's
choice for some K by distillation. Then times the forward pass of models with k blocks physically removed
against the intact one, interleaved. Prints markdown tables.

    python bench/prune_quality.py --model smollm2-135m
    python bench/prune_quality.py --model /tmp/normsurgery-bench/llama-2.4gb-bf16 --time-only   # a 1.2B Llama shape
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def heldout_ids(tokenizer, sequences: int, seq_len: int) -> torch.Tensor:
    from normsurgery.engine.text import sample

    return sample(tokenizer, seq_len=seq_len, sequences=sequences, split="heldout")[0]


def sharing_blocks(model: torch.nn.Module, layers_path: str, remove: list[int]) -> torch.nn.Module:
    """A view of `model` without the blocks `remove` that shares every parameter with it (for timing forwards
    without cache, where block indices do not matter): many variants of a large model fit in memory at once."""
    *path, attr = layers_path.split(".")
    view = copy.copy(model)
    chain = [view]  # shallow copies of the modules down to the block list; everything else is shared
    for name in path:
        chain[-1]._modules = dict(chain[-1]._modules)
        chain[-1]._modules[name] = copy.copy(chain[-1]._modules[name])
        chain.append(chain[-1]._modules[name])
    chain[-1]._modules = dict(chain[-1]._modules)
    blocks = [b for i, b in enumerate(chain[-1]._modules[attr]) if i not in remove]
    chain[-1]._modules[attr] = torch.nn.ModuleList(blocks)
    config = copy.copy(model.config)
    config.num_hidden_layers = len(blocks)
    if getattr(config, "layer_types", None):
        config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in remove]
    for module in chain:
        if hasattr(module, "config"):
            module.config = config
    return view


def without_blocks(model: torch.nn.Module, layers_path: str, remove: list[int]) -> torch.nn.Module:
    """An independent copy of `model` with blocks physically removed and cache indices renumbered (to heal)."""
    pruned = sharing_blocks(copy.deepcopy(model), layers_path, remove)
    for new, block in enumerate(pruned.get_submodule(layers_path)):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    return pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument("--methods", default="bi,angular,angular-all,skip-cost,last,auto")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--heal-ks", default="", help="K values whose default choice is also healed")
    parser.add_argument("--heal-steps", type=int, default=50)
    parser.add_argument("--heal-batch", type=int, default=4)
    parser.add_argument("--heal-lr", type=float, default=1e-4)
    parser.add_argument("--time-ks", default="0,2,4,8,15", help="0 first (the intact model)")
    parser.add_argument("--time-seq-len", type=int, default=256, help="tokens of the timed forward")
    parser.add_argument("--time-only", action="store_true", help="skip the quality measurements")
    parser.add_argument("--time-runs", type=int, default=30, help="interleaved forwards of each variant; the fastest counts")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()

    from normsurgery.arch import family_for
    from normsurgery.engine.loading import load_model, load_tokenizer
    from normsurgery.depth.measure import cross_entropy, measure
    from normsurgery.engine.text import sample
    from normsurgery.depth.measure import remeasure
    from normsurgery.depth.select import candidates
    from normsurgery.depth.skip import skipping
    from normsurgery.source import open_model
    from normsurgery.finetune.engine import FinetuneOptions, finetune

    torch.manual_seed(0)
    random.seed(0)
    source = open_model(args.model, scan_finite=False)
    arch, path = source.arch, source.path
    layers_path = family_for(arch.model_type).layers
    source.close()
    tokenizer = load_tokenizer(path)
    model = load_model(path, torch.float32).eval()
    base = None
    if not args.time_only:
        calib, _ = sample(tokenizer, seq_len=args.seq_len, sequences=args.samples)
        held = heldout_ids(tokenizer, args.samples, args.seq_len)
        start = time.perf_counter()
        stats = measure(model, arch, calib, label=args.model, skip_cost=True, costs_of=("block",))
        base = cross_entropy(model, held)
        print(f"{args.model}: {arch.num_layers} blocks; statistics with skip costs in {time.perf_counter() - start:.0f} s; "
              f"held-out CE {base:.4f} on {args.samples} x {args.seq_len} tokens", flush=True)

    rows = []
    for k in [] if args.time_only else map(int, args.ks.split(",")):
        for method in args.methods.split(","):
            found = candidates(stats, k, method, top=3)
            best = remeasure(model, arch, calib, found) if method == "auto" else found[0]
            with skipping(model, arch, best.blocks):
                ce = cross_entropy(model, held)
            row = {"k": k, "method": method, "blocks": list(best.blocks), "heldout_ce": ce, "delta": ce - base}
            rows.append(row)
            print(json.dumps(row), flush=True)

    healed = []
    for k in [int(x) for x in args.heal_ks.split(",") if x]:
        blocks = next(r["blocks"] for r in rows if r["k"] == k and r["method"] == "auto")
        student = without_blocks(model, layers_path, blocks).train().requires_grad_(True)
        start = time.perf_counter()
        finetune(student, tokenizer, FinetuneOptions(steps=args.heal_steps, lr=args.heal_lr, batch_size=args.heal_batch,
                                                     seq_len=args.seq_len), teacher=model)
        ce = cross_entropy(student.eval(), held)
        healed.append({"k": k, "blocks": blocks, "steps": args.heal_steps, "heldout_ce": ce, "delta": ce - base,
                       "wall_s": time.perf_counter() - start})
        print(json.dumps(healed[-1]), flush=True)
        del student

    if tokenizer is not None:
        ids = heldout_ids(tokenizer, 1, args.time_seq_len)
    else:  # a synthetic checkpoint (bench/synthetic.py): any tokens time the same
        ids = torch.randint(model.config.get_text_config().vocab_size, (1, args.time_seq_len))
    L = arch.num_layers
    time_ks = [int(x) for x in args.time_ks.split(",")] + [L]  # L: every block removed (embedding, final norm, head)
    variants = {k: sharing_blocks(model, layers_path, list(range(L - 1 - k, L - 1)) if k < L else list(range(L)))
                for k in time_ks}
    times: dict[int, list[float]] = {k: [] for k in time_ks}
    with torch.no_grad():
        order = list(variants)
        for _ in range(args.time_runs):
            random.shuffle(order)  # a fresh order each round: no variant always follows the same one
            for k in order:
                t = time.perf_counter()
                variants[k](input_ids=ids, use_cache=False)
                times[k].append(time.perf_counter() - t)
    full = min(times[0])  # the fastest run: the least disturbed by other work on a shared machine
    share = 1 - min(times[L]) / full  # of the forward time spent in the blocks

    if rows:
        print(f"\n| K | {' | '.join(args.methods.split(','))} |")
        print("|---|" + "---|" * len(args.methods.split(",")))
    for k in [] if args.time_only else map(int, args.ks.split(",")):
        cells = [next(r for r in rows if r["k"] == k and r["method"] == m) for m in args.methods.split(",")]
        print(f"| {k} | " + " | ".join(f"{c['delta']:+.3f} ({','.join(map(str, c['blocks']))})" for c in cells) + " |")
    if healed:
        print("\n| K | blocks | unhealed | healed | steps | heal wall |")
        print("|---|---|---|---|---|---|")
        for h in healed:
            before = next(r["delta"] for r in rows if r["k"] == h["k"] and r["method"] == "auto")
            print(f"| {h['k']} | {','.join(map(str, h['blocks']))} | {before:+.3f} | {h['delta']:+.3f} | {h['steps']} | "
                  f"{h['wall_s']:.0f} s |")
    print(f"\nforward of 1 x {ids.shape[1]} tokens, fastest of {args.time_runs} interleaved runs; intact model {full * 1000:.1f} ms, "
          f"of which the {L} blocks {share:.1%} (the rest: embedding, final norm and unembedding)")
    print("| blocks removed k | k/L | time saved | saved / (k/L) | saved / (k/L x blocks' share) |")
    print("|---|---|---|---|---|")
    for k in time_ks[1:-1]:
        saved = 1 - min(times[k]) / full
        print(f"| {k} | {k / L:.3f} | {saved:.3f} | {saved / (k / L):.2f} | {saved / (k / L * share):.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"base_ce": base, "rows": rows, "healed": healed,
                       "times": {k: min(v) for k, v in times.items()}, "all_times": times}, f, indent=1)


if __name__ == "__main__":
    main()
