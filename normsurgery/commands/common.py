"""Options and output helpers shared by every command."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

console = Console()

AllowPickle = Annotated[
    bool, typer.Option("--allow-pickle", help="Accept pytorch_model.bin (pickle) checkpoints; pickle can run code.")
]
TrustRemoteCode = Annotated[
    bool, typer.Option("--trust-remote-code", help="Accept configs that need their own modeling code (auto_map).")
]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
MaxLogitDiff = Annotated[float, typer.Option(
    "--max-logit-diff", help="Limit on max |logit diff| divided by the logit scale (max |logit| of ORIGINAL); <0 disables.")]


Device = Annotated[str, typer.Option(
    "--device", help="Where models run: auto (the GPUs when there are any, else the CPU), cpu, cuda (all GPUs) or "
    "cuda:N.", rich_help_panel="Execution")]
MaxMemory = Annotated[Optional[str], typer.Option(
    "--max-memory", help="Most memory the models may take, e.g. 2GB (per GPU on GPUs); default: 80% of the free "
    "memory. Weights beyond it are read from the checkpoint as the forward reaches them.",
    rich_help_panel="Execution")]

MixedPrecision = Annotated[str, typer.Option(
    "--mixed-precision", help="The fine-tune's steps in bfloat16 autocast (weights, gradients and AdamW state stay "
    "float32): auto (bf16 on a GPU that supports it, float32 on the CPU), no, or bf16 (allowed on the CPU, where it "
    "is usually slower).", rich_help_panel="Fine-tune")]


DTYPE_NAMES = ("float32", "float64", "bfloat16", "float16")


def torch_dtype(name: str):
    """The torch dtype named by a --dtype option (imports torch: call it inside a command)."""
    import torch

    if name not in DTYPE_NAMES:
        from normsurgery.errors import NormSurgeryError

        raise NormSurgeryError(f"--dtype {name!r} is not one of {', '.join(DTYPE_NAMES)}.")
    return getattr(torch, name)


def print_json(obj: Any) -> None:
    """Write `obj` as indented JSON to stdout (nothing else goes to stdout with --json)."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
