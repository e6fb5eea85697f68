"""`normsurgery check ORIGINAL CANDIDATE`: equivalence / degradation report with a CI exit code."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from normsurgery.thresholds import (
    DEFAULT_MAX_KL,
    DEFAULT_MAX_REL_LOGIT_DIFF,
    DEFAULT_MIN_TOP1,
    DEFAULT_NUM_SEQS,
    DEFAULT_SEQ_LEN,
)
from normsurgery.commands.common import (
    AllowPickle,
    Device,
    JsonOutput,
    MaxLogitDiff,
    MaxMemory,
    TrustRemoteCode,
    console,
    print_json,
)
from normsurgery.errors import CheckFailed

if TYPE_CHECKING:
    from normsurgery.comparison import CheckReport


def report_markdown(report: CheckReport) -> str:
    """The report as a Markdown table (for CI step summaries and model cards)."""
    rows = [
        ("max \\|logit diff\\|", f"{report.max_abs_logit_diff:.3g}"),
        ("logit scale (max \\|logit\\|)", f"{report.logit_scale:.3g}"),
        ("max \\|logit diff\\| / scale", f"{report.rel_logit_diff:.3g}"),
        ("mean KL", f"{report.mean_kl:.3g}"),
        ("top-1 agreement", f"{report.top1_agreement:.4%}"),
        ("perplexity original", f"{report.ppl_original:.4f}"),
        ("perplexity candidate", f"{report.ppl_candidate:.4f}"),
    ]
    lines = [
        f"**normsurgery check**: `{report.candidate}` vs `{report.original}` — "
        f"{'PASSED' if report.passed else 'FAILED'} ({report.num_sequences}x{report.sequence_length} tokens, "
        f"{report.tokens}, {report.dtype})",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
    ]
    lines += [f"- failed: {f}" for f in report.failures]
    return "\n".join(lines) + "\n"


def memory_line(memory: dict) -> str:
    """Where the models ran and how much memory that took, in one line."""
    peak = memory.get("peak_rss_bytes")
    how = "streamed from their checkpoints" if memory.get("streamed") else "held in memory"
    return (f"ran on {memory['device']}, {how}; budget {memory['budget_bytes'] / 1e9:.1f} GB "
            f"({memory.get('budget_from', 'free memory')})"
            + (f", peak memory {peak / 1e9:.2f} GB" if peak else ""))


def print_report(report: CheckReport) -> None:
    """The report as a rich table."""
    table = Table(title=f"check: {report.candidate} vs {report.original}", title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    table.add_column("limit", justify="right")
    t = report.thresholds
    limit = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
    table.add_row("max |logit diff|", f"{report.max_abs_logit_diff:.3g}", "")
    table.add_row("logit scale (max |logit|)", f"{report.logit_scale:.3g}", "")
    table.add_row("max |logit diff| / scale", f"{report.rel_logit_diff:.3g}", limit(t["max_rel_logit_diff"], ".3g"))
    table.add_row("mean KL", f"{report.mean_kl:.3g}", limit(t["max_kl"], ".3g"))
    table.add_row("top-1 agreement", f"{report.top1_agreement:.4%}", limit(t["min_top1"], ".4%"))
    table.add_row("perplexity (original)", f"{report.ppl_original:.4f}", "")
    table.add_row("perplexity (candidate)", f"{report.ppl_candidate:.4f}", "")
    console.print(table)
    console.print(f"tokens: {report.num_sequences} x {report.sequence_length} ({report.tokens}), {report.dtype}")
    if report.memory:
        console.print(memory_line(report.memory))
    if report.passed:
        console.print("[bold green]PASSED[/bold green]")
    for failure in report.failures:
        console.print(f"[bold red]FAILED[/bold red]: {failure}")


def check(
    original: Annotated[str, typer.Argument(help="The reference model: folder, reference name or hub id.")],
    candidate: Annotated[str, typer.Argument(help="The model to compare with it.")],
    text: Annotated[Optional[Path], typer.Option(help="Text file to tokenize (default: Shakespeare calibration text, else random tokens).")] = None,
    max_logit_diff: MaxLogitDiff = DEFAULT_MAX_REL_LOGIT_DIFF,
    min_top1: Annotated[float, typer.Option(help="Least top-1 agreement, a fraction in [0, 1]; <0 disables.")] = DEFAULT_MIN_TOP1,
    max_kl: Annotated[float, typer.Option(help="Limit on mean KL(original || candidate) in nats; <0 disables.")] = DEFAULT_MAX_KL,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.", min=2)] = DEFAULT_SEQ_LEN,
    num_seqs: Annotated[int, typer.Option(help="Number of sequences (all run in one forward when memory allows).", min=1)] = DEFAULT_NUM_SEQS,
    dtype: Annotated[str, typer.Option(help="Compute dtype for both models: float32, float64, bfloat16, float16.")] = "float32",
    json_output: JsonOutput = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown report (for CI summaries).")] = False,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
    device: Device = "auto",
    max_memory: MaxMemory = None,
) -> None:
    """Run ORIGINAL and CANDIDATE on the same tokens; report logit error, KL, top-1 agreement, perplexity.

    Exits 1 when a threshold fails. The defaults are what an exact rewrite must meet in float32.

    Examples:

      normsurgery check gpt2-shakespeare ./gpt2-rms

      normsurgery check ./orig ./pruned --max-logit-diff -1 --min-top1 0.9 --max-kl 0.05 --json
    """
    from normsurgery.api import check as compare

    with Progress(TextColumn("comparing"), BarColumn(), TextColumn("{task.completed} forwards"),
                  console=console, transient=True, disable=json_output or markdown) as progress:
        task = progress.add_task("check", total=None)
        report = compare(original, candidate, text=text, seq_len=seq_len, num_seqs=num_seqs, dtype=dtype,
                         max_logit_diff=max_logit_diff, min_top1=min_top1, max_kl=max_kl, allow_pickle=allow_pickle,
                         trust_remote_code=trust_remote_code, device=device, max_memory=max_memory,
                         progress=lambda _what, done, _total: progress.update(task, completed=done))
    if json_output:
        print_json(report.as_dict())
    elif markdown:
        print(report_markdown(report), end="")
    else:
        print_report(report)
    if not report.passed:
        raise CheckFailed("; ".join(report.failures))
