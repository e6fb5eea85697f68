"""A rewrite as a plan of small steps, executed while streaming tensors from a reader to a writer.

Each step reads a handful of tensors (one norm and its readers, one writer, the embeddings), computes
its outputs in float64, and the executor casts each output once to its source dtype and hands it to
the writer. Tensors no step mentions are copied unchanged. Peak memory is one step's tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:  # a plan of copies only (pruning) runs on stored bytes and never imports torch
    import torch

    Tensor = torch.Tensor
Compute = Callable[[dict[str, "Tensor"]], dict[str, "Tensor"]]


class TensorSource(Protocol):
    """What the executor needs from a checkpoint reader."""

    def names(self) -> list[str]: ...
    def get(self, name: str) -> Tensor: ...
    def prefetch(self, names: list[str]) -> None: ...


class TensorSink(Protocol):
    """What the executor needs from a checkpoint writer."""

    def add(self, name: str, tensor: Tensor) -> None: ...


@dataclass
class Step:
    """Outputs computed together from `inputs`; `label` says what the step does (for reports and errors)."""

    label: str
    inputs: tuple[str, ...]
    compute: Compute


def module_path(tensor: str) -> str:
    """The module that owns a tensor."""
    return tensor.rsplit(".", 1)[0]


@dataclass
class Surgery:
    """The module changes that the exported modeling code (export/modeling_normsurgery.py) makes to the stock
    class when it loads a rewritten model: norms swapped (`norms`: module path -> its new kind and arguments),
    biases added to readers (`add_bias`), tensors whose residual width shrinks (`resized`, their shapes recorded
    when written), pruned sub-layers' modules replaced (`modules`: module path -> what stands in for it), module
    attributes set (`attributes`: module path.attribute -> value, e.g. a residual width CRMSNorm shrank), modules
    whose output is centred (`centred`: module path -> whether its last coordinate is then dropped, as CRMSNorm drops
    every writer's: computed positions, which no weight holds)."""

    operation: str
    unembed: str  # the unembedding's module path (the exported code finds it through the output embeddings)
    key_mapping: dict[str, str]  # the family's on-disk -> in-memory key renames
    norms: dict[str, dict[str, Any]] = field(default_factory=dict)
    add_bias: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    attributes: dict[str, int] = field(default_factory=dict)
    centred: dict[str, dict[str, bool]] = field(default_factory=dict)

    @classmethod
    def of(cls, operation: str, arch: Any, norms: dict[str, dict[str, Any]], add_bias: list[str] | None = None,
           resized: list[str] | None = None, attributes: dict[str, int] | None = None,
           centred: dict[str, dict[str, bool]] | None = None) -> "Surgery":
        """The surgery of `operation` on a model of architecture `arch`."""
        return cls(operation, module_path(arch.unembed.weight), dict(arch.key_renames), norms, list(add_bias or []),
                   list(resized or []), attributes=dict(attributes or {}), centred=dict(centred or {}))

    def exported(self, shapes: dict[str, list[int]]) -> dict[str, Any]:
        """What the exported code reads from the config: the changes, with the written shapes of `resized`."""
        exported = {"operation": self.operation, "norms": self.norms, "add_bias": self.add_bias, "unembed": self.unembed,
                    "key_mapping": self.key_mapping, "shapes": {name: shapes[name] for name in sorted(shapes)}}
        optional = {"modules": self.modules, "attributes": self.attributes, "centred": self.centred}
        return {**exported, **{key: value for key, value in optional.items() if value}}


@dataclass
class Plan:
    """An operation's steps, the tensors it drops, and what changes in the config and the exported code."""

    operation: str
    steps: list[Step] = field(default_factory=list)
    dropped: set[str] = field(default_factory=set)
    config_updates: dict[str, Any] = field(default_factory=dict)
    # config changes that need the transformers config (its defaults expanded); computed once it is built, so that
    # streaming can start while transformers is still importing
    config_updates_from: Callable[[Any], dict[str, Any]] | None = None
    surgery: Surgery | None = None  # module changes the exported modeling code applies; None: stock class
    folded: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # norms left in place, with the reason
    renames: dict[str, str] = field(default_factory=dict)  # source name -> output name of copied tensors
    # blocks the output skips: it must equal the original run with these blocks skipped (verification)
    skipped_blocks: tuple[int, ...] = ()
    # sub-layers the output drops ("attention"/"mlp" -> block indices): it must equal the original run with their
    # outputs zeroed (verification)
    skipped_sublayers: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # read and check the dropped tensors too, in stream order (pruning refuses a damaged checkpoint even where it
    # is cut away; the reads fill time the stream spends waiting for the disk)
    check_dropped: bool = False

    def all_config_updates(self, config: Any) -> dict[str, Any]:
        """Every config.json change: the plan's own, then those computed from the transformers `config`."""
        late = self.config_updates_from(config) if self.config_updates_from else {}
        return {**self.config_updates, **late}


def _widened(tensor: Tensor, target: torch.dtype) -> Tensor:
    """An input upcast to its output dtype when that is wider, so that results are formed at the output's precision."""
    if tensor.dtype.is_floating_point and target.is_floating_point and target.itemsize > tensor.dtype.itemsize:
        return tensor.to(target)
    return tensor


def run_step(step: Step, source: TensorSource, dtype_for: Callable[[str], torch.dtype]) -> dict[str, Tensor]:
    """One step's outputs, each formed at (at least) its output dtype's precision and cast once to it."""
    inputs = {name: _widened(source.get(name), dtype_for(name)) for name in step.inputs}
    outputs = step.compute(inputs)
    del inputs
    return {name: tensor.to(dtype_for(name)).contiguous() for name, tensor in outputs.items()}


def execute(
    plan: Plan,
    source: TensorSource,
    sink: TensorSink,
    *,
    dtype_for: Callable[[str], torch.dtype],
    on_step: Callable[[str], None] | None = None,
    produced: dict[str, Step] | None = None,
) -> list[str]:
    """Run the plan: computed outputs first (in plan order), then every tensor no step produced or dropped.

    `produced`, when given, is filled with the step that made each computed output (copies are not listed).
    """
    written: list[str] = []
    for i, step in enumerate(plan.steps):
        source.prefetch([n for later in plan.steps[i + 1 : i + 2] for n in later.inputs])
        for name, tensor in run_step(step, source, dtype_for).items():
            sink.add(name, tensor)
            written.append(name)
            if produced is not None:
                produced[name] = step
        if on_step:
            on_step(step.label)
    produced = set(written)
    rest = [name for name in source.names() if name not in produced and (plan.check_dropped or name not in plan.dropped)]
    for i, name in enumerate(rest):
        source.prefetch(rest[i + 1 : i + 2])
        if name in plan.dropped:
            source.get(name)  # read (and checked by a checking source), not written
            continue
        sink.add(plan.renames.get(name, name), source.get(name))
        written.append(plan.renames.get(name, name))
        if on_step:
            on_step(name)
    return written
