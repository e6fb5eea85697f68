"""`normsurgery eval MODEL`: lm-eval tasks on a model, alone or side by side with its original (a CI gate)."""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from normsurgery.commands.common import JsonOutput, MaxMemory, TrustRemoteCode, console, print_json, torch_dtype
from normsurgery.errors import CheckFailed, NormSurgeryError


def _print_table(rows, candidate, original, failures) -> None:
    from normsurgery.evaluation.compare import _num, _pm

    title = f"eval: {candidate.model}" + (f" vs {original.model}" if original else "")
    table = Table(title=title, title_justify="left")
    for col in ("task", "metric") + (("original", "candidate", "delta ± stderr") if original else ("value ± stderr",)):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for r in rows:
        cells = [r.task, r.metric]
        if original:
            delta = _pm(r.delta, r.delta_stderr, sign=True)
            cells += [_num(r.original), _pm(r.candidate, r.stderr), f"[red]{delta}[/red]" if r.failure else delta]
        else:
            cells.append(_pm(r.candidate, r.stderr))
        table.add_row(*cells)
    console.print(table)
    for t in candidate.tasks:
        console.print(f"  {t.task}: {t.samples} items, {t.seconds:.1f} s, {t.tokens_per_second:.0f} tokens/s")
    if original:
        console.print("[bold green]PASSED[/bold green]" if not failures else "")
    for failure in failures:
        console.print(f"[bold red]FAILED[/bold red]: {failure}")


def _record(folder: Path, text: str, data: dict) -> None:
    """Add the evaluation to a normsurgery output's model card and normsurgery.json (each replaced atomically)."""
    report_file = folder / "normsurgery.json"
    if not report_file.is_file():
        raise NormSurgeryError(f"--record writes into a normsurgery output, and {folder} has no normsurgery.json; "
                               "drop --record or evaluate a folder normsurgery wrote.")
    report = json.loads(report_file.read_text(encoding="utf-8"))
    report.setdefault("evaluations", []).append(data)
    card = folder / "README.md"
    body = card.read_text(encoding="utf-8") if card.is_file() else ""
    for path, content in ((report_file, json.dumps(report, indent=2) + "\n"), (card, body.rstrip("\n") + "\n\n## Evaluation\n\n" + text)):
        tmp = path.with_name(path.name + ".normsurgery-tmp")
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)


def eval_command(
    model: Annotated[str, typer.Argument(help="Model folder, reference model name or hub id.")],
    tasks: Annotated[Optional[str], typer.Option(help="Comma-separated tasks (default: the offline Shakespeare suite).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="At most this many items per task.", min=1)] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.", min=1)] = 8,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, mps, ... (lm-eval's device)", rich_help_panel="Execution")] = "cpu",
    max_memory: MaxMemory = None,
    dtype: Annotated[str, typer.Option(help="float32, float64, bfloat16 or float16.")] = "float32",
    compare: Annotated[Optional[str], typer.Option(help="The original model: run both, report each metric's delta.")] = None,
    max_ppl_increase: Annotated[Optional[float], typer.Option(help="With --compare: fail (exit 1) when a perplexity rises by more than this fraction (0.01 = 1%).")] = None,
    max_acc_drop: Annotated[Optional[float], typer.Option(help="With --compare: fail (exit 1) when an accuracy falls by more than this (0.01 = 1 point).")] = None,
    json_output: JsonOutput = False,
    markdown: Annotated[Optional[Path], typer.Option(help="Also write the report as Markdown to this file (CI summaries).")] = None,
    record: Annotated[bool, typer.Option("--record", help="Add the results to MODEL's model card and normsurgery.json.")] = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Evaluate MODEL with lm-eval (in-process, offline by default); with --compare, side by side with its original.

    `check` asks "is it the same function?"; `eval --compare` asks "how much worse is it?".

    Examples:

      normsurgery eval smollm2-135m

      normsurgery eval ./gpt2-dyt --compare gpt2-shakespeare --max-ppl-increase 0.05 --markdown summary.md
    """
    from normsurgery.evaluation.compare import evaluate_models

    status = console.status("", spinner="dots") if not json_output else None
    with status if status else nullcontext():
        evaluation = evaluate_models(
            model, tasks=tasks.split(",") if tasks else None, compare=compare, limit=limit, batch_size=batch_size,
            device=device, dtype=torch_dtype(dtype), max_memory=max_memory, max_ppl_increase=max_ppl_increase,
            max_acc_drop=max_acc_drop, trust_remote_code=trust_remote_code,
            on_task=(lambda label, task: status.update(f"{label}: {task}")) if status else None)
    rows, candidate, original, failures = (evaluation.rows, evaluation.candidate, evaluation.original,
                                           evaluation.failures)
    data, text = evaluation.as_dict(), evaluation.markdown()
    if markdown is not None:
        from normsurgery.checkpoint.writer import make_parent

        make_parent(markdown)
        try:
            markdown.write_text(text, encoding="utf-8")
        except OSError as err:
            raise NormSurgeryError(f"cannot write --markdown {markdown}: {err}.") from None
    if record:
        from normsurgery.source import validated_path

        _record(validated_path(model), text, data)
    if json_output:
        print_json(data)
    else:
        _print_table(rows, candidate, original, failures)
    if failures:
        raise CheckFailed("; ".join(failures))
