"""Attention sub-layers against whole blocks, at the same forward time given back, on one model.

For each count n of attention sub-layers, `prune --what attention --remove n` chooses them by the command's default
(`--by auto`: the best candidates of every metric re-measured by calibration loss, on its own calibration sample),
and the outputs are written by the command (unverified: `prune` verifies them, and the tests); they are timed side
by side with the original without k blocks, for every k of `--block-ks` (every block has the same shapes, so which
k does not change the time), interleaved: one forward of 1 x `--time-seq-len` tokens without cache, timed as the CPU
time of the one thread computing it (least disturbed by other work on a shared machine), the least of
`--time-runs` rounds, as a ratio to the original. Each n is paired with the k whose time ratio is closest, and
`prune --remove k` chooses those k blocks by the same default. For each pair: the KV cache a forward with
`use_cache=True` allocates at that length, as a ratio to the original's (and the arithmetic for the attention
layers kept); the held-out cross-entropy change (the command's own held-out sample, and Python docs); and the same
after `prune ... --heal-steps N` (the command's heal, distillation to the original). Prints markdown. `--reuse LOG`
takes the choices and rows a previous run printed instead of measuring them again (both are deterministic).

    python bench/sublayer_prune.py --model smollm2-135m --heal-steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from prune_quality import heldout_ids, sharing_blocks  # noqa: E402


def kv_cache_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of keys and values in the cache a forward of `ids` with use_cache=True allocates."""
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def reuse(log: Path) -> tuple[dict[tuple[str, int], list[int]], dict[tuple[str, int, int], dict]]:
    """A previous run's choices and measured rows (its printed JSON lines), to carry on without measuring them again:
    both are deterministic for a model, and the choices cost minutes on a small CPU."""
    chosen, rows = {}, {}
    for line in log.read_text().splitlines():
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        if "what" in row:
            chosen[row["what"], row["n"]] = row["blocks"]
        if "unhealed" in row:
            rows[row["what"], row["n"], row.get("heal_steps", 0) if "healed" in row else 0] = row
    return chosen, rows


def load(folder: Path) -> torch.nn.Module:
    """A written output in float32, with its own modeling code when it ships some."""
    from transformers import AutoModelForCausalLM

    remote = (folder / "modeling_normsurgery.py").exists()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=remote).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--attention-counts", default="4,8,12")
    parser.add_argument("--block-ks", default="1,2,3,4,5,6,7,8", help="whole-block counts to pair with")
    parser.add_argument("--heal-steps", type=int, default=20)
    parser.add_argument("--heal-batch", type=int, default=4)
    parser.add_argument("--heal-counts", default=None,
                        help="attention counts healed, with their block pair (default all)")
    parser.add_argument("--time-seq-len", type=int, default=2048)
    parser.add_argument("--time-runs", type=int, default=3)
    parser.add_argument("--eval-tokens", type=int, default=8192,
                        help="tokens of Python docs (the held-out sample is the command's)")
    parser.add_argument("--work", default="/tmp/normsurgery-bench/sublayer-prune")
    parser.add_argument("--reuse", help="a previous run's printed lines: its choices and rows are not measured again")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import normsurgery as ns
    from normsurgery.arch import family_for
    from normsurgery.depth.measure import cross_entropy, measure, remeasure
    from normsurgery.depth.pipeline import PruneSelection
    from normsurgery.depth.select import candidates
    from normsurgery.depth.skip import skipping, zeroing
    from normsurgery.engine.loading import load_model, load_tokenizer
    from normsurgery.engine.text import sample
    from normsurgery.reference.text import python_docs_text
    from normsurgery.source import open_model
    from normsurgery.trainable.remove_ln import heldout_batches

    torch.manual_seed(0)
    random.seed(0)
    work = Path(args.work)
    source = open_model(args.model, scan_finite=False)
    arch, path = source.arch, source.path
    source.close()
    tokenizer = load_tokenizer(path)
    model = load_model(path, torch.float32).eval()
    seq_len = PruneSelection.seq_len
    calib = sample(tokenizer, seq_len=seq_len, sequences=PruneSelection.samples)[0]
    start = time.perf_counter()
    counts = [int(x) for x in args.attention_counts.split(",")]
    block_ks = [int(x) for x in args.block_ks.split(",")]
    chosen = reuse(Path(args.reuse))[0] if args.reuse else {}
    measured: list = []

    def choose(what: str, n: int) -> None:
        if (what, n) in chosen:
            return
        if not measured:
            measured.append(measure(model, arch, calib, label=args.model))
        stats = measured[0]
        found = candidates(stats, n, PruneSelection.by, keep_first=PruneSelection.keep_first,
                           keep_last=PruneSelection.keep_last, top=PruneSelection.remeasure, what=what)
        chosen[what, n] = sorted(remeasure(model, arch, calib, found, what=what).blocks)
        print(json.dumps({"what": what, "n": n, "blocks": chosen[what, n], "at_s": round(time.perf_counter() - start)}),
              flush=True)

    def write(what: str, n: int, heal_steps: int = 0) -> tuple[Path, dict]:
        out = work / f"{what}-{n}{f'-healed{heal_steps}' if heal_steps else ''}"
        report = ns.prune(args.model, out, what=what, layers=chosen[what, n], verify=False, force=True,
                          heal_steps=heal_steps, batch_size=args.heal_batch)
        return out, report

    for n in counts:
        choose("attention", n)
    # forward time: the written attention outputs, and the original without k blocks (sharing its weights; every
    # block has the same shapes, so which k does not matter to the time: the k before the last)
    layers_path = family_for(arch.model_type).layers
    L = arch.num_layers
    variants: dict[tuple[str, int], torch.nn.Module] = {("original", 0): model}
    for n in counts:
        variants["attention", n] = load(write("attention", n)[0])
    for k in block_ks:
        variants["block", k] = sharing_blocks(model, layers_path, list(range(L - 1 - k, L - 1)))
    ids = heldout_ids(tokenizer, 1, args.time_seq_len)
    times: dict[tuple[str, int], list[float]] = {key: [] for key in variants}
    order = list(variants)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU time of the one thread that computes: what other work on the machine
    with torch.no_grad():     # disturbs least (wall times on the shared machine varied by 2x within a round)
        for _ in range(args.time_runs):
            random.shuffle(order)
            for key in order:
                t = time.thread_time()
                variants[key](input_ids=ids, use_cache=False)
                times[key].append(time.thread_time() - t)
            print(json.dumps({f"{w}-{n}": round(times[w, n][-1], 3) for w, n in order}), flush=True)
    torch.set_num_threads(threads)
    ratio = {key: min(v) / min(times["original", 0]) for key, v in times.items()}
    pair = {n: min(block_ks, key=lambda k: abs(ratio["block", k] - ratio["attention", n])) for n in counts}
    print(json.dumps({"time_ratio": {f"{w}-{n}": round(r, 4) for (w, n), r in ratio.items()}, "pair": pair,
                      "at_s": round(time.perf_counter() - start)}), flush=True)
    for k in sorted(set(pair.values())):
        choose("block", k)

    # KV cache, and held-out cross-entropy of the unhealed choices (the original with them skipped or zeroed: what
    # the outputs compute, as `prune` verifies)
    texts = {"heldout": torch.cat(heldout_batches(tokenizer, seq_len)),
             "python-docs": sample(tokenizer, seq_len=seq_len, sequences=max(1, args.eval_tokens // seq_len),
                                   text=python_docs_text(), seed=3)[0]}
    base_cache = kv_cache_bytes(model, ids)
    base = {name: cross_entropy(model, t) for name, t in texts.items()}
    kv_heads = model.config.num_key_value_heads
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    rows, reused = [], reuse(Path(args.reuse))[1] if args.reuse else {}  # read now: another run may have added rows
    for n in counts:
        for what, m in (("attention", n), ("block", pair[n])):
            heal_counts = counts if args.heal_counts is None else [int(x) for x in args.heal_counts.split(",")]
            steps = args.heal_steps if n in heal_counts else 0
            if (what, m, steps) in reused:
                rows.append({**reused[what, m, steps], "time_ratio": ratio[what, m], "reused": True})
                continue
            folder = work / f"{what}-{m}"
            if what == "block":
                write("block", m)
            variant = variants.get((what, m)) if what == "attention" else load(folder)
            kept_attention = arch.num_layers - m
            arithmetic = 2 * kept_attention * kv_heads * head_dim * args.time_seq_len * 4
            context = zeroing(model, arch, {"attention": chosen[what, m]}) if what == "attention" \
                else skipping(model, arch, chosen[what, m])
            with context:
                unhealed = {name: cross_entropy(model, t) - base[name] for name, t in texts.items()}
            row = {"what": what, "n": m, "blocks": chosen[what, m], "time_ratio": ratio[what, m],
                   "kv_cache_ratio": kv_cache_bytes(variant, ids) / base_cache,
                   "kv_cache_ratio_arithmetic": arithmetic / (2 * arch.num_layers * kv_heads * head_dim
                                                              * args.time_seq_len * 4),
                   "unhealed": unhealed}
            del variant
            if steps:
                heal_start = time.perf_counter()
                out, report = write(what, m, args.heal_steps)
                row["heal_wall_s"] = time.perf_counter() - heal_start
                healed = load(out)
                row["healed"] = {name: cross_entropy(healed, t) - base[name] for name, t in texts.items()}
                h = report["heal"]
                row["heal_steps"] = steps
                row["heal_report"] = {k: h[k] for k in ("heldout_ce_before", "heldout_ce_unhealed", "heldout_ce_after",
                                                        "finetune_seconds")}
                del healed
            row["at_s"] = round(time.perf_counter() - start)
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\noriginal: held-out CE {base['heldout']:.3f} (the command's sample, {texts['heldout'].numel()} tokens), "
          f"Python docs {base['python-docs']:.3f} ({texts['python-docs'].numel()} tokens); forward of 1 x "
          f"{args.time_seq_len} tokens {min(times['original', 0]):.2f} s of one thread's CPU time (least of "
          f"{args.time_runs}); KV cache "
          f"{base_cache / 2**20:.1f} MiB; heal {args.heal_steps} steps of {args.heal_batch} x {seq_len} tokens")
    print("\n| removed | which (0-based blocks) | forward time | KV cache (measured / arithmetic) | held-out: pruned | "
          "healed | Python docs: pruned | healed |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        healed = r.get("healed", {})
        cells = [f"{r['n']} {'attention sub-layers' if r['what'] == 'attention' else 'blocks'}",
                 ", ".join(map(str, r["blocks"])), f"{r['time_ratio']:.3f}",
                 f"{r['kv_cache_ratio']:.3f} / {r['kv_cache_ratio_arithmetic']:.3f}",
                 f"{r['unhealed']['heldout']:+.3f}", f"{healed['heldout']:+.3f}" if healed else "-",
                 f"{r['unhealed']['python-docs']:+.3f}", f"{healed['python-docs']:+.3f}" if healed else "-"]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"base": base, "base_cache_bytes": base_cache, "ratio": {
            f"{w}-{n}": r for (w, n), r in ratio.items()}, "times": {f"{w}-{n}": v for (w, n), v in times.items()},
            "pair": pair, "chosen": {f"{w}-{n}": b for (w, n), b in chosen.items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
