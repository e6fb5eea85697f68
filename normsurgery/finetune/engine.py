"""A short fine-tune of a loaded model: distillation to a teacher's logits (KL), the language-model loss, or both.

Built on accelerate, so the same code runs on the CPU, one GPU, or several (`accelerate launch`: data parallel, or
FSDP version 2 with each decoder block sharded, see sharding.py; DeepSpeed and Megatron-LM are refused). Optionally
in bfloat16 autocast (float32 master weights). Deterministic for a seed on the CPU; resumable from a checkpoint
folder (accelerate's state plus the step reached), except under FSDP. Rewrites that change the model as training goes (LN removal freezes one norm at a time) hook in
through `on_step`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from normsurgery.errors import NormSurgeryError
from normsurgery.finetune.options import FinetuneOptions
from normsurgery.engine.text import load_text, tokenize, windows

STATE_FILE = "normsurgery_finetune.json"
DIVERGED_LOSS = 100.0  # nats/token: no model comes back from this (guessing uniformly over 256k tokens is 12.5)


def process_state() -> Any:
    """accelerate's process state, made the way the fine-tune makes it (ACCELERATE_USE_CPU=true makes a `torchrun`
    launch on CPUs distributed, over gloo): under `accelerate launch` every process trains the same model (a
    replica under DDP, a shard under FSDP) and only the main one reports and writes."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def time_step(student: torch.nn.Module, teacher: torch.nn.Module | None, options: FinetuneOptions,
              device: torch.device) -> float:
    """Seconds one training step of this shape takes here (forward, backward, and the teacher's forward), timed on
    random tokens after a small warm-up pass; the gradients are dropped. Sizes a schedule to a time budget."""
    import time

    vocab = int(student.get_input_embeddings().weight.shape[0])
    ids = torch.randint(0, vocab, (options.batch_size or 1, options.seq_len or 128), generator=torch.Generator().manual_seed(0))
    student.to(device)
    if teacher is not None:
        teacher.to(device)
    seconds = 0.0
    for batch in (ids[:1, :16], ids):
        start = time.perf_counter()
        batch = batch.to(device)
        with autocast(options, device):
            logits = student(input_ids=batch).logits
            if teacher is not None and "kl" in options.loss:
                with torch.no_grad():
                    reference = teacher(input_ids=batch).logits
                logits = logits + 0 * reference
        logits.float().logsumexp(-1).mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    student.zero_grad(set_to_none=True)
    return seconds


def bf16_autocast(options: FinetuneOptions, device: torch.device) -> bool:
    """Whether the training steps run in bfloat16 autocast (the weights, their gradients and AdamW stay float32):
    `auto` on a CUDA GPU that supports bfloat16, never on the CPU; `bf16` wherever it is asked for (on a CPU too:
    torch has bfloat16 kernels there, slow on most CPUs, but it is the same code path as on a GPU); `no` never."""
    if options.mixed_precision == "no":
        return False
    gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if options.mixed_precision == "auto":
        return gpu_bf16
    if device.type == "cuda" and not gpu_bf16:
        raise NormSurgeryError(f"{torch.cuda.get_device_name(device)} does not support bfloat16; use --mixed-precision "
                               "no (float32) on it.")
    return True


def autocast(options: FinetuneOptions, device: torch.device) -> torch.autocast:
    """The autocast context of a training step: bfloat16 where `bf16_autocast` says so, else a no-op. Only the
    training steps run in it: the calibrations, the held-out measurements and the export check stay float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_autocast(options, device))


def training_bytes(parameters: int, options: FinetuneOptions, shards: int = 1, timed: bool = True) -> int:
    """What a fine-tune of a model with `parameters` holds at least on one device: float32 weights, gradients and
    AdamW's two moments (16 bytes a parameter) and the teacher for a distillation loss (4 more), split over
    `shards` FSDP processes; but a step `timed` before the fine-tune (convert's, which sizes the schedule) runs
    unsharded, with the whole model's weights and gradients (and the teacher) on every device."""
    teacher = 4 if "kl" in options.loss else 0
    return int(parameters * max((16 + teacher) / shards, 8 + teacher if timed else 0))


def check_fits(parameters: int, options: FinetuneOptions, budget: int, what: str, shards: int = 1,
               timed: bool = True) -> None:
    """Refuse a fine-tune that cannot fit the memory budget (of one device) before anything is loaded."""
    from normsurgery.engine.resources import human_bytes

    need = training_bytes(parameters, options, shards, timed)
    if need > budget:
        held = (f"float32 weights, gradients, AdamW state{' and the teacher' if 'kl' in options.loss else ''}"
                + (f" over {shards} FSDP processes" if shards > 1 else "")
                + (", and the whole model's weights and gradients in the step timed before the fine-tune"
                   if shards > 1 and timed else ""))
        raise NormSurgeryError(
            f"{what} fine-tunes the whole model, which needs at least {human_bytes(need)} here ({parameters / 1e9:.2g}B "
            f"parameters: {held}), more than the {human_bytes(budget)} available (--max-memory or the free memory). "
            "Run it on a GPU or a larger machine, or shard it over several GPUs with FSDP (README, 'Several "
            "processes'); nothing was written.")


@dataclass
class FinetuneResult:
    """The loss at every step (those run by this process), where the text came from, how many processes trained
    (each on its own batches, gradients averaged), whether they sharded the model (FSDP), and whether the steps
    ran in bfloat16 autocast."""

    losses: list[float] = field(default_factory=list)
    first_step: int = 0
    text: str = ""
    processes: int = 1
    fsdp: bool = False
    mixed_precision: str = "no"


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), in float32 whatever the model dtype."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy."""
    from normsurgery.engine.forward import next_token_nll

    return next_token_nll(logits, ids, reduction="mean", dtype=torch.float32)


def finetune(
    student: torch.nn.Module,
    tokenizer: Any,
    options: FinetuneOptions,
    *,
    teacher: torch.nn.Module | None = None,
    on_step: Callable[[int, float], None] | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
) -> FinetuneResult:
    """Train `student` in place for `options.steps` steps (counting those of a resumed run); `extra_loss`, called
    after each forward, adds an auxiliary term (e.g. from tensors the forward left on the model)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, parse_flag_from_env, set_seed

    from normsurgery.finetune.sharding import fsdp_wanted

    options.validate()
    if "kl" in options.loss and teacher is None:
        raise NormSurgeryError("a distillation loss needs the original model as teacher.")
    if options.device.startswith("cuda:"):
        torch.cuda.set_device(int(options.device.split(":", 1)[1]))  # one process: accelerate trains on the current GPU
    # the schedule counts optimizer steps: accelerate would otherwise step it once per process at every step, and
    # a run on N processes would reach the end of its cosine (lr 0) after 1/N of its steps. Mixed precision is
    # --mixed-precision's (`autocast`), never accelerate's, which would put every forward of the model in it. DDP
    # looks for unused parameters: a swap's alpha takes no part in the forward until its norm is swapped
    accelerator = Accelerator(cpu=options.device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU"),
                              step_scheduler_with_optimizer=False, mixed_precision="no",
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    refuse_sharded(accelerator.distributed_type)
    sharded = fsdp_wanted() and (accelerator.distributed_type == DistributedType.FSDP or accelerator.num_processes > 1)
    bf16 = bf16_autocast(options, accelerator.device)
    set_seed(options.seed)
    text, label = load_text(options.text)
    ids = tokenize(tokenizer, text, options.seq_len)
    if options.gradient_checkpointing:
        if not getattr(student, "supports_gradient_checkpointing", False):
            raise NormSurgeryError("this model class does not support gradient checkpointing; drop the option.")
        student.gradient_checkpointing_enable()
    student.train()
    teacher = _place(accelerator, student, teacher, sharded)  # before the optimizer, which holds the shards
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=options.weight_decay)
    warmup = max(1, options.warmup)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, options.steps) / options.steps)),
    )
    student, optimizer, schedule = _prepare(accelerator, student, optimizer, schedule, sharded)
    first = _resume(accelerator, options.checkpoint_dir)
    batches = windows(ids, options.seq_len, options.batch_size, options.seed + accelerator.process_index)
    for _ in range(first):  # the same batches as an uninterrupted run
        next(batches)
    result = FinetuneResult(first_step=first, text=label, processes=accelerator.num_processes, fsdp=sharded,
                            mixed_precision="bf16" if bf16 else "no")
    for step in range(first, options.steps):
        batch = next(batches).to(accelerator.device)
        with autocast(options, accelerator.device):
            logits = student(input_ids=batch).logits
            loss = torch.zeros((), device=accelerator.device)
            if "kl" in options.loss:
                with torch.no_grad():
                    reference = teacher(input_ids=batch).logits
                loss = loss + distillation_loss(logits, reference)
            if "lm" in options.loss:
                loss = loss + lm_loss(logits, batch)
            if extra_loss is not None:
                loss = loss + extra_loss()
        if not torch.isfinite(loss) or float(loss.detach()) > DIVERGED_LOSS:
            raise NormSurgeryError(f"the fine-tune diverged at step {step} (loss {loss.item()}); nothing was written. "
                                   "Lower --lr, or give the schedule more steps (a larger --budget or --gap): a "
                                   "rewrite that changes many norms per step can blow the model up.")
        accelerator.backward(loss)
        if options.grad_clip:
            accelerator.clip_grad_norm_(trainable, options.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        result.losses.append(value)
        if on_step:
            on_step(step, value)
        done = step + 1
        if options.checkpoint_dir and options.checkpoint_every and done % options.checkpoint_every == 0 and done < options.steps:
            _save(accelerator, options.checkpoint_dir, done)
    student.eval()
    if options.gradient_checkpointing:
        accelerator.unwrap_model(student).gradient_checkpointing_disable()
    return result


def _place(accelerator: Any, student: torch.nn.Module, teacher: torch.nn.Module | None,
           sharded: bool) -> torch.nn.Module | None:
    """Shard the student and the frozen teacher over the processes (FSDP), or put the frozen teacher on this
    process's device (accelerate's prepare puts the student there); returns the teacher."""
    from normsurgery.finetune.sharding import shard

    if sharded:
        shard(student, accelerator.device)
    if teacher is None:
        return None
    teacher = teacher.eval().requires_grad_(False)
    return shard(teacher, accelerator.device) if sharded else teacher.to(accelerator.device)


def _prepare(accelerator: Any, student: torch.nn.Module, optimizer: Any, schedule: Any, sharded: bool) -> tuple[Any, Any, Any]:
    """accelerate's wrapping: DDP over several processes, or on GPUs under FSDP its FSDP2 bookkeeping (it keeps the
    model, already sharded, as it is). CPU processes under FSDP, which accelerate runs as DDP, get the optimizer
    and the schedule wrapped only: DDP must not wrap a sharded model."""
    from accelerate.utils import DistributedType

    if sharded and accelerator.distributed_type != DistributedType.FSDP:
        return (student, *accelerator.prepare(optimizer, schedule))
    return accelerator.prepare(student, optimizer, schedule)


def refuse_sharded(distributed_type: Any) -> None:
    """Refuse DeepSpeed and Megatron-LM: their engines wrap the model, its norms' stand-ins and the optimizer in
    ways the rewrites do not follow (FSDP version 2 and DDP are what is supported)."""
    from accelerate.utils import DistributedType

    if distributed_type in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise NormSurgeryError(
            f"this accelerate configuration runs the fine-tune with {distributed_type.value}, which normsurgery does not "
            "support. Use FSDP version 2 to shard a model that does not fit one GPU (`distributed_type: FSDP` and "
            "`fsdp_version: 2` in `accelerate config`), or data parallelism (`accelerate launch --multi_gpu ...`); "
            "nothing was written.")


def _resume(accelerator: Any, folder: Path | None) -> int:
    """The step a checkpoint folder reached (its state loaded), or 0."""
    if folder is None or not (folder / STATE_FILE).is_file():
        return 0
    try:
        step = int(json.loads((folder / STATE_FILE).read_text())["step"])
        accelerator.load_state(str(folder))
    except Exception as err:  # a damaged or foreign folder
        raise NormSurgeryError(f"cannot resume from {folder}: {err}. Remove the folder to start afresh.") from None
    return step


def _save(accelerator: Any, folder: Path, step: int) -> None:
    """Save the training state, then the step (last, so a half-written checkpoint is never resumed)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STATE_FILE).unlink(missing_ok=True)
    accelerator.save_state(str(folder))
    (folder / STATE_FILE).write_text(json.dumps({"step": step}) + "\n")
