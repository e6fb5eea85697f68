"""`normsurgery prune` (remove the least effective blocks) and `normsurgery diagnose` (show why)."""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.table import Table

from normsurgery.cli import app
from normsurgery.commands.common import (
    AllowPickle,
    Device,
    JsonOutput,
    MaxMemory,
    MixedPrecision,
    TrustRemoteCode,
    console,
    print_json,
)
from normsurgery.errors import NormSurgeryError
from normsurgery.prune.select import METHODS, candidates
from normsurgery.prune.stats import LayerStats

if TYPE_CHECKING:
    import torch

    from normsurgery.engine.loading import OpenModel
    from normsurgery.engine.resources import Runtime
    from normsurgery.source import ModelSource

Samples = Annotated[int, typer.Option(help="Calibration sequences.", rich_help_panel="Calibration")]
SeqLen = Annotated[int, typer.Option(help="Tokens per calibration sequence.", rich_help_panel="Calibration")]
Text = Annotated[Optional[str], typer.Option(help="Calibration text: .txt or .jsonl file (default: Shakespeare calibration split).", rich_help_panel="Calibration")]


def _stats(source: ModelSource, opened: OpenModel, tokenizer: Any, *, samples: int, seq_len: int,
           text: str | None, skip_cost: bool, quiet: bool) -> tuple[LayerStats, torch.Tensor]:
    """Measure the per-block statistics of an opened model on its calibration text."""
    from normsurgery.check import context_length
    from normsurgery.prune.measure import calibration_ids, measure

    if samples < 1 or seq_len < 2:
        raise NormSurgeryError("--samples must be at least 1 and --seq-len at least 2.")
    seq_len = min(seq_len, context_length(source.config) or seq_len)
    ids = calibration_ids(tokenizer, text, samples, seq_len)
    with console.status("measuring blocks on calibration text", spinner="dots") if not quiet else nullcontext():
        stats = measure(opened.model, source.arch, ids, label=source.spec, skip_cost=skip_cost,
                        weight=source.reader.get, batch_size=measure_batch(opened, source, seq_len))
    return stats, ids


def measure_batch(opened: OpenModel, source: ModelSource, seq_len: int) -> int:
    """Sequences per forward: all that fit the budget beside the residual state of every depth that the
    measurement keeps (float32)."""
    depths = source.arch.num_layers + 1
    return opened.lazy.tokens_per_pass(seq_len, extra_per_token=depths * source.arch.hidden_size * 4)


def _load(source: ModelSource, runtime: Runtime, allow_pickle: bool, trust_remote_code: bool) -> tuple[OpenModel, Any]:
    """The float32 model over the checkpoint (resident as far as the budget allows, the rest streamed) and its
    tokenizer (needed for calibration text)."""
    from normsurgery.engine.loading import OpenModel, load_tokenizer
    from normsurgery.engine.weights import CheckpointWeights

    tokenizer = load_tokenizer(source.path)
    if tokenizer is None:
        raise NormSurgeryError(f"{source.path} has no tokenizer files; measuring blocks needs calibration text. Name the "
                               "blocks yourself with --layers.")
    opened = OpenModel(source.path, runtime, passes=2, weights=CheckpointWeights(source.reader),
                       trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    return opened, tokenizer


def _parse_layers(layers: str) -> list[int]:
    try:
        return [int(x) for x in layers.replace(" ", "").split(",") if x]
    except ValueError:
        raise NormSurgeryError(f"--layers takes 0-based block indices separated by commas, e.g. 10,11,12 (got {layers!r}).") from None


@dataclass
class PruneSelection:
    """How `prune` chooses its blocks: `remove` K by a method, or exactly `layers`; and the calibration text."""

    remove: int | None = None
    layers: list[int] | None = None
    by: str = "auto"
    keep_first: int = 1
    keep_last: int = 1
    remeasure: int = 3
    skip_cost: bool = False
    samples: int = 16
    seq_len: int = 128
    text: str | None = None


def run_prune(model: str, output: Path | None, selection: PruneSelection, *, heal: Any = None, dry_run: bool = False,
              force: bool = False, max_shard_size: str = "5GB", verify: bool = True, allow_pickle: bool = False,
              trust_remote_code: bool = False, quiet: bool = False, runtime: Runtime | None = None) -> dict[str, Any]:
    """Choose the blocks, write the pruned model (verified), optionally heal it (`heal`: FinetuneOptions); the report.
    Measurement and verification run on `runtime` (default: the free memory of the best device)."""
    from normsurgery.checkpoint.writer import parse_size
    from normsurgery.rewrite.prune import check_removal, plan_prune
    from normsurgery.source import open_model
    from normsurgery.surgery import apply_plan
    from normsurgery.thresholds import Thresholds

    s = selection
    if (s.remove is None) == (s.layers is None):
        raise NormSurgeryError("give either --remove K (choose K blocks) or --layers (name them), not both or neither.")
    shard_bytes = parse_size(max_shard_size)
    if output is None and not dry_run:
        raise NormSurgeryError("give an output folder with -o/--output (or --dry-run to only choose the blocks).")
    if output is not None and output.exists() and not force and not dry_run:
        raise NormSurgeryError(f"{output} already exists; choose another --output or pass --force to replace it.")
    # measuring runs the model, so NaN/inf are refused first. A given --layers runs nothing before the copy: it
    # streams at once, checking each tensor as it is copied or dropped (NaN is refused even where it is cut away),
    # while transformers' reading of the config and the shape check go on in the background; unverified, it is a
    # checked copy of stored bytes that imports neither torch nor transformers
    shapes = "now" if s.layers is None else "unchecked" if not verify and heal is None else "background"
    source = open_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                        scan_finite=s.layers is None, shapes=shapes)
    report: dict[str, Any] = {"operation": "prune", "source": source.spec}
    try:
        if s.layers is not None:
            chosen = check_removal(source.arch, s.layers)
            report["selection"] = {"method": "given", "blocks": chosen}
        else:
            from normsurgery.engine.resources import peak_rss, resolve_runtime
            from normsurgery.prune.measure import remeasure

            runtime = runtime or resolve_runtime()
            opened, tokenizer = _load(source, runtime, allow_pickle, trust_remote_code)
            with opened:
                stats, ids = _stats(source, opened, tokenizer, samples=s.samples, seq_len=s.seq_len, text=s.text,
                                    skip_cost=s.skip_cost, quiet=quiet)
                found = candidates(stats, int(s.remove or 0), s.by, keep_first=s.keep_first, keep_last=s.keep_last,
                                   top=max(1, s.remeasure))
                batch = opened.lazy.tokens_per_pass(int(ids.shape[1]))
                best = remeasure(opened.model, source.arch, ids, found, batch) if s.remeasure > 0 else found[0]
                report["memory"] = {**opened.lazy.describe(), "peak_rss_bytes": peak_rss()}
            del opened
            chosen = check_removal(source.arch, list(best.blocks))
            report["selection"] = {"method": s.by, "blocks": chosen, "calibration_ce": stats.base_ce,
                                   "candidates": [asdict(c) for c in found]}
        plan = plan_prune(source.arch, source.reader.config, source.reader.names(), chosen)
        plan.check_dropped = s.layers is not None  # --remove scanned every tensor when it opened the model
        report["kept_blocks"] = source.arch.num_layers - len(chosen)
        if dry_run:
            report.update(dry_run=True, config_updates=plan.all_config_updates(source.settings))
        elif heal is not None:
            from normsurgery.engine.resources import resolve_runtime

            report.update(_write_and_heal(source, plan, output, force, shard_bytes, heal, allow_pickle,
                                          runtime or resolve_runtime()))
        else:
            result = apply_plan(source, plan, output, force=force, max_shard_size=shard_bytes, verify=verify,
                                thresholds=Thresholds(), runtime=runtime)
            report.update({"output": str(output), "config_updates": result.config_updates, "check": result.check,
                           "change": result.change})
    finally:
        source.close()
    return report


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
    device: Device = "auto",
    max_memory: MaxMemory = None,
    heal_steps: Annotated[int, typer.Option(help="Distil the pruned model to the original for N steps (0: no heal).", rich_help_panel="Heal")] = 0,
    lr: Annotated[float, typer.Option(help="Heal learning rate.", rich_help_panel="Heal")] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="Heal sequences per step.", rich_help_panel="Heal")] = 8,
    mixed_precision: MixedPrecision = "auto",
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
    if heal_steps < 0:
        raise NormSurgeryError(f"--heal-steps cannot be negative (got {heal_steps}).")
    selection = PruneSelection(remove=remove, layers=_parse_layers(layers) if layers is not None else None, by=by,
                               keep_first=keep_first, keep_last=keep_last, remeasure=candidates_to_remeasure,
                               skip_cost=skip_cost, samples=samples, seq_len=seq_len, text=text)
    runs_a_model = remove is not None or not no_verify or heal_steps > 0
    runtime, heal = None, None
    if runs_a_model or device != "auto" or max_memory is not None:  # a --no-verify copy of named blocks needs no torch
        from normsurgery.engine.resources import resolve_runtime

        runtime = resolve_runtime(device, max_memory)
    if heal_steps:
        from normsurgery.train.engine import FinetuneOptions

        heal = FinetuneOptions(steps=heal_steps, lr=lr, batch_size=batch_size, seq_len=seq_len, text=text,
                               device=device, mixed_precision=mixed_precision)
    report = run_prune(model, output, selection, heal=heal, dry_run=dry_run, force=force, max_shard_size=max_shard_size,
                       verify=not no_verify, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                       quiet=json_output, runtime=runtime)
    if heal is not None:
        from normsurgery.train.engine import process_state

        if not process_state().is_main_process:  # a heal on several processes: the main one reports
            return
    _print_prune(report, json_output)


def _write_and_heal(source: ModelSource, plan: Any, out: Path, force: bool, shard_bytes: int, options: Any,
                    allow_pickle: bool, runtime: Runtime) -> dict[str, Any]:
    """Write the exact pruned model to a staging folder beside OUT, distil it to the original, write it to OUT. On
    several processes (`accelerate launch`) the main one writes both and reports; the others get no report."""
    from normsurgery.surgery import apply_plan
    from normsurgery.train.engine import process_state
    from normsurgery.trainable.heal import heal_folder

    options.validate()
    staging = out.parent / f".{out.name}.unhealed"
    state = process_state()
    result = (apply_plan(source, plan, staging, force=True, max_shard_size=shard_bytes, verify=True, runtime=runtime)
              if state.is_main_process else None)
    state.wait_for_everyone()
    try:
        heal = heal_folder(staging, source.path, out, options, operation="prune+heal", force=force,
                           max_shard_size=shard_bytes, allow_pickle=allow_pickle, runtime=runtime)
    finally:
        if state.is_main_process:  # the others have read it: the heal waits for every process before it returns
            shutil.rmtree(staging, ignore_errors=True)
    if result is None:
        return {}
    return {"output": str(out), "config_updates": result.config_updates, "check": result.check,
            "change": result.change, "heal": heal,
            "export_check": heal.pop("export_check")}


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
                      f"{h['heldout_ce_unhealed']:.4f} pruned -> {h['heldout_ce_after']:.4f} healed")


@app.command()
def diagnose(
    model: Annotated[str, typer.Argument(help="A model folder, a reference model name, or a hub id.")],
    html: Annotated[Optional[Path], typer.Option("--html", help="Write a self-contained HTML report here.")] = None,
    png: Annotated[Optional[Path], typer.Option("--png", help="Write the plots as PNG files into this folder.")] = None,
    skip_cost: Annotated[bool, typer.Option("--skip-cost/--no-skip-cost", help="Measure each block's skip cost (one pass per block).")] = True,
    samples: Samples = 16,
    seq_len: SeqLen = 128,
    text: Text = None,
    device: Device = "auto",
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
    from normsurgery.engine.resources import peak_rss, resolve_runtime
    from normsurgery.source import open_model

    runtime = resolve_runtime(device, max_memory)
    source = open_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, scan_finite=True)
    try:
        opened, tokenizer = _load(source, runtime, allow_pickle, trust_remote_code)
        with opened:
            stats, _ = _stats(source, opened, tokenizer, samples=samples, seq_len=seq_len, text=text,
                              skip_cost=skip_cost, quiet=json_output)
            stats.memory = {**opened.lazy.describe(), "peak_rss_bytes": peak_rss()}
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


__all__ = ["prune", "diagnose", "run_prune", "PruneSelection"]
