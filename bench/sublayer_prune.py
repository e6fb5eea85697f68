"""Attention sub-layers against whole blocks, at the same forward time given back, on one model.

For each count n of attention sub-layers, `prune --what attention --remove n` chooses them by the command's default
(`--by auto`: the best candidates of every metric re-measured by calibration loss, on its own calibration sample),
and the outputs are written by the command (unverified: `prune` verifies them, and the tests). Each n is paired
with the k of `--block-ks` whose forward time is closest, by the shares of the original's forward that a block and
an attention sub-layer take (`component_shares`, measured within the same forwards: 1 - n x the attention share,
1 - k x the block share), and `prune --remove k` chooses those k blocks by the same default. End to end, each
attention output and the original without k blocks (every block has the same shapes, so which k does not change
the time) are timed back to back with the original (in turn before and after it): one forward of 1 x
`--time-seq-len` tokens without cache, the CPU time of the one thread computing it (least disturbed by other work
on a shared machine), the median of `--time-runs` such ratios; on a shared machine that ratio moves by 10-15% from
one pair to the next, more than a block's share, which is why the shares pair. For each pair: the KV cache a forward with
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
import statistics
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


def component_shares(model: torch.nn.Module, arch, ids: torch.Tensor, rounds: int) -> dict[str, float]:
    """What one block and one attention sub-layer (with its input norm) take of a forward, as shares of its time:
    one thread's CPU time between hooks at their entry and exit, summed over every block, the median of `rounds`
    forwards. All three are measured within the same forwards, so the machine's speed drifting from one forward to
    the next (by 20% on a shared machine) cancels out of the shares."""
    from normsurgery.rewrite.sublayers import sublayers

    spent = {"block": 0.0, "attention": 0.0}
    started: dict[str, float] = {}
    handles = []

    def timing(kind: str, name: str) -> None:
        def enter(*_: object) -> None:
            started[name] = time.thread_time()

        def leave(*_: object) -> None:
            spent[kind] += time.thread_time() - started.pop(name)

        handles.extend([model.get_submodule(name).register_forward_pre_hook(enter),
                        model.get_submodule(name).register_forward_hook(leave)])

    for i, found in enumerate(sublayers(arch)):
        timing("block", arch.blocks[i].prefix.rstrip("."))
        attention = found["attention"]
        timing("attention", attention.module)
        if attention.input_norm is not None:
            timing("attention", attention.input_norm.name)
    shares: dict[str, list[float]] = {"block": [], "attention": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for _ in range(rounds):
                spent.update(block=0.0, attention=0.0)
                t = time.thread_time()
                model(input_ids=ids, use_cache=False)
                total = time.thread_time() - t
                for kind in shares:
                    shares[kind].append(spent[kind] / total / arch.num_layers)
    finally:
        torch.set_num_threads(threads)
        for handle in handles:
            handle.remove()
    return {kind: statistics.median(v) for kind, v in shares.items()}


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
    # forward time: the written attention outputs, and the original without the k blocks paired with them by their
    # shares (sharing its weights; every block has the same shapes, so which k does not matter to the time: the k
    # before the last)
    layers_path = family_for(arch.model_type).layers
    L = arch.num_layers
    variants: dict[tuple[str, int], torch.nn.Module] = {("original", 0): model}
    for n in counts:
        variants["attention", n] = load(write("attention", n)[0])
    ids = heldout_ids(tokenizer, 1, args.time_seq_len)
    shares = component_shares(model, arch, ids, args.time_runs)
    share = {("original", 0): 1.0, **{("attention", n): 1 - n * shares["attention"] for n in counts},
             **{("block", k): 1 - k * shares["block"] for k in block_ks}}
    pair = {n: min(block_ks, key=lambda k: abs(share["block", k] - share["attention", n])) for n in counts}
    for k in sorted(set(pair.values())):
        variants["block", k] = sharing_blocks(model, layers_path, list(range(L - 1 - k, L - 1)))
    times: dict[tuple[str, int], list[float]] = {key: [] for key in variants}
    pairs: dict[tuple[str, int], list[float]] = {key: [] for key in variants if key != ("original", 0)}
    order = list(pairs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU time of the one thread that computes: what other work on the machine

    def timed(key: tuple[str, int]) -> float:
        t = time.thread_time()
        variants[key](input_ids=ids, use_cache=False)
        times[key].append(time.thread_time() - t)
        return times[key][-1]

    with torch.no_grad():  # disturbs least; each variant is timed back to back with the original (in turn first
        for r in range(args.time_runs):  # and second), as the machine's speed drifts by 20% within minutes
            random.shuffle(order)
            for key in order:
                first, second = (key, ("original", 0)) if r % 2 else (("original", 0), key)
                a, b = timed(first), timed(second)
                pairs[key].append(a / b if first == key else b / a)
            print(json.dumps({f"{w}-{n}": round(pairs[w, n][-1], 4) for w, n in order}), flush=True)
    torch.set_num_threads(threads)
    ratio = {("original", 0): 1.0, **{key: statistics.median(v) for key, v in pairs.items()}}
    print(json.dumps({"time_ratio": {f"{w}-{n}": round(r, 4) for (w, n), r in ratio.items()}, "shares": shares,
                      "pair": pair, "at_s": round(time.perf_counter() - start)}), flush=True)
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
                rows.append({**reused[what, m, steps], "time_ratio": ratio[what, m], "time_share_ratio": share[what, m],
                             "reused": True})
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
                   "time_share_ratio": share[what, m],
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
          f"{args.time_seq_len} tokens {statistics.median(times['original', 0]):.2f} s of one thread's CPU time (median of "
          f"{len(times['original', 0])}); KV cache "
          f"{base_cache / 2**20:.1f} MiB; heal {args.heal_steps} steps of {args.heal_batch} x {seq_len} tokens")
    print("\n| removed | which (0-based blocks) | forward time (from shares / end to end) | KV cache (measured / arithmetic) | held-out: pruned | "
          "healed | Python docs: pruned | healed |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        healed = r.get("healed", {})
        cells = [f"{r['n']} {'attention sub-layers' if r['what'] == 'attention' else 'blocks'}",
                 ", ".join(map(str, r["blocks"])), f"{r['time_share_ratio']:.3f} / {r['time_ratio']:.3f}",
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
