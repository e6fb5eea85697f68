"""Measure a loaded model's per-block statistics on calibration batches, in one pass with hooks.

Hooks record the raw residual stream entering every block and entering the final norm (so the last block's
output is never the post-norm `hidden_states[-1]` of transformers), and, where blocks have separate attention and
MLP sub-layers, the residual between them (entering the MLP). All pairwise cosines between depths are
one batched Gram product per token in float64, from which Block Influence (consecutive depths) and the
angular distance of every span (l, n) follow; each sub-layer's influence is 1 - cos of the residual before and
after it. The skip cost reruns the batches once per block skipped (and once per sub-layer zeroed).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import torch

from normsurgery.arch.facts import norm_label, placement
from normsurgery.arch.spec import Architecture
from normsurgery.depth.skip import skipping, zeroing
from normsurgery.depth.stats import LayerStats, NormGain
from normsurgery.engine.forward import cross_entropy as mean_ce
from normsurgery.engine.forward import next_token_nll
from normsurgery.rewrite.sublayers import SUBLAYERS, WHAT, has_sublayers, sublayers

if TYPE_CHECKING:
    from normsurgery.depth.select import Candidate


def cross_entropy(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy (nats/token) of `model` on `ids`, `batch_size` sequences a forward."""
    return mean_ce(model, ids.split(batch_size))


class _Residuals:
    """Forward pre-hooks that keep the residual stream entering each block and the final norm, and (`mids`) the
    residual entering each block's MLP sub-layer when the blocks have separate sub-layers."""

    def __init__(self, model: torch.nn.Module, arch: Architecture, mids: bool) -> None:
        L = arch.num_layers
        self.states: list[torch.Tensor | None] = [None] * (L + 1)
        self.mids: list[torch.Tensor | None] = [None] * L if mids else []
        modules = [model.get_submodule(arch.block_path(b.index)) for b in arch.blocks]
        modules.append(model.get_submodule(arch.module_path(arch.final_norm.name)) if arch.final_norm else None)
        self.handles = [m.register_forward_pre_hook(self._keeper(self.states, i), with_kwargs=True)
                        for i, m in enumerate(modules) if m is not None]
        if arch.final_norm is None:  # no final norm: the last block's output, from a forward hook
            last = modules[-2]
            self.handles.append(last.register_forward_hook(self._output_keeper(L)))
        for i, found in enumerate(sublayers(arch) if mids else []):
            entry = model.get_submodule(found["mlp"].entry)
            self.handles.append(entry.register_forward_pre_hook(self._keeper(self.mids, i), with_kwargs=True))

    @staticmethod
    def _keeper(into: list[torch.Tensor | None], index: int) -> Callable[..., None]:
        def keep(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            into[index] = (args[0] if args else kwargs["hidden_states"]).detach()
        return keep

    def _output_keeper(self, index: int) -> Callable[..., None]:
        def keep(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self.states[index] = (output[0] if isinstance(output, tuple) else output).detach()
        return keep

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


TOKENS_AT_ONCE = 256


class _Accumulator:
    """Running sums of the per-depth statistics over batches."""

    def __init__(self, depths: int) -> None:
        self.sublayer_cos = torch.zeros(len(SUBLAYERS), depths - 1, dtype=torch.float64)
        self.angle_all = torch.zeros(depths, depths, dtype=torch.float64)
        self.angle_last = torch.zeros(depths, depths, dtype=torch.float64)
        self.cos_next = torch.zeros(depths - 1, dtype=torch.float64)
        self.rms = torch.zeros(depths, dtype=torch.float64)
        self.rel_update = torch.zeros(depths - 1, dtype=torch.float64)
        self.update_cos = torch.zeros(depths - 1, dtype=torch.float64)
        self.tokens = 0
        self.sequences = 0

    def add(self, states: list[torch.Tensor], mids: list[torch.Tensor]) -> None:
        """Fold one batch of residual states (one [batch, positions, d] tensor per depth; `mids`: one per block
        between its sub-layers, or none) into the sums, a few sequences at a time so that the float64 work stays
        near TOKENS_AT_ONCE tokens whatever the batch."""
        positions = states[0].shape[1]
        step = max(1, TOKENS_AT_ONCE // positions)
        for start in range(0, states[0].shape[0], step):
            self._add([s[start:start + step] for s in states])
            if mids:
                self._add_sublayers([s[start:start + step] for s in states], [m[start:start + step] for m in mids])

    def _add_sublayers(self, states: list[torch.Tensor], mids: list[torch.Tensor]) -> None:
        """Sum each sub-layer's cosine between the residual before and after it: attention h_l -> mid_l, MLP
        mid_l -> h_{l+1}."""
        h = torch.stack([s.double() for s in states])  # [depth, batch, positions, d]
        mid = torch.stack([m.double() for m in mids])  # [depth - 1, batch, positions, d]
        cos = torch.nn.functional.cosine_similarity
        self.sublayer_cos[0] += cos(h[:-1], mid, dim=-1).flatten(1).sum(1)
        self.sublayer_cos[1] += cos(mid, h[1:], dim=-1).flatten(1).sum(1)

    def _add(self, states: list[torch.Tensor]) -> None:
        h = torch.stack([s.double() for s in states])  # [depth, batch, positions, d]
        depth, batch, positions, _ = h.shape
        norms = h.norm(dim=-1)  # [depth, batch, positions]
        unit = h / norms.clamp_min(1e-30).unsqueeze(-1)
        flat = unit.flatten(1, 2).transpose(0, 1)  # [tokens, depth, d]
        cos = (flat @ flat.transpose(1, 2)).clamp(-1.0, 1.0)  # [tokens, depth, depth]
        angle = torch.arccos(cos) / math.pi
        self.angle_all += angle.sum(0)
        self.angle_last += angle.view(batch, positions, depth, depth)[:, -1].sum(0)
        self.cos_next += torch.diagonal(cos, offset=1, dim1=1, dim2=2).sum(0)
        d = h.shape[-1]
        self.rms += (norms / math.sqrt(d)).flatten(1).sum(1)
        delta = h[1:] - h[:-1]
        delta_norm = delta.norm(dim=-1)
        self.rel_update += (delta_norm / norms[:-1].clamp_min(1e-30)).flatten(1).sum(1)
        self.update_cos += ((delta * h[:-1]).sum(-1) / (delta_norm * norms[:-1]).clamp_min(1e-30)).flatten(1).sum(1)
        self.tokens += batch * positions
        self.sequences += batch


def norm_gains(arch: Architecture, weight: Callable[[str], torch.Tensor]) -> list[NormGain]:
    """Summary statistics of every norm's effective gain (weight + offset), in model order; `weight` reads a
    tensor by name (from the checkpoint, so that a model offloaded to disk need not be materialised)."""
    layer_of = {n.name: b.index for b in arch.blocks for n in b.norms}
    gains = []
    for norm in arch.all_norms():
        if norm.weight is None:
            continue
        g = weight(norm.weight).detach().double().flatten() + norm.gain_offset
        gains.append(NormGain(norm.name, layer_of.get(norm.name), norm.role, float(g.mean()), float(g.std()),
                              float(g.min()), float(g.max())))
    return gains


@torch.no_grad()
def measure(model: torch.nn.Module, arch: Architecture, ids: torch.Tensor, *, label: str, batch_size: int = 4,
            skip_cost: bool = False, costs_of: tuple[str, ...] = WHAT,
            weight: Callable[[str], torch.Tensor] | None = None,
            on_batch: Callable[[], None] | None = None) -> LayerStats:
    """Every per-block statistic of `model` on the calibration `ids` (skip costs only when asked: L more passes for
    each of `costs_of`, blocks and the sub-layers the model has). `weight` reads a tensor by name for the gain
    statistics (default: the model's own parameters)."""
    model.eval()
    split = has_sublayers(arch)
    hooks = _Residuals(model, arch, mids=split)
    acc = _Accumulator(arch.num_layers + 1)
    total, count = 0.0, 0
    try:
        for batch in ids.split(batch_size):
            logits = model(input_ids=batch, use_cache=False).logits.double()
            total += float(next_token_nll(logits, batch))
            count += batch[:, 1:].numel()
            acc.add(hooks.states, hooks.mids)  # type: ignore[arg-type]
            if on_batch:
                on_batch()
    finally:
        hooks.close()
    base = total / count
    L = arch.num_layers
    angle_all = (acc.angle_all / acc.tokens).tolist()
    angle_last = (acc.angle_last / acc.sequences).tolist()
    stats = LayerStats(
        model=label,
        family=arch.family,
        num_layers=L,
        norm_placement=f"{placement(arch)} ({norm_label(arch)})",
        tokens=acc.tokens,
        sequences=acc.sequences,
        base_ce=base,
        block_influence=(1 - acc.cos_next / acc.tokens).tolist(),
        angular_last=[[angle_last[l][l + n] for l in range(L - n + 1)] for n in range(1, L + 1)],
        angular_all=[[angle_all[l][l + n] for l in range(L - n + 1)] for n in range(1, L + 1)],
        residual_rms=(acc.rms / acc.tokens).tolist(),
        relative_update=(acc.rel_update / acc.tokens).tolist(),
        update_cosine=(acc.update_cos / acc.tokens).tolist(),
        norm_gains=norm_gains(arch, weight or model.get_parameter),
    )
    if split:
        stats.attention_influence, stats.mlp_influence = (1 - acc.sublayer_cos / acc.tokens).tolist()
    if skip_cost and "block" in costs_of:
        stats.skip_cost = _skip_costs(model, ids, batch_size, base, lambda b: skipping(model, arch, [b]), L, on_batch)
    for kind in SUBLAYERS if skip_cost and split else ():
        if kind in costs_of:
            costs = _skip_costs(model, ids, batch_size, base, lambda b: zeroing(model, arch, {kind: [b]}), L, on_batch)
            setattr(stats, f"{kind}_skip_cost", costs)
    return stats


def _skip_costs(model: torch.nn.Module, ids: torch.Tensor, batch_size: int, base: float,
                without: Callable[[int], Any], count: int, on_batch: Callable[[], None] | None) -> list[float]:
    """Calibration cross-entropy with each of `count` parts removed (`without(i)`: the context), minus `base`."""
    costs = []
    for i in range(count):
        with without(i):
            costs.append(cross_entropy(model, ids, batch_size) - base)
        if on_batch:
            on_batch()
    return costs


@torch.no_grad()
def remeasure(model: torch.nn.Module, arch: Architecture, ids: torch.Tensor, found: list[Candidate],
              batch_size: int = 4, what: str = "block") -> Candidate:
    """Set each candidate's calibration loss (its blocks skipped, or their `what` sub-layers zeroed) and return the
    lowest."""
    for candidate in found:
        with skipping(model, arch, candidate.blocks) if what == "block" else zeroing(model, arch, {what: candidate.blocks}):
            candidate.loss = cross_entropy(model, ids, batch_size)
    return min(found, key=lambda c: (c.loss, c.blocks))
