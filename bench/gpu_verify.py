"""The verified fold and `check` of the 6B Llama shape on a GPU machine, timed; one script for one device session.

Builds the ~12 GB bf16 checkpoint of bench/synthetic.py (5.9B parameters, random weights) on the local disk, then
times, each as a fresh process: `fold SRC -o OUT --device DEVICE` (stream + verification), `check SRC OUT` (exit 0)
and `check SRC BAD` with one weight element changed (exit 1), and prints the figures as JSON lines and a table.
Target on one GPU: verified fold and check each under 60 s.

    PYTHONPATH=. python bench/gpu_verify.py --workdir /tmp/ns-gpu [--device cuda] [--layers 32]

Test it on a CPU first with a small model: `python bench/gpu_verify.py --device cpu --layers 2 --shape llama-2.4gb`.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import build, folder_bytes, llama_of_layers  # noqa: E402
from verify_scale import change_one_element, normsurgery, run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ns-gpu"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="llama-6b")
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    facts = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "cpus": __import__("os").cpu_count(),
             "host": platform.node()}
    if torch.cuda.is_available():
        facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    print(json.dumps({"machine": facts}), flush=True)
    start = time.perf_counter()
    src = build(args.workdir / f"{args.shape}-{args.layers}l-bf16", llama_of_layers(args.layers, args.shape),
                torch.bfloat16, shard="4GB")
    rows = {"build_s": time.perf_counter() - start, "GB": folder_bytes(src) / 1e9}
    out, bad = args.workdir / "out", args.workdir / "bad"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(["bash", "-c", f"cp -r '{src}' '{bad}' && sync"], check=True)
    rows["copy_s"] = time.perf_counter() - start
    shutil.rmtree(bad)
    device = ("--device", args.device)
    rows["fold_s"], rows["fold_rss_gb"] = run(normsurgery("fold", src, "-o", out, *device))
    report = json.loads((out / "normsurgery.json").read_text())
    rows["maths_rel_diff"] = report["maths_check"]["rel_logit_diff"]
    rows["memory"] = report["check"]["memory"]
    rows["nofold_s"], _ = run(normsurgery("fold", src, "-o", args.workdir / "out2", "--no-verify", *device))
    shutil.rmtree(args.workdir / "out2")
    rows["check_s"], rows["check_rss_gb"] = run(normsurgery("check", src, out, "--max-logit-diff", "-1", "--min-top1",
                                                            "-1", "--max-kl", "-1", *device))
    shutil.copytree(out, bad)
    change_one_element(bad, f"model.layers.{args.layers // 2}.mlp.down_proj.weight")
    rows["check_bad_s"], rows["check_bad_rss_gb"] = run(normsurgery("check", src, bad, *device), expect=1)
    shutil.rmtree(bad)
    shutil.rmtree(out)
    print(json.dumps({"figures": rows}), flush=True)
    print(f"\n| {args.shape} {args.layers} layers, {rows['GB']:.1f} GB bf16 | seconds | peak RSS GB |\n|---|---|---|")
    print(f"| copy (cp -r && sync) | {rows['copy_s']:.1f} | |")
    print(f"| fold, verified, --device {args.device} | {rows['fold_s']:.1f} | {rows['fold_rss_gb']:.2f} |")
    print(f"| fold --no-verify | {rows['nofold_s']:.1f} | |")
    print(f"| check SRC OUT | {rows['check_s']:.1f} | {rows['check_rss_gb']:.2f} |")
    print(f"| check SRC BAD (one element changed, exit 1) | {rows['check_bad_s']:.1f} | {rows['check_bad_rss_gb']:.2f} |")


if __name__ == "__main__":
    main()
