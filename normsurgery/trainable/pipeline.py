"""The trainable rewrites end to end, file to file (`convert --to none|dyt|derf`): open, size the schedule,
calibrate and fine-tune, fold or swap, write, check the export. Prints nothing: the caller is told the chosen
schedule (`on_plan`) and each step (`on_step`)."""

from __future__ import annotations

import copy
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from normsurgery.engine.forward import cross_entropy
from normsurgery.engine.loading import load_model, load_tokenizer
from normsurgery.checkpoint.writer import parse_size
from normsurgery.errors import NormSurgeryError
from normsurgery.rewrite.inert import plan_stock_remove
from normsurgery.rewrite.remove import plan_remove_norms
from normsurgery.source import open_model
from normsurgery.engine.resources import Runtime, resolve_runtime
from normsurgery.finetune.engine import FinetuneOptions, check_fits, process_state, time_step
from normsurgery.trainable.budget import DEFAULT_BUDGET, Sized, cap_gap, parse_budget, size_schedule, sized_lr, tokens_per_step
from normsurgery.trainable.export import export_form, export_on_main, export_trained
from normsurgery.trainable.remove_ln import (
    CALIBRATION_SEQ_LEN,
    CALIBRATION_SEQUENCES,
    HELDOUT_TOKENS,
    RELEASES,
    RemovalOptions,
    calibration_batches,
    total_steps,
    heldout_batches,
    remove_norms,
    removal_units,
)
from normsurgery.trainable.stand_ins import removable_norms, special_token_ids


def _load_for_training(source: Any, options: FinetuneOptions, allow_pickle: bool,
                       trust_remote_code: bool) -> tuple[Any, torch.nn.Module, torch.nn.Module | None]:
    """The tokenizer, the float32 model to train, and (for a distillation loss) a frozen copy as teacher."""
    tokenizer = load_tokenizer(source.path)
    if tokenizer is None:
        raise NormSurgeryError(f"{source.path} has no tokenizer files; the fine-tune needs the model's tokenizer.")
    student = load_model(source.path, torch.float32, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    return tokenizer, student, copy.deepcopy(student) if "kl" in options.loss else None


def _open_for_training(model: str, out: Path, force: bool, max_shard_size: str, removal: RemovalOptions,
                       allow_pickle: bool, trust_remote_code: bool, runtime: Runtime | None,
                       what: str) -> tuple[Any, int]:
    """Refuse an existing OUT, open and scan the model, refuse a fine-tune that cannot fit the memory budget (of
    one device, the training state split over the processes under FSDP), fit the sequence length to its context;
    the shard size."""
    from normsurgery.finetune.sharding import fsdp_wanted

    shard_bytes = parse_size(max_shard_size)
    if out.exists() and not force:
        raise NormSurgeryError(f"{out} already exists; choose another --output or pass --force to replace it.")
    runtime = runtime or resolve_runtime(removal.finetune.device)
    source = open_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, scan_finite=True)
    try:
        check_fits(source.parameter_count, removal.finetune, runtime.budget, what,
                   shards=process_state().num_processes if fsdp_wanted() else 1)
    except BaseException:
        source.close()
        raise
    removal.finetune.tokens_per_step = tokens_per_step(runtime.device.type)
    removal.finetune.fit_context(source.config)
    return source, shard_bytes


def _from_main(*values: float) -> list[float]:
    """The main process's values on every process (one process: the values): each process times its own step, and
    schedules sized from different timings would run different numbers of steps, whose collectives never match."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list(list(values), from_process=0)


def size_run(removal: RemovalOptions, *, parameters: int, units: int, releases: int, student: torch.nn.Module,
             teacher: torch.nn.Module | None, elapsed: float, used: Callable[[int, int, int, int], int],
             ramps: bool, calibration_batches: int, seconds_per_unit: Callable[[], float] = lambda: 0.0) -> Sized:
    """Fill what the user left unset (learning rate, gap, ramp, heal) from the model's size, a timed step on this
    device (the main process's, on several) and the budget (`removal.budget`, DEFAULT_BUDGET when unset); returns
    the schedule and its cost.
    `used(gap, per_freeze, ramp, heal)` is the number of steps of such a schedule; each event measures
    `calibration_batches` batches of calibration text, and `seconds_per_unit()` times what each unit costs besides
    (a swap's alpha fit)."""
    options = removal.finetune
    if options.lr is None:
        options.lr = sized_lr(parameters)
    step_tokens = (options.batch_size or 1) * (options.seq_len or 1)
    device = torch.device(options.device) if options.device == "cpu" or options.device.startswith("cuda:") else process_state().device
    seconds, elapsed, per_unit = _from_main(time_step(student, teacher, options, device), elapsed, seconds_per_unit())
    forward = seconds / 3 / step_tokens  # a forward pass is about a third of a step, per token
    per_event = forward * CALIBRATION_SEQUENCES * min(options.seq_len or 1, CALIBRATION_SEQ_LEN) * calibration_batches
    fixed = elapsed + 2 * forward * HELDOUT_TOKENS + 2 * seconds  # held-out before and after, the export check
    budget = parse_budget(removal.budget or DEFAULT_BUDGET)
    sized = size_schedule(units, releases, budget=budget, parameters=parameters, step_tokens=step_tokens,
                          seconds_per_step=seconds, seconds_per_event=per_event, fixed_seconds=fixed,
                          used=lambda g, p, r: used(g, p, r, 0), ramps=ramps, seconds_per_unit=per_unit)
    if removal.gap is None and removal.heal is None:
        removal.gap, removal.heal, removal.per_freeze = sized.gap, sized.heal, sized.per_freeze
        removal.ramp = sized.ramp if removal.ramp is None else removal.ramp
    else:  # the user's own schedule: keep it whole (a missing part comes from the sized one) and estimate its cost
        removal.gap = sized.gap if removal.gap is None else removal.gap
        removal.heal = sized.heal if removal.heal is None else removal.heal
        removal.ramp = 1 if removal.ramp is None else removal.ramp
        events = -(-units // removal.per_freeze) + releases
        sized.steps = used(removal.gap, removal.per_freeze, removal.ramp, removal.heal)
        sized.gap, sized.heal, sized.per_freeze, sized.ramp = removal.gap, removal.heal, removal.per_freeze, removal.ramp
        sized.estimate_seconds = fixed + sized.steps * seconds + events * per_event + units * per_unit
    return sized


@dataclass
class TrainingPlan:
    """What a trainable rewrite chose before it starts: a line saying so, warnings worth reading first, and the
    number of fine-tune steps (for a progress bar)."""

    summary: str
    notes: list[str]
    steps: int


def describe_plan(sized: Sized, what: str, units: int, options: FinetuneOptions, parameters: int,
                  device: str) -> TrainingPlan:
    """Say what the fine-tune will do and roughly how long it will take, with warnings for a budget too small."""
    notes = []
    if sized.per_freeze > 1:
        notes.append(f"the budget allows fewer steps than there are {what}, so {sized.per_freeze} change at each "
                     "event; expect a worse result than a larger --budget gives.")
    given, meant = steps_per_unit(sized, options), cap_gap(parameters)
    if given < meant / 10:
        notes.append(f"at this budget each of the {units} {what} gets {given:.2g} step(s) of 1k tokens before the "
                     f"next change; a model of this size is meant to get about {meant} (gpt2-shakespeare, 1.35M "
                     "parameters, needed 30). Expect the result to be far from the original, or the fine-tune to "
                     "diverge: give it a larger --budget, or run it on a GPU.")
    summary = (f"{sized.describe(what, units)} (lr {options.lr:.2g} for {parameters / 1e6:.3g}M parameters, "
               f"{options.batch_size} x {options.seq_len} tokens a step at {sized.seconds_per_step:.2g} s on {device})")
    return TrainingPlan(summary, notes, sized.steps)


def steps_per_unit(sized: Sized, options: FinetuneOptions) -> float:
    """Training steps of 1k tokens that one unit (a norm path or a norm) gets before the next changes."""
    tokens = (options.batch_size or 1) * (options.seq_len or 1)
    return sized.gap * tokens / 1024 / max(1, sized.per_freeze)


def _options_report(options: FinetuneOptions, **schedule: float) -> dict[str, Any]:
    """The schedule and fine-tune options as plain data for the report."""
    return {**schedule, **{k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()}}


OnPlan = Callable[[TrainingPlan], None]
OnStep = Callable[[int, float], None]


def run_remove(model: str, out: Path, *, force: bool = False, max_shard_size: str = "5GB",
               removal: RemovalOptions | None = None, allow_pickle: bool = False, trust_remote_code: bool = False,
               runtime: Runtime | None = None, on_plan: OnPlan | None = None,
               on_step: OnStep | None = None) -> dict[str, Any]:
    """LN removal end to end: check it applies and which form it can be written in (`removal.export`), fine-tune
    with the freeze schedule, fold or make the norms inert, write, check; the report (empty on a process other than
    the main one of a distributed run, which writes and reports)."""
    removal = removal or RemovalOptions()
    removal.validate()
    source, shard_bytes = _open_for_training(model, out, force, max_shard_size, removal, allow_pickle, trust_remote_code,
                                             runtime, "convert --to none")
    try:
        started = time.perf_counter()
        units = removal_units(source.arch, removable_norms(source.arch))
        export, export_note = export_form(source, removal.export)
        tokenizer, student, teacher = _load_for_training(source, removal.finetune, allow_pickle, trust_remote_code)
        sized = size_run(removal, parameters=source.parameter_count, units=len(units), releases=len(RELEASES),
                         student=student, teacher=teacher, elapsed=time.perf_counter() - started,
                         used=lambda g, p, r, h: total_steps(len(units), RemovalOptions(gap=g, heal=h, per_freeze=p,
                                                                                       ramp=r)), ramps=True,
                         calibration_batches=removal.calibration_batches)
        main = process_state().is_main_process
        if on_plan and main:
            described = describe_plan(sized, "norm paths to freeze", len(units), removal.finetune,
                                      source.parameter_count, str(student.device))
            on_plan(described if export_note is None else replace(described, notes=described.notes + [export_note]))
        start = time.perf_counter()
        scales, events, result, before = remove_norms(
            student, tokenizer, source.arch, removal, teacher=teacher, special_ids=special_token_ids(tokenizer),
            on_step=on_step if main else None)
        seconds = time.perf_counter() - start
        heldout = heldout_batches(tokenizer, removal.finetune.seq_len)
        after = cross_entropy(student, heldout)
        report = {
            "heldout_ce_before": before,
            "heldout_ce_after": after,
            "heldout_ce_change": after - before,
            "finetune_seconds": seconds,
            "removal_steps": [asdict(e) for e in events],
            "losses": result.losses,
            "options": _options_report(removal.finetune, gap=removal.gap, heal=removal.heal, per_freeze=removal.per_freeze,
                                       ramp=removal.ramp, aux_weight=removal.aux_weight,
                                       spread_weight=removal.spread_weight,
                                       budget=removal.budget or DEFAULT_BUDGET),
            "estimate_seconds": sized.estimate_seconds,
            "text": result.text,
            "processes": result.processes,
            "fsdp": result.fsdp,
            "mixed_precision": result.mixed_precision,
            "export": export,
            **({"export_note": export_note} if export_note else {}),
        }
        plan = (plan_stock_remove(source.arch, source.reader.config, scales) if export == "stock"
                else plan_remove_norms(source.arch, scales))
        check_ids = calibration_batches(tokenizer, removal.finetune.seq_len, 2, 1)[0]
        report["export_check"] = export_on_main(student, check_ids, lambda state, want: export_trained(
            source, plan, state, want, check_ids, out, force=force, max_shard_size=shard_bytes, report=report))
    finally:
        source.close()
    if report["export_check"] is None:  # another process wrote and reports
        return {}
    frozen = sum(e.scale is not None for e in events)
    return {"operation": "none", "output": str(out), "removed": len(scales), "frozen_paths": frozen, **report}


def removal_options(*, gap: int | None = None, heal: int | None = None,
                    aux_weight: float = RemovalOptions.aux_weight, spread_weight: float = RemovalOptions.spread_weight,
                    lr: float | None = None, batch_size: int | None = None, seq_len: int | None = None,
                    text: str | None = None, seed: int = 0, loss: str = "kl", gradient_checkpointing: bool = False,
                    checkpoint_dir: Path | None = None, checkpoint_every: int = 0, device: str = "auto",
                    budget: str | None = None, ramp: int | None = None,
                    mixed_precision: str = "auto", alpha_init: str = "best-mse",
                    export: str | None = None) -> RemovalOptions:
    """The CLI's options as a RemovalOptions (None: sized by the model, the device and the budget; `export` None:
    stock where the model allows it)."""
    return RemovalOptions(gap=gap, heal=heal, ramp=ramp, aux_weight=aux_weight, spread_weight=spread_weight,
                          budget=budget, alpha_init=alpha_init,
                          export=export, finetune=FinetuneOptions(
        lr=lr, batch_size=batch_size, seq_len=seq_len, text=text, seed=seed, loss=loss,  # type: ignore[arg-type]
        gradient_checkpointing=gradient_checkpointing, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
        device=device, mixed_precision=mixed_precision))  # type: ignore[arg-type]


def run_swap(model: str, target: str, out: Path, *, force: bool = False, max_shard_size: str = "5GB",
             removal: RemovalOptions | None = None, allow_pickle: bool = False, trust_remote_code: bool = False,
             runtime: Runtime | None = None, on_plan: OnPlan | None = None,
             on_step: OnStep | None = None) -> dict[str, Any]:
    """DyT/Derf end to end: centre (LayerNorm models), swap progressively with calibrated alphas while distilling,
    heal, write; the report (empty on a process other than the main one)."""
    removal = removal or RemovalOptions()
    from normsurgery.rewrite.plan import Plan
    from normsurgery.trainable.swap import (
        SWAP_CALIBRATION_BATCHES,
        center_in_memory,
        exported_state,
        plan_surgery,
        swap_norms,
        swap_order,
        swapped_tensor_names,
        time_fit,
    )

    removal.validate()
    if removal.export is not None:
        raise NormSurgeryError(f"--export applies to --to none only; --to {target} always writes its own modeling code "
                               "(DyT and Derf have no stock module). Leave --export out.")
    if removal.heal is not None and removal.heal < 1:
        raise NormSurgeryError("--heal must be at least 1 for --to dyt/derf (the fine-tune after the swap).")
    source, shard_bytes = _open_for_training(model, out, force, max_shard_size, removal, allow_pickle, trust_remote_code,
                                             runtime, f"convert --to {target}")
    try:
        started = time.perf_counter()
        norms = removable_norms(source.arch)
        order = swap_order(removal_units(source.arch, norms))
        tokenizer, student, teacher = _load_for_training(source, removal.finetune, allow_pickle, trust_remote_code)
        centred = any(n.kind == "layernorm" for n in norms)
        if centred:
            center_in_memory(student, source.arch)
        sized = size_run(removal, parameters=source.parameter_count, units=len(order), releases=0, student=student,
                         teacher=teacher, elapsed=time.perf_counter() - started, ramps=True,
                         calibration_batches=SWAP_CALIBRATION_BATCHES,
                         seconds_per_unit=lambda: time_fit(norms[0], target, source.arch.hidden_size),
                         used=lambda g, p, r, h: total_steps(len(order), RemovalOptions(gap=g, heal=h, per_freeze=p,
                                                                                        ramp=r), releases=()))
        removal.heal = max(1, removal.heal)
        main = process_state().is_main_process
        if on_plan and main:
            on_plan(describe_plan(sized, f"norms to swap for {target}", len(order), removal.finetune,
                                  source.parameter_count, str(student.device)))
        seq_len = removal.finetune.seq_len
        heldout = heldout_batches(tokenizer, seq_len)
        before = cross_entropy(student, heldout)
        start = time.perf_counter()
        inits, events, result = swap_norms(student, tokenizer, norms, target, order, removal, teacher=teacher,
                                           on_step=on_step if main else None)
        seconds = time.perf_counter() - start
        after = cross_entropy(student, heldout)
        report = {
            "heldout_ce_before": before,
            "heldout_ce_after": after,
            "heldout_ce_change": after - before,
            "finetune_seconds": seconds,
            "alpha_init": [asdict(i) for i in inits.values()],
            "removal_steps": events,
            "losses": result.losses,
            "options": _options_report(removal.finetune, gap=removal.gap, heal=removal.heal, per_freeze=removal.per_freeze,
                                       ramp=removal.ramp, budget=removal.budget or DEFAULT_BUDGET,
                                       alpha_init=removal.alpha_init),
            "estimate_seconds": sized.estimate_seconds,
            "text": result.text,
            "processes": result.processes,
            "fsdp": result.fsdp,
            "mixed_precision": result.mixed_precision,
        }
        plan = Plan(operation=target, surgery=plan_surgery(source.arch, norms, target))
        extra = swapped_tensor_names(norms, target)
        if centred and source.arch.tied:
            plan.config_updates["tie_word_embeddings"] = False
            extra.append(source.arch.unembed.weight)
        check_ids = calibration_batches(tokenizer, seq_len, 2, 1)[0]
        report["export_check"] = export_on_main(student, check_ids, lambda state, want: export_trained(
            source, plan, exported_state(state, norms, target), want, check_ids, out, force=force,
            max_shard_size=shard_bytes, report=report, extra=extra))
    finally:
        source.close()
    if report["export_check"] is None:
        return {}
    methods = Counter(i.method for i in inits.values())
    return {"operation": target, "output": str(out), "swapped": len(norms),
            "alpha_methods": dict(methods), **report}
