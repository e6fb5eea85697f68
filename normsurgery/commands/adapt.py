"""`normsurgery adapt MODEL_TYPE`: draft a family declaration by tracing a tiny random model, and prove it."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.markup import escape

from normsurgery.commands.common import JsonOutput, console, print_json
from normsurgery.errors import NormSurgeryError


def _overrides(values: list[str]) -> dict[str, object]:
    """--set KEY=VALUE options as config values (JSON where the value parses as JSON, else a string)."""
    import json

    out: dict[str, object] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise NormSurgeryError(f"--set {item!r} is not KEY=VALUE; e.g. --set qk_layernorm=true.")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def adapt(
    model_type: Annotated[str, typer.Argument(help="A transformers model_type, e.g. arcee or qwen3.")],
    layers: Annotated[int, typer.Option("--layers", min=1, max=8, help="Blocks of the tiny model (at least one of each "
                                        "kind of block its config lists is kept).")] = 2,
    set_values: Annotated[Optional[list[str]], typer.Option(
        "--set", help="A config value of the tiny model, KEY=VALUE (JSON), e.g. to draft a layout variant.")] = None,
    json_output: JsonOutput = False,
) -> None:
    """Draft the family declaration of a model type, by tracing a tiny random model, and prove it.

    Builds a tiny random instance offline, finds by tracing which linears read each norm and which write into the
    residual stream, prints a Family(...) declaration for normsurgery/arch/families.py, and proves it: every
    checkpoint tensor named, every norm computing what is declared, fold (and the exact conversions, where they
    apply) keeping the logits in memory and from file to file. Exit 0 when proven, 1 when not, 2 for bad input.

    Examples:

      normsurgery adapt arcee

      normsurgery adapt stablelm --set use_parallel_residual=true --json
    """
    from normsurgery.adapt import adapt as run_adapt

    result = run_adapt(model_type, layers=layers, overrides=_overrides(set_values or []))
    if json_output:
        print_json(result.as_dict())
    else:
        _show(result)
    if not result.proven:
        raise typer.Exit(1)


def _show(result) -> None:
    """The draft, its proof, and what to do next."""
    draft = result.draft
    if result.source:
        if not result.proven:
            console.print("# a draft to edit by hand, NOT proven", markup=False, highlight=False)
        console.print(result.source, markup=False, highlight=False, soft_wrap=True)  # as is, to paste
    for note in draft.notes:
        console.print(f"[yellow]note[/yellow]: {escape(note)}", highlight=False)
    for problem in draft.problems:
        console.print(f"[red]cannot express[/red]: {escape(problem)}", highlight=False)
    for check in result.checks:
        mark = "[green]PASS[/green]" if check.passed else "[red]FAIL[/red]"
        console.print(f"{mark} {escape(check.name)}: {escape(check.detail)}", highlight=False)
    if result.declared_as:
        same = "matches it" if not result.differs_from_declared else "differs: " + "; ".join(result.differs_from_declared)
        console.print(f"{draft.model_type} is already declared (family {result.declared_as}); the draft {escape(same)}",
                      highlight=False)
    if result.proven and draft.layouts:
        console.print(f"[bold green]proven[/bold green] for its {len(draft.layouts)} kinds of block: normsurgery traces "
                      f"{draft.model_type} at run time as it is; a declaration in families.py needs a block function "
                      "that gives each block its kind (the text above is block 0's).", highlight=False)
    elif result.proven:
        console.print(f"[bold green]proven[/bold green]: paste the declaration into normsurgery/arch/families.py, add "
                      f"it to FAMILIES, and add a fixture for {draft.model_type} to tests/family_configs.py.",
                      highlight=False)
    else:
        console.print("[bold red]not proven[/bold red]: the draft needs a hand edit (or a hand-written declaration) "
                      "before normsurgery can trust it.", highlight=False)
