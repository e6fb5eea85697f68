"""What the DyT/Derf initialisation alone does, before any training: held-out cross-entropy after swapping norms.

Each row swaps a set of norms (all of them, or only the MLP-input, attention-input or final norms) for DyT or
Derf with one initialisation, and measures the model with no fine-tune at all on held-out Shakespeare and on the
Python language reference. It separates what calibration can do from what the heal must do:

- `linear`: the command's default (`--alpha-init linear`): alpha = 0.1/typical scale and the gain x10, the
  frozen-scale map up to 3 typical scales;
- `scale`: alpha = 1/typical scale, gain unchanged (`--alpha-init scale`);
- `fitted`: the better of `scale` and a least-squares alpha by the fit's error (`--alpha-init best-mse`, the
  earlier default; all norms calibrated on the original model, as `--gap 0` does);
- `progressive`: as `fitted`, each norm calibrated on the model with the earlier ones already swapped (the order
  and calibration of the schedule, without its training steps);
- `none`: LN removal's frozen scales, all measured on the original (per reader path; with the special scales and
  the token bound kept, and released as in the exported model), the reference point for a linear stand-in.

`progressive` runs for the set `all` only (it calibrates once per norm).

    python bench/swap_ablation.py --model smollm2-135m
    python bench/swap_ablation.py --model gpt2-shakespeare --tokens 4096
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SETS = ("all", "mlp", "attention", "final")


def chosen(arch, norms: list, which: str) -> list:
    """The norms of one set: MLP-input (a block's second input norm), attention-input (its first), final, or all."""
    if which == "all":
        return norms
    if which == "final":
        return [n for n in norms if n.role == "final"]
    position = 1 if which == "mlp" else 0
    picked = {ins[position].name for b in arch.blocks
              if len(ins := [n for n in b.norms if n.role == "input"]) > position}
    return [n for n in norms if n.name in picked]


def swapped(original: torch.nn.Module, source, tokenizer, norms: list, target: str, init: str) -> torch.nn.Module:
    """A copy of the model with `norms` swapped for `target`, initialised by `init`, no training."""
    from normsurgery.trainable.remove_ln import CALIBRATION_SEQ_LEN, CALIBRATION_SEQUENCES, calibration_batches
    from normsurgery.trainable.swap import CALIBRATION_TOKENS, center_in_memory, fit_alpha, install_swappable, norm_inputs

    model = copy.deepcopy(original)
    if any(n.kind == "layernorm" for n in norms):
        center_in_memory(model, source.arch)
    batches = calibration_batches(tokenizer, CALIBRATION_SEQ_LEN, CALIBRATION_SEQUENCES,
                                  max(1, CALIBRATION_TOKENS // (CALIBRATION_SEQUENCES * CALIBRATION_SEQ_LEN)))
    stand_ins = install_swappable(model, norms, target)
    groups = [[n] for n in norms] if init == "progressive" else [norms]
    rule = {"linear": "linear", "scale": "scale"}.get(init, "best-mse")
    for group in groups:
        inputs = norm_inputs(model, group, batches)
        for norm in group:
            fit = fit_alpha(inputs[norm.name], norm, target, rule)
            stand_ins[norm.name].swap(fit.alpha, fit.gain)
            stand_ins[norm.name].set_mix(1.0)
    return model


def frozen(original: torch.nn.Module, source, tokenizer, norms: list, released: bool) -> torch.nn.Module:
    """A copy of the model with every norm path frozen at its scale on the original (LN removal with no training);
    `released`: the special scales and the token bound lifted too, as in the exported model."""
    from normsurgery.trainable.remove_ln import (CALIBRATION_SEQ_LEN, CALIBRATION_SEQUENCES, calibration_batches,
                                                 RELEASES, measure, removal_units)
    from normsurgery.trainable.stand_ins import install, special_token_ids

    model = copy.deepcopy(original)
    wanted = {n.name for n in norms}
    groups = install(model, [n for n in source.arch.all_norms() if n.name in wanted], special_token_ids(tokenizer),
                     source.arch.key_renames)
    todo = [groups[u.name] for u in removal_units(source.arch, norms)]
    measure(model, todo, calibration_batches(tokenizer, CALIBRATION_SEQ_LEN, CALIBRATION_SEQUENCES, 1))
    for group in todo:
        group.set_mix(1.0)
    if released:
        for group in groups.values():
            for which in RELEASES:
                group.release(which)
    return model


def reference(model: str, seq_len: int, tokens: int) -> tuple:
    """The model's source, tokenizer and float32 original, the held-out samples of each text and the original's
    cross-entropy on them (printed): what every row of an ablation is measured against."""
    from normsurgery.engine.forward import cross_entropy
    from normsurgery.engine.loading import load_model, load_tokenizer
    from normsurgery.source import open_model

    import trainable_budget

    torch.manual_seed(0)
    source = open_model(model)
    tokenizer = load_tokenizer(source.path)
    original = load_model(source.path, torch.float32).eval()
    texts = trainable_budget.samples(tokenizer, seq_len, tokens)
    base = {name: cross_entropy(original, batches) for name, batches in texts.items()}
    print(f"# {model}: original held-out CE " + ", ".join(f"{k} {v:.3f}" for k, v in base.items()), flush=True)
    return source, tokenizer, original, texts, base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--targets", default="dyt,derf")
    parser.add_argument("--inits", default="linear,scale,fitted,progressive")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens of each text")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--no-removal", action="store_true", help="skip the frozen-scale rows")
    args = parser.parse_args()

    from normsurgery.engine.forward import cross_entropy
    from normsurgery.trainable.stand_ins import removable_norms

    source, tokenizer, original, texts, base = reference(args.model, args.seq_len, args.tokens)
    print("| norms | stand-in | init | " + " | ".join(f"{k} change" for k in base) + " | seconds |")
    print("|---|---|---|" + "---|" * (len(base) + 1))
    norms = removable_norms(source.arch)
    rows = []

    def row(which: str, kind: str, init: str, model: torch.nn.Module, started: float) -> None:
        with torch.no_grad():
            changes = {name: cross_entropy(model, batches) - base[name] for name, batches in texts.items()}
        rows.append({"norms": which, "stand_in": kind, "init": init, **changes})
        print(f"| {which} | {kind} | {init} | " + " | ".join(f"{v:+.3f}" for v in changes.values())
              + f" | {time.perf_counter() - started:.0f} |", flush=True)

    for which in args.sets.split(","):
        subset = chosen(source.arch, norms, which)
        if not subset:
            continue
        if not args.no_removal:
            started = time.perf_counter()
            row(which, "none (frozen scales)", "bound and special scales kept",
                frozen(original, source, tokenizer, subset, released=False), started)
            started = time.perf_counter()
            row(which, "none (frozen scales)", "released (as exported)",
                frozen(original, source, tokenizer, subset, released=True), started)
        for target in args.targets.split(","):
            for init in args.inits.split(","):
                if init == "progressive" and which != "all":
                    continue
                started = time.perf_counter()
                row(which, target, init, swapped(original, source, tokenizer, subset, target, init), started)
    print(json.dumps({"model": args.model, "original": base, "rows": rows}))


if __name__ == "__main__":
    main()
