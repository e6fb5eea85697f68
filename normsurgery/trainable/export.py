"""Write a model trained in memory through an exact plan (e.g. folding frozen norms away) as a normsurgery output,
in the form chosen before training (`export_form`)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import torch

import normsurgery
from normsurgery.checkpoint.card import render_model_card
from normsurgery.checkpoint.writer import CheckpointWriter
from normsurgery.errors import NormSurgeryError
from normsurgery.export.config import MODELING_FILE, rewritten_config
from normsurgery.rewrite.inert import stock_problem
from normsurgery.rewrite.plan import Plan, execute
from normsurgery.source import ModelSource
from normsurgery.trainable.plot import LOSS_CURVE, draw_loss_curve
from normsurgery.trainable.stand_ins import removable_norms
from normsurgery.surgery import main_dtype


def export_form(source: ModelSource, wanted: str | None) -> tuple[str, str | None]:
    """The form `--to none` writes, "stock" or "native", checked before any training; when a run that did not ask
    for one falls back to native, the note saying why. An explicit --export stock that cannot be written is refused."""
    if wanted == "native":
        return "native", None
    why = stock_problem(source.arch, removable_norms(source.arch), main_dtype(source))
    if why is None:
        return "stock", None
    if wanted == "stock":
        raise NormSurgeryError(
            f"--export stock cannot write this {source.arch.family} model as its stock transformers class with inert "
            f"norms: {why}. Nothing was trained or written. Pass --export native (no norm modules, its own modeling "
            "code, loaded with trust_remote_code=True), or leave --export out to get native with a note.")
    return "native", f"writing --export native (its own modeling code, trust_remote_code=True): the stock form is " \
                     f"impossible for this model, since {why}."


class MemorySource:
    """A trained model's state dict, seen under the source checkpoint's tensor names (`renames`: the on-disk to
    in-memory renamings transformers applies, such as GPT-NeoX's embed_out -> lm_head)."""

    def __init__(self, state: dict[str, torch.Tensor], names: list[str], renames: dict[str, str]) -> None:
        self._state = state
        self._key = {}
        for name in names:
            key = name
            for pattern, replacement in renames.items():
                key = re.sub(pattern, replacement, key)
            if key in state:
                self._key[name] = key

    def names(self) -> list[str]:
        return list(self._key)

    def get(self, name: str) -> torch.Tensor:
        return self._state[self._key.get(name, name)].detach().to("cpu").contiguous()

    def prefetch(self, names: list[str]) -> None:
        return None


MAX_EXPORT_DIFF = 1e-4  # of the logit scale: the fold of frozen norms is exact up to float32 rounding
Export = Callable[[dict[str, torch.Tensor], torch.Tensor], dict[str, float]]


def export_on_main(model: torch.nn.Module, check_ids: torch.Tensor, export: Export) -> dict[str, float] | None:
    """Gather the trained model's whole state and its logits on `check_ids` (on every process: under FSDP both are
    collectives), then `export(state, logits)` on the main process only, the others waiting until the output is in
    place; returns the export's check, None on the other processes."""
    from normsurgery.finetune.engine import process_state
    from normsurgery.finetune.sharding import full_state

    logits = reference_logits(model, check_ids)
    state = full_state(model)
    check = export(state, logits) if process_state().is_main_process else None
    process_state().wait_for_everyone()
    return check


@torch.no_grad()
def reference_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The trained model's float32 logits on `ids` (on the CPU), in evaluation mode, that the export must match."""
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device)).logits.float().cpu()
    model.train(training)
    return logits


def export_trained(source: ModelSource, plan: Plan, state: dict[str, torch.Tensor], want: torch.Tensor,
                   check_ids: torch.Tensor, out: Path, *, force: bool, max_shard_size: int, report: dict[str, Any],
                   extra: list[str] = ()) -> dict[str, float]:
    """Run `plan` over the trained model's `state` (cast back to their stored dtypes; `extra`: tensors the source
    checkpoint does not have, such as a swap's alpha), write OUT with card and report, and check before OUT
    appears that the written folder computes `want`, the trained model's logits on `check_ids`. Returns the
    check."""
    stored = main_dtype(source)
    dtypes = {n: source.reader.info(n).dtype for n in source.reader.names()}
    metadata = {"normsurgery_version": normsurgery.__version__, "normsurgery_operation": plan.operation}
    with CheckpointWriter(out, force=force, max_shard_size=max_shard_size, metadata=metadata) as writer:
        written = execute(plan, MemorySource(state, source.reader.names() + [n for n in extra if n not in source.reader],
                                       source.arch.key_renames), writer,
                          dtype_for=lambda name: dtypes.get(name, stored))
        writer.write_json("config.json", rewritten_config(source.reader.config, plan.all_config_updates(source.config),
                                                             plan.surgery, {}))
        writer.copy_side_files(source.path)
        if plan.surgery is not None:
            writer.copy_file(MODELING_FILE)
        staged = writer.stage()
        check = _same_function(want, staged, check_ids, float32=stored == torch.float32)
        report = {**report, "export_check": check}
        if report.get("losses"):
            marks = {e["step"]: e["unit"] for e in report.get("removal_steps", [])}
            title = f"{source.spec}: {plan.operation}, {len(report['losses'])} fine-tune steps"
            not_drawn = draw_loss_curve(report["losses"], marks, title, writer.tmp / LOSS_CURVE)
            report["loss_curve"] = not_drawn or LOSS_CURVE
        operation = {"operation": plan.operation, "folded": len(plan.folded), "remote_code": plan.surgery is not None,
                     "dtype": str(stored).replace("torch.", "")}
        writer.write_text("README.md", render_model_card(source.spec, [operation], None, report))
        writer.write_text("normsurgery.json", json.dumps({**operation, "source": source.spec, "output": str(out),
                                                          "tensors_written": len(written), **report}, indent=2) + "\n")
    return check


@torch.no_grad()
def _same_function(want: torch.Tensor, folder: Path, ids: torch.Tensor, *, float32: bool) -> dict[str, float]:
    """Load the written folder (with normsurgery's own modeling code when it has it) and compare its logits with
    the trained model's, `want`."""
    from transformers import AutoModelForCausalLM

    from normsurgery.errors import CheckFailed

    remote = (folder / "modeling_normsurgery.py").exists()
    written = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote, dtype=torch.float32).eval()
    got = written(input_ids=ids).logits.float()
    rel = float((want - got).abs().max() / want.abs().max())
    top1 = float((want.argmax(-1) == got.argmax(-1)).float().mean())
    if float32 and rel > MAX_EXPORT_DIFF:
        raise CheckFailed(f"the exported model differs from the trained one by {rel:.3g} of the logit scale (limit "
                          f"{MAX_EXPORT_DIFF}); nothing was written. This is a bug in normsurgery; please report it.")
    return {"rel_logit_diff": rel, "top1_agreement": top1}
