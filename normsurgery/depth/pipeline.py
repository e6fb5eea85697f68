"""Pruning end to end, file to file: measure the blocks on calibration text (or take the named ones), choose,
write the pruned model verified against the original with those blocks skipped (or, pruning sub-layers, with
their attention or MLP zeroed), optionally heal it. Prints nothing."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from normsurgery.errors import NormSurgeryError
from normsurgery.depth.select import candidates
from normsurgery.depth.stats import LayerStats
from normsurgery.rewrite.sublayers import WHAT

if TYPE_CHECKING:
    import torch

    from normsurgery.engine.loading import OpenModel
    from normsurgery.engine.resources import Runtime
    from normsurgery.source import ModelSource


HEAL_LR = 1e-4  # a pruned model's heal (distillation to the original): learning rate and sequences per step
HEAL_BATCH_SIZE = 8


@dataclass
class PruneSelection:
    """How `prune` chooses its blocks: `remove` K by a method, or exactly `layers`; whether it removes the whole
    blocks or only their attention or MLP (`what`), and how removed sub-layers are written (`export`: native, skipped
    by shipped code, or stock, their output projections zeroed); and the calibration text."""

    what: str = "block"
    export: str = "native"  # whole blocks: a stock model either way
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


def _stats(source: ModelSource, opened: OpenModel, tokenizer: Any, *, samples: int, seq_len: int,
           text: str | None, skip_cost: bool, costs_of: tuple[str, ...] = WHAT) -> tuple[LayerStats, torch.Tensor]:
    """Measure the per-block statistics of an opened model on its calibration text (skip costs of `costs_of`:
    blocks and/or sub-layers)."""
    from normsurgery.depth.measure import measure
    from normsurgery.engine.text import context_length, load_text, sample

    if samples < 1 or seq_len < 2:
        raise NormSurgeryError("--samples must be at least 1 and --seq-len at least 2.")
    seq_len = min(seq_len, context_length(source.config) or seq_len)
    ids, _ = sample(tokenizer, seq_len=seq_len, sequences=samples, text=load_text(text)[0] if text else None)
    stats = measure(opened.model, source.arch, ids, label=source.spec, skip_cost=skip_cost, costs_of=costs_of,
                    weight=source.reader.get, batch_size=measure_batch(opened, source, seq_len))
    return stats, ids


def measure_batch(opened: OpenModel, source: ModelSource, seq_len: int) -> int:
    """Sequences per forward: all that fit the budget beside the residual state of every depth that the
    measurement keeps (float32)."""
    from normsurgery.rewrite.sublayers import has_sublayers

    depths = source.arch.num_layers * (2 if has_sublayers(source.arch) else 1) + 1
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


def diagnose_model(model: str, *, samples: int = PruneSelection.samples, seq_len: int = PruneSelection.seq_len,
                   text: str | None = None, skip_cost: bool = True, sublayer_skip_cost: bool = False,
                   allow_pickle: bool = False, trust_remote_code: bool = False,
                   runtime: Runtime | None = None) -> LayerStats:
    """Per-block statistics of `model` on calibration text (`text`: a .txt/.jsonl file, or the Shakespeare
    calibration split), with where it ran and the peak memory in `.memory`; skip costs of the blocks
    (`skip_cost`) and of their attention and MLP sub-layers (`sublayer_skip_cost`: two more passes per block)."""
    from normsurgery.rewrite.sublayers import SUBLAYERS

    from normsurgery.engine.resources import peak_rss, resolve_runtime
    from normsurgery.source import open_model

    runtime = runtime or resolve_runtime()
    source = open_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, scan_finite=True)
    try:
        opened, tokenizer = _load(source, runtime, allow_pickle, trust_remote_code)
        with opened:
            costs_of = (("block",) if skip_cost else ()) + (SUBLAYERS if sublayer_skip_cost else ())
            stats, _ = _stats(source, opened, tokenizer, samples=samples, seq_len=seq_len, text=text,
                              skip_cost=bool(costs_of), costs_of=costs_of)
            stats.memory = {**opened.lazy.describe(), "peak_rss_bytes": peak_rss()}
    finally:
        source.close()
    return stats


def run_prune(model: str, output: Path | None, selection: PruneSelection, *, heal: Any = None, dry_run: bool = False,
              force: bool = False, max_shard_size: str = "5GB", verify: bool = True, allow_pickle: bool = False,
              trust_remote_code: bool = False, runtime: Runtime | None = None) -> dict[str, Any]:
    """Choose the blocks, write the pruned model (verified), optionally heal it (`heal`: FinetuneOptions); the report.
    Measurement and verification run on `runtime` (default: the free memory of the best device)."""
    from normsurgery.checkpoint.writer import parse_size
    from normsurgery.rewrite.sublayers import check_export, check_what, sublayers
    from normsurgery.source import open_model
    from normsurgery.surgery import apply_plan
    from normsurgery.thresholds import Thresholds

    s = selection
    check_what(s.what)
    check_export(s.export)
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
    report: dict[str, Any] = {"operation": "prune", "source": source.spec, "what": s.what,
                              "export": "stock" if s.what == "block" else s.export}
    try:
        if s.what != "block":
            sublayers(source.arch)  # the refusal for a model without separate sub-layers, before any measuring
        if s.layers is not None:
            chosen = _checked(source.arch, s.what, s.layers)
            report["selection"] = {"method": "given", "blocks": chosen}
        else:
            from normsurgery.engine.resources import peak_rss, resolve_runtime
            from normsurgery.depth.measure import remeasure

            runtime = runtime or resolve_runtime()
            opened, tokenizer = _load(source, runtime, allow_pickle, trust_remote_code)
            with opened:
                stats, ids = _stats(source, opened, tokenizer, samples=s.samples, seq_len=s.seq_len, text=s.text,
                                    skip_cost=s.skip_cost, costs_of=(s.what,))
                found = candidates(stats, int(s.remove or 0), s.by, keep_first=s.keep_first, keep_last=s.keep_last,
                                   top=max(1, s.remeasure), what=s.what)
                batch = opened.lazy.tokens_per_pass(int(ids.shape[1]))
                best = (remeasure(opened.model, source.arch, ids, found, batch, what=s.what) if s.remeasure > 0
                        else found[0])
                report["memory"] = {**opened.lazy.describe(), "peak_rss_bytes": peak_rss()}
            del opened
            chosen = _checked(source.arch, s.what, list(best.blocks))
            report["selection"] = {"method": s.by, "blocks": chosen, "calibration_ce": stats.base_ce,
                                   "candidates": [asdict(c) for c in found]}
        plan = _plan(source, s.what, chosen, s.export)
        plan.check_dropped = s.layers is not None  # --remove scanned every tensor when it opened the model
        report["kept_blocks"] = source.arch.num_layers - (len(chosen) if s.what == "block" else 0)
        if dry_run:
            report.update(dry_run=True, config_updates=plan.all_config_updates(source.settings))
        elif heal is not None:
            from normsurgery.engine.resources import resolve_runtime

            report.update(_write_and_heal(source, plan, output, force, shard_bytes, heal, allow_pickle,
                                          runtime or resolve_runtime()))
        else:
            result = apply_plan(source, plan, output, force=force, max_shard_size=shard_bytes, verify=verify,
                                thresholds=Thresholds(), runtime=runtime)
            report.update({"output": str(output), "config_updates": result.config_updates,
                           **_checks(result)})
    finally:
        source.close()
    return report


def _checked(arch: Any, what: str, blocks: list[int]) -> list[int]:
    """The blocks (whose `what` goes) sorted, or the error saying why they cannot be removed."""
    from normsurgery.rewrite.prune import check_removal
    from normsurgery.rewrite.sublayers import check_sublayer_removal

    return check_removal(arch, blocks) if what == "block" else check_sublayer_removal(arch, what, blocks)


def _plan(source: ModelSource, what: str, blocks: list[int], export: str) -> Any:
    """The plan that removes the blocks, or their `what` sub-layers (`export` stock: zeroed in place)."""
    from normsurgery.rewrite.prune import plan_prune
    from normsurgery.rewrite.sublayers import plan_sublayer_prune, plan_sublayer_zero

    if what == "block":
        return plan_prune(source.arch, source.reader.config, source.reader.names(), blocks)
    if export == "stock":
        return plan_sublayer_zero(source.arch, what, blocks)
    return plan_sublayer_prune(source.arch, source.reader.names(), what, blocks)


def _write_and_heal(source: ModelSource, plan: Any, out: Path, force: bool, shard_bytes: int, options: Any,
                    allow_pickle: bool, runtime: Runtime) -> dict[str, Any]:
    """Write the exact pruned model to a staging folder beside OUT (verified), distil it to the original, write it to
    OUT. Without whole blocks, the heal trains the original with the dropped sub-layers zeroed and writes it through
    the same plan. On several processes (`accelerate launch`) the main one writes both and reports; the others get
    no report."""
    from dataclasses import replace

    from normsurgery.surgery import apply_plan
    from normsurgery.finetune.engine import process_state
    from normsurgery.finetune.heal import heal_folder, heal_model

    options.validate()
    staging = out.parent / f".{out.name}.unhealed"
    state = process_state()
    result = (apply_plan(source, plan, staging, force=True, max_shard_size=shard_bytes, verify=True, runtime=runtime)
              if state.is_main_process else None)
    state.wait_for_everyone()
    try:
        if plan.skipped_sublayers:
            heal = heal_model(source, replace(plan, operation="prune+heal", check_dropped=False), source.path, out,
                              options, force=force, max_shard_size=shard_bytes, allow_pickle=allow_pickle,
                              runtime=runtime)
        else:
            heal = heal_folder(staging, source.path, out, options, operation="prune+heal", force=force,
                               max_shard_size=shard_bytes, allow_pickle=allow_pickle, runtime=runtime)
    finally:
        if state.is_main_process:  # the others have read it: the heal waits for every process before it returns
            shutil.rmtree(staging, ignore_errors=True)
    if result is None:
        return {}
    return {"output": str(out), "config_updates": result.config_updates, **_checks(result), "heal": heal,
            "export_check": heal.pop("export_check")}


def _checks(result: Any) -> dict[str, Any]:
    """A verified prune's two comparisons as plain data: against the source with the blocks skipped, and against
    the intact source."""
    return {"check": result.check.as_dict() if result.check else None,
            "change": result.change.as_dict() if result.change else None}
