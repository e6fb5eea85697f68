"""Normalization removal written as a stock model: every removed norm kept as its stock module, made inert.

A norm with eps = STOCK_EPS = 2^66 and gain w computes w * P x / sqrt(var(P x) + 2^66) + b, P the centring of a
LayerNorm (the identity for an RMSNorm). In float32, var + 2^66 rounds to 2^66 whenever var < 2^42 (a residual
RMS below 2 million; above it the divisor is off by var / 2^67 relatively), and 1/sqrt(2^66) = 2^-33 is a power of
two, so the norm computes w * 2^-33 * P x + b with no other rounding than the gain's own: a fixed linear map (an
RMSNorm with gain 2^33 returns its input bit for bit, in float32 and bfloat16). Each removed norm is frozen at one
scale per reader path (trainable/stand_ins.py: each path computes g * P x / s + b, subtracting the mean live,
frozen or not), so:

- a norm whose readers form one path keeps its frozen map itself: gain 2^33 g / s (stored as w with the family's
  `(1 + w)` offset taken off), bias b, its readers unchanged;
- a norm read by several paths (Q/K and V of an attention input) gains 2^33 and bias 0, so it computes P x, and
  each reader's output slice takes its path's g / s and b as `convert --to none --export native` folds them
  (rewrite/remove.py); a bias b needs every reader to have a bias to take it.

The stock LayerNorm subtracts the mean as the trained stand-ins did, so no writer is centred and a tied
unembedding stays tied. Powers of two keep eps, 2^33 and 2^-33 exact in float32 and bfloat16 alike; float16 cannot
hold a gain of 2^33, and a norm that must stay live (a per-head QK-norm) cannot share the huge eps, so such models,
and families whose eps is not a config.json key, cannot be written this way (`stock_problem`).
"""

from __future__ import annotations

from typing import Any

import torch

from normsurgery.arch import FAMILY_BY_MODEL_TYPE, raw_key
from normsurgery.arch.spec import Architecture, Norm, reader_groups
from normsurgery.rewrite.maths import effective_gain
from normsurgery.rewrite.plan import Plan, Step
from normsurgery.rewrite.remove import frozen_norm_step

Tensor = torch.Tensor
STOCK_EPS = 2.0**66  # about 7.4e19: see the module docstring
STOCK_ROOT = 2.0**33  # sqrt(STOCK_EPS), exact


class _Reads:
    """A stand-in config that records which attributes a family's eps reader asks for."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __getattr__(self, name: str) -> float:
        self.names.append(name)
        return 1e-5


def eps_attribute(arch: Architecture) -> str | None:
    """The config attribute the family reads its norms' eps from, or None when transformers fixes it in code."""
    family = FAMILY_BY_MODEL_TYPE.get(arch.model_type)
    if family is None:  # a traced family: its eps key is not declared (stock export is refused)
        return None
    reads = _Reads()
    family.eps(reads)
    return reads.names[0] if len(reads.names) == 1 else None


def stock_problem(arch: Architecture, norms: list[Norm], dtype: torch.dtype) -> str | None:
    """Why removing `norms` cannot be written as a stock model of this architecture stored in `dtype`, or None."""
    if arch.origin == "traced":
        return f"{arch.model_type} has no declared family (it was traced), so its eps key in config.json is not known"
    if eps_attribute(arch) is None:
        return (f"transformers' {arch.family} code fixes its norms' eps instead of reading it from config.json, so "
                "it cannot be made huge")
    removed = {n.name for n in norms}
    live = [n.name for n in arch.all_norms() if n.name not in removed]
    if live:
        return (f"its {len(live)} norms that stay live ({', '.join(live[:2])}, ...; per-head QK-norms) read the same "
                f"eps ({eps_attribute(arch)}), which a huge value would switch off")
    if any(n.weight is None for n in norms):
        return "its norms have no gain to undo the huge eps"
    if dtype == torch.float16:
        return "a float16 checkpoint cannot hold the gain of 2^33 that undoes the huge eps (float32 and bfloat16 can)"
    for norm in norms:
        if norm.bias and len(reader_groups(norm)) > 1 and any(r.bias is None for r in norm.readers):
            return (f"{norm.name} is read on several paths frozen at different scales, so its bias must move into its "
                    f"readers, and {next(r.weight for r in norm.readers if r.bias is None)} has no bias in the "
                    "stock class")
    return None


def _carried_step(norm: Norm, arch: Architecture, scale: float) -> Step:
    """A one-path norm keeps its frozen map: gain 2^33 g / s (its bias is copied as it is)."""
    def compute(t: dict[str, Tensor]) -> dict[str, Tensor]:
        gain = effective_gain(t[norm.weight], norm.gain_offset, arch.hidden_size).to(torch.float64)
        return {norm.weight: gain * (STOCK_ROOT / scale) - norm.gain_offset}

    return Step(f"make {norm.name} inert", (norm.weight,), compute)


def _identity_step(norm: Norm, arch: Architecture, scales: dict[str, float]) -> Step:
    """A several-path norm folds each path's g / s and b into its readers' slices and computes P x itself."""
    fold = frozen_norm_step(norm, arch, scales, None)

    def compute(t: dict[str, Tensor]) -> dict[str, Tensor]:
        out = fold.compute(t)
        out[norm.weight] = torch.full((arch.hidden_size,), STOCK_ROOT - norm.gain_offset, dtype=torch.float64)
        if norm.bias:
            out[norm.bias] = torch.zeros(arch.hidden_size, dtype=torch.float64)
        return out

    return Step(f"make {norm.name} inert", fold.inputs, compute)


def plan_stock_remove(arch: Architecture, raw: dict[str, Any], scales: dict[str, dict[str, float]]) -> Plan:
    """The plan that writes the norms named in `scales` (frozen at one scale per reader path) as inert stock norms;
    `raw` is config.json, whose eps key is set to STOCK_EPS. The caller has checked `stock_problem`."""
    plan = Plan(operation="none")
    for norm in arch.all_norms():
        if norm.name not in scales:
            continue
        own = scales[norm.name]  # one scale per reader path
        step = _carried_step(norm, arch, *own.values()) if len(own) == 1 else _identity_step(norm, arch, own)
        plan.steps.append(step)
        plan.folded.append(norm.name)
    plan.config_updates[raw_key(raw, str(eps_attribute(arch)))] = STOCK_EPS
    return plan
