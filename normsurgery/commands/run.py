"""`normsurgery run RECIPE.yaml`: chain surgeries from a recipe file; a CI gate with exit codes 0 / 1 / 2."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from normsurgery.commands.common import Device, JsonOutput, MaxMemory, TrustRemoteCode, console, print_json
from normsurgery.errors import NormSurgeryError
from normsurgery.recipe import report as reports
from normsurgery.recipe.runner import RecipeRun, StepResult, plan_lines
from normsurgery.recipe.schema import RecipeError, load_recipe


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise RecipeError(f"--set takes NAME=VALUE (got {pair!r}).")
        out[name] = value
    return out


def _write(path: Path | None, text: str, what: str) -> None:
    if path is None:
        return
    from normsurgery.checkpoint.writer import make_parent

    make_parent(path)
    try:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as err:
        raise NormSurgeryError(f"cannot write {what} {path}: {err.strerror or err}.") from None


def run(
    recipe: Annotated[Path, typer.Argument(help="The recipe file (YAML).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print what each step reads and writes; touch nothing.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Set a recipe variable: NAME=VALUE (repeatable).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Run the recipe on this model instead of its own.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write here instead of the recipe's output.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the output if it exists.")] = False,
    junit: Annotated[Optional[Path], typer.Option("--junit", help="Also write the report as JUnit XML (one test case per step).")] = None,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", help="Also write the report as Markdown (e.g. $GITHUB_STEP_SUMMARY).")] = None,
    json_output: JsonOutput = False,
    trust_remote_code: TrustRemoteCode = False,
    device: Device = "auto",
    max_memory: MaxMemory = None,
) -> None:
    """Run a recipe: ordered steps (fold, convert, prune, heal, check, eval, export) from one YAML file.

    Exit code 0 when every step passed, 1 when a check or threshold failed, 2 when the recipe or its input is
    invalid. The output's model card records the recipe's hash, the tool's version and every step's figures.

    Examples:

      normsurgery run recipes/gpt2-shakespeare-rmsnorm.yaml

      normsurgery run recipes/smollm2-prune-heal.yaml --set out=/tmp/runs --junit report.xml --markdown summary.md
    """
    loaded, digest = load_recipe(recipe, _overrides(set_ or []))
    if model is not None:
        loaded.model = model
    target = output if output is not None else Path(loaded.output)
    if dry_run:
        lines = plan_lines(loaded, target)
        if json_output:
            print_json({"recipe": str(recipe), "recipe_sha256": digest, "model": loaded.model, "output": str(target),
                        "dry_run": True, "steps": [{"step": r.index, "what": r.label, "reads": r.reads,
                                                    "writes": r.writes} for r in lines]})
            return
        table = Table(title=f"{recipe}: {loaded.model} -> {target} (dry run, nothing touched)", show_edge=False)
        for column in ("#", "step", "reads", "writes"):
            table.add_column(column)
        for r in lines:
            table.add_row(str(r.index), r.label, r.reads, r.writes)
        console.print(table)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TimeElapsedColumn(), console=console, transient=True, disable=json_output) as progress:
        task = progress.add_task(f"{recipe.name}", total=len(loaded.steps))

        def on_step(result: StepResult) -> None:
            done = len(loaded.steps) if result.kind == "done" else result.index - 1
            progress.update(task, completed=done, description=f"{recipe.name}: {result.label}")

        results = RecipeRun(loaded, digest, target, force=force, trust_remote_code=trust_remote_code,
                            on_step=on_step, device=device, max_memory=max_memory).run()
    errors = [r for r in results if r.status == "error"]
    failed = [r for r in results if r.status == "failed"]
    code = 2 if errors else 1 if failed else 0
    _write(junit, reports.junit(str(recipe), results), "--junit")
    _write(markdown, reports.markdown(str(recipe), digest, str(target), results, code), "--markdown")
    if json_output:
        print_json(reports.as_json(str(recipe), digest, str(target), results, code))
    else:
        _print_results(results, target, code)
    if code:
        raise typer.Exit(code)


def _print_results(results: list[StepResult], target: Path, code: int) -> None:
    table = Table(show_edge=False)
    for column in ("#", "step", "status", "seconds", "peak RSS GB", "figures"):
        table.add_column(column)
    for r in results:
        shown = [(k, v) for k, v in r.figures.items() if not isinstance(v, dict)][:3]  # all of them: --json, --markdown
        figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown)
        detail = "; ".join(r.failures) or r.error or figures
        table.add_row(str(r.index), r.label, reports.MARK[r.status], f"{r.seconds:.1f}",
                      f"{r.peak_rss_gb:.2f}" if r.peak_rss_gb else "", detail)
    console.print(table)
    if code == 0:
        console.print(f"[bold green]all steps passed[/bold green]; wrote {target}")
    else:
        console.print(f"[bold red]{'a step failed' if code == 1 else 'a step could not run'}[/bold red]; nothing was "
                      f"written to {target}")

