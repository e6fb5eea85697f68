"""`normsurgery fold` and `normsurgery convert --to rmsnorm|crmsnorm`: the exact rewrites."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from normsurgery.arch.facts import applicability
from normsurgery.commands.common import (
    AllowPickle,
    Device,
    JsonOutput,
    MaxLogitDiff,
    MaxMemory,
    MixedPrecision,
    TrustRemoteCode,
    console,
    print_json,
)
from normsurgery.finetune.options import FinetuneOptions
from normsurgery.thresholds import DEFAULT_MAX_REL_LOGIT_DIFF
from normsurgery.trainable.options import RemovalOptions

if TYPE_CHECKING:
    from normsurgery.surgery import SurgeryResult


class Target(str, Enum):
    """What `convert --to` can produce."""

    rmsnorm = "rmsnorm"
    crmsnorm = "crmsnorm"
    none = "none"
    dyt = "dyt"
    derf = "derf"


Out = Annotated[Path, typer.Option("--output", "-o", help="Output folder (must not exist unless --force).")]
Force = Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")]
MaxShard = Annotated[str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 5GB, 500MB.")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="Store the result as float32, bfloat16, float16 or float64 (default: as the source).")]
NoVerify = Annotated[bool, typer.Option("--no-verify", help="Skip the model check after writing (shard checksums are always verified).")]


def _run(model: str, plan_for, out: Path, force: bool, max_shard_size: str, dtype: Optional[str], no_verify: bool,
         json_output: bool, allow_pickle: bool, trust_remote_code: bool, max_logit_diff: float, device: str,
         max_memory: Optional[str]) -> SurgeryResult:
    """Shared body of the rewrite commands: the API's rewrite with progress bars, then the report."""
    from normsurgery.api import _rewrite

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True, disable=json_output) as progress:
        tasks: dict[str, Any] = {}

        def on_progress(what: str, done: int, total: int | None) -> None:
            if what not in tasks:
                tasks[what] = progress.add_task(what, total=total)
            progress.update(tasks[what], completed=done)

        result = _rewrite(model, out, plan_for, force=force, dtype=dtype, verify=not no_verify,
                          max_logit_diff=max_logit_diff, max_shard_size=max_shard_size, allow_pickle=allow_pickle,
                          trust_remote_code=trust_remote_code, device=device, max_memory=max_memory,
                          progress=on_progress)
    if json_output:
        print_json(result.as_dict())
    else:
        _print_result(result)
    return result


def _print_result(result: SurgeryResult) -> None:
    console.print(f"[bold green]wrote[/bold green] {result.output} ({result.operation}, {result.tensors_written} tensors, "
                  f"{result.dtype}{', with its own modeling code (trust_remote_code=True)' if result.remote_code else ''})")
    console.print(f"folded/swapped {len(result.folded)} norms" + (f"; left {len(result.kept)}:" if result.kept else ""))
    for line in result.kept:
        console.print(f"  - {line}")
    if result.check:
        c = result.check
        console.print(f"check: max |logit diff| {c.max_abs_logit_diff:.3g} ({c.rel_logit_diff:.3g} of the logit scale), "
                      f"mean KL {c.mean_kl:.3g}, top-1 agreement {c.top1_agreement:.2%}")
        if c.memory:
            from normsurgery.commands.check import memory_line

            console.print(f"  {memory_line(c.memory)}")
    if result.maths_check and result.storage_check:
        console.print(f"  maths (float32 twin): {result.maths_check.rel_logit_diff:.3g} of the logit scale; "
                      f"storage rounding to {result.dtype}: {result.storage_check.rel_logit_diff:.3g}")
    if not result.check:
        console.print("[yellow]not verified (--no-verify)[/yellow]")


def _run_trainable(model: str, target: str, out: Path, options: Any, *, force: bool, max_shard_size: str,
                   json_output: bool, allow_pickle: bool, trust_remote_code: bool, runtime: Any) -> None:
    """`convert --to none|dyt|derf`: say what the schedule is, show a progress bar with an ETA, print the result."""
    from rich.progress import TimeRemainingColumn

    from normsurgery.trainable.pipeline import run_remove, run_swap

    progress = Progress(TextColumn("removing norms" if target == "none" else f"swapping norms for {target}"),
                        BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                        TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), console=console, transient=True, disable=json_output)
    task = progress.add_task(target, total=None, loss=float("nan"))

    def on_plan(plan: Any) -> None:
        if not json_output:
            console.print(plan.summary)
            for note in plan.notes:
                console.print(f"[yellow]note: {note}[/yellow]")
        progress.update(task, total=plan.steps)

    common = dict(force=force, max_shard_size=max_shard_size, removal=options, allow_pickle=allow_pickle,
                  trust_remote_code=trust_remote_code, runtime=runtime, on_plan=on_plan,
                  on_step=lambda step, loss: progress.update(task, completed=step + 1, loss=loss))
    with progress:
        report = run_remove(model, out, **common) if target == "none" else run_swap(model, target, out, **common)
    if not report:  # a process other than the main one of a distributed run
        return
    if json_output:
        print_json(report)
        return
    if target == "none" and report["export"] == "stock":
        console.print(f"[bold green]wrote[/bold green] {out} (no normalization left: {report['removed']} norms frozen, "
                      f"{report['frozen_paths']} reader paths apart, and kept as inert stock norms (eps 2^66); the "
                      "stock class, no trust_remote_code)")
    elif target == "none":
        console.print(f"[bold green]wrote[/bold green] {out} (no normalization left: {report['removed']} norms "
                      f"frozen, {report['frozen_paths']} reader paths apart, and folded; its own modeling code, "
                      "trust_remote_code=True)")
    else:
        methods = ", ".join(f"{m} for {k}" for m, k in report["alpha_methods"].items())
        console.print(f"[bold green]wrote[/bold green] {out} ({report['swapped']} norms swapped for {target}; alpha "
                      f"initialised by {methods}; its own modeling code, trust_remote_code=True)")
    before, after = report["heldout_ce_before"], report["heldout_ce_after"]
    console.print(f"held-out cross-entropy {before:.4f} -> {after:.4f} nats/token ({after - before:+.4f}); "
                  f"fine-tune {len(report['losses'])} steps in {report['finetune_seconds']:.0f} s")
    if target == "none":
        console.print(f"export check: {report['export_check']['rel_logit_diff']:.3g} of the logit scale")
    _note_if_far(before, after)


FAR = 0.1  # nats/token of held-out cross-entropy above the original worth telling the user about


def _note_if_far(before: float, after: float) -> None:
    """Say plainly when the rewritten model is clearly worse than the original, and what to try."""
    if after - before > FAR:
        console.print(f"[yellow]note: the output is {after - before:.2f} nats/token worse than the original on held-out "
                      "text. Heal longer (--heal), try another --lr, or measure it with `normsurgery eval OUT --compare "
                      "MODEL` before using it.[/yellow]")


def fold(
    model: Annotated[str, typer.Argument(help="A model folder, a reference model name, or a hub id.")],
    output: Out,
    force: Force = False,
    max_shard_size: MaxShard = "5GB",
    dtype: Dtype = None,
    no_verify: NoVerify = False,
    max_logit_diff: MaxLogitDiff = DEFAULT_MAX_REL_LOGIT_DIFF,
    json_output: JsonOutput = False,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
    device: Device = "auto",
    max_memory: MaxMemory = None,
) -> None:
    """Fold every norm's gain (and bias) into the linear layers that read it. Exact; stays a stock model.

    Norms whose output does not feed only linear layers (sandwich/post norms) are left and listed.

    Examples:

      normsurgery fold smollm2-135m -o smollm2-folded

      normsurgery fold ./gpt2 -o ./gpt2-folded --dtype bfloat16
    """
    from normsurgery.rewrite.fold import plan_fold

    _run(model, lambda s: plan_fold(s.arch), output, force, max_shard_size, dtype, no_verify, json_output,
         allow_pickle, trust_remote_code, max_logit_diff, device, max_memory)


def convert(
    model: Annotated[str, typer.Argument(help="A model folder, a reference model name, or a hub id.")],
    to: Annotated[Target, typer.Option("--to", help="rmsnorm or crmsnorm (exact, Pre-LN LayerNorm models); none (remove every norm), dyt or derf (swap every norm): calibrate, fine-tune, export.")],
    output: Out,
    force: Force = False,
    max_shard_size: MaxShard = "5GB",
    dtype: Dtype = None,
    no_verify: NoVerify = False,
    max_logit_diff: MaxLogitDiff = DEFAULT_MAX_REL_LOGIT_DIFF,
    json_output: JsonOutput = False,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
    device: Device = "auto",
    max_memory: MaxMemory = None,
    budget: Annotated[Optional[str], typer.Option(help="What the whole fine-tune may take: a time (30min, 2h, 900s) or training tokens (20M, 500k). Sizes every schedule option left unset. [default: 30min]", rich_help_panel="Fine-tune")] = None,
    gap: Annotated[Optional[int], typer.Option(help="Fine-tune steps between two freezes (--to none) or swaps (--to dyt/derf). [default: sized by --budget]", rich_help_panel="Fine-tune")] = None,
    heal: Annotated[Optional[int], typer.Option(help="Fine-tune steps after the last freeze or swap. [default: sized by --budget]", rich_help_panel="Fine-tune")] = None,
    ramp: Annotated[Optional[int], typer.Option(help="Steps over which each freeze (--to none: live scale to constant) or swap (--to dyt/derf: norm to DyT/Derf) blends in (1: at once). [default: 4 gaps with a sized schedule, else 1]", rich_help_panel="Fine-tune")] = None,
    aux_weight: Annotated[float, typer.Option(help="[--to none] Weight of Baroni et al.'s auxiliary loss (spread of the final norm's per-token scale); 0 turns it off.", rich_help_panel="Fine-tune")] = RemovalOptions.aux_weight,
    spread_weight: Annotated[float, typer.Option(help="[--to none] Weight of a penalty on every frozen path's per-token scale spread about its frozen scale, from its freeze on (the tokens the constant cannot fit; the bound hides them until it is lifted); 0 turns it off.", rich_help_panel="Fine-tune")] = RemovalOptions.spread_weight,
    alpha_init: Annotated[str, typer.Option(help="[--to dyt/derf] How each swap starts: linear (alpha 0.1/scale, gain x10: the frozen-scale map, saturating only 10x beyond the typical scale), scale (alpha 1/scale), least-squares, or best-mse (the better fit of those two; the default).", rich_help_panel="Fine-tune")] = RemovalOptions.alpha_init,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (AdamW, warmup then cosine). [default: sized by the parameter count, 3e-3 at 1M to 1e-4 at 10B]", rich_help_panel="Fine-tune")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Sequences per step (default: about 1k tokens per step on a CPU, 8k on a GPU).", rich_help_panel="Fine-tune")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Tokens per sequence (default: the model's context length, at most 1024, so that every position is trained).", rich_help_panel="Fine-tune")] = None,
    text: Annotated[Optional[str], typer.Option(help="Training text: .txt/.jsonl file or hub dataset (default: Shakespeare training split).", rich_help_panel="Fine-tune")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the batches and the initialisation.", rich_help_panel="Fine-tune")] = FinetuneOptions.seed,
    loss: Annotated[str, typer.Option(help="kl (distil to the original), lm, or kl+lm.", rich_help_panel="Fine-tune")] = FinetuneOptions.loss,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Trade compute for memory.", rich_help_panel="Fine-tune")] = False,
    checkpoint_dir: Annotated[Optional[Path], typer.Option(help="Resume from / save the fine-tune state here.", rich_help_panel="Fine-tune")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Save the state every N steps (with --checkpoint-dir).", rich_help_panel="Fine-tune")] = FinetuneOptions.checkpoint_every,
    mixed_precision: MixedPrecision = FinetuneOptions.mixed_precision,
    export: Annotated[Optional[str], typer.Option(help="[--to none] stock: the family's own transformers class, every removed norm kept but inert (eps 2^66, gain 2^33 times its frozen map), loadable without trust_remote_code by tools that take only stock classes; native: no norm module at all, with its own modeling code (trust_remote_code=True). [default: stock where the model allows it, else native with a note]")] = RemovalOptions.export,
) -> None:
    """Convert a Pre-LN LayerNorm model to Pre-RMSNorm or Pre-CRMSNorm exactly, or remove its norms (--to none).

    The output carries its own small modeling code: load it with trust_remote_code=True. --to none freezes each
    norm's scale in turn while fine-tuning (KL to the original by default), then makes the frozen norms inert
    stock norms (--export stock, the default where the model allows it: a stock model) or folds them away
    (--export native: no norm left, its own modeling code).

    Examples:

      normsurgery convert gpt2-shakespeare --to rmsnorm -o gpt2-rms

      normsurgery convert ./pythia --to crmsnorm -o ./pythia-crms --json

      normsurgery convert gpt2-shakespeare --to none -o gpt2-noln

      normsurgery convert gpt2-shakespeare --to none --export native -o gpt2-noln-native
    """
    if to in (Target.none, Target.dyt, Target.derf):
        from normsurgery.engine.resources import resolve_runtime
        from normsurgery.trainable.pipeline import removal_options

        options = removal_options(gap=gap, heal=heal, aux_weight=aux_weight, spread_weight=spread_weight, lr=lr,
                                  batch_size=batch_size, seq_len=seq_len, text=text, seed=seed, loss=loss,
                                  gradient_checkpointing=gradient_checkpointing, checkpoint_dir=checkpoint_dir,
                                  checkpoint_every=checkpoint_every, device=device, budget=budget, ramp=ramp,
                                  mixed_precision=mixed_precision, alpha_init=alpha_init, export=export)
        _run_trainable(model, to.value, output, options, force=force, max_shard_size=max_shard_size,
                       json_output=json_output, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                       runtime=resolve_runtime(device, max_memory))
        return
    if export is not None:
        from normsurgery.errors import NormSurgeryError

        raise NormSurgeryError(f"--export applies to --to none only; --to {to.value} is exact and writes its own "
                               "modeling code. Leave --export out.")
    if to is Target.rmsnorm:
        from normsurgery.source import open_model

        source = open_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, scan_finite=False)
        verdict = next(a for a in applicability(source.arch) if a.operation == "rmsnorm")
        source.close()
        if not verdict.applies and verdict.reason.startswith("already RMSNorm"):
            message = f"{model} already uses RMSNorm: nothing to do, nothing written."
            print_json({"operation": "rmsnorm", "changed": False, "reason": message}) if json_output else console.print(message)
            return
    from normsurgery.rewrite.center import plan_center_swap

    _run(model, lambda s: plan_center_swap(s.arch, to.value), output, force, max_shard_size, dtype, no_verify,
         json_output, allow_pickle, trust_remote_code, max_logit_diff, device, max_memory)
