"""Schedules sized by the model, the device and a budget (`--budget 30min`, `--budget 20M` tokens).

The learning rate falls with the parameter count (3e-3 suits our 1.35M-parameter model, Baroni et al. used 6e-4
for GPT-2 small and 1e-4 to 2.5e-4 for the larger ones), the tokens per step are what the device digests well,
and the budget becomes a number of steps from a timed probe step. The steps are shared between the gaps of the
schedule (freezes or swaps) and the heal after the last event; when the budget has fewer gaps than the schedule
has events, several units share one event. No schedule runs longer than a size-scaled cap: 30 gaps of 1k tokens
per unit and a 300-step heal suffice for the 1.35M model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

from normsurgery.errors import NormSurgeryError

DEFAULT_BUDGET = "30min"
REFERENCE_PARAMETERS = 1.35e6  # gpt2-shakespeare, where lr 3e-3, gap 30 and heal 300 were measured
TOKENS_PER_STEP = {"cpu": 1024, "cuda": 8192}
HEAL_SHARE = 0.3  # of the budget's steps, for the heal after the last event
RAMP_GAPS = 4  # a gradual freeze takes this many gaps (several paths ramp at once)
_UNITS = {"s": 1, "sec": 1, "min": 60, "h": 3600}
_MULTIPLIERS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


@dataclass(frozen=True)
class Budget:
    """What `--budget` allows: wall-clock seconds or training tokens (exactly one is set)."""

    seconds: float | None = None
    tokens: int | None = None

    def describe(self) -> str:
        return f"{self.seconds / 60:.3g} min" if self.seconds is not None else f"{self.tokens:,} tokens"


def parse_budget(text: str) -> Budget:
    """'30min', '2h', '900s' (time) or '20M', '500k', '1e6' (training tokens); a bare '30m' is refused as
    ambiguous."""
    if re.fullmatch(r"\s*\d+(?:\.\d+)?\s*m\s*", text):
        raise NormSurgeryError(f"--budget {text!r} is ambiguous: write {text.strip()[:-1]}min for minutes or "
                               f"{text.strip()[:-1]}M for million training tokens.")
    value = text.strip().lower().replace(" ", "")
    timed = re.fullmatch(r"(\d+(?:\.\d+)?)(s|sec|min|h)", value)
    if timed:
        return Budget(seconds=float(timed.group(1)) * _UNITS[timed.group(2)])
    counted = re.fullmatch(r"(\d+(?:\.\d+)?(?:e\d+)?)([kmg]?)(?:tok|tokens)?", value)
    if counted and float(counted.group(1)) > 0:
        return Budget(tokens=int(float(counted.group(1)) * _MULTIPLIERS[counted.group(2)]))
    raise NormSurgeryError(f"--budget {text!r} is neither a time (30min, 2h, 900s) nor a token count (20M, 500k); "
                           "give one of those.")


def sized_lr(parameters: int) -> float:
    """AdamW's peak learning rate for a fine-tune of a model with `parameters` parameters."""
    return float(min(3e-3, max(1e-4, 3e-3 * (REFERENCE_PARAMETERS / max(parameters, 1)) ** 0.35)))


def tokens_per_step(device_type: str) -> int:
    """Tokens per step an unset --batch-size keeps: about 1k on a CPU, 8k on a GPU."""
    return TOKENS_PER_STEP.get(device_type, TOKENS_PER_STEP["cuda"])


def cap_gap(parameters: int) -> int:
    """The most steps (of about 1k tokens) worth spending per schedule event for a model of this size."""
    return max(1, round(30 * math.sqrt(max(parameters, 1) / REFERENCE_PARAMETERS)))


@dataclass
class Sized:
    """A schedule chosen for a budget: what it runs and what it should cost."""

    steps: int
    gap: int
    heal: int
    per_freeze: int
    ramp: int
    seconds_per_step: float
    estimate_seconds: float

    def describe(self, events_name: str, units: int) -> str:
        grouped = f"{self.per_freeze} at a time, " if self.per_freeze > 1 else ""
        ramp = f", each over {self.ramp} steps" if self.ramp > 1 else ""
        return (f"{units} {events_name}, {grouped}every {self.gap} steps{ramp}, then {self.heal} healing steps: "
                f"{self.steps} steps, about {_minutes(self.estimate_seconds)}")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def size_schedule(units: int, releases: int, *, budget: Budget, parameters: int, step_tokens: int,
                  seconds_per_step: float, seconds_per_event: float, fixed_seconds: float,
                  used: Callable[[int, int, int], int], ramps: bool = True, seconds_per_unit: float = 0.0) -> Sized:
    """Steps, gap, ramp, heal and units per event that fit the budget: about 70% of the steps for the events
    (every event at least one step apart), the rest healing; never more than the size-scaled cap. `used(gap,
    per_freeze, ramp)` is how many steps the events of such a schedule take before the heal. An event costs
    `seconds_per_event` (its calibration) and each unit in it `seconds_per_unit` (a swap's alpha fit)."""
    if budget.tokens is not None:
        steps = max(1, budget.tokens // step_tokens)
    else:
        assert budget.seconds is not None
        spare = budget.seconds - fixed_seconds - (units + releases) * seconds_per_event - units * seconds_per_unit
        steps = max(1, int(spare / max(seconds_per_step, 1e-6)))
    cap = max(1, round(cap_gap(parameters) * 1024 / step_tokens))
    between = max(0, int(steps * (1 - HEAL_SHARE)))

    def ramp_of(gap: int) -> int:
        return max(1, RAMP_GAPS * gap) if ramps else 1

    fitting = [g for g in range(1, cap + 1) if used(g, 1, ramp_of(g)) <= between]
    if fitting:
        per_freeze, gap = 1, fitting[-1]
    else:  # fewer steps than events: several units per event, one step apart (or all at once)
        per_freeze = next((p for p in range(2, units + 1) if used(1, p, ramp_of(1)) <= between), units)
        gap = 1 if used(1, per_freeze, ramp_of(1)) <= between else 0
    ramp = ramp_of(gap)
    taken = used(gap, per_freeze, ramp)
    heal = max(1, min(10 * cap, steps - taken))
    total = taken + heal
    frozen_events = math.ceil(units / per_freeze) + releases
    estimate = (fixed_seconds + total * seconds_per_step + frozen_events * seconds_per_event
                + units * seconds_per_unit)
    return Sized(total, gap, heal, per_freeze, ramp, seconds_per_step, estimate)
