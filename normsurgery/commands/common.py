"""Options and output helpers shared by every command."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

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


def print_json(obj: Any) -> None:
    """Write `obj` as indented JSON to stdout (nothing else goes to stdout with --json)."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
