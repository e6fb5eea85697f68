"""`normsurgery prune` (remove the least effective blocks) and `normsurgery diagnose` (show why)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

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
from normsurgery.depth.pipeline import HEAL_BATCH_SIZE, HEAL_LR, PruneSelection
from normsurgery.depth.select import METHODS
from normsurgery.depth.stats import LayerStats
from normsurgery.rewrite.sublayers import WHAT

Samples = Annotated[int, typer.Option(help="Calibration sequences.", rich_help_panel="Calibration")]
SeqLen = Annotated[int, typer.Option(help="Tokens per calibration sequence.", rich_help_panel="Calibration")]
Text = Annotated[Optional[str], typer.Option(help="Calibration text: .txt or .jsonl file (default: Shakespeare calibration split).", rich_help_panel="Calibration")]


def _parse_layers(layers: str) -> list[int]:
    try:
        return [int(x) for x in layers.replace(" ", "").split(",") if x]
    except ValueError:
        raise NormSurgeryError(f"--layers takes 0-based block indices separated by commas, e.g. 10,11,12 (got {layers!r}).") from None


def prune(
    model: Annotated[str, typer.Argument(help="A model folder, a reference model name, or a hub id.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder (must not exist unless --force); not needed with --dry-run.")] = None,
    remove: Annotated[Optional[int], typer.Option("--remove", "-k", help="How many blocks (or sub-layers, with --what) to remove.")] = None,
    layers: Annotated[Optional[str], typer.Option(help="Remove exactly these 0-based blocks (or their --what sub-layer), e.g. 10,11,12 (no measuring).")] = None,
    what: Annotated[str, typer.Option(help=f"What to remove: {', '.join(WHAT)} (the attention or the MLP of the chosen blocks, which stay in place).")] = PruneSelection.what,
    export: Annotated[str, typer.Option(help="With --what attention|mlp: native (the removed sub-layers skipped by shipped modeling code, trust_remote_code=True: faster, and no keys or values cached for a removed attention) or stock (the family's own class, every tensor kept with the removed sub-layers' output projections zeroed: loads without remote code, but saves no time and no KV cache). Whole blocks: a stock model either way.")] = PruneSelection.export,
    by: Annotated[str, typer.Option(help=f"How to choose: {', '.join(METHODS)}.")] = PruneSelection.by,
    keep_first: Annotated[int, typer.Option(help="Never remove the first N blocks.")] = PruneSelection.keep_first,
    keep_last: Annotated[int, typer.Option(help="Never remove the last N blocks.")] = PruneSelection.keep_last,
    candidates_to_remeasure: Annotated[int, typer.Option("--remeasure", help="Re-measure the top N candidates by calibration loss and keep the best; 0 trusts the metric.")] = PruneSelection.remeasure,
    skip_cost: Annotated[bool, typer.Option("--skip-cost", help="Also measure each block's skip cost (one pass per block).")] = False,
    samples: Samples = PruneSelection.samples,
    seq_len: SeqLen = PruneSelection.seq_len,
    text: Text = None,
    device: Device = "auto",
    max_memory: MaxMemory = None,
    heal_steps: Annotated[int, typer.Option(help="Distil the pruned model to the original for N steps (0: no heal).", rich_help_panel="Heal")] = 0,
    lr: Annotated[float, typer.Option(help="Heal learning rate.", rich_help_panel="Heal")] = HEAL_LR,
    batch_size: Annotated[int, typer.Option(help="Heal sequences per step.", rich_help_panel="Heal")] = HEAL_BATCH_SIZE,
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

    With --what attention (or mlp) only that sub-layer of each chosen block goes: every block keeps its index, the
    output carries small modeling code (trust_remote_code=True, no normsurgery needed) and stores no keys or values
    for the removed attention, and it is checked to equal the original with those sub-layers' outputs zeroed.
    With --export stock it is a stock model instead, the removed sub-layers' output projections zeroed in place (no
    speed or KV-cache saving). Refused for parallel blocks (attention and MLP reading the same residual).

    Examples:

      normsurgery prune smollm2-135m --remove 4 -o smollm2-26l

      normsurgery prune smollm2-135m --layers 20,21 -o smollm2-28l --heal-steps 100

      normsurgery prune smollm2-135m --what attention --remove 6 -o smollm2-24attn

      normsurgery prune smollm2-135m --what mlp --layers 20 --export stock -o smollm2-no-mlp20
    """
    from normsurgery.depth.pipeline import run_prune

    if heal_steps < 0:
        raise NormSurgeryError(f"--heal-steps cannot be negative (got {heal_steps}).")
    selection = PruneSelection(what=what, export=export, remove=remove,
                               layers=_parse_layers(layers) if layers is not None else None, by=by,
                               keep_first=keep_first, keep_last=keep_last, remeasure=candidates_to_remeasure,
                               skip_cost=skip_cost, samples=samples, seq_len=seq_len, text=text)
    runs_a_model = remove is not None or not no_verify or heal_steps > 0
    runtime, heal = None, None
    if runs_a_model or device != "auto" or max_memory is not None:  # a --no-verify copy of named blocks needs no torch
        from normsurgery.engine.resources import resolve_runtime

        runtime = resolve_runtime(device, max_memory)
    if heal_steps:
        from normsurgery.finetune.engine import FinetuneOptions

        heal = FinetuneOptions(steps=heal_steps, lr=lr, batch_size=batch_size, seq_len=seq_len, text=text,
                               device=device, mixed_precision=mixed_precision)
    with console.status("measuring blocks on calibration text", spinner="dots") if remove is not None and not json_output \
            else nullcontext():
        report = run_prune(model, output, selection, heal=heal, dry_run=dry_run, force=force,
                           max_shard_size=max_shard_size, verify=not no_verify, allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code, runtime=runtime)
    if heal is not None:
        from normsurgery.finetune.engine import process_state

        if not process_state().is_main_process:  # a heal on several processes: the main one reports
            return
    _print_prune(report, json_output)


def _print_prune(report: dict[str, Any], json_output: bool) -> None:
    if json_output:
        print_json(report)
        return
    selection = report["selection"]
    blocks = ", ".join(map(str, selection["blocks"]))
    if report["what"] == "block":
        console.print(f"blocks to remove (0-based): [bold]{blocks}[/bold] ({selection['method']}); "
                      f"{report['kept_blocks']} blocks stay")
    else:
        console.print(f"{report['what']} sub-layers to remove, of blocks (0-based): [bold]{blocks}[/bold] "
                      f"({selection['method']}); all {report['kept_blocks']} blocks stay in place")
    for c in selection.get("candidates", []):
        loss = f", calibration CE {c['loss']:.4f}" if c.get("loss") is not None else ""
        console.print(f"  candidate {list(c['blocks'])} by {c['method']} (score {c['score']:.4g}{loss})")
    if report.get("dry_run"):
        console.print("dry run: nothing written")
        return
    if report["what"] == "block":
        console.print(f"[bold green]wrote[/bold green] {report['output']} (a stock model; config re-indexed: "
                      f"{', '.join(report['config_updates'])})")
    elif report["export"] == "stock":
        console.print(f"[bold green]wrote[/bold green] {report['output']} (a stock model: the removed sub-layers' "
                      "output projections are zero; they still run and cache, so it is no faster than the original)")
    else:
        console.print(f"[bold green]wrote[/bold green] {report['output']} (with its own modeling code: load it with "
                      "trust_remote_code=True)")
    if report.get("check"):
        c = report["check"]
        removed = "blocks skipped" if report["what"] == "block" else "sub-layers zeroed"
        console.print(f"check against the original with those {removed}: {c['rel_logit_diff']:.3g} of the logit "
                      f"scale, top-1 agreement {c['top1_agreement']:.2%}")
    if report.get("change"):
        c = report["change"]
        console.print(f"against the intact original: perplexity {c['ppl_original']:.4g} -> {c['ppl_candidate']:.4g}, "
                      f"top-1 agreement {c['top1_agreement']:.2%}")
    if report.get("heal"):
        h = report["heal"]
        console.print(f"healed {len(h['losses'])} steps: held-out CE {h['heldout_ce_before']:.4f} -> "
                      f"{h['heldout_ce_unhealed']:.4f} pruned -> {h['heldout_ce_after']:.4f} healed")


def diagnose(
    model: Annotated[str, typer.Argument(help="A model folder, a reference model name, or a hub id.")],
    html: Annotated[Optional[Path], typer.Option("--html", help="Write a self-contained HTML report here.")] = None,
    png: Annotated[Optional[Path], typer.Option("--png", help="Write the plots as PNG files into this folder.")] = None,
    skip_cost: Annotated[bool, typer.Option("--skip-cost/--no-skip-cost", help="Measure each block's skip cost (one pass per block).")] = True,
    sublayer_skip_cost: Annotated[bool, typer.Option("--sublayer-skip-cost", help="Also measure each attention and MLP sub-layer's skip cost (two passes per block).")] = False,
    samples: Samples = PruneSelection.samples,
    seq_len: SeqLen = PruneSelection.seq_len,
    text: Text = None,
    device: Device = "auto",
    max_memory: MaxMemory = None,
    save: Annotated[Optional[Path], typer.Option("--save", help="Write the statistics as JSON here.")] = None,
    json_output: JsonOutput = False,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Per-block diagnostics: residual norm growth, norm gains, Block Influence, angular distances, skip costs;
    each attention and MLP sub-layer's influence (and skip cost with --sublayer-skip-cost).

    Examples:

      normsurgery diagnose smollm2-135m

      normsurgery diagnose smollm2-135m --html smollm2.html --png plots/
    """
    from normsurgery.engine.resources import resolve_runtime
    from normsurgery.depth.pipeline import diagnose_model

    with console.status("measuring blocks on calibration text", spinner="dots") if not json_output else nullcontext():
        stats = diagnose_model(model, samples=samples, seq_len=seq_len, text=text, skip_cost=skip_cost,
                               sublayer_skip_cost=sublayer_skip_cost,
                               allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                               runtime=resolve_runtime(device, max_memory))
    notes: dict[str, Any] = {}
    if save:
        stats.save(save)
    if png or html:
        from normsurgery.depth.report import draw_plots, write_html

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
    columns = [("block", [str(i) for i in range(stats.num_layers)]),
               ("BI", [f"{v:.4f}" for v in stats.block_influence]),
               ("angular n=1", [f"{v:.4f}" for v in stats.angular_last[0]]),
               ("rel. update", [f"{v:.4f}" for v in stats.relative_update]),
               ("update cos", [f"{v:+.3f}" for v in stats.update_cosine]),
               ("residual RMS", [f"{v:.4g}" for v in stats.residual_rms[:-1]])]
    for label, values, fmt in (("skip cost", stats.skip_cost, "+.4f"), ("attn BI", stats.attention_influence, ".4f"),
                               ("MLP BI", stats.mlp_influence, ".4f"),
                               ("attn skip", stats.attention_skip_cost, "+.4f"),
                               ("MLP skip", stats.mlp_skip_cost, "+.4f")):
        if values is not None:
            columns.append((label, [format(v, fmt) for v in values]))
    for label, _ in columns:
        table.add_column(label, justify="right")
    low = set(sorted(range(stats.num_layers), key=lambda i: stats.block_influence[i])[: max(1, stats.num_layers // 4)])
    for i in range(stats.num_layers):
        table.add_row(*(values[i] for _, values in columns), style="bold" if i in low else None)
    console.print(table)
    console.print(f"residual RMS after the last block (before the final norm): {stats.residual_rms[-1]:.4g}. "
                  "Bold: the quarter of blocks with the lowest Block Influence."
                  + (" attn BI / MLP BI: 1 - cos of the residual before and after the block's attention / MLP "
                     "(what prune --what attention|mlp ranks by)." if stats.attention_influence is not None else ""))


__all__ = ["prune", "diagnose"]
