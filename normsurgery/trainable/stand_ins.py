"""Stand-ins for a loaded model's norms that keep its parameters (so state_dict names do not change) and
can have their per-token scale frozen to a constant."""

from __future__ import annotations

import torch
from torch import nn

from normsurgery.arch.spec import Architecture, Norm
from normsurgery.errors import NormSurgeryError


class FreezableNorm(nn.Module):
    """LayerNorm or RMSNorm, computed in float32, whose divisor sqrt(mean square + eps) can be frozen to `scale`.

    While `collect` is on it accumulates the mean of its live per-token divisor (the calibration statistic);
    while `track` is on it keeps the last forward's live divisors, with their graph, for an auxiliary loss.
    """

    def __init__(self, norm: Norm, original: nn.Module) -> None:
        super().__init__()
        self.name = norm.name
        self.center = norm.kind == "layernorm"
        self.eps = norm.eps
        self.gain_offset = norm.gain_offset
        self.weight = original.weight if norm.weight else None
        self.bias = original.bias if norm.bias else None
        # the frozen divisor; NaN while live. A buffer, so that a resumed fine-tune gets it back with the weights
        self.register_buffer("scale", torch.tensor(float("nan")))
        self.collect = False
        self.track = False
        self.live: torch.Tensor | None = None
        self._sum = 0.0
        self._count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        if self.center:
            y = y - y.mean(dim=-1, keepdim=True)
        live = torch.sqrt(y.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.collect:
            self._sum += float(live.detach().sum())
            self._count += live.numel()
        if self.track:
            self.live = live
        y = y / (live if torch.isnan(self.scale) else self.scale)
        if self.weight is not None:
            y = y * (self.weight.float() + self.gain_offset)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    @property
    def frozen(self) -> bool:
        """Whether the divisor is fixed."""
        return not bool(torch.isnan(self.scale))

    def start_collecting(self) -> None:
        """Reset the calibration statistic and record from the next forward."""
        self._sum, self._count, self.collect = 0.0, 0, True

    def mean_scale(self) -> float:
        """The mean live divisor over the tokens seen since `start_collecting`."""
        self.collect = False
        if not self._count:
            raise NormSurgeryError(f"no calibration tokens reached {self.name}.")
        return self._sum / self._count


def scale_spread(stand_in: FreezableNorm) -> torch.Tensor:
    """Baroni et al.'s auxiliary loss: how far the last forward's per-token divisors stray from their mean, as the
    mean squared relative deviation (scale-free, so one weight suits every model). Zero when all tokens agree."""
    if stand_in.live is None:
        raise NormSurgeryError(f"{stand_in.name} has not run a forward with tracking on.")
    live = stand_in.live.flatten()
    return ((live / live.mean()) - 1).pow(2).mean()


def removable_norms(arch: Architecture) -> list[Norm]:
    """The norms that LN removal freezes and folds away: every Pre-LN input norm and the final norm.

    Refuses models whose other norms would stay in the residual path (Post-LN, sandwich/Peri-LN output norms,
    an embedding norm); per-head QK-norms are left as they are (they do not normalise the residual).
    """
    if arch.post_ln:
        raise NormSurgeryError("--to none applies to Pre-LN models; this one is Post-LN (its norms sit on the "
                               "residual stream, which a fixed scale cannot replace). No output was written.")
    others = [n.name for n in arch.all_norms() if n.role not in ("input", "final", "qk")]
    if others:
        raise NormSurgeryError(f"--to none needs every residual norm to be a Pre-LN input norm or the final norm; "
                               f"{', '.join(others[:3])} are not (sandwich, Peri-LN or embedding norms). No output was "
                               "written.")
    return [n for n in arch.all_norms() if n.role in ("input", "final")]


def install(model: nn.Module, norms: list[Norm]) -> dict[str, FreezableNorm]:
    """Swap each norm module of a loaded model for a FreezableNorm holding the same parameters."""
    stand_ins = {}
    for norm in norms:
        original = model.get_submodule(norm.name)
        stand_in = FreezableNorm(norm, original)
        parent, _, attr = norm.name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, stand_in)
        stand_ins[norm.name] = stand_in
    return stand_ins
