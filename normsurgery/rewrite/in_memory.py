"""Run a plan on a loaded model in place, instead of from file to file: the same steps, reading and writing the
model's own parameters under their on-disk names (the family's key renames undone)."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from normsurgery.arch.spec import Architecture
from normsurgery.errors import NormSurgeryError
from normsurgery.rewrite.plan import Plan, run_step


class ModelTensors:
    """A loaded model's parameters and buffers as a plan's tensor source, by on-disk name; `set` writes a step's
    output back into the model. A per-expert on-disk tensor that transformers stacked at load (`fused`, see
    Architecture.fused) is the view of its rows in the stacked parameter."""

    def __init__(self, model: nn.Module, renames: dict[str, str],
                 fused: dict[str, tuple[tuple[str, ...], ...]] | None = None,
                 split: dict[str, tuple[str, ...]] | None = None) -> None:
        self.model = model
        self.renames = renames
        self.split = dict(split or {})  # stored tensor -> the in-memory parameters transformers split it into
        self._named = {**dict(model.named_parameters(remove_duplicate=False)),
                       **dict(model.named_buffers(remove_duplicate=False))}
        # on-disk name -> (stacked parameter, expert, position among the expert's parts, number of parts)
        self._parts = {part: (stacked, e, k, len(parts)) for stacked, experts in (fused or {}).items()
                       if stacked in self._named for e, parts in enumerate(experts) for k, part in enumerate(parts)}

    def loaded_name(self, name: str) -> str:
        """The in-memory name of an on-disk tensor name."""
        for pattern, replacement in self.renames.items():
            name = re.sub(pattern, replacement, name)
        return name

    def __contains__(self, name: str) -> bool:
        return name in self._parts or name in self.split or self.loaded_name(name) in self._named

    def storages(self) -> set[int]:
        """The data pointers of the model's tensors (to tell a computed output from one of them)."""
        return {t.untyped_storage().data_ptr() for t in self._named.values()}

    def names(self) -> list[str]:
        return list(self._named)

    def prefetch(self, names: list[str]) -> None:
        """Nothing to read ahead: the tensors are in memory."""

    def get(self, name: str) -> torch.Tensor:
        """The tensor stored as `name` (a copy where transformers split it into several parameters at load)."""
        if name in self.split:
            return torch.cat([self._named[part].detach() for part in self.split[name]])
        if name in self._parts:
            stacked, expert, k, parts = self._parts[name]
            rows = self._named[stacked].shape[1] // parts
            return self._named[stacked].detach()[expert, k * rows:(k + 1) * rows]
        loaded = self.loaded_name(name)
        if loaded not in self._named:
            raise NormSurgeryError(f"the loaded model has no tensor {loaded} (from {name}); is it the model its "
                                   "config says it is?")
        return self._named[loaded].detach()

    @torch.no_grad()
    def set(self, name: str, value: torch.Tensor) -> None:
        """Write `value` into the tensor `name` in place (its shape, dtype and device kept)."""
        if name in self.split:  # each parameter takes its rows
            parts = [self._named[part] for part in self.split[name]]
            if sum(p.shape[0] for p in parts) != value.shape[0]:
                raise NormSurgeryError(f"{name} would change shape, which a rewrite in memory cannot do to a loaded "
                                       "module; write it to a folder instead.")
            for part, rows in zip(parts, value.split([p.shape[0] for p in parts])):
                part.detach().copy_(rows.to(device=part.device, dtype=part.dtype))
            return
        target = self.get(name)
        if target.shape != value.shape:
            raise NormSurgeryError(f"{name} would change shape {tuple(target.shape)} -> {tuple(value.shape)}, which a "
                                   "rewrite in memory cannot do to a loaded module; write it to a folder instead.")
        target.copy_(value.to(device=target.device, dtype=target.dtype))


def untie_unembedding(model: nn.Module) -> None:
    """Give a tied unembedding its own copy of the embedding, so that the two can be rewritten apart."""
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if output is not None and output.weight is embedding.weight:
        output.weight = nn.Parameter(embedding.weight.detach().clone())
    for config in {id(c): c for c in _configs(model.config)}.values():
        config.tie_word_embeddings = False


def _configs(config: Any) -> list[Any]:
    """The config and its text config (multimodal wrappers keep the LM's settings there)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config, text]


def apply_in_memory(model: nn.Module, plan: Plan, arch: Architecture) -> nn.Module:
    """Run every step of `plan` on `model` in place, each output formed at least in its tensor's precision (float64
    inside the steps, as from file to file), then make the module changes of the plan's surgery the way the
    exported modeling code makes them at load (the model becomes that code's subclass of its stock class, whose
    `save_pretrained` writes a folder that loads as the CLI's output does), and apply its config changes."""
    if plan.renames or (plan.dropped and plan.surgery is None):
        raise NormSurgeryError(f"{plan.operation} drops or renames blocks' tensors, which a loaded model cannot follow; "
                               "write it to a folder instead.")
    if plan.config_updates.get("tie_word_embeddings") is False:
        untie_unembedding(model)
    tensors = ModelTensors(model, arch.key_renames, arch.fused, arch.split)
    stored = next(model.parameters()).dtype

    def dtype_for(name: str) -> torch.dtype:
        return tensors.get(name).dtype if name in tensors else stored  # an added bias: the model's dtype

    held = tensors.storages()
    outputs = {}
    for step in plan.steps:  # every output is computed from the original tensors before any is written
        for name, value in run_step(step, tensors, dtype_for).items():
            # an output that is an input unchanged (a reader weight a step passes through) would see the writes
            outputs[name] = value.clone() if value.untyped_storage().data_ptr() in held else value
    if plan.surgery is not None:
        _operate(model, plan, outputs)
        tensors = ModelTensors(model, arch.key_renames, arch.fused, arch.split)
    for name, value in outputs.items():
        tensors.set(name, value)
    for key, value in plan.all_config_updates(model.config).items():
        for config in {id(c): c for c in _configs(model.config)}.values():
            setattr(config, key, value)
    return model


def _operate(model: nn.Module, plan: Plan, outputs: dict[str, torch.Tensor]) -> None:
    """Make the surgery's module changes (norms swapped, biases added, tensors resized) on a loaded model."""
    from normsurgery.export.modeling_normsurgery import apply_surgery, patched

    assert plan.surgery is not None
    surgery = plan.surgery.exported({name: list(outputs[name].shape) for name in plan.surgery.resized})
    reference = next(model.parameters())
    model.__class__ = patched(type(model))
    model.config.normsurgery = surgery
    apply_surgery(model, surgery)
    for path in surgery["norms"]:
        model.get_submodule(path).to(device=reference.device, dtype=reference.dtype)
