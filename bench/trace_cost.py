"""What tracing an undeclared architecture costs: the first open of a checkpoint of each type (trace and proof, in a
fresh cache) against the second (the proven declaration read from the cache, in a new registry), beside a declared
family's open, all in this process (no interpreter start-up in the figures).

    python bench/trace_cost.py [--types glm4_moe,qwen3_next,mamba,lfm2,gemma3,olmo3] [--declared llama]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from arch_sweep import tiny_checkpoint  # noqa: E402


def open_seconds(folder: Path) -> tuple[float, str]:
    """Seconds to open a checkpoint and say which operations apply (what every command does first)."""
    from normsurgery.arch.facts import applicability
    from normsurgery.source import open_model

    start = time.perf_counter()
    source = open_model(str(folder))
    applicability(source.arch)
    source.close()
    return time.perf_counter() - start, source.arch.origin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", default="glm4_moe,qwen3_next,mamba,lfm2,gemma3,olmo3")
    parser.add_argument("--declared", default="llama")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ["NORMSURGERY_CACHE"] = tempfile.mkdtemp(prefix="normsurgery-trace-cost-")
    from normsurgery.adapt import runtime

    print("| model type | path | first open (s) | second open, from the cache (s) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in [args.declared, *args.types.split(",")]:
            folder = Path(tmp) / model_type
            tiny_checkpoint(model_type, folder)
            first, origin = open_seconds(folder)
            runtime._TRACED.clear()  # a new process: only the cache on disk remains
            second, _ = open_seconds(folder)
            print(f"| {model_type} | {origin} | {first:.2f} | {second:.2f} |", flush=True)


if __name__ == "__main__":
    main()
