"""Conversion time and peak memory of normsurgery against a plain copy of the same folder, in one run.

For each synthetic checkpoint (real tensor names and shapes, random weights; see bench/synthetic.py) it
times `cp -r SRC DST && sync` and each normsurgery operation (run as a fresh process, verification off:
that is timed separately) in interleaved rounds, and records every process's peak RSS with wait4. Prints a
Markdown table.

    python bench/convert_speed.py [--workdir /tmp/normsurgery-bench] [--suite main|rss|prune|moe|all] [--repeat N]
                                  [--mergekit PATH/TO/mergekit-yaml] [--moe-layers 8,24,40]
    python bench/convert_speed.py --guard [--repeat N]

--guard is the check for CI (one to two minutes on 2 cores): a 0.3 GB bf16 Llama-shaped checkpoint whose
config.json is as the hub ships one (see HUB_LLAMA_KEYS), generated into a temporary folder; the best of N (3) runs
of the copy, of `prune --layers --no-verify`, `fold --no-verify` and the verified `fold`, interleaved; a table of
times and ratios to the copy, and exit status 1 when a ratio exceeds its limit (GUARD_LIMITS, generous: shared CI
machines are noisy; a prune that imports torch and transformers again, seconds more, exceeds its limit).

Peak RSS is each command's own, taken with wait4 by a small launcher process that starts it: a child forked from
this script directly would report at least this script's own RSS (Linux carries the parent's memory high-water mark
into the child's ru_maxrss through fork and exec), which made every figure the same ~0.7 GB floor before. The moe
suite also reports the peak RSS of a process that only imports what a conversion imports.

With --mergekit, the prune suite also times mergekit's passthrough merge of the same kept blocks in each round
(install it in its own environment: `python -m venv mk && mk/bin/pip install torch==2.13.0 mergekit==0.1.5`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import SHAPES, build, folder_bytes, llama_of_layers  # noqa: E402


# started from this (large) process, runs the command and prints its peak RSS in kB: the command's ru_maxrss then
# starts from the launcher's few MB, not from this process's RSS
LAUNCHER = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
            "_, status, usage = os.wait4(p.pid, 0); print(usage.ru_maxrss); sys.exit(os.waitstatus_to_exitcode(status))")


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one command run as a child of a small launcher process."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return seconds, int(proc.stdout.split()[-1]) / 1e6


def startup_rss() -> float:
    """Peak RSS (GB) of a process that imports what a conversion imports and does nothing else."""
    modules = ("normsurgery.surgery", "normsurgery.engine.loading", "normsurgery.rewrite.fold", "normsurgery.rewrite.prune",
               "transformers.models.mixtral.modeling_mixtral")
    return run([sys.executable, "-c", f"import {', '.join(modules)}"])[1]


def copy_time(src: Path, dst: Path) -> tuple[float, float]:
    """The baseline: copy the folder and sync it to disk."""
    shutil.rmtree(dst, ignore_errors=True)
    result = run(["bash", "-c", f"cp -r '{src}' '{dst}' && sync"])
    shutil.rmtree(dst, ignore_errors=True)
    return result


def normsurgery(*args: str) -> list[str]:
    return [sys.executable, "-m", "normsurgery", *args]


def mergekit_prune(mergekit: str, src: Path, work: Path, keep: list[tuple[int, int]]) -> list[str]:
    """The mergekit command that keeps the block ranges `keep` of `src` (a passthrough merge), 1 GB shards."""
    slices = "\n".join(f"  - sources:\n      - model: {src}\n        layer_range: [{a}, {b}]" for a, b in keep)
    config = work / "mergekit-prune.yaml"
    config.write_text(f"slices:\n{slices}\nmerge_method: passthrough\ndtype: bfloat16\n")
    return [mergekit, str(config), "--out-shard-size", "1B", "--quiet"]


def bench_model(src: Path, ops: list[tuple[str, list[str]]], work: Path, verify: bool, repeat: int,
                others: list[tuple[str, list[str]]] = ()) -> list[dict]:
    """Rounds of one copy then each operation (and each other tool's command, given whole but for the output
    folder), interleaved so that each round meets the same machine (its page cache and disk serve other work).
    Reports the fastest run of each (the least disturbed) and the median of the per-round ratios to that round's
    copy."""
    copies: list[float] = []
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in [*ops, *others]}
    out = work / "out"
    for _ in range(repeat):
        copies.append(copy_time(src, work / "copy")[0])
        for label, args in ops:
            runs[label].append(run(normsurgery(*args, str(src), "-o", str(out), "--force", "--no-verify", "--max-shard-size", "1GB")))
            shutil.rmtree(out, ignore_errors=True)
        for label, command in others:
            runs[label].append(run([*command[:2], str(out), *command[2:]]))
            shutil.rmtree(out, ignore_errors=True)
    rows = []
    for label, args in [*ops, *others]:
        seconds = [r[0] for r in runs[label]]
        row = {"model": src.name, "GB": folder_bytes(src) / 1e9, "op": label, "s": min(seconds),
               "rss": max(r[1] for r in runs[label]), "copy_s": min(copies), "ratio": min(seconds) / min(copies),
               "median_ratio": statistics.median(s / c for s, c in zip(seconds, copies))}
        if verify and (label, args) in ops:
            row["s_verified"], row["rss_verified"] = run(normsurgery(*args, str(src), "-o", str(out), "--force", "--max-shard-size", "1GB"))
            shutil.rmtree(out, ignore_errors=True)
        print(f"  {src.name} {label}: {row}; runs {[round(x, 2) for x in seconds]}, copies {[round(x, 2) for x in copies]}", flush=True)
        rows.append(row)
    return rows


# the guard's checkpoint: hidden 1024, 8 layers, GQA 16/4 heads, MLP 2816, vocab 32000, untied head (0.31 GB in bf16)
GUARD_SHAPE = dict(model_type="llama", hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=4, intermediate_size=2816, vocab_size=32000, tie_word_embeddings=False,
                   max_position_embeddings=2048)
# the keys of a Llama config.json on the hub (SmolLM2-135M's; transformers 4.40 wrote it: no mlp_bias, head_dim or
# layer_types, legacy rope keys, torch_dtype): what `prune --no-verify` must read without importing transformers
HUB_LLAMA_KEYS = ("architectures", "attention_bias", "attention_dropout", "bos_token_id", "eos_token_id", "hidden_act",
                  "hidden_size", "initializer_range", "intermediate_size", "max_position_embeddings", "model_type",
                  "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "pretraining_tp", "rms_norm_eps",
                  "tie_word_embeddings", "use_cache", "vocab_size")
# operation -> (arguments before the model, after it; the largest ratio of its best time to the best copy's). Measured
# on 2 cores shared with other work (load 4-5): best copy 0.30 s; ratios 2.5, 17 and 49 (verified fold: 25-60 from run
# to run); a prune that imports torch and transformers again (as before the fix of issue 35) measured 12.9
GUARD_LIMITS = {
    "prune 4 blocks --no-verify": (["prune"], ["--layers", "2,3,4,5", "--no-verify"], 6.0),
    "fold --no-verify": (["fold"], ["--no-verify"], 40.0),
    "fold (verified)": (["fold"], [], 120.0),
}


def hub_style(folder: Path) -> None:
    """Rewrite a synthetic Llama's config.json (transformers 5 writes every attribute) as the hub ships one."""
    config = json.loads((folder / "config.json").read_text())
    hub = {k: config[k] for k in HUB_LLAMA_KEYS if k in config}
    hub.update(rope_scaling=None, rope_theta=10000.0, torch_dtype="bfloat16", transformers_version="4.40.0.dev0")
    (folder / "config.json").write_text(json.dumps(hub, indent=2))


def guard(repeat: int) -> int:
    """The CI check: times and ratios of each GUARD_LIMITS operation to a copy, measured in this run; 1 when one
    exceeds its limit."""
    with tempfile.TemporaryDirectory(prefix="normsurgery-guard-") as tmp:
        work = Path(tmp)
        src = build(work / "llama-0.3gb-bf16", GUARD_SHAPE, torch.bfloat16)
        hub_style(src)
        out = work / "out"
        copies: list[float] = []
        times: dict[str, list[float]] = {label: [] for label in GUARD_LIMITS}
        for _ in range(repeat):  # interleaved: each round meets the same machine
            copies.append(copy_time(src, work / "copy")[0])
            for label, (before, after, _) in GUARD_LIMITS.items():
                times[label].append(run(normsurgery(*before, str(src), *after, "-o", str(out), "--force",
                                                    "--max-shard-size", "1GB"))[0])
                shutil.rmtree(out, ignore_errors=True)
        size = folder_bytes(src) / 1e9
    copy = min(copies)
    print(f"\nguard: {size:.2f} GB bf16 Llama, hub-style config.json; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs; best of {repeat} interleaved runs\n")
    print("| operation | best s | runs s | ratio to copy | limit | |")
    print("|---|---|---|---|---|---|")
    print(f"| copy (cp -r && sync) | {copy:.2f} | {', '.join(f'{x:.2f}' for x in copies)} | 1.00 | | |")
    failed = []
    for label, (_, _, limit) in GUARD_LIMITS.items():
        best = min(times[label])
        ratio = best / copy
        if ratio > limit:
            failed.append(label)
        print(f"| {label} | {best:.2f} | {', '.join(f'{x:.2f}' for x in times[label])} | {ratio:.2f} | {limit:g} | "
              f"{'FAIL' if ratio > limit else 'ok'} |")
    if failed:
        print(f"\nguard FAILED: {', '.join(failed)} slower than its limit times the copy")
        return 1
    print("\nguard passed")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/normsurgery-bench"))
    parser.add_argument("--suite", choices=["main", "rss", "prune", "moe", "all"], default="all")
    parser.add_argument("--verify", action="store_true", help="also time each operation with its automatic check")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of copy and operations")
    parser.add_argument("--mergekit", help="a mergekit-yaml executable: also time mergekit's prune (prune suite)")
    parser.add_argument("--moe-layers", default="8", help="comma-separated depths of the synthetic Mixtral (moe suite; "
                                                          "8 layers: 1.28 GB, each layer 0.15 GB more)")
    parser.add_argument("--guard", action="store_true", help="the CI check: ratios to a copy on a temporary 0.3 GB "
                                                             "checkpoint; exit status 1 when one exceeds its limit")
    args = parser.parse_args()
    if args.guard:
        sys.exit(guard(args.repeat))
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if args.suite in ("main", "prune", "all"):
        llama = build(args.workdir / "llama-2.4gb-bf16", SHAPES["llama-2.4gb"], torch.bfloat16)
        ops = [("prune 4 blocks", ["prune", "--layers", "10,11,12,13"])]
        others = [("mergekit prune 4 blocks", mergekit_prune(args.mergekit, llama, args.workdir, [(0, 10), (14, 24)]))
                  ] if args.mergekit else []
        rows += bench_model(llama, ([("fold", ["fold"])] if args.suite != "prune" else []) + ops, args.workdir,
                            args.verify, args.repeat, others)
    if args.suite in ("main", "all"):
        gpt2 = build(args.workdir / "gpt2-xl-fp32", SHAPES["gpt2-xl"], torch.float32)
        rows += bench_model(gpt2, [("fold", ["fold"]), ("rmsnorm", ["convert", "--to", "rmsnorm"]),
                                   ("crmsnorm", ["convert", "--to", "crmsnorm"])], args.workdir, args.verify, args.repeat)
    if args.suite in ("rss", "all"):
        for layers in (8, 24, 52):
            src = build(args.workdir / f"llama-{layers}l-bf16", llama_of_layers(layers), torch.bfloat16)
            rows += bench_model(src, [("fold", ["fold"])], args.workdir, False, args.repeat)
    startup = None
    if args.suite in ("moe", "all"):
        startup = startup_rss()
        for layers in map(int, args.moe_layers.split(",")):
            name = "mixtral-8e-bf16" if layers == 8 else f"mixtral-8e-{layers}l-bf16"
            mixtral = build(args.workdir / name, {**SHAPES["mixtral-8e"], "num_hidden_layers": layers}, torch.bfloat16)
            rows += bench_model(mixtral, [("fold", ["fold"]), ("prune 2 blocks", ["prune", "--layers", "3,4"])],
                                args.workdir, args.verify, args.repeat)
    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPUs; output shards 1GB; verification off unless noted; "
          f"{args.repeat} interleaved rounds of copy and operations; seconds: the fastest run"
          + (f"; peak RSS of the imports alone {startup:.2f} GB" if startup is not None else "") + "\n")
    print("| model | size GB | operation | seconds | copy seconds | ratio of fastest | median ratio per round | peak RSS GB |"
          + (" seconds with check | peak RSS with check GB |" if args.verify else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|---|" if args.verify else ""))
    for r in rows:
        line = (f"| {r['model']} | {r['GB']:.2f} | {r['op']} | {r['s']:.1f} | {r['copy_s']:.1f} | {r['ratio']:.2f} | "
                f"{r['median_ratio']:.2f} | {r['rss']:.2f} |")
        if args.verify:
            line += f" {r.get('s_verified', float('nan')):.1f} | {r.get('rss_verified', float('nan')):.2f} |"
        print(line)


if __name__ == "__main__":
    main()
