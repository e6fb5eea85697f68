"""A transformers model built on the meta device whose weights are read from a WeightMap as the forward reaches them.

accelerate's big-model machinery does the work: `init_empty_weights` builds the skeleton (buffers such as
rotary frequencies are real), `AlignDevicesHook` with a lazy weights map brings each module's weights to the
execution device just before its forward and drops them right after, and `dispatch_model` spreads a model
that fits several GPUs over them. A model that fits the budget stays resident, so repeated passes (measurements,
calibration) read it once; a model larger than the budget is streamed from the checkpoint in place at every
pass, so memory stays at one module's weights and the activations whatever the model's size. Any model class
that transformers builds from a config works: stock families and exported `auto_map` code alike.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Union

import torch
from accelerate.hooks import AlignDevicesHook, ModelHook

from normsurgery.engine.buffers import POOL, BufferPool
from normsurgery.engine.resources import Runtime, human_bytes
from normsurgery.engine.weights import WeightMap
from normsurgery.errors import NormSurgeryError

# What one token costs in activations, in hidden-size units of float32 (residual, norm output, q/k/v, attention
# output, MLP in and out with headroom): a deliberate over-estimate used to size batches against the budget.
ACTIVATION_WIDTHS = 24
# The least a budget must leave beside the largest layer: activations and logits of this many tokens.
MIN_TOKENS = 128


class UnmatchedWeights(Exception):
    """The model's parameter names could not all be found in the weight map (a renamed or legacy checkpoint)."""


@dataclass
class LazyModel:
    """A model ready to run, and what the engine decided about it (for reports)."""

    model: torch.nn.Module
    runtime: Runtime
    resident_bytes: int  # float weights kept on the devices between passes
    streamed_bytes: int  # float weights read from the checkpoint at every pass
    largest_streamed: int  # the biggest module's weights brought in at once
    activation_bytes_per_token: int
    logit_bytes_per_token: int
    notes: list[str] = field(default_factory=list)

    @property
    def streaming(self) -> bool:
        """Whether some weights are read from the checkpoint at every pass."""
        return self.streamed_bytes > 0

    def tokens_per_pass(self, seq_len: int, extra_per_token: int = 0) -> int:
        """How many sequences of `seq_len` tokens fit the budget in one forward (at least one); `extra_per_token`
        is what the caller keeps per token beside the forward (e.g. every block's hidden states)."""
        free = self.runtime.budget - self.resident_bytes - self.largest_streamed
        per_sequence = seq_len * (self.activation_bytes_per_token + 3 * self.logit_bytes_per_token + extra_per_token)
        return max(1, free // max(per_sequence, 1))

    def describe(self) -> dict[str, Any]:
        """Plain data: where it ran, how much was kept and how much streamed."""
        return {"device": str(self.runtime.device) if len(self.runtime.devices) == 1 else [str(d) for d in self.runtime.devices],
                "budget_bytes": self.runtime.budget, "budget_from": "--max-memory" if self.runtime.explicit else "free memory",
                "resident_bytes": self.resident_bytes,
                "streamed_bytes": self.streamed_bytes, **({"notes": self.notes} if self.notes else {})}


@dataclass(frozen=True)
class Rows:
    """Rows [start, stop) of the `total` rows of one stored tensor: a parameter transformers splits off a fused stored
    tensor at load (Architecture.split). Given with `parts` only (the in-memory parameters the stored tensor holds,
    in order, and this one's `index` among them), its rows are found from the model's parameter shapes."""

    name: str
    start: int = 0
    stop: int = 0
    total: int = 0
    parts: tuple[str, ...] = ()
    index: int = 0


# where a parameter's value is stored: one tensor's name; tensors to concatenate (along the first dimension);
# (stacked experts) each expert's tensors to concatenate, the experts stacked; or rows of one stored tensor
Source = Union[str, tuple[str, ...], tuple[tuple[str, ...], ...], Rows]


def source_parts(source: Source) -> list[str]:
    """The stored tensors a parameter's value is made of."""
    if isinstance(source, str):
        return [source]
    if isinstance(source, Rows):
        return [source.name]
    return [p for x in source for p in ((x,) if isinstance(x, str) else x)]


def read_source(weights: WeightMap, source: Source) -> torch.Tensor:
    """A parameter's value: the stored tensor, or stored tensors fused as transformers fuses them at load (parts
    concatenated along their outputs, each expert's, the experts stacked), or its rows of a stored tensor."""
    if isinstance(source, str):
        return weights.get(source)
    if isinstance(source, Rows):
        return weights.get(source.name)[source.start:source.stop]
    if isinstance(source[0], str):
        return torch.cat([weights.get(part) for part in source])  # type: ignore[arg-type]
    return torch.stack([torch.cat([weights.get(part) for part in parts]) for parts in source])


def source_nbytes(weights: WeightMap, source: Source, dtype: torch.dtype) -> int:
    """The bytes of a parameter's value at `dtype`."""
    if isinstance(source, Rows):
        return weights.nbytes(source.name, dtype) * (source.stop - source.start) // max(source.total, 1)
    return sum(weights.nbytes(part, dtype) for part in source_parts(source))


class _ModelNames(Mapping):
    """The weight map seen under the model's own parameter names, each tensor read only when asked for.

    On a GPU the stored tensor travels as stored (bf16: half the bytes) and is widened there.
    """

    def __init__(self, weights: WeightMap, names: dict[str, Source], device: torch.device) -> None:
        self.weights, self.names, self.device = weights, names, device

    def __getitem__(self, key: str) -> torch.Tensor:
        source = self.names.get(key)
        if source is None:
            raise KeyError(key)
        tensor = read_source(self.weights, source)
        return tensor if self.device.type == "cpu" else tensor.to(self.device)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def model_config(folder: Path, *, trust_remote_code: bool = False) -> Any:
    """The transformers config of a model folder (its own code only when `trust_remote_code`)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise NormSurgeryError(f"transformers could not read {folder / 'config.json'}: {err}. Fix the config.") from None


def skeleton(config: Any, dtype: torch.dtype, *, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model class of `config` with every parameter on the meta device (no memory), buffers real, eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise NormSurgeryError(f"transformers cannot build a {getattr(config, 'model_type', '?')} model from its "
                               f"config: {err}. Check config.json.") from None
    return model.eval()


def parameter_sources(model: torch.nn.Module, available: set[str], key_mapping: dict[str, str] | None = None,
                      fused: dict[str, Source] | None = None) -> dict[str, Source]:
    """For every parameter name of `model` (tied aliases included), the weight-map name that holds its value.

    Tried in turn: the same name; a checkpoint name that `key_mapping` (checkpoint regex -> model name, as
    transformers' `key_mapping`) turns into it; the name without or with the base model's prefix; another
    name of the same tied parameter; the per-expert tensors that `fused` (the family's, Architecture.fused) says
    transformers stacks into it, or its rows of a stored tensor that transformers splits (a `Rows` entry).
    """
    renamed: dict[str, str] = {}
    for stored in available:
        name = stored
        for pattern, replacement in (key_mapping or {}).items():
            name = re.sub(pattern, replacement, name)
        renamed.setdefault(name, stored)
    prefix = getattr(model, "base_model_prefix", "") or ""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    ties = dict(getattr(model, "all_tied_weights_keys", None) or {})  # tied parameter -> the one it shares
    ties.update({source: target for target, source in list(ties.items())})

    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}

    def rows(split: Rows) -> Rows:
        sizes = [shapes[p][0] for p in split.parts]
        start = sum(sizes[: split.index])
        return Rows(split.name, start, start + sizes[split.index], sum(sizes))

    def lookup(name: str) -> Source | None:
        if name in available:
            return name
        parts = (fused or {}).get(name)
        if isinstance(parts, Rows):
            return rows(parts) if parts.name in available and all(p in shapes for p in parts.parts) else None
        if parts and all(part in available for part in source_parts(parts)):
            return parts
        if name in renamed:
            return renamed[name]
        if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in available:
            return name[len(prefix) + 1:]
        if prefix and f"{prefix}.{name}" in available:
            return f"{prefix}.{name}"
        return None

    sources: dict[str, Source] = {}
    missing = []
    for names in groups.values():
        names = names + [ties[n] for n in names if n in ties]
        found = next((s for s in map(lookup, names) if s is not None), None)
        if found is None:
            missing += names
        for name in names:
            if found is not None:
                sources[name] = lookup(name) or found
    if missing:
        raise UnmatchedWeights(", ".join(missing[:3]))
    return sources


def _leaf_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, list[str]]]:
    """Modules that own parameters directly, in forward order as registered, with those parameters' names."""
    leaves = []
    for path, module in model.named_modules(remove_duplicate=False):
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if own:
            leaves.append((path, module, own))
    return leaves


def _streamed_with(path: str, by_parent: tuple[str, ...]) -> str:
    """The module whose forward brings in `path`'s parameters: its own, or its parent's (or, for an entry "REGEX@N",
    the ancestor N levels up) when a `by_parent` entry matches it."""
    for entry in by_parent:
        pattern, _, up = entry.partition("@")
        if re.search(pattern, path):
            return ".".join(path.split(".")[: -int(up or 1)])
    return path


def lazy_model(config: Any, weights: WeightMap, runtime: Runtime, *, dtype: torch.dtype = torch.float32,
               passes: int = 1, trust_remote_code: bool = False, key_mapping: dict[str, str] | None = None,
               fused: dict[str, Source] | None = None,
               by_parent: tuple[str, ...] = ()) -> LazyModel:
    """Build `config`'s model over `weights` on `runtime`: held in memory when the caller runs several `passes`
    and the whole model fits the budget (weights read once), else streamed module by module at every pass (a
    model larger than the budget, or a single pass, where holding it would only cost memory); the modules whose
    paths match a `by_parent` regex are streamed for their parent's (or an ancestor's) forward
    (Family.streamed_by_parent).

    Raises UnmatchedWeights when the names do not match (the caller then loads the model the ordinary way), and
    a NormSurgeryError when the budget cannot hold the largest module and one sequence's activations.
    """
    from accelerate.hooks import add_hook_to_module
    from accelerate.utils import set_module_tensor_to_device

    model = skeleton(config, dtype, trust_remote_code=trust_remote_code)
    sources = parameter_sources(model, set(weights.names()), key_mapping, fused)
    view = _ModelNames(weights, sources, runtime.device)
    leaves = _leaf_modules(model)
    sizes = {path: sum(source_nbytes(weights, sources[f"{path}.{n}" if path else n], dtype) for n in own)
             for path, _, own in leaves}
    owners = {path: _streamed_with(path, by_parent) for path, _, _ in leaves}
    units: dict[str, int] = {}
    for path, owner in owners.items():
        units[owner] = units.get(owner, 0) + sizes[path]
    # a unit brought in by a module around other units (Llama 4's embedding, for the whole base model) stays in
    # memory while they stream
    enclosing = sum(size for owner, size in units.items() if owner != "" and owner not in sizes
                    and any(o.startswith(owner + ".") for o in units))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0) or 1)
    vocab = int(getattr(text, "vocab_size", 0) or 1)
    activation = ACTIVATION_WIDTHS * hidden * 4
    logits = vocab * 4
    largest = max(units.values(), default=0) + enclosing
    working = MIN_TOKENS * (activation + 3 * logits)
    minimum = largest + working
    if runtime.budget < minimum:
        raise NormSurgeryError(
            f"--max-memory {human_bytes(runtime.budget)} is too small to run this model: its largest layer alone "
            f"takes {human_bytes(largest)} in {str(dtype).replace('torch.', '')}, and a short sequence needs room "
            f"beside it. Give at least --max-memory {human_bytes(minimum * 1.1).replace(' ', '')}; nothing was written."
        )
    total = sum(sizes.values())
    device = runtime.device
    for buffer_owner in model.modules():  # buffers (rotary frequencies, masks) were built for real on the CPU
        for name, buf in list(buffer_owner.named_buffers(recurse=False)):
            if buf.device != device:
                buffer_owner._buffers[name] = buf.to(device)
    notes: list[str] = []
    if passes > 1 and len(runtime.devices) > 1 and total + working <= runtime.budget:
        return _spread(model, view, leaves, sizes, runtime, dtype, activation, logits, notes)
    hold = passes > 1 and total + working <= runtime.budget
    pool = POOL if device.type == "cpu" else None  # on a GPU the stored tensor is widened there
    resident = streamed = 0
    by_owner: dict[str, list[tuple[torch.nn.Module, str, str]]] = {}
    for path, module, own in leaves:
        if hold:
            for n in own:
                set_module_tensor_to_device(module, n, device, value=view[f"{path}.{n}" if path else n])
            resident += sizes[path]
            continue
        streamed += sizes[path]
        if owners[path] == path:
            hook = _StreamingHook(view, f"{path}." if path else "", device, dtype, pool)
            add_hook_to_module(module, hook, append=True)
        else:
            by_owner.setdefault(owners[path], []).extend((module, n, f"{path}.{n}") for n in own)
    for owner, tensors in by_owner.items():
        add_hook_to_module(model.get_submodule(owner), _ParentHook(tensors, view, device, dtype, pool), append=True)
    if hold:
        _retie(model)
    return LazyModel(model, runtime, resident, streamed, 0 if hold else largest, activation, logits, notes)


class _StreamingHook(AlignDevicesHook):
    """accelerate's offload hook for one streamed module, over a view of the weights that widens into pooled
    buffers; they return to the pool once the hook has dropped them after the forward."""

    def __init__(self, view: _ModelNames, prefix: str, device: torch.device, dtype: torch.dtype,
                 pool: BufferPool | None) -> None:
        super().__init__(execution_device=device, offload=True, io_same_device=False, offload_buffers=False,
                         weights_map=_Prefixed(view, prefix, dtype, pool))
        self.pool = pool

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        output = super().post_forward(module, output)
        if self.pool is not None:
            self.pool.give_back(self.weights_map.taken)
        return output


class _ParentHook(ModelHook):
    """Brings some child modules' parameters in for a module's forward and drops them after it (for model code that
    reads them there, Family.streamed_by_parent)."""

    def __init__(self, tensors: list[tuple[torch.nn.Module, str, str]], view: _ModelNames, device: torch.device,
                 dtype: torch.dtype, pool: BufferPool | None) -> None:
        self.tensors, self.device, self.pool = tensors, device, pool
        self.weights = _Prefixed(view, "", dtype, pool)

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        from accelerate.utils import set_module_tensor_to_device

        for child, name, full in self.tensors:
            set_module_tensor_to_device(child, name, self.device, value=self.weights[full])
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        from accelerate.utils import set_module_tensor_to_device

        for child, name, _ in self.tensors:
            set_module_tensor_to_device(child, name, "meta")
        if self.pool is not None:
            self.pool.give_back(self.weights.taken)
        return output


class _Prefixed(Mapping):
    """One module's view of the model's weights (its own parameter names, without the module path); stored
    tensors of another floating dtype are widened into pooled buffers, remembered in `taken`."""

    def __init__(self, view: _ModelNames, prefix: str, dtype: torch.dtype, pool: BufferPool | None) -> None:
        self.view, self.prefix, self.dtype, self.pool = view, prefix, dtype, pool
        self.taken: list[torch.Tensor] = []

    def __getitem__(self, key: str) -> torch.Tensor:
        tensor = self.view[self.prefix + key]
        if self.pool is None or tensor.dtype == self.dtype or not tensor.dtype.is_floating_point:
            return tensor
        widened = self.pool.widen(tensor, self.dtype)
        self.taken.append(widened)
        return widened

    def __iter__(self) -> Iterator[str]:
        return (k[len(self.prefix):] for k in self.view if k.startswith(self.prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _retie(model: torch.nn.Module) -> None:
    """Make aliases of one tied parameter share the materialised tensor again (setting one replaced only it)."""
    tied = getattr(model, "_tied_weights_keys", None)
    if tied and hasattr(model, "tie_weights"):
        try:
            model.tie_weights()
        except Exception:  # a stock model always ties; custom code may not support it on a partly meta model
            pass


def _spread(model: torch.nn.Module, view: _ModelNames, leaves: list, sizes: dict[str, int], runtime: Runtime,
            dtype: torch.dtype, activation: int, logits: int, notes: list[str]) -> LazyModel:
    """Place a model that fits several GPUs over them, block by block (accelerate's device map), all resident."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import set_module_tensor_to_device

    working = MIN_TOKENS * (activation + 3 * logits)
    memory = {d.index: max(b - working, 0) for d, b in zip(runtime.devices, runtime.budgets)}
    device_map = infer_auto_device_map(model, max_memory=memory, dtype=dtype,
                                       no_split_module_classes=getattr(model, "_no_split_modules", None) or [])

    def placed(path: str) -> int:
        best = ""
        for unit in device_map:
            if (unit == "" or path == unit or path.startswith(unit + ".")) and len(unit) >= len(best):
                best = unit
        return device_map[best]

    for path, module, own in leaves:
        for n in own:
            set_module_tensor_to_device(module, n, torch.device("cuda", placed(path)), value=view[f"{path}.{n}" if path else n])
    _retie(model)
    model = dispatch_model(model, device_map=device_map)
    notes.append(f"spread over {len(set(device_map.values()))} GPUs")
    return LazyModel(model, runtime, sum(sizes.values()), 0, 0, activation, logits, notes)
