"""Stand-ins for a loaded model's norms whose per-token divisor can be frozen, one per reader path.

A norm's module becomes a pass-through that keeps its parameters (so state_dict names do not change); each group
of its readers (an input norm's Q/K projections, its V projection, the MLP's projections: `Linear.groups` in the
family declaration) computes the norm itself, with its own divisor. Baroni et al. freeze those paths at different
steps; doing it at the readers needs no per-family attention code. A frozen group divides ordinary tokens by one
constant and, until they are released at the end of the schedule, position 0 (the attention sink) and the
tokenizer's special tokens by constants of their own, and no token's normalised input may exceed a few times an
ordinary one's (massive activations: through a gated MLP a frozen one grows quadratically, block after block,
and overflows); the bound is lifted gradually at the end. Freezing and releasing can be gradual: the divisor moves
from the live one to the constant geometrically, live^(1 - m) * s^m, as `mix` m goes from 0 to 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normsurgery.arch.facts import EXPERTS_FUSED, POSITIONS_COMPUTED, has_experts
from normsurgery.arch.spec import DEFAULT_GROUP, Architecture, Linear, Norm, reader_groups
from normsurgery.errors import NormSurgeryError

class TokenContext:
    """Which tokens of the current batch are special (BOS, end-of-text...): set by a pre-hook on the model."""

    def __init__(self, special_ids: list[int]) -> None:
        self.special_ids = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
        self.special: torch.Tensor | None = None  # (batch, seq) bool, or None when no batch has been seen

    def see(self, input_ids: torch.Tensor | None) -> None:
        """Record the special-token mask of the batch about to run."""
        if input_ids is None or not self.special_ids.numel():
            self.special = None
            return
        self.special = torch.isin(input_ids, self.special_ids.to(input_ids.device))


class ScaleGroup(nn.Module):
    """A norm as seen by one group of its readers, computed in float32: LayerNorm or RMSNorm whose divisor
    sqrt(mean square + eps) is live, frozen (`mix` 1), or on the way between (0 < mix < 1).

    The frozen divisor is `scale` for ordinary tokens and `first` / `special` for position 0 / special tokens,
    which move onto `scale` as their release (0 to 1) goes on. While `collect` is on it sums its live divisors
    apart for those three kinds of token (the calibration statistics); while `track` is on it keeps the last
    forward's live divisors, with their graph, for the auxiliary loss.
    """

    def __init__(self, norm: Norm, owner: "NormPassthrough", group: str, context: TokenContext) -> None:
        super().__init__()
        self.norm_name, self.group = norm.name, group
        self.center = norm.kind == "layernorm"
        self.eps = norm.eps
        self.gain_offset = norm.gain_offset
        self._owner = [owner]  # not a submodule: the owner holds the parameters under their original names
        self._context = context
        # buffers, so that a resumed run gets them back. NaN: not measured yet (first/special: none seen)
        self.register_buffer("scale", torch.tensor(float("nan")))
        self.register_buffer("first", torch.tensor(float("nan")))
        self.register_buffer("special", torch.tensor(float("nan")))
        self.register_buffer("mix", torch.tensor(0.0))
        # outlier tokens, special tokens, position 0: 0 kept apart, 1 on the ordinary scale
        self.register_buffer("released", torch.zeros(len(RELEASE_INDEX)))
        self.collect = False
        self.track = False
        self.live: torch.Tensor | None = None
        self.ordinary: torch.Tensor | None = None  # mask of the ordinary tokens of the tracked forward
        self._sums = torch.zeros(3, dtype=torch.float64)  # ordinary, first, special
        self._counts = torch.zeros(3, dtype=torch.float64)
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def name(self) -> str:
        return f"{self.norm_name}[{self.group}]"

    @property
    def measured(self) -> bool:
        """Whether the frozen scales have been measured (the path's freeze has begun)."""
        return not bool(torch.isnan(self.scale))

    @property
    def frozen(self) -> bool:
        """Whether the divisor is fully fixed, special tokens and position 0 on the ordinary scale included."""
        return self.measured and float(self.mix) >= 1 and bool((self.released >= 1).all())

    def masks(self, shape: torch.Size, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(position 0, special token) masks for a (batch, seq) activation."""
        first = torch.zeros(shape, dtype=torch.bool, device=device)
        if len(shape) > 1:
            first[:, 0] = True
        special = self._context.special
        if special is None or special.shape != shape:
            special = torch.zeros(shape, dtype=torch.bool, device=device)
        return first, special & ~first

    def _target(self, own: torch.Tensor, released: float) -> float | None:
        """The frozen divisor of a special kind of token: its own scale moved geometrically onto the ordinary one."""
        if torch.isnan(own) or released >= 1:
            return None
        return float(torch.exp((1 - released) * own.double().log() + released * self.scale.double().log()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._cache is not None and self._cache[0] is x:  # q and k read the same group: compute it once
            return self._cache[1]
        y = x.float()
        if self.center:
            y = y - y.mean(dim=-1, keepdim=True)
        live = torch.sqrt(y.pow(2).mean(dim=-1) + self.eps)
        first, special = self.masks(live.shape, live.device)
        if self.collect:
            detached = live.detach().double()
            for i, mask in enumerate((~first & ~special, first, special)):
                self._sums[i] += float(detached[mask].sum())
                self._counts[i] += int(mask.sum())
        if self.track:
            self.live, self.ordinary = live, ~first & ~special
        mix = float(self.mix)
        if self.measured and mix > 0:
            target = torch.full_like(live, float(self.scale))
            for mask, own, which in ((first, self.first, "first"), (special, self.special, "special")):
                value = self._target(own, float(self.released[RELEASE_INDEX[which]]))
                if value is not None:
                    target = torch.where(mask, torch.full_like(live, value), target)
            outliers = float(self.released[RELEASE_INDEX["outliers"]])
            if outliers < 1:  # no token's normalised input above OUTLIER x unit RMS: frozen, a token far from its
                # scale (a massive activation, a sink unlike the calibration's) grows quadratically through gated
                # MLPs, block after block, and overflows. The bound is lifted (to none) by the release. It carries
                # no gradient: the fine-tune sees every frozen path as the linear map it will export, so it cannot
                # learn to lean on the bound as a norm (its tokens then overflow when the bound is lifted)
                bound = OUTLIER ** (1 / (1 - outliers)) if outliers < 0.97 else math.inf
                target = torch.maximum(target, live.detach() / bound)
            divisor = target if mix >= 1 else torch.exp((1 - mix) * live.log() + mix * target.log())
        else:
            divisor = live
        y = y / divisor.unsqueeze(-1)
        owner = self._owner[0]
        if owner.weight is not None:
            y = y * (owner.weight.float() + self.gain_offset)
        if owner.bias is not None:
            y = y + owner.bias.float()
        y = y.to(x.dtype)
        self._cache = (x, y)
        return y

    def start_collecting(self) -> None:
        """Reset the calibration statistics and record from the next forward."""
        self._sums.zero_()
        self._counts.zero_()
        self.collect = True

    def measure(self) -> float:
        """Set the frozen divisors to the means seen since `start_collecting` (position 0 and special tokens apart,
        when any were seen); returns the ordinary tokens' scale. `mix` says how much of them is used."""
        self.collect = False
        if not self._counts[0]:
            raise NormSurgeryError(f"no calibration tokens reached {self.name}.")
        means = (self._sums / self._counts.clamp(min=1)).tolist()
        self.scale.fill_(means[0])
        self.first.fill_(means[1] if self._counts[1] else float("nan"))
        self.special.fill_(means[2] if self._counts[2] else float("nan"))
        return means[0]

    def set_mix(self, value: float) -> None:
        """How far the divisor has moved from live (0) to frozen (1)."""
        self.mix.fill_(min(1.0, max(0.0, value)))

    def release(self, which: str, value: float = 1.0) -> None:
        """How far `outliers` (the bound of OUTLIER x an ordinary token, lifted to none), `special` (special
        tokens) or `first` (position 0) have moved onto the ordinary scale."""
        self.released[RELEASE_INDEX[which]] = min(1.0, max(0.0, value))

    def forget(self) -> None:
        """Drop the cached output of the last forward (called by the owner before each new one)."""
        self._cache = None


RELEASE_INDEX = {"outliers": 0, "special": 1, "first": 2}
OUTLIER = 3.0  # until released, no token's normalised input exceeds this many times unit RMS


class NormPassthrough(nn.Module):
    """What replaces a norm module: its parameters under their original names, the residual passed through
    unchanged (the readers' groups normalise it), and the groups as submodules (their buffers in the state)."""

    def __init__(self, norm: Norm, original: nn.Module, context: TokenContext, group_names: list[str]) -> None:
        super().__init__()
        self.weight = original.weight if norm.weight else None
        self.bias = original.bias if norm.bias else None
        self.groups = nn.ModuleDict({g: ScaleGroup(norm, self, g, context) for g in group_names})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for group in self.groups.values():
            group.forget()
        return x


@dataclass(frozen=True)
class Unit:
    """One thing the removal schedule freezes: a reader group of one norm."""

    norm: Norm
    group: str

    @property
    def name(self) -> str:
        return f"{self.norm.name}[{self.group}]"


def _bind_reader(module: nn.Module, reader: Linear, groups: dict[str, ScaleGroup]) -> None:
    """Make a reader read its groups' normalised residual: a pre-hook for a one-group reader, a forward that
    splits the output slices between groups for a fused one (GPT-2's c_attn)."""
    names = reader.groups or (DEFAULT_GROUP,)
    if len(set(names)) == 1:
        group = groups[names[0]]
        module.register_forward_pre_hook(lambda _m, args: (group(args[0]),) + tuple(args[1:]))
        return
    slices = reader.group_slices(module.weight.shape[1] if reader.conv1d else module.weight.shape[0])

    def forward(x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for name, part in slices:
            weight = module.weight[:, part].t() if reader.conv1d else module.weight[part]
            bias = module.bias[part] if module.bias is not None else None
            outputs.append(F.linear(groups[name](x), weight, bias))
        return torch.cat(outputs, dim=-1)

    module.forward = forward


def loaded_module(model: nn.Module, path: str, renames: dict[str, str]) -> nn.Module:
    """The module of a loaded model at an on-disk module path (the family's key renames applied, e.g. GPT-NeoX's
    embed_out, which transformers loads as lm_head)."""
    import re

    for pattern, replacement in renames.items():
        path = re.sub(pattern, replacement, path + ".").rstrip(".")
    return model.get_submodule(path)


def install(model: nn.Module, norms: list[Norm], special_ids: list[int],
            renames: dict[str, str] | None = None) -> dict[str, ScaleGroup]:
    """Swap each norm of a loaded model for a pass-through and its readers for group-normalising ones; returns
    the groups by unit name (`norm[group]`). `special_ids` are the tokens kept on scales of their own; `renames`
    the family's on-disk -> in-memory key renames."""
    context = TokenContext(special_ids)
    model.register_forward_pre_hook(lambda _m, args, kwargs: context.see(kwargs.get("input_ids", args[0] if args else None)),
                                    with_kwargs=True)
    found: dict[str, ScaleGroup] = {}
    for norm in norms:
        original = model.get_submodule(norm.name)
        passthrough = NormPassthrough(norm, original, context, reader_groups(norm))
        parent, _, attr = norm.name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, passthrough)
        groups = dict(passthrough.groups.items())
        for reader in norm.readers:
            _bind_reader(loaded_module(model, reader.weight.rpartition(".")[0], renames or {}), reader, groups)
        found.update({g.name: g for g in groups.values()})
    return found


def special_token_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's special tokens (BOS, EOS, chat markers...): attention sinks like position 0."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            ids.add(value)
    return sorted(ids)


def scale_spread(group: ScaleGroup) -> torch.Tensor:
    """Baroni et al.'s auxiliary loss: how far the last forward's per-token divisors of the ordinary tokens
    stray from their mean, as the mean squared relative deviation (scale-free, so one weight suits every
    model). Zero when all tokens agree."""
    if group.live is None or group.ordinary is None:
        raise NormSurgeryError(f"{group.name} has not run a forward with tracking on.")
    live = group.live[group.ordinary]
    return ((live / live.mean()) - 1).pow(2).mean()


def frozen_spread(group: ScaleGroup) -> torch.Tensor:
    """How far the last forward's per-token divisors of the ordinary tokens stray from the path's frozen scale, as
    the mean squared log ratio: what the constant that replaces the norm gets wrong. In logs, because a fine-tune
    with frozen norms can grow ordinary tokens to 1,000 times the scale (on smollm2-135m, the tokens just after the
    attention sink), whose squared ratio would swamp the distillation loss. Zero when every token sits at the scale."""
    if group.live is None or group.ordinary is None:
        raise NormSurgeryError(f"{group.name} has not run a forward with tracking on.")
    return (group.live[group.ordinary] / group.scale).log().pow(2).mean()


def removable_norms(arch: Architecture) -> list[Norm]:
    """The norms that LN removal freezes and folds away: every Pre-LN input norm and the final norm.

    Refuses models whose other norms would stay in the residual path (Post-LN, sandwich/Peri-LN output norms,
    an embedding norm); per-head QK-norms are left as they are (they do not normalise the residual).
    """
    if has_experts(arch):
        raise NormSurgeryError(f"--to none, dyt and derf do not take mixture-of-experts models yet: {EXPERTS_FUSED}. "
                               "No output was written.")
    if arch.computed_positions and any(n.kind == "layernorm" for n in arch.all_norms()):
        raise NormSurgeryError(f"--to none, dyt and derf centre a LayerNorm model's residual first, which does not "
                               f"apply to this {arch.family} model: {POSITIONS_COMPUTED}. No output was written.")
    if arch.post_ln:
        raise NormSurgeryError("--to none applies to Pre-LN models; this one is Post-LN (its norms sit on the "
                               "residual stream, which a fixed scale cannot replace). No output was written.")
    others = [n.name for n in arch.all_norms() if n.role not in ("input", "final", "qk")]
    if others:
        raise NormSurgeryError(f"--to none needs every residual norm to be a Pre-LN input norm or the final norm; "
                               f"{', '.join(others[:3])} are not (sandwich, Peri-LN or embedding norms). No output was "
                               "written.")
    return [n for n in arch.all_norms() if n.role in ("input", "final")]
