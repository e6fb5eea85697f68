"""Trainable rewrites under a time or token budget, with the defaults a user gets, beside the same-budget baseline.

Each row runs `convert --to none|dyt|derf --budget B` through the CLI's own functions (every other option sized
by the command), then measures the output's cross-entropy on two held-out texts the fine-tune never reads: the
held-out Shakespeare plays and the Python language reference (`pydoc_data`, text of another kind). The baseline
fine-tunes the *original* for the same steps, batch and learning rate with the language-model loss on the same
training text: what the fine-tune alone does to held-out text (run once per budget, with the first row's
steps, batch and learning rate). `--variant` adds ablation rows (options of the
command given as key=value: gap=0 swaps every norm at once).

    python bench/trainable_budget.py --model smollm2-135m --targets none --budgets 30min
    python bench/trainable_budget.py --model gpt2-shakespeare --targets none,dyt,derf --budgets 2min
    python bench/trainable_budget.py --model smollm2-135m --targets dyt --budgets 10min --variant gap=0
    python bench/trainable_budget.py --model smollm2-135m --targets dyt --budgets 10min --variant alpha_init=best-mse
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def samples(tokenizer, seq_len: int, tokens: int) -> dict[str, list[torch.Tensor]]:
    """Fixed batches of 4 x seq_len tokens, about `tokens` of each held-out text."""
    from normsurgery.engine.text import sample
    from normsurgery.reference.text import python_docs_text, shakespeare_text

    count = max(1, tokens // (4 * seq_len))
    return {name: list(sample(tokenizer, seq_len=seq_len, sequences=4 * count, text=text, seed=3)[0].split(4))
            for name, text in (("shakespeare", shakespeare_text("heldout")), ("python-docs", python_docs_text()))}


def run(model: str, target: str, budget: str, variant: dict[str, str], out: Path, steps: bool = False) -> dict:
    """One `convert --to TARGET --budget BUDGET` (plus the variant's options: gap, heal, ramp, lr, aux_weight,
    spread_weight, alpha_init, batch_size, seq_len); its JSON report, each step's loss on stderr with `steps`."""
    from normsurgery.trainable.options import RemovalOptions
    from normsurgery.trainable.pipeline import removal_options, run_remove, run_swap

    options = removal_options(gap=int(variant["gap"]) if "gap" in variant else None,
                              heal=int(variant["heal"]) if "heal" in variant else None,
                              aux_weight=float(variant.get("aux_weight", RemovalOptions.aux_weight)),
                              spread_weight=float(variant.get("spread_weight", RemovalOptions.spread_weight)),
                              lr=float(variant["lr"]) if "lr" in variant else None,
                              batch_size=int(variant["batch_size"]) if "batch_size" in variant else None,
                              seq_len=int(variant["seq_len"]) if "seq_len" in variant else None,
                              text=None, seed=0, loss="kl", gradient_checkpointing=False, checkpoint_dir=None,
                              checkpoint_every=0, budget=budget,
                              ramp=int(variant["ramp"]) if "ramp" in variant else None,
                              alpha_init=variant.get("alpha_init", "best-mse"))
    common = dict(force=True, removal=options, on_step=(lambda step, loss: print(f"step {step} loss {loss:.4f}",
                                                                                file=sys.stderr, flush=True))
                  if steps else None)
    return run_remove(model, out, **common) if target == "none" else run_swap(model, target, out, **common)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--targets", default="none,dyt,derf")
    parser.add_argument("--budgets", default="10min,30min")
    parser.add_argument("--variant", action="append", default=[], help="key=value,... options of an extra row")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens per text")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--variants-only", action="store_true", help="skip the rows with the default options")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--steps", action="store_true", help="print each fine-tune step's loss to stderr")
    parser.add_argument("--keep", type=Path, help="keep each row's output in this folder (for `normsurgery eval`)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from normsurgery.engine.loading import load_model, load_tokenizer
    from normsurgery.errors import NormSurgeryError
    from normsurgery.source import open_model
    from normsurgery.finetune.engine import FinetuneOptions, finetune
    from normsurgery.engine.forward import cross_entropy

    source = open_model(args.model, scan_finite=False)
    path = source.path
    source.close()
    tokenizer = load_tokenizer(path)
    held = samples(tokenizer, args.eval_seq_len, args.eval_tokens)
    original = load_model(path, torch.float32)
    base = {name: cross_entropy(original, batches) for name, batches in held.items()}
    print(f"{args.model}: original held-out CE " + ", ".join(f"{k} {v:.4f}" for k, v in base.items()) +
          f" nats/token ({args.eval_tokens} tokens of each at {args.eval_seq_len})", flush=True)
    variants = ([] if args.variants_only else [{}]) + [dict(kv.split("=", 1) for kv in v.split(",")) for v in args.variant]
    rows, baselines = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets.split(","):
            for budget in args.budgets.split(","):
                for variant in variants:
                    start = time.perf_counter()
                    name = "-".join([target, budget, *(f"{k}={v}" for k, v in variant.items())])
                    out = args.keep / name if args.keep else Path(tmp) / "out"
                    try:
                        report = run(args.model, target, budget, variant, out, args.steps)
                    except NormSurgeryError as err:  # a diverged fine-tune is a result too
                        rows.append({"target": target, "budget": budget, "variant": variant, "failed": str(err),
                                     "wall_s": time.perf_counter() - start})
                        print(json.dumps(rows[-1]), flush=True)
                        continue
                    wall = time.perf_counter() - start
                    rewritten = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                     trust_remote_code=True)
                    options = report["options"]
                    row = {"target": target, "budget": budget, "variant": variant, "steps": len(report["losses"]),
                           "gap": options["gap"], "heal": options["heal"], "per_freeze": options["per_freeze"],
                           "ramp": options.get("ramp"),
                           "lr": options["lr"], "batch": f"{options['batch_size']}x{options['seq_len']}",
                           "wall_s": wall, "estimate_s": report["estimate_seconds"],
                           "internal_change": report["heldout_ce_change"]}
                    row.update({f"{k}_change": cross_entropy(rewritten, b) - base[k] for k, b in held.items()})
                    del rewritten
                    if not args.no_baseline and budget not in baselines:
                        model = copy.deepcopy(original)
                        finetune(model, tokenizer, FinetuneOptions(steps=row["steps"], lr=options["lr"],
                                                                   batch_size=options["batch_size"],
                                                                   seq_len=options["seq_len"], loss="lm"))
                        baselines[budget] = {f"baseline_{k}_change": cross_entropy(model, b) - base[k]
                                             for k, b in held.items()}
                        del model
                    row.update(baselines.get(budget, {}))
                    rows.append(row)
                    print(json.dumps(row), flush=True)

    print("\n| `--to` | budget | variant | schedule | steps | wall (estimate) | held-out Shakespeare | Python docs | "
          "baseline: original fine-tuned, same steps (Shakespeare / Python docs) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        variant = ", ".join(f"{k}={v}" for k, v in r["variant"].items()) or "defaults"
        if "failed" in r:
            print(f"| {r['target']} | {r['budget']} | {variant} | - | - | {r['wall_s'] / 60:.1f} min | failed: "
                  f"{r['failed'].split(';')[0]} | - | - |")
            continue
        schedule = (f"gap {r['gap']}, heal {r['heal']}" + (f", ramp {r['ramp']}" if (r["ramp"] or 1) > 1 else "")
                    + (f", {r['per_freeze']} per event" if r["per_freeze"] > 1 else ""))
        baseline = (f"{r['baseline_shakespeare_change']:+.3f} / {r['baseline_python-docs_change']:+.3f}"
                    if "baseline_shakespeare_change" in r else "-")
        print(f"| {r['target']} | {r['budget']} | {variant} | {schedule}, lr {r['lr']:.2g}, {r['batch']} | {r['steps']} "
              f"| {r['wall_s'] / 60:.1f} min ({r['estimate_s'] / 60:.1f}) | {r['shakespeare_change']:+.3f} | "
              f"{r['python-docs_change']:+.3f} | {baseline} |")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "base": base, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
