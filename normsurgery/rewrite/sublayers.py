"""Sub-layer pruning: drop the attention or the MLP of chosen blocks, keeping every block and its index.

A block is sequential when its attention and its MLP each add their own output to the residual in turn; each is
then a sub-layer that can contribute nothing while the rest runs unchanged. A sub-layer is found from the family's
residual picture alone: its writer (the attention's output projection is a block's first writer, the MLP's its
second), the module holding that writer (replaced whole by the exported code; OPT and BioGPT keep fc1/fc2 in the
block itself), its readers and its input and output norms. Nothing is computed: the kept tensors are copied and
the output's config records which sub-layers the shipped modeling code replaces (export/modeling_normsurgery.py),
so it equals the original with those sub-layers' outputs zeroed, exactly. Written stock instead
(`plan_sublayer_zero`), every tensor is kept and the writer's weight and bias (and an output norm's bias) are
zeros, so the sub-layer still runs, and still fills the cache, but adds exactly nothing: the stock class loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from normsurgery.arch.spec import Architecture, Block, Linear, Norm
from normsurgery.errors import NormSurgeryError
from normsurgery.rewrite.plan import Plan, Step, Surgery, module_path
from normsurgery.rewrite.prune import check_indices

SUBLAYERS = ("attention", "mlp")
WHAT = ("block",) + SUBLAYERS
EXPORTS = ("native", "stock")  # how a sub-layer prune is written: shipped code that skips it, or zeroed writers


@dataclass(frozen=True)
class Sublayer:
    """One block's attention or MLP: the module replaced whole (None when its linears sit in the block itself),
    its writer, readers and norms (module paths and tensor names are model-level)."""

    kind: str
    block: int
    module: str | None
    writer: Linear
    readers: tuple[Linear, ...]
    input_norm: Norm | None
    output_norm: Norm | None

    @property
    def contribution(self) -> str:
        """The module whose output is what the sub-layer adds to the residual (zeroed in the reference run)."""
        return self.output_norm.name if self.output_norm else module_path(self.writer.weight)

    @property
    def entry(self) -> str:
        """The module whose input is the residual the sub-layer reads (hooked to measure it)."""
        return self.input_norm.name if self.input_norm else module_path(self.readers[0].weight)

    def tensors(self, names: list[str]) -> list[str]:
        """The stored tensors among `names` that belong to this sub-layer (its module's, linears' and norms')."""
        own = {t for x in (self.writer, *self.readers) for t in x.tensors()}
        own |= {t for n in (self.input_norm, self.output_norm) if n is not None for t in n.tensors()}
        inside = f"{self.module}." if self.module else None
        return [n for n in names if n in own or (inside is not None and n.startswith(inside))]

    def zeroed(self) -> tuple[str, ...]:
        """The tensors whose zeros make the sub-layer add nothing: its writer's, and its output norm's bias (the norm
        of a zero output is its bias)."""
        bias = (self.output_norm.bias,) if self.output_norm is not None and self.output_norm.bias else ()
        return self.writer.tensors() + bias

    def replacements(self, hidden_size: int) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """What the exported code puts in place of the sub-layer: (module path -> replacement, norm path ->
        identity). Without a module of its own, the readers yield nothing and the writer yields zeros."""
        norms = {n.name: {"kind": "identity"} for n in (self.input_norm, self.output_norm) if n is not None}
        if self.module is not None:
            return {self.module: {"kind": self.kind, "layer": self.block}}, norms
        modules = {module_path(r.weight): {"kind": "empty"} for r in self.readers}
        modules[module_path(self.writer.weight)] = {"kind": "zeros", "width": hidden_size}
        return modules, norms


class SublayersRefused(NormSurgeryError):
    """A model whose blocks have no separate attention and MLP sub-layers; `why` says what is in the way."""

    def __init__(self, why: str) -> None:
        super().__init__(
            f"--what attention and --what mlp need blocks whose attention and MLP are separate sub-layers, each "
            f"adding its output to the residual in turn; {why}, so neither can be removed on its own. Remove whole "
            f"blocks with --what block instead (parallel-block families such as gptj, phi, codegen, cohere, and "
            f"gpt_neox, falcon or stablelm with a parallel residual, and mixture-of-experts families are refused)."
        )
        self.why = why


def _owner(path: str, modules: dict[str, str | None]) -> str | None:
    """The sub-layer a linear belongs to: the one whose module holds it, else the only one without a module."""
    for kind, module in modules.items():
        if module is not None and path.startswith(module + "."):
            return kind
    loose = [kind for kind, module in modules.items() if module is None]
    return loose[0] if len(loose) == 1 else None


def block_sublayers(arch: Architecture, block: Block) -> dict[str, Sublayer]:
    """A sequential block's attention and MLP, or the refusal saying why this model has none."""
    if block.parallel:
        raise SublayersRefused(f"a {arch.family} model of this config computes attention and MLP in parallel from the "
                               "same residual")
    if block.experts:
        raise SublayersRefused(f"a {arch.family} block routes its MLP through {block.experts} experts, which "
                               "sub-layer pruning does not handle yet")
    if len(block.writers) != 2:
        raise SublayersRefused(f"a {arch.family} block has {len(block.writers)} residual writers, not one attention and "
                               "one MLP output")
    modules: dict[str, str | None] = {}
    for kind, writer in zip(SUBLAYERS, block.writers):
        parent = module_path(module_path(writer.weight))
        modules[kind] = None if parent + "." == block.prefix else parent
    if modules["attention"] is None:
        raise SublayersRefused(f"a {arch.family} block's attention output projection is not inside an attention module")
    readers: dict[str, list[Linear]] = {kind: [] for kind in SUBLAYERS}
    inputs: dict[str, Norm] = {}
    for norm in block.norms_with_role("input"):
        owners = {_owner(r.weight, modules) for r in norm.readers}
        if len(owners) != 1 or None in owners:
            raise SublayersRefused(f"{norm.name} is read by both attention and MLP")
        kind = owners.pop()
        if kind in inputs:
            raise SublayersRefused(f"a {arch.family} block has more than one input norm before its {kind}")
        inputs[kind] = norm
        readers[kind] += norm.readers
    for reader in block.direct_readers:
        kind = _owner(reader.weight, modules)
        if kind is None:
            raise SublayersRefused(f"{reader.weight} belongs to neither attention nor MLP")
        readers[kind].append(reader)
    outputs = block.norms_with_role("output")
    if len(outputs) not in (0, 2) or any(not readers[kind] for kind in SUBLAYERS):
        raise SublayersRefused(f"a {arch.family} block does not show which norms and linears are its attention's and "
                               "its MLP's")
    return {kind: Sublayer(kind, block.index, modules[kind], writer, tuple(readers[kind]), inputs.get(kind),
                           outputs[i] if outputs else None)
            for i, (kind, writer) in enumerate(zip(SUBLAYERS, block.writers))}


def sublayers(arch: Architecture) -> list[dict[str, Sublayer]]:
    """Every block's attention and MLP, or the one-paragraph refusal for a model whose blocks have none."""
    return [block_sublayers(arch, block) for block in arch.blocks]


def sublayer_problem(arch: Architecture) -> str | None:
    """Why the model's blocks have no separate attention and MLP sub-layers, or None when they have."""
    try:
        sublayers(arch)
    except SublayersRefused as refused:
        return refused.why
    return None


def has_sublayers(arch: Architecture) -> bool:
    """Whether the model's blocks have separate attention and MLP sub-layers."""
    return sublayer_problem(arch) is None


def check_what(what: str) -> str:
    """`what` if it names something prune removes, else the refusal."""
    if what not in WHAT:
        raise NormSurgeryError(f"--what must be one of {', '.join(WHAT)} (got {what!r}): whole blocks, or only the "
                               "attention or only the MLP of the chosen blocks.")
    return what


def check_export(export: str) -> str:
    """`export` if it names a form prune writes, else the refusal."""
    if export not in EXPORTS:
        raise NormSurgeryError(f"--export must be native or stock (got {export!r}): the removed sub-layers skipped by "
                               "shipped modeling code, or kept with their output projections zeroed in a stock model.")
    return export


def check_sublayer_removal(arch: Architecture, what: str, blocks: list[int]) -> list[int]:
    """The blocks whose `what` sub-layer is removed, sorted, or a clear error for a set that cannot be removed."""
    count = arch.num_layers
    check_indices(count, blocks)
    if not blocks:
        raise NormSurgeryError(f"no {what} sub-layer to remove: pass --remove K (K >= 1) or --layers.")
    if len(blocks) >= count:
        raise NormSurgeryError(f"cannot remove the {what} of {len(blocks)} of {count} blocks: at least one must stay.")
    sublayers(arch)
    return sorted(blocks)


def plan_sublayer_prune(arch: Architecture, names: list[str], what: str, blocks: list[int]) -> Plan:
    """Drop the `what` sub-layer (attention or mlp) of `blocks` from a checkpoint holding tensors `names`; every
    block keeps its index, and the exported code replaces the dropped sub-layers."""
    blocks = check_sublayer_removal(arch, what, blocks)
    found = sublayers(arch)
    surgery = Surgery.of("prune", arch, {})
    plan = Plan(operation="prune", surgery=surgery, skipped_sublayers={what: tuple(blocks)})
    for index in blocks:
        sublayer = found[index][what]
        plan.dropped.update(sublayer.tensors(names))
        modules, norms = sublayer.replacements(arch.hidden_size)
        surgery.modules.update(modules)
        surgery.norms.update(norms)
    return plan


def plan_sublayer_zero(arch: Architecture, what: str, blocks: list[int]) -> Plan:
    """Zero the output projections of the `what` sub-layer (attention or mlp) of `blocks`, keeping every tensor and
    shape: a stock model equal to the original with those sub-layers' outputs zeroed, as fast as the original."""
    import torch

    blocks = check_sublayer_removal(arch, what, blocks)
    found = sublayers(arch)
    plan = Plan(operation="prune", skipped_sublayers={what: tuple(blocks)})
    for index in blocks:
        names = found[index][what].zeroed()
        plan.steps.append(Step(f"zero the {what} of block {index}", names,
                               lambda t: {name: torch.zeros_like(tensor) for name, tensor in t.items()}))
    return plan
