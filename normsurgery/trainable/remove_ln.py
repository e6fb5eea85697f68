"""LayerNorm removal by fine-tuning (Heimersheim 2024; Baroni et al. 2025), on a loaded model.

Each norm in turn gets its per-token divisor frozen to its mean on calibration text, measured just before
the freeze on the model as it is then (Baroni et al.'s "recompute" variant), with a short fine-tune between
freezes. The order is theirs: every block's MLP-input norm (ln_2) first, then every attention-input norm
(ln_1), then the final norm. We freeze ln_1 as one norm (they freeze its Q/K and V paths at different steps,
which needs a patched attention) and keep no special scale for a first or end-of-text token: the tokens we
train on have none. Frozen norms are linear and fold away exactly (normsurgery/rewrite/remove.py). Optionally
(`aux_weight`) Baroni et al.'s auxiliary loss pushes the final norm's per-token scales together, so that the
constant that replaces them fits every token better.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from normsurgery.arch.spec import Architecture, Norm
from normsurgery.errors import NormSurgeryError
from normsurgery.train.engine import FinetuneOptions, FinetuneResult, finetune
from normsurgery.train.text import tokenize, windows
from normsurgery.trainable.stand_ins import FreezableNorm, install, removable_norms, scale_spread


@dataclass
class RemovalOptions:
    """The schedule: fine-tune steps between two freezes, and after the last one."""

    gap: int = 10
    heal: int = 50
    calibration_batches: int = 4
    aux_weight: float = 0.0  # weight of the spread of the final norm's per-token scale (Baroni et al.'s aux loss)
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)


@dataclass
class RemovalEvent:
    """One freeze: when, which norm, the scale it got, and the held-out CE just after."""

    step: int
    norm: str
    scale: float
    heldout_ce: float


def removal_order(arch: Architecture, norms: list[Norm]) -> list[Norm]:
    """MLP-input norms block by block, then attention-input norms, then the final norm (Baroni et al.)."""
    wanted = {n.name for n in norms}
    inputs = [[n for n in b.norms if n.role == "input" and n.name in wanted] for b in arch.blocks]
    order = [b[1] for b in inputs if len(b) > 1] + [b[0] for b in inputs if b]
    return order + [n for n in norms if n.role == "final"]


def calibration_batches(tokenizer: Any, seq_len: int, batch_size: int, count: int) -> list[torch.Tensor]:
    """Fixed batches of the Shakespeare calibration split for the scale statistics."""
    from normsurgery.reference.text import shakespeare_text

    stream = windows(tokenize(tokenizer, shakespeare_text("calibration"), seq_len), seq_len, batch_size, seed=1)
    return [next(stream) for _ in range(count)]


def heldout_batches(tokenizer: Any, seq_len: int, batch_size: int = 8) -> list[torch.Tensor]:
    """A fixed held-out sample for the per-step cross-entropy in the report (evaluation only)."""
    from normsurgery.reference.text import shakespeare_text

    stream = windows(tokenize(tokenizer, shakespeare_text("heldout"), seq_len), seq_len, batch_size, seed=2)
    return [next(stream) for _ in range(4)]


@torch.no_grad()
def cross_entropy(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean next-token cross-entropy (nats) of `model` on `batches`."""
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        logits = model(input_ids=batch).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                 reduction="sum")
        total, count = total + float(loss), count + batch[:, 1:].numel()
    model.train(training)
    return total / count


@torch.no_grad()
def freeze(model: torch.nn.Module, stand_in: FreezableNorm, batches: list[torch.Tensor]) -> float:
    """Measure a norm's mean divisor on calibration batches with the model as it is now, and freeze it there."""
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    stand_in.start_collecting()
    for batch in batches:
        model(input_ids=batch.to(device))
    scale = stand_in.mean_scale()
    stand_in.scale.fill_(scale)
    model.train(training)
    return scale


def remove_norms(
    model: torch.nn.Module,
    tokenizer: Any,
    arch: Architecture,
    options: RemovalOptions,
    *,
    teacher: torch.nn.Module | None,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[dict[str, float], list[RemovalEvent], FinetuneResult, float]:
    """Freeze every removable norm on schedule while fine-tuning; returns the scales, the freeze events, the
    fine-tune's losses and the held-out CE before anything changed."""
    order = removal_order(arch, removable_norms(arch))
    stand_ins = install(model, order)
    calib = calibration_batches(tokenizer, options.finetune.seq_len, options.finetune.batch_size, options.calibration_batches)
    heldout = heldout_batches(tokenizer, options.finetune.seq_len)
    before = cross_entropy(model, heldout)
    due: dict[int, list[Norm]] = {}
    for i, norm in enumerate(order):
        due.setdefault(i * options.gap, []).append(norm)
    options.finetune.steps = max(1, (len(order) - 1) * options.gap + options.heal)
    events: list[RemovalEvent] = []

    def freeze_due(step: int) -> None:
        for norm in due.pop(step, []):
            if stand_ins[norm.name].frozen:  # frozen in a checkpoint this run resumed from
                continue
            scale = freeze(model, stand_ins[norm.name], calib)
            if not math.isfinite(scale) or scale <= 0:
                raise NormSurgeryError(f"{norm.name} measured a scale of {scale} on the calibration text; the model "
                                       "diverged. Lower --lr or raise --gap.")
            events.append(RemovalEvent(step, norm.name, scale, cross_entropy(model, heldout)))

    freeze_due(0)

    def after_step(step: int, loss: float) -> None:
        freeze_due(step + 1)
        if on_step:
            on_step(step, loss)

    extra_loss = None
    if options.aux_weight:
        final = stand_ins[next(n.name for n in order if n.role == "final")]
        final.track = True
        extra_loss = lambda: options.aux_weight * scale_spread(final)  # noqa: E731
    try:
        result = finetune(model, tokenizer, options.finetune, teacher=teacher, on_step=after_step, extra_loss=extra_loss)
    finally:
        for stand_in in stand_ins.values():
            stand_in.track, stand_in.live = False, None
    for step in sorted(due):  # norms a resumed run found frozen, or (never otherwise) left over
        freeze_due(step)
    scales = {name: float(s.scale) for name, s in stand_ins.items()}
    return scales, events, result, before
