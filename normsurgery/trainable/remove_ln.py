"""LayerNorm removal by fine-tuning (Heimersheim 2024; Baroni et al. 2025), on a loaded model.

Each reader path of each norm in turn (see stand_ins.py) gets its per-token divisor frozen to its mean on
calibration text, measured just before the freeze on the model as it is then (Baroni et al.'s "recompute"
variant), with a short fine-tune between freezes. A freeze can be gradual (`ramp` steps: the divisor moves
geometrically from the live one to the constant), which spares the model the jump. The order is theirs: every block's MLP-input norm first, then
every attention-input norm's Q/K path, then its V path, then the final norm. Position 0 (the attention sink) and
the tokenizer's special tokens keep frozen scales of their own until the end, when the special tokens and then
position 0 are released onto the ordinary scale, so that the exported model has no special case and no norm.
Frozen norms are linear and fold away exactly (normsurgery/rewrite/remove.py). Optionally (`aux_weight`)
Baroni et al.'s auxiliary loss pushes the final norm's per-token scales together, so that the constant that
replaces them fits every token better, and (`spread_weight`) each frozen path's per-token scales towards its
frozen one, from the freeze on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from normsurgery.arch.spec import Architecture, Norm
from normsurgery.engine.forward import cross_entropy
from normsurgery.errors import NormSurgeryError
from normsurgery.engine.text import sample
from normsurgery.finetune.engine import FinetuneResult, finetune
from normsurgery.trainable.options import RemovalOptions
from normsurgery.arch.spec import reader_groups
from normsurgery.trainable.stand_ins import (ScaleGroup, Unit, frozen_spread, install, removable_norms,
                                             scale_spread)

CALIBRATION_SEQUENCES = 8  # sequences per scale measurement (position 0 is measured on each of them)
CALIBRATION_SEQ_LEN = 256  # at most this many tokens each
HELDOUT_TOKENS = 8192  # the command's own held-out sample (bench/ measures on more)
RELEASES = ("outliers", "special", "first")  # released after the last freeze, in this order


@dataclass
class RemovalEvent:
    """One schedule event: when, what (a unit `norm[group]`, or a release), and the scale a freeze gave."""

    step: int
    unit: str
    scale: float | None


def removal_units(arch: Architecture, norms: list[Norm]) -> list[Unit]:
    """MLP-input norms block by block, then each attention-input norm's Q/K path, its V path and any other path
    (a parallel block's MLP), then the final norm (Baroni et al.)."""
    wanted = {n.name for n in norms}
    inputs = [[n for n in b.norms if n.role == "input" and n.name in wanted] for b in arch.blocks]
    units = [Unit(b[1], g) for b in inputs if len(b) > 1 for g in reader_groups(b[1])]
    rank = {"qk": 0, "v": 1}
    firsts = [b[0] for b in inputs if b]
    for r in sorted({rank.get(g, 2) for n in firsts for g in reader_groups(n)}):
        units += [Unit(n, g) for n in firsts for g in reader_groups(n) if rank.get(g, 2) == r]
    return units + [Unit(n, g) for n in norms if n.role == "final" for g in reader_groups(n)]


def schedule(units: list[str], options: RemovalOptions,
             releases: tuple[str, ...] = RELEASES) -> dict[int, list[list[str]]]:
    """The events starting at each step: freezes (or swaps) of `per_freeze` units `gap` steps apart, then the
    releases, `gap` steps apart after the last one has ramped in."""
    events = [units[i : i + options.per_freeze] for i in range(0, len(units), options.per_freeze)]
    gap, ramp = options.gap or 0, options.ramp or 1
    due: dict[int, list[list[str]]] = {}
    for i, names in enumerate(events):
        due.setdefault(i * gap, []).append(names)
    last = (len(events) - 1) * gap + ramp - 1
    for i, release in enumerate(releases):
        due.setdefault(last + (i + 1) * gap, []).append([release])
    return due


def total_steps(units: int, options: RemovalOptions, releases: tuple[str, ...] = RELEASES) -> int:
    """Fine-tune steps of the whole schedule: the events, the last one's ramp, then the heal."""
    due = schedule([str(i) for i in range(units)], options, releases)
    return max(1, max(due) + (options.ramp or 1) - 1 + (options.heal or 0))


def ramp_fraction(steps_since_start: int, ramp: int) -> float:
    """How far a ramp begun `steps_since_start` steps ago has gone: 1/ramp at its first step, 1 after `ramp`."""
    return 0.0 if steps_since_start < 0 else min(1.0, (steps_since_start + 1) / max(1, ramp))


def calibration_batches(tokenizer: Any, seq_len: int, batch_size: int, count: int) -> list[torch.Tensor]:
    """Fixed batches of the Shakespeare calibration split for the scale statistics (seeded random windows)."""
    return list(sample(tokenizer, seq_len=seq_len, sequences=batch_size * count, seed=1)[0].split(batch_size))


def heldout_batches(tokenizer: Any, seq_len: int, batch_size: int = 8) -> list[torch.Tensor]:
    """A fixed held-out sample of about HELDOUT_TOKENS tokens for the report's cross-entropy (evaluation only)."""
    count = max(1, HELDOUT_TOKENS // (batch_size * seq_len))
    return list(sample(tokenizer, seq_len=seq_len, sequences=batch_size * count, split="heldout", seed=2)[0]
                .split(batch_size))


@torch.no_grad()
def measure(model: torch.nn.Module, groups: list[ScaleGroup], batches: list[torch.Tensor]) -> list[float]:
    """Measure the groups' mean divisors on calibration batches with the model as it is now (their freezes begin)."""
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    for group in groups:
        group.start_collecting()
    for batch in batches:
        model(input_ids=batch.to(device))
    scales = [group.measure() for group in groups]
    model.train(training)
    return scales


def auxiliary_loss(final: ScaleGroup, groups: list[ScaleGroup], options: RemovalOptions) -> torch.Tensor:
    """Baroni et al.'s spread of the final norm's scale (`aux_weight`, from the start) plus the mean spread of every
    frozen path about its frozen scale (`spread_weight`, each path from its freeze on), so that the model unlearns
    the tokens a constant cannot fit while the token bound still holds them."""
    loss = options.aux_weight * scale_spread(final) if options.aux_weight else torch.zeros(())
    frozen = [g for g in groups if g.measured and float(g.mix) > 0] if options.spread_weight else []
    if frozen:
        loss = loss + options.spread_weight * torch.stack([frozen_spread(g) for g in frozen]).mean()
    return loss


def remove_norms(
    model: torch.nn.Module,
    tokenizer: Any,
    arch: Architecture,
    options: RemovalOptions,
    *,
    teacher: torch.nn.Module | None,
    special_ids: list[int] = (),
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[dict[str, dict[str, float]], list[RemovalEvent], FinetuneResult, float]:
    """Freeze every reader path of every removable norm on schedule while fine-tuning, then release the special
    scales; returns the scales (norm -> group -> scale), the events, the fine-tune's losses and the held-out CE
    before anything changed."""
    norms = removable_norms(arch)
    units = removal_units(arch, norms)
    groups = install(model, norms, list(special_ids), arch.key_renames)
    seq_len = min(options.finetune.seq_len, CALIBRATION_SEQ_LEN)
    calib = calibration_batches(tokenizer, seq_len, CALIBRATION_SEQUENCES, options.calibration_batches)
    before = cross_entropy(model, heldout_batches(tokenizer, options.finetune.seq_len))
    due = schedule([u.name for u in units], options)
    options.finetune.steps = total_steps(len(units), options)
    begins = {n: step for step, listed in due.items() for names in listed for n in names}  # a resumed run's too
    events: list[RemovalEvent] = []

    def advance(step: int) -> None:
        """Begin the events due at `step`, then set every ramp for the step about to run."""
        for names in due.pop(step, []):
            if names[0] in RELEASES:
                events.append(RemovalEvent(step, names[0], None))
                continue
            todo = [groups[n] for n in names if not groups[n].measured]  # measured: in a checkpoint resumed from
            for group, scale in zip(todo, measure(model, todo, calib) if todo else []):
                if not math.isfinite(scale) or scale <= 0:
                    raise NormSurgeryError(f"{group.name} measured a scale of {scale} on the calibration text; the "
                                           "model diverged. Lower --lr or raise --gap.")
                events.append(RemovalEvent(step, group.name, scale))
        for name, begin in begins.items():
            if begin > step:
                continue
            fraction = ramp_fraction(step - begin, options.ramp or 1)
            if name in RELEASES:
                for group in groups.values():
                    group.release(name, fraction)
            elif groups[name].measured:
                groups[name].set_mix(fraction)

    advance(0)

    def after_step(step: int, loss: float) -> None:
        advance(step + 1)
        if on_step:
            on_step(step, loss)

    extra_loss = None
    if options.aux_weight or options.spread_weight:
        final = next(groups[u.name] for u in units if u.norm.role == "final")
        for group in groups.values() if options.spread_weight else [final]:
            group.track = True
        extra_loss = lambda: auxiliary_loss(final, list(groups.values()), options)  # noqa: E731
    try:
        result = finetune(model, tokenizer, options.finetune, teacher=teacher, on_step=after_step, extra_loss=extra_loss)
    finally:
        for group in groups.values():
            group.track, group.live, group.ordinary = False, None, None
    for step in sorted(due):  # events a resumed run had passed, or (never otherwise) left over
        advance(step)
    for group in groups.values():  # the schedule ends fully frozen and released; make it so exactly
        group.set_mix(1.0)
        for which in RELEASES:
            group.release(which)
    scales: dict[str, dict[str, float]] = {}
    for group in groups.values():
        scales.setdefault(group.norm_name, {})[group.group] = float(group.scale)
    return scales, events, result, before
