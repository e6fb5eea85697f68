"""Forward speed (tokens/s) of an original model vs its fold / rmsnorm / crmsnorm rewrites on CPU, eager and
torch.compile, as ratios measured side by side in one run; and the RMSNorm kernel choice (fused
`torch.nn.functional.rms_norm` vs the written-out formula) that the exported modeling code relies on.

    python bench/forward_speed.py [--workdir /tmp/normsurgery-bench] [--seq 256] [--iters 10] [--no-compile]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import build  # noqa: E402

GPT2_SMALL = dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)
OPS = {"fold": ["fold"], "rmsnorm": ["convert", "--to", "rmsnorm"], "crmsnorm": ["convert", "--to", "crmsnorm"]}


def timed(fn, iters: int) -> list[float]:
    """Seconds per call, after two warm-up calls."""
    for _ in range(2):
        fn()
    out = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def model_speeds(work: Path, seq: int, iters: int, compile_too: bool) -> None:
    """Tokens/s of each model in turn, interleaved round by round so that machine noise hits all alike."""
    from transformers import AutoModelForCausalLM

    src = build(work / "gpt2-small-fp32", GPT2_SMALL, torch.float32)
    paths = {"original": src}
    for op, args in OPS.items():
        out = work / f"gpt2-small-{op}"
        if not (out / "config.json").exists():
            subprocess.run([sys.executable, "-m", "normsurgery", *args, str(src), "-o", str(out), "--force"], check=True,
                           stdout=subprocess.DEVNULL)
        paths[op] = out
    ids = torch.randint(0, GPT2_SMALL["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(0))
    modes = ["eager"] + (["compile"] if compile_too else [])
    for mode in modes:
        models = {}
        for name, path in paths.items():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=name in ("rmsnorm", "crmsnorm")).eval()
            models[name] = torch.compile(model) if mode == "compile" else model
        times: dict[str, list[float]] = {name: [] for name in models}
        with torch.inference_mode():
            for _ in range(3):  # rounds
                for name, model in models.items():
                    times[name] += timed(lambda: model(ids), iters)
        base = statistics.median(times["original"])
        print(f"\n{mode}: GPT-2 small shape (124M, fp32), batch 1 x {seq} tokens, median of {3 * iters}, "
              f"{torch.get_num_threads()} threads")
        print("| model | tokens/s | ratio to original |\n|---|---|---|")
        for name, t in times.items():
            med = statistics.median(t)
            print(f"| {name} | {seq / med:,.0f} | {base / med:.3f} |")


def rms_norm_kernels(iters: int, compile_too: bool) -> None:
    """The exported RMSNorm's kernel: fused F.rms_norm (with and without the gain) vs the formula written out."""
    def formula(x, w, eps=1e-5):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def fused(x, w, eps=1e-5):
        return F.rms_norm(x, (x.shape[-1],), w, eps)

    def fused_then_gain(x, w, eps=1e-5):
        return F.rms_norm(x, (x.shape[-1],), None, eps) * w

    kernels = {"formula": formula, "F.rms_norm(gain)": fused, "F.rms_norm * gain": fused_then_gain}
    modes = ["eager"] + (["compile"] if compile_too else [])
    print("\nRMSNorm kernels, float32, microseconds per call (median) and speed-up over the formula")
    print("| shape | mode | " + " | ".join(kernels) + " |\n|---|---|" + "---|" * len(kernels))
    for shape in ((1, 256, 768), (8, 512, 2048)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        w = torch.rand(shape[-1]) + 0.5
        for mode in modes:
            fns = {k: (torch.compile(f) if mode == "compile" else f) for k, f in kernels.items()}
            assert all(torch.allclose(fns["formula"](x, w), f(x, w), rtol=1e-5, atol=1e-5) for f in fns.values())
            med = {k: statistics.median(timed(lambda f=f: f(x, w), iters * 10)) for k, f in fns.items()}
            cells = [f"{med[k] * 1e6:.0f} us ({med['formula'] / med[k]:.2f}x)" for k in kernels]
            print(f"| {shape} | {mode} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/normsurgery-bench"))
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}")
    rms_norm_kernels(args.iters, not args.no_compile)
    model_speeds(args.workdir, args.seq, args.iters, not args.no_compile)


if __name__ == "__main__":
    main()
