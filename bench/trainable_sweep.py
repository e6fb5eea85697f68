"""Held-out cross-entropy of the trainable rewrites against their fine-tune budget, beside the baseline that
matters: the original model fine-tuned for the same number of steps on the same text.

Each row runs the real command (`convert --to none|dyt|derf`, through the same functions as the CLI), then
measures the output's cross-entropy on a held-out sample larger than the command's own (16 x 8 x 128 tokens of
the held-out plays). The baseline fine-tunes the original with the language-model loss (distilling the original
to itself changes nothing: its KL is zero from the first step). Prints a markdown table.

    python bench/trainable_sweep.py --model gpt2-shakespeare
    python bench/trainable_sweep.py --model smollm2-135m --targets dyt,derf --heal 10,30 --batch-size 4
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def heldout(tokenizer, seq_len: int, count: int) -> list[torch.Tensor]:
    """`count` fixed batches of 8 x seq_len tokens from the held-out plays."""
    from normsurgery.engine.text import sample

    return list(sample(tokenizer, seq_len=seq_len, sequences=8 * count, split="heldout", seed=3)[0].split(8))


def run_rewrite(model: str, target: str, gap: int, heal: int, args: argparse.Namespace, out: Path) -> dict:
    """One `convert --to TARGET` run; its JSON report."""
    from normsurgery.trainable.pipeline import removal_options, run_remove, run_swap

    options = removal_options(gap=gap, heal=heal, aux_weight=args.aux_weight, lr=args.lr, batch_size=args.batch_size,
                              seq_len=args.seq_len, text=None, seed=0, loss=args.loss, gradient_checkpointing=False,
                              checkpoint_dir=None, checkpoint_every=0)
    common = dict(force=True, removal=options)
    if target == "none":
        return run_remove(model, out, **common)
    return run_swap(model, target, out, **common)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2-shakespeare")
    parser.add_argument("--targets", default="none,dyt,derf")
    parser.add_argument("--schedules", default="5:20,10:100,30:300,60:600", help="--to none budgets, GAP:HEAL each")
    parser.add_argument("--heal", default="20,100,300,600", help="--to dyt/derf budgets")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--loss", default="kl")
    parser.add_argument("--aux-weight", type=float, default=0.0)
    parser.add_argument("--heldout-batches", type=int, default=16)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--baseline-steps", default="", help="baseline budgets (default: those of the rows)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from normsurgery.engine.loading import load_model, load_tokenizer
    from normsurgery.source import open_model
    from normsurgery.finetune.engine import FinetuneOptions, finetune
    from normsurgery.engine.forward import cross_entropy
    from normsurgery.trainable.stand_ins import removable_norms

    source = open_model(args.model, scan_finite=False)
    path, norms = source.path, len(removable_norms(source.arch))
    source.close()
    tokenizer = load_tokenizer(path)
    batches = heldout(tokenizer, args.seq_len, args.heldout_batches)
    original = load_model(path, torch.float32)
    base_ce = cross_entropy(original, batches)
    print(f"{args.model}: {norms} norms, held-out CE {base_ce:.4f} nats/token on {args.heldout_batches} x 8 x "
          f"{args.seq_len} tokens; lr {args.lr}, batch {args.batch_size} x {args.seq_len}, loss {args.loss}", flush=True)

    rows, budgets = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets.split(","):
            plans = ([tuple(map(int, s.split(":"))) for s in args.schedules.split(",")] if target == "none"
                     else [(0, int(h)) for h in args.heal.split(",")])
            for gap, heal in plans:
                start = time.perf_counter()
                report = run_rewrite(args.model, target, gap, heal, args, Path(tmp) / "out")
                wall = time.perf_counter() - start
                steps = len(report["losses"])
                rewritten = AutoModelForCausalLM.from_pretrained(Path(tmp) / "out", dtype=torch.float32,
                                                                 trust_remote_code=True)
                ce = cross_entropy(rewritten, batches)
                del rewritten
                row = {"target": target, "gap": gap, "heal": heal, "steps": steps, "wall_s": wall,
                       "ce": ce, "delta": ce - base_ce, "after_swap": report.get("heldout_ce_after_swap"),
                       "internal_before": report["heldout_ce_before"], "internal_after": report["heldout_ce_after"]}
                rows.append(row)
                budgets.add(steps)
                print(json.dumps(row), flush=True)

        baseline = {}
        wanted = sorted(int(x) for x in args.baseline_steps.split(",") if x) or sorted(budgets)
        for steps in [] if args.no_baseline else wanted:
            model = copy.deepcopy(original)
            start = time.perf_counter()
            finetune(model, tokenizer, FinetuneOptions(steps=steps, lr=args.lr, batch_size=args.batch_size,
                                                       seq_len=args.seq_len, loss="lm"))
            baseline[steps] = cross_entropy(model, batches) - base_ce
            print(json.dumps({"baseline_steps": steps, "delta": baseline[steps],
                              "wall_s": time.perf_counter() - start}), flush=True)

    print("\n| `--to` | schedule | steps | wall | held-out CE change (nats/token) | original fine-tuned with LM loss, same steps |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        schedule = f"gap {r['gap']}, heal {r['heal']}" if r["target"] == "none" else f"heal {r['heal']}"
        base = f"{baseline[r['steps']]:+.3f}" if r["steps"] in baseline else "-"
        print(f"| {r['target']} | {schedule} | {r['steps']} | {r['wall_s']:.0f} s | {r['delta']:+.3f} | {base} |")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "base_ce": base_ce, "rows": rows,
                                         "baseline": baseline}, indent=1) + "\n")


if __name__ == "__main__":
    main()
