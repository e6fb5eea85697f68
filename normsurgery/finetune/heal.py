"""Heal a pruned model by distilling it to the original, and write it through the same export: a stock model from
its folder, or a model without some sub-layers trained as the original with those sub-layers zeroed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from normsurgery.engine.loading import load_model, load_tokenizer
from normsurgery.rewrite.plan import Plan
from normsurgery.source import ModelSource, open_model
from normsurgery.surgery import sublayer_label
from normsurgery.engine.resources import Runtime, resolve_runtime
from normsurgery.finetune.engine import FinetuneOptions, check_fits, finetune, process_state
from normsurgery.trainable.export import export_on_main, export_trained
from normsurgery.engine.forward import cross_entropy
from normsurgery.trainable.remove_ln import calibration_batches, heldout_batches


def heal_folder(current: Path, teacher_folder: Path, out: Path, options: FinetuneOptions, *, operation: str,
                force: bool, max_shard_size: int, allow_pickle: bool = False,
                runtime: Runtime | None = None) -> dict[str, Any]:
    """Fine-tune the stock model in `current` towards `teacher_folder`'s logits and write it to `out` (see
    `heal_model`)."""
    source = open_model(str(current), scan_finite=False)
    try:
        return heal_model(source, Plan(operation=operation), teacher_folder, out, options, force=force,
                          max_shard_size=max_shard_size, allow_pickle=allow_pickle, runtime=runtime)
    finally:
        source.close()


def heal_model(source: ModelSource, plan: Plan, teacher_folder: Path, out: Path, options: FinetuneOptions, *,
               force: bool, max_shard_size: int, allow_pickle: bool = False,
               runtime: Runtime | None = None) -> dict[str, Any]:
    """Fine-tune the model of `source` as `plan` writes it (the sub-layers it drops, `plan.skipped_sublayers`, zeroed
    by hooks throughout) towards `teacher_folder`'s logits, and write it through `plan` to `out` (checked to compute
    what the trained model computes; on several processes the main one writes); returns the held-out
    cross-entropies, losses and the export check (None on the other processes)."""
    from normsurgery.depth.skip import zeroing
    from normsurgery.finetune.sharding import fsdp_wanted

    options.validate()
    runtime = runtime or resolve_runtime(options.device)
    options.fit_context(source.config)
    check_fits(source.parameter_count, options, runtime.budget, "healing",
               shards=process_state().num_processes if fsdp_wanted() else 1, timed=False)
    tokenizer = load_tokenizer(teacher_folder)
    teacher = load_model(teacher_folder, torch.float32, allow_pickle=allow_pickle)
    student = load_model(source.path, torch.float32, allow_pickle=allow_pickle)
    with zeroing(student, source.arch, plan.skipped_sublayers):
        heldout = heldout_batches(tokenizer, options.seq_len)
        before, unhealed = cross_entropy(teacher, heldout), cross_entropy(student, heldout)
        start = time.perf_counter()
        trained = finetune(student, tokenizer, options, teacher=teacher)
        healed = cross_entropy(student, heldout)
        summary: dict[str, Any] = {
            "heldout_ce_before": before, "heldout_ce_unhealed": unhealed, "heldout_ce_after": healed,
            "heldout_ce_change": healed - before, "finetune_seconds": time.perf_counter() - start,
            "losses": trained.losses, "processes": trained.processes, "fsdp": trained.fsdp,
            "mixed_precision": trained.mixed_precision}
        if plan.skipped_sublayers:
            label = sublayer_label(plan.skipped_sublayers)
            summary["removed_sublayers"] = f"{label} (0-based block indices, kept in place)"
        check_ids = calibration_batches(tokenizer, options.seq_len, 2, 1)[0]
        summary["export_check"] = export_on_main(student, check_ids, lambda state, want: export_trained(
            source, plan, state, want, check_ids, out, force=force, max_shard_size=max_shard_size, report=summary))
    return summary
