"""`normsurgery prune` (remove the least effective blocks) and `normsurgery diagnose` (show why)."""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer
from rich.table import Table

from normsurgery.check import Thresholds, load_model, load_tokenizer
from normsurgery.checkpoint.writer import parse_size
from normsurgery.cli import app
from normsurgery.commands.common import AllowPickle, JsonOutput, TrustRemoteCode, console, print_json
from normsurgery.errors import NormSurgeryError
from normsurgery.prune.measure import calibration_ids, measure
from normsurgery.prune.select import METHODS, Candidate, candidates, remeasure
from normsurgery.prune.stats import LayerStats
from normsurgery.rewrite.prune import check_removal, plan_prune
from normsurgery.source import ModelSource, open_model
from normsurgery.surgery import apply_plan

Samples = Annotated[int, typer.Option(help="Calibration sequences.", rich_help_panel="Calibration")]
SeqLen = Annotated[int, typer.Option(help="Tokens per calibration sequence.", rich_help_panel="Calibration")]
Text = Annotated[Optional[str], typer.Option(help="Calibration text: .txt or .jsonl file (default: Shakespeare calibration split).", rich_help_panel="Calibration")]


def _stats(source: ModelSource, model: torch.nn.Module, tokenizer: Any, *, samples: int, seq_len: int,
           text: str | None, skip_cost: bool, quiet: bool) -> tuple[LayerStats, torch.Tensor]:
    """Measure the per-block statistics of a loaded model on its calibration text."""
    if samples < 1 or seq_len < 2:
        raise NormSurgeryError("--samples must be at least 1 and --seq-len at least 2.")
    ids = calibration_ids(tokenizer, text, samples, seq_len)
    with console.status("measuring blocks on calibration text", spinner="dots") if not quiet else _nothing():
        stats = measure(model, source.arch, ids, label=source.spec, skip_cost=skip_cost, weight=source.reader.get)
    return stats, ids


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


MaxMemory = Annotated[Optional[str], typer.Option("--max-memory", help="Keep at most this much of the model in memory (e.g. 2GB); the rest is read from the checkpoint block by block as the forward reaches it (slower).", rich_help_panel="Calibration")]


def _load(source: ModelSource, allow_pickle: bool, trust_remote_code: bool,
          max_memory: str | None = None) -> tuple[torch.nn.Module, Any]:
    """The float32 model (offloaded beyond `max_memory`) and its tokenizer (needed for calibration text)."""
    tokenizer = load_tokenizer(source.path)
    if tokenizer is None:
        raise NormSurgeryError(f"{source.path} has no tokenizer files; measuring blocks needs calibration text. Name the "
                               "blocks yourself with --layers.")
    budget = parse_size(max_memory) if max_memory else None
    model = load_model(source.path, torch.float32, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                       max_memory=budget)
    return model, tokenizer


def _parse_layers(layers: str) -> list[int]:
    try:
        return [int(x) for x in layers.replace(" ", "").split(",") if x]
    except ValueError:
        raise NormSurgeryError(f"--layers takes 0-based block indices separated by commas, e.g. 10,11,12 (got {layers!r}).") from None


@app.command()
def prune(
    model: Annotated[str, typer.Argument(help="A model folder, a reference model name, or a hub id.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder (must not exist unless --force); not needed with --dry-run.")] = None,
    remove: Annotated[Optional[int], typer.Option("--remove", "-k", help="How many blocks to remove.")] = None,
    layers: Annotated[Optional[str], typer.Option(help="Remove exactly these 0-based blocks, e.g. 10,11,12 (no measuring).")] = None,
    by: Annotated[str, typer.Option(help=f"How to choose: {', '.join(METHODS)}.")] = "auto",
    keep_first: Annotated[int, typer.Option(help="Never remove the first N blocks.")] = 1,
    keep_last: Annotated[int, typer.Option(help="Never remove the last N blocks.")] = 1,
    candidates_to_remeasure: Annotated[int, typer.Option("--remeasure", help="Re-measure the top N candidates by calibration loss and keep the best; 0 trusts the metric.")] = 3,
    skip_cost: Annotated[bool, typer.Option("--skip-cost", help="Also measure each block's skip cost (one pass per block).")] = False,
    samples: Samples = 16,
    seq_len: SeqLen = 128,
    text: Text = None,
    max_memory: MaxMemory = None,
    heal_steps: Annotated[int, typer.Option(help="Distil the pruned model to the original for N steps (0: no heal).", rich_help_panel="Heal")] = 0,
    lr: Annotated[float, typer.Option(help="Heal learning rate.", rich_help_panel="Heal")] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="Heal sequences per step.", rich_help_panel="Heal")] = 8,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Choose and report the blocks; write nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 5GB.")] = "5GB",
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the check that the output equals the original with those blocks skipped.")] = False,
    json_output: JsonOutput = False,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Remove K blocks: measured on calibration text, the best candidates re-measured by loss, or named by --layers.

    The output is a stock model (no remote code) with the blocks renumbered and the per-layer config re-indexed;
    it is checked to equal the original run with the removed blocks skipped.

    Examples:

      normsurgery prune smollm2-135m --remove 4 -o smollm2-26l

      normsurgery prune smollm2-135m --layers 20,21 -o smollm2-28l --heal-steps 100
    """
    if (remove is None) == (layers is None):
        raise NormSurgeryError("give either --remove K (choose K blocks) or --layers (name them), not both or neither.")
    if heal_steps < 0:
        raise NormSurgeryError(f"--heal-steps cannot be negative (got {heal_steps}).")
    shard_bytes = parse_size(max_shard_size)
    if output is None and not dry_run:
        raise NormSurgeryError("give an output folder with -o/--output (or --dry-run to only choose the blocks).")
    if output is not None and output.exists() and not force and not dry_run:
        raise NormSurgeryError(f"{output} already exists; choose another --output or pass --force to replace it.")
    source = open_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, scan_finite=False)
    report: dict[str, Any] = {"operation": "prune", "source": source.spec}
    try:
        if layers is not None:
            chosen = check_removal(source.arch, _parse_layers(layers))
            report["selection"] = {"method": "given", "blocks": chosen}
        else:
            net, tokenizer = _load(source, allow_pickle, trust_remote_code, max_memory)
            stats, ids = _stats(source, net, tokenizer, samples=samples, seq_len=seq_len, text=text,
                                skip_cost=skip_cost, quiet=json_output)
            found = candidates(stats, int(remove or 0), by, keep_first=keep_first, keep_last=keep_last,
                               top=max(1, candidates_to_remeasure))
            best = remeasure(net, source.arch, ids, found) if candidates_to_remeasure > 0 else found[0]
            del net
            chosen = check_removal(source.arch, list(best.blocks))
            report["selection"] = {"method": by, "blocks": chosen, "calibration_ce": stats.base_ce,
                                   "candidates": [asdict(c) for c in found]}
        plan = plan_prune(source.arch, source.config, source.reader.config, source.reader.names(), chosen)
        report["kept_blocks"] = source.arch.num_layers - len(chosen)
        report["config_updates"] = plan.config_updates
        if dry_run:
            report["dry_run"] = True
        elif heal_steps:
            report.update(_write_and_heal(source, plan, output, force, shard_bytes, heal_steps, lr, batch_size, seq_len,
                                          text, json_output, allow_pickle))
        else:
            result = apply_plan(source, plan, output, force=force, max_shard_size=shard_bytes, verify=not no_verify,
                                thresholds=Thresholds())
            report.update({"output": str(output), "check": result.check, "change": result.change})
    finally:
        source.close()
    _print_prune(report, json_output)


def _write_and_heal(source: ModelSource, plan: Any, out: Path, force: bool, shard_bytes: int, steps: int, lr: float,
                    batch_size: int, seq_len: int, text: str | None, json_output: bool,
                    allow_pickle: bool) -> dict[str, Any]:
    """Write the exact pruned model to a staging folder, distil it to the original, write the healed one to OUT."""
    from normsurgery.rewrite.plan import Plan
    from normsurgery.train.engine import FinetuneOptions, finetune
    from normsurgery.trainable.export import export_trained
    from normsurgery.trainable.remove_ln import calibration_batches, cross_entropy, heldout_batches

    options = FinetuneOptions(steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, text=text)
    options.validate()
    staging = out.parent / f".{out.name}.unhealed"
    result = apply_plan(source, plan, staging, force=True, max_shard_size=shard_bytes, verify=True)
    try:
        pruned = open_model(str(staging), scan_finite=False)
        tokenizer = load_tokenizer(source.path)
        teacher = load_model(source.path, torch.float32, allow_pickle=allow_pickle)
        student = load_model(staging, torch.float32)
        heldout = heldout_batches(tokenizer, seq_len)
        before = cross_entropy(teacher, heldout)
        unhealed = cross_entropy(student, heldout)
        start = time.perf_counter()
        with console.status(f"healing: {steps} steps of distillation", spinner="dots") if not json_output else _nothing():
            trained = finetune(student, tokenizer, options, teacher=teacher)
        healed = cross_entropy(student, heldout)
        summary = {"heldout_ce_before": before, "heldout_ce_pruned": unhealed, "heldout_ce_after": healed,
                   "heldout_ce_change": healed - before, "finetune_seconds": time.perf_counter() - start,
                   "losses": trained.losses, "removed_blocks": list(plan.skipped_blocks)}
        check_ids = calibration_batches(tokenizer, seq_len, 2, 1)[0]
        check = export_trained(pruned, Plan(operation="prune+heal"), student, check_ids, out, force=force,
                               max_shard_size=shard_bytes, report=summary)
        pruned.close()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"output": str(out), "check": result.check, "change": result.change, "heal": summary, "export_check": check}


def _print_prune(report: dict[str, Any], json_output: bool) -> None:
    if json_output:
        print_json(report)
        return
    selection = report["selection"]
    blocks = ", ".join(map(str, selection["blocks"]))
    console.print(f"blocks to remove (0-based): [bold]{blocks}[/bold] ({selection['method']}); "
                  f"{report['kept_blocks']} blocks stay")
    for c in selection.get("candidates", []):
        loss = f", calibration CE {c['loss']:.4f}" if c.get("loss") is not None else ""
        console.print(f"  candidate {list(c['blocks'])} by {c['method']} (score {c['score']:.4g}{loss})")
    if report.get("dry_run"):
        console.print("dry run: nothing written")
        return
    console.print(f"[bold green]wrote[/bold green] {report['output']} (a stock model; config re-indexed: "
                  f"{', '.join(report['config_updates'])})")
    if report.get("check"):
        c = report["check"]
        console.print(f"check against the original with those blocks skipped: {c['rel_logit_diff']:.3g} of the logit "
                      f"scale, top-1 agreement {c['top1_agreement']:.2%}")
    if report.get("change"):
        c = report["change"]
        console.print(f"against the intact original: perplexity {c['ppl_original']:.4g} -> {c['ppl_candidate']:.4g}, "
                      f"top-1 agreement {c['top1_agreement']:.2%}")
    if report.get("heal"):
        h = report["heal"]
        console.print(f"healed {len(h['losses'])} steps: held-out CE {h['heldout_ce_before']:.4f} -> "
                      f"{h['heldout_ce_pruned']:.4f} pruned -> {h['heldout_ce_after']:.4f} healed")


@app.command()
def diagnose(
    model: Annotated[str, typer.Argument(help="A model folder, a reference model name, or a hub id.")],
    html: Annotated[Optional[Path], typer.Option("--html", help="Write a self-contained HTML report here.")] = None,
    png: Annotated[Optional[Path], typer.Option("--png", help="Write the plots as PNG files into this folder.")] = None,
    skip_cost: Annotated[bool, typer.Option("--skip-cost/--no-skip-cost", help="Measure each block's skip cost (one pass per block).")] = True,
    samples: Samples = 16,
    seq_len: SeqLen = 128,
    text: Text = None,
    max_memory: MaxMemory = None,
    save: Annotated[Optional[Path], typer.Option("--save", help="Write the statistics as JSON here.")] = None,
    json_output: JsonOutput = False,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Per-block diagnostics: residual norm growth, norm gains, Block Influence, angular distances, skip costs.

    Examples:

      normsurgery diagnose smollm2-135m

      normsurgery diagnose smollm2-135m --html smollm2.html --png plots/
    """
    source = open_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, scan_finite=False)
    try:
        net, tokenizer = _load(source, allow_pickle, trust_remote_code, max_memory)
        stats, _ = _stats(source, net, tokenizer, samples=samples, seq_len=seq_len, text=text, skip_cost=skip_cost,
                          quiet=json_output)
    finally:
        source.close()
    notes: dict[str, Any] = {}
    if save:
        stats.save(save)
    if png or html:
        from normsurgery.prune.report import draw_plots, write_html

        if png:
            drawn = draw_plots(stats, png)
            notes["png"] = drawn if isinstance(drawn, list) else None
            if isinstance(drawn, str):
                notes["png_note"] = drawn
        if html:
            notes["html_note"] = write_html(stats, html)
    if json_output:
        print_json({**stats.to_json(), "files": {"html": str(html) if html else None, "png": str(png) if png else None}})
        return
    _print_stats(stats)
    for key, value in notes.items():
        if isinstance(value, str):
            console.print(f"[yellow]{value}[/yellow]")
    if html:
        console.print(f"[bold green]wrote[/bold green] {html}")
    if png and isinstance(notes.get("png"), list):
        console.print(f"[bold green]wrote[/bold green] {len(notes['png'])} plots into {png}")


def _print_stats(stats: LayerStats) -> None:
    """The per-block table in the terminal; the lowest Block Influence quarter in bold."""
    console.print(f"{stats.model}: {stats.family}, {stats.num_layers} blocks, {stats.norm_placement}; "
                  f"{stats.sequences} x {stats.tokens // max(1, stats.sequences)} calibration tokens, CE {stats.base_ce:.4f}")
    table = Table(show_edge=False)
    for column in ("block", "BI", "angular n=1", "rel. update", "update cos", "residual RMS") + (
            ("skip cost",) if stats.skip_cost is not None else ()):
        table.add_column(column, justify="right")
    low = set(sorted(range(stats.num_layers), key=lambda i: stats.block_influence[i])[: max(1, stats.num_layers // 4)])
    for i in range(stats.num_layers):
        row = [str(i), f"{stats.block_influence[i]:.4f}", f"{stats.angular_last[0][i]:.4f}",
               f"{stats.relative_update[i]:.4f}", f"{stats.update_cosine[i]:+.3f}", f"{stats.residual_rms[i]:.4g}"]
        if stats.skip_cost is not None:
            row.append(f"{stats.skip_cost[i]:+.4f}")
        table.add_row(*row, style="bold" if i in low else None)
    console.print(table)
    console.print(f"residual RMS after the last block (before the final norm): {stats.residual_rms[-1]:.4g}. "
                  "Bold: the quarter of blocks with the lowest Block Influence.")


__all__ = ["prune", "diagnose", "Candidate"]
