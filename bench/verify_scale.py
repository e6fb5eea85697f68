"""Verification at scale: time and peak memory of everything that runs a model, against a plain copy, in one run.

For synthetic Llama checkpoints of 1, 2.4, 6 and 12 GB (bf16, real tensor names and shapes, random weights; see
bench/synthetic.py) it times, in interleaved rounds, `cp -r SRC DST && sync` and the default (verified) `fold`, and
once each: `fold --no-verify`, and `check SRC BAD` where BAD is a copy of the fold's output with one weight element
changed (must exit 1). On the largest it also runs `diagnose` and `prune --remove 4` under `--max-memory`. Every
process's peak RSS comes from wait4. It ends with the start-up of each command on a tiny checkpoint and an estimate
for a 70B model from the measured disk and compute rates.

    python bench/verify_scale.py [--workdir /tmp/normsurgery-bench] [--sizes 1,2.4,6,12] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import SHAPES, build, folder_bytes, llama_of_layers  # noqa: E402

# size label -> (shape, layers)
MODELS = {"1": ("llama-2.4gb", 8), "2.4": ("llama-2.4gb", 24), "6": ("llama-6b", 16), "12": ("llama-6b", 32)}


def run(cmd: list[str], expect: int = 0) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one command run as a child process; its exit code must be `expect`."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != expect:
        raise SystemExit(f"{' '.join(cmd)} exited {code}, expected {expect}:\n{proc.stderr.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 1e6


def normsurgery(*args: str) -> list[str]:
    return [sys.executable, "-m", "normsurgery", *map(str, args)]


def copy_time(src: Path, dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    seconds, _ = run(["bash", "-c", f"cp -r '{src}' '{dst}' && sync"])
    shutil.rmtree(dst, ignore_errors=True)
    return seconds


def change_one_element(folder: Path, name: str, delta: float = 1.0) -> None:
    """Add `delta` to the first element of tensor `name`, in place in its shard (bf16)."""
    index = folder / "model.safetensors.index.json"
    shard = folder / (json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors")
    with shard.open("r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(length))[name]
        offset = 8 + length + entry["data_offsets"][0]
        f.seek(offset)
        value = torch.frombuffer(bytearray(f.read(2)), dtype=torch.bfloat16)
        f.seek(offset)
        f.write((value.float() + delta).to(torch.bfloat16).view(torch.uint8).numpy().tobytes())


def bench_size(label: str, work: Path, repeat: int) -> dict:
    shape, layers = MODELS[label]
    src = build(work / f"{shape}-{layers}l-bf16", llama_of_layers(layers, shape), torch.bfloat16)
    out, bad = work / "out", work / "bad"
    copies, folds = [], []
    for _ in range(repeat):
        copies.append(copy_time(src, work / "copy"))
        shutil.rmtree(out, ignore_errors=True)
        folds.append(run(normsurgery("fold", src, "-o", out, "--force")))
    row = {"model": src.name, "GB": folder_bytes(src) / 1e9, "copy_s": min(copies), "fold_s": min(s for s, _ in folds),
           "fold_rss": max(r for _, r in folds),
           "median_ratio": statistics.median(s / c for (s, _), c in zip(folds, copies))}
    row["ratio"] = row["fold_s"] / row["copy_s"]
    verified = json.loads((out / "normsurgery.json").read_text())
    row["maths"] = verified["maths_check"]["rel_logit_diff"]
    shutil.rmtree(out, ignore_errors=True)
    row["nofold_s"], row["nofold_rss"] = run(normsurgery("fold", src, "-o", out, "--no-verify"))
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(out, bad)
    change_one_element(bad, f"model.layers.{layers // 2}.mlp.down_proj.weight")
    row["check_s"], row["check_rss"] = run(normsurgery("check", src, bad), expect=1)
    shutil.rmtree(bad, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    print(f"  {label} GB: {row}", flush=True)
    return row


def bench_measurements(label: str, work: Path, budget: str) -> list[dict]:
    """diagnose and prune --remove 4 of the largest model under a memory budget (short calibration: 2 x 64 tokens)."""
    shape, layers = MODELS[label]
    src = work / f"{shape}-{layers}l-bf16"
    tokenizer_src = Path(__file__).resolve().parent.parent / "normsurgery" / "data" / "gpt2_shakespeare_tokenizer.json"
    shutil.copy(tokenizer_src, src / "tokenizer.json")  # measuring needs calibration text; vocab ids < 32000
    calibration = ("--samples", "2", "--seq-len", "64", "--max-memory", budget)
    rows = []
    for what, args in (("diagnose --no-skip-cost", ("diagnose", src, "--no-skip-cost", *calibration)),
                       ("prune --remove 4", ("prune", src, "--remove", "4", "-o", work / "out", "--force", *calibration))):
        seconds, rss = run(normsurgery(*args))
        rows.append({"what": what, "s": seconds, "rss": rss})
        print(f"  {what}: {seconds:.1f} s, {rss:.2f} GB", flush=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    (src / "tokenizer.json").unlink()
    return rows


def startup(work: Path) -> list[tuple[str, float]]:
    """Seconds of each command on a tiny checkpoint (the fixed cost every job pays)."""
    tiny = build(work / "tiny-llama", dict(SHAPES["llama-2.4gb"], hidden_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                           vocab_size=512), torch.float32)
    out = work / "tiny-out"
    jobs = [("--version", ("--version",)), ("--help", ("--help",)), ("inspect", ("inspect", tiny)),
            ("fold (verified)", ("fold", tiny, "-o", out, "--force")),
            ("fold --no-verify", ("fold", tiny, "-o", out, "--force", "--no-verify")),
            ("check", ("check", tiny, tiny)), ("prune --layers 0", ("prune", tiny, "--layers", "0", "-o", out, "--force"))]
    rows = []
    for label, args in jobs:
        rows.append((label, min(run(normsurgery(*args))[0] for _ in range(3))))
    shutil.rmtree(out, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/normsurgery-bench"))
    parser.add_argument("--sizes", default="1,2.4,6,12")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--budget", default="1.5GB", help="--max-memory of diagnose and prune --remove")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    sizes = args.sizes.split(",")
    rows = [bench_size(label, args.workdir, args.repeat) for label in sizes]
    measured = bench_measurements(sizes[-1], args.workdir, args.budget)
    starts = startup(args.workdir)
    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPUs, transformers {__import__('transformers').__version__}; "
          f"{args.repeat} interleaved rounds of copy and verified fold (fastest of each, median ratio per round)\n")
    print("| model | size GB | copy s | verified fold s | ratio | median ratio | fold peak RSS GB | maths check "
          "| fold --no-verify s | RSS GB | check of a 1-element change s (exit 1) | RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['GB']:.2f} | {r['copy_s']:.1f} | {r['fold_s']:.1f} | {r['ratio']:.2f} | "
              f"{r['median_ratio']:.2f} | {r['fold_rss']:.2f} | {r['maths']:.2g} | {r['nofold_s']:.1f} | "
              f"{r['nofold_rss']:.2f} | {r['check_s']:.1f} | {r['check_rss']:.2f} |")
    print(f"\n{sizes[-1]} GB model, --max-memory {args.budget}, calibration 2 x 64 tokens:\n")
    for m in measured:
        print(f"- {m['what']}: {m['s']:.1f} s, peak RSS {m['rss']:.2f} GB")
    print("\nStart-up on a tiny checkpoint (fastest of 3):\n")
    for label, seconds in starts:
        print(f"- {label}: {seconds:.2f} s")
    big = rows[-1]
    disk = big["GB"] / big["copy_s"]  # GB/s of read + write through cp
    verify_s = big["fold_s"] - big["nofold_s"]
    params = big["GB"] / 2  # billions of bf16 parameters
    print(f"\n70B on paper (bf16, 140 GB): this machine verifies at {params / verify_s:.2f} B parameters per second "
          f"({big['model']}: {verify_s:.1f} s of verification), so about {70 / (params / verify_s) / 60:.0f} minutes "
          f"for the check and {140 / disk / 60:.1f} minutes of disk for the stream at the copy's {disk:.2f} GB/s.")


if __name__ == "__main__":
    main()
