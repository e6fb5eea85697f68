"""DyT and Derf in place of every norm (Zhu et al. 2025; zlab-princeton 2025), on a loaded model.

LayerNorm models are centred first (exact: the writers' outputs made zero-mean, see center.py), because
DyT/Derf do not subtract the mean. Each swap keeps the norm's gain (Gemma's 1 + w included) and bias, and
gets its alpha (and Derf's shift) from calibration statistics: the norm's inputs on calibration text and
its normalised outputs x / sqrt(mean square + eps). `--alpha-init` chooses how (trainable.options.ALPHA_INITS):
- `best-mse` (the default): the better, by that fit's error, of the two below;
- `scale`: alpha = 1/s (s the typical scale) with the gain unchanged (tanh(a x) ~ a x near 0; erf(a x) ~
  2 a x / sqrt(pi));
- `least-squares`: the alpha of a least-squares fit of the squashed input to the normalised output;
- `linear`: the frozen-scale linearisation, made to hold: alpha = 0.1/s and the gain times 10, so that
  g' tanh(a x) = g x / s within 3% for |x| < 3 s and only tokens 10x the typical scale saturate. On smollm2-135m it
  is the best start before any training (the MLP-input norms swapped: +4.6 nats, against +9.4 for `scale` and
  +8.9 for `least-squares`; bench/swap_ablation.py), but not after a 10-minute CPU fine-tune (README).

The swaps are made progressively, as LN removal freezes (`swap_norms`: MLP-input norms, then attention-input
norms, then the final norm, `gap` distillation steps apart, each calibrated on the model as it is by then), and
the model is then healed by distillation (the fine-tune engine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from normsurgery.arch.spec import Architecture, Norm
from normsurgery.finetune.engine import FinetuneResult, finetune
from normsurgery.export.modeling_normsurgery import DynamicErf, DynamicTanh
from normsurgery.rewrite.center import center_embedding_step, center_position_step, center_writer_step
from normsurgery.rewrite.plan import Surgery
from normsurgery.trainable.remove_ln import CALIBRATION_SEQ_LEN, CALIBRATION_SEQUENCES

SWAPS = {"dyt": DynamicTanh, "derf": DynamicErf}
CALIBRATION_TOKENS = 4096  # token vectors kept per norm for the alpha fit
ALPHA_GRID = torch.logspace(-2, 2, 41, dtype=torch.float64)  # times the typical-scale alpha; then refined
REFINE_POINTS = 21  # a finer grid between the best coarse point's neighbours
LINEAR_FRACTION = 0.1  # `linear`: alpha as a fraction of the typical-scale alpha (the gain grows by its inverse)
SWAP_CALIBRATION_BATCHES = max(1, CALIBRATION_TOKENS // (CALIBRATION_SEQUENCES * CALIBRATION_SEQ_LEN))


@dataclass
class AlphaInit:
    """How one norm's swap was initialised: both candidates' errors and the one kept."""

    norm: str
    alpha: float
    shift: float
    method: str  # "linear", "scale" or "least-squares"
    mse_scale: float
    mse_least_squares: float
    gain: float = 1.0  # factor on the norm's gain (`linear`: 1 / LINEAR_FRACTION)


def _param(model: nn.Module, name: str) -> nn.Parameter:
    module, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module), attr)


@torch.no_grad()
def center_in_memory(model: nn.Module, arch: Architecture) -> None:
    """Make every writer of a loaded Pre-LN LayerNorm model zero-mean (unchanged outputs), untying a tied
    unembedding first so that it keeps the original rows."""
    if arch.tied:
        output = model.get_output_embeddings()
        output.weight = nn.Parameter(model.get_input_embeddings().weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    steps = [center_embedding_step(arch, "rmsnorm")]
    if arch.position_embedding:
        steps.append(center_position_step(arch.position_embedding, "rmsnorm"))
    steps += [center_writer_step(w, "rmsnorm") for b in arch.blocks for w in b.writers]
    for step in steps:
        outputs = step.compute({n: _param(model, n).detach().clone() for n in step.inputs})
        for name, tensor in outputs.items():
            target = _param(model, name)
            target.copy_(tensor.to(target.dtype))


@torch.no_grad()
def norm_inputs(model: nn.Module, norms: list[Norm], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Up to CALIBRATION_TOKENS input vectors of each norm on the calibration batches (float64)."""
    seen: dict[str, list[torch.Tensor]] = {n.name: [] for n in norms}

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            if sum(t.shape[0] for t in seen[name]) < CALIBRATION_TOKENS:
                seen[name].append(x.cpu())
        return record

    handles = [model.get_submodule(n.name).register_forward_pre_hook(hook(n.name)) for n in norms]
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            model(input_ids=batch.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    return {name: torch.cat(xs)[:CALIBRATION_TOKENS] for name, xs in seen.items()}


def fit_alpha(x: torch.Tensor, norm: Norm, target: str, init: str = "best-mse") -> AlphaInit:
    """Alpha (shift 0) and gain factor for one norm from its calibration inputs `x`, by the rule `init`
    (trainable.options.ALPHA_INITS); the report carries the fit errors of the typical-scale and least-squares alphas either way."""
    if norm.kind == "layernorm":
        x = x - x.mean(dim=-1, keepdim=True)  # already ~0 after centring; exact for the fit
    z = x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + norm.eps)
    scale = float(torch.sqrt(x.pow(2).mean(dim=-1) + norm.eps).mean())
    squash = torch.tanh if target == "dyt" else torch.erf
    typical = (1.0 if target == "dyt" else math.sqrt(math.pi) / 2) / scale

    def mse(alpha: float, xs: torch.Tensor = x, zs: torch.Tensor = z) -> float:
        return float((squash(alpha * xs) - zs).pow(2).mean())

    # the search runs in float32 (a few times faster; a fit over 61 norms of 4096 x 576 inputs took minutes in
    # float64 on a grid of 161), coarse then fine: as fine as that grid near the best alpha, in 62 evaluations
    x32, z32 = x.float(), z.float()
    coarse = [typical * float(g) for g in ALPHA_GRID]
    errors = [mse(a, x32, z32) for a in coarse]
    i = min(range(len(coarse)), key=errors.__getitem__)
    low, high = coarse[max(i - 1, 0)], coarse[min(i + 1, len(coarse) - 1)]
    fine = torch.logspace(math.log10(low), math.log10(high), REFINE_POINTS, dtype=torch.float64).tolist()
    best = min([coarse[i], *fine], key=lambda a: mse(a, x32, z32))
    mse_typical, mse_best = mse(typical), mse(best)
    if init == "linear":
        return AlphaInit(norm.name, LINEAR_FRACTION * typical, 0.0, "linear", mse_typical, mse_best,
                         1.0 / LINEAR_FRACTION)
    keep_ls = init == "least-squares" or (init == "best-mse" and mse_best < mse_typical)
    return AlphaInit(norm.name, best if keep_ls else typical, 0.0, "least-squares" if keep_ls else "scale",
                     mse_typical, mse_best)


def time_fit(norm: Norm, target: str, hidden: int) -> float:
    """Seconds one alpha fit of `norm` takes here, on random inputs of the calibration's shape (the sizer counts it
    for every norm: 0.3 s each for smollm2-135m's 61 on a 2-core CPU)."""
    import time

    x = torch.randn(CALIBRATION_TOKENS, hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    fit_alpha(x, norm, target)
    return time.perf_counter() - start


class SwappableNorm(nn.Module):
    """A norm that becomes DyT/Derf when `swap` is called, in float32. It keeps the norm's parameters under their
    names and has DyT/Derf's (`alpha`, Derf's `shift`, a `weight` for a norm without a gain) from the start, so
    that the optimizer built before the first step trains each of them once its swap is made. Alpha and shift are
    one-element vectors, since FSDP2 cannot shard a scalar parameter; the output stores them as DyT/Derf's scalars
    (`exported_state`)."""

    def __init__(self, norm: Norm, original: nn.Module, target: str, dim: int) -> None:
        super().__init__()
        self.target, self.center, self.eps = target, norm.kind == "layernorm", norm.eps
        self.gain_offset = norm.gain_offset
        self.has_gain = norm.weight is not None
        self.weight = original.weight if norm.weight else nn.Parameter(torch.ones(dim))
        self.bias = original.bias if norm.bias else None
        device = self.weight.device
        self.alpha = nn.Parameter(torch.ones(1, device=device))
        if target == "derf":
            self.shift = nn.Parameter(torch.zeros(1, device=device))
        # buffers, so that a resumed run gets them back: whether the swap has begun, and how far (0 norm, 1 swap)
        self.register_buffer("swapped", torch.tensor(False, device=device))
        self.register_buffer("mix", torch.tensor(0.0, device=device))
        # factor on the gain inside DyT/Derf only (alpha-init `linear`), folded into the exported gain
        self.register_buffer("squash_gain", torch.tensor(1.0, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        mix = float(self.mix) if bool(self.swapped) else 0.0
        if mix > 0:
            z = self.alpha.float() * y + (self.shift.float() if self.target == "derf" else 0.0)
            squashed = (torch.tanh(z) if self.target == "dyt" else torch.erf(z)) * (self.weight.float() * self.squash_gain)
        if mix < 1:
            if self.center:
                y = y - y.mean(dim=-1, keepdim=True)
            y = y * torch.rsqrt(y.pow(2).mean(dim=-1, keepdim=True) + self.eps)
            if self.has_gain:
                y = y * (self.weight.float() + self.gain_offset)
        y = squashed if mix >= 1 else y if mix <= 0 else mix * squashed + (1 - mix) * y
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    @torch.no_grad()
    def swap(self, alpha: float, gain: float = 1.0) -> None:
        """Begin the swap: DyT/Derf with this alpha, the norm's effective gain times `gain` and its bias, blended
        in as `mix` goes from 0 to 1 (the norm's own output keeps its gain meanwhile)."""
        if self.has_gain and self.gain_offset:
            self.weight.add_(self.gain_offset)
            self.gain_offset = 0.0
        self.squash_gain.fill_(gain)
        self.alpha.fill_(alpha)
        self.swapped.fill_(True)

    def set_mix(self, value: float) -> None:
        """How far the output has moved from the norm's (0) to DyT/Derf's (1)."""
        self.mix.fill_(min(1.0, max(0.0, value)))


def install_swappable(model: nn.Module, norms: list[Norm], target: str) -> dict[str, SwappableNorm]:
    """Put a SwappableNorm, not yet swapped, in place of each norm."""
    found = {}
    for norm in norms:
        original = model.get_submodule(norm.name)
        stand_in = SwappableNorm(norm, original, target, int(model.config.get_text_config().hidden_size))
        parent, _, attr = norm.name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, stand_in)
        found[norm.name] = stand_in
    return found


def swap_order(units: list[Any]) -> list[str]:
    """The norms in the order of the removal schedule's units (each norm once, at its first unit)."""
    seen: list[str] = []
    for unit in units:
        if unit.norm.name not in seen:
            seen.append(unit.norm.name)
    return seen


def swap_norms(
    model: nn.Module,
    tokenizer: Any,
    norms: list[Norm],
    target: str,
    order: list[str],
    options: Any,
    *,
    teacher: nn.Module | None,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[dict[str, AlphaInit], list[dict[str, Any]], FinetuneResult]:
    """Swap the norms for DyT/Derf in `order`, `options.per_freeze` at a time and `options.gap` distillation steps
    apart (gap 0: all at once), each alpha fitted on the model as it is just before its swap and blended in over
    `options.ramp` steps; then heal for `options.heal` steps. Returns the initialisations, the events and the
    fine-tune's losses."""
    from normsurgery.trainable.remove_ln import (
        calibration_batches,
        ramp_fraction,
        schedule,
        total_steps,
    )

    by_name = {n.name: n for n in norms}
    stand_ins = install_swappable(model, norms, target)
    calib = calibration_batches(tokenizer, min(options.finetune.seq_len, CALIBRATION_SEQ_LEN), CALIBRATION_SEQUENCES,
                                SWAP_CALIBRATION_BATCHES)
    due = schedule(order, options, releases=())
    ramp = options.ramp or 1
    options.finetune.steps = total_steps(len(order), options, releases=())
    inits: dict[str, AlphaInit] = {}
    events: list[dict[str, Any]] = []
    begins = {n: step for step, listed in due.items() for names in listed for n in names}  # a resumed run's too

    def run_due(step: int) -> None:
        for names in due.pop(step, []):
            todo = [by_name[n] for n in names if not bool(stand_ins[n].swapped)]  # swapped: a resumed run
            inputs = norm_inputs(model, todo, calib) if todo else {}
            for norm in todo:
                inits[norm.name] = fit_alpha(inputs[norm.name], norm, target, options.alpha_init)
                stand_ins[norm.name].swap(inits[norm.name].alpha, inits[norm.name].gain)
                events.append({"step": step, "unit": norm.name, "scale": inits[norm.name].alpha})
        for name, begin in begins.items():
            if begin <= step and bool(stand_ins[name].swapped):
                stand_ins[name].set_mix(ramp_fraction(step - begin, ramp))

    run_due(0)

    def after_step(step: int, loss: float) -> None:
        run_due(step + 1)
        if on_step:
            on_step(step, loss)

    result = finetune(model, tokenizer, options.finetune, teacher=teacher, on_step=after_step)
    for step in sorted(due):
        run_due(step)
    for stand_in in stand_ins.values():  # the schedule ends fully swapped; make it so exactly
        stand_in.set_mix(1.0)
    return inits, events, result



def exported_state(state: dict[str, torch.Tensor], norms: list[Norm], target: str) -> dict[str, torch.Tensor]:
    """The trained state as DyT/Derf store it: each swap's alpha and Derf's shift a scalar, its gain factor
    (`squash_gain`) folded into the gain."""
    scalars = {f"{n.name}.{p}" for n in norms for p in ["alpha"] + (["shift"] if target == "derf" else [])}
    out = {name: tensor.reshape(()) if name in scalars else tensor for name, tensor in state.items()}
    for norm in norms:
        factor = state.get(f"{norm.name}.squash_gain")
        if factor is not None:
            weight = state[f"{norm.name}.weight"]
            out[f"{norm.name}.weight"] = (weight.float() * factor.float()).to(weight.dtype)
    return out


def swapped_tensor_names(norms: list[Norm], target: str) -> list[str]:
    """The new tensors a swap adds (alpha, and Derf's shift) beside the norms' weight and bias."""
    extra = ["alpha"] + (["shift"] if target == "derf" else [])
    return [f"{n.name}.{p}" for n in norms for p in extra] + [f"{n.name}.weight" for n in norms if not n.weight]


def plan_surgery(arch: Architecture, norms: list[Norm], target: str) -> Surgery:
    """The exported code's view: which norms became DyT/Derf (and with a bias or not)."""
    return Surgery.of(target, arch, {n.name: {"kind": target, "dim": arch.hidden_size, "bias": n.bias is not None}
                                     for n in norms})
