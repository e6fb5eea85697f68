"""Find a model type's residual stream by tracing a tiny random instance: its norms and what each computes, the
linears that read each norm (and which output slices serve queries, keys or values), the linears that write into
the residual stream, the embeddings, the final norm and the unembedding. The result is a `Draft`."""

from __future__ import annotations

import copy
import math
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from normsurgery.adapt.draft import Draft, LayoutDraft, LinDraft, NormDraft, Width
from normsurgery.adapt.signature import block_list
from normsurgery.adapt.tiny import VOCAB, perturb, tiny_config, tiny_model
from normsurgery.adapt.trace import Key, Node, Trace, record, walk
from normsurgery.adapt.trace import key as tensor_key
from normsurgery.arch.spec import NormRole

SEQ = 6
ADD = frozenset({"add", "__add__", "__radd__", "add_", "__iadd__"})
CAST = frozenset({"to", "float", "type", "type_as", "contiguous", "dropout", "clone", "detach", "double", "half",
                  "bfloat16"})
RESIDUAL_PASS = CAST | {"view", "reshape"}  # ops that keep the residual stream the residual stream
# ops between a norm and its readers that move no value across features (token routing to experts selects rows)
PASS = CAST | {"view", "reshape", "__getitem__", "flatten", "unsqueeze", "squeeze", "index_select", "repeat",
               "expand", "repeat_interleave", "gather", "take_along_dim", "split", "tensor_split"}
# ops that multiply an input by a stored matrix: with a parameter (or a view of one) as the matrix, a linear layer
# written as a function call (a router's weight, routed experts stacked in one 3-D parameter)
MATMUL = frozenset({"linear", "matmul", "__matmul__", "bmm", "mm", "_grouped_mm", "grouped_mm"})
# ops that give a view of a parameter (an expert's slice of a stacked tensor, a transpose)
VIEWS = frozenset({"__getitem__", "t", "transpose", "__get__", "view", "reshape", "contiguous", "to", "float",
                   "type_as", "select", "narrow", "unsqueeze", "squeeze", "expand"})
FLIPS = frozenset({"t", "transpose", "__get__"})  # views that swap a matrix's two dimensions (.T, .mT, .t())
# ops whose output carries no value of their input (a shape, a fresh buffer), and gates: a routing choice or weight
# made from the residual scales the value written, it is not a value written itself
NO_VALUE = frozenset({"zeros_like", "empty_like", "ones_like", "full_like", "new_zeros", "new_empty", "new_full",
                      "new_ones", "size", "softmax", "sigmoid", "topk", "sort", "argsort", "argmax", "one_hot"})
SCALE = frozenset({"mul", "__mul__", "__rmul__", "div", "__truediv__"})  # by a constant: passes to the readers


def is_norm(module: nn.Module) -> bool:
    """A norm module: nn.LayerNorm, a class named like one (RMSNorm, LayerNorm1P, ...), or a module of no other
    children whose only parameters are one gain (and bias) vector and whose output does not change when its input
    is scaled (a remote model's `class LN`, whatever its name)."""
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower() or _normalises(module)


@torch.no_grad()
def _normalises(module: nn.Module) -> bool:
    """Whether a leaf module with one or two vector parameters of one width computes a normalisation: its output on
    random rows equals its output on the same rows scaled by 7."""
    params = list(module.parameters())
    if (any(True for _ in module.children()) or not 1 <= len(params) <= 2 or is_linear(module)
            or isinstance(module, nn.Embedding) or any(p.ndim != 1 or p.shape != params[0].shape for p in params)
            or params[0].shape[0] < 2 or params[0].device.type == "meta"):
        return False
    x = torch.randn(3, params[0].shape[0], generator=torch.Generator().manual_seed(0)) + 1.0
    try:
        probe = copy.deepcopy(module).double()
        y, z = probe(x.double()), probe(7.0 * x.double())
    except Exception:  # noqa: BLE001 - a module that takes other inputs is no norm
        return False
    return isinstance(y, torch.Tensor) and y.shape == x.shape and bool(torch.allclose(y, z, rtol=1e-4, atol=1e-6))


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or HF's Conv1D."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _modules(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module], dict[str, nn.Module]]:
    """The innermost norm modules, the linears and the embeddings, by path."""
    named = dict(model.named_modules())
    norms = {p: m for p, m in named.items() if p and is_norm(m)
             and not any(is_norm(c) for c in m.modules() if c is not m)}
    linears = {p: m for p, m in named.items() if is_linear(m)}
    embeddings = {p: m for p, m in named.items() if isinstance(m, nn.Embedding)}
    return norms, linears, embeddings


@torch.no_grad()
def norm_facts(module: nn.Module, d: int) -> tuple[str, float, float]:
    """(kind, eps, gain offset) of a norm, from what it computes in float64 on probes: a LayerNorm ignores a shift
    of its input; a zero weight leaves a (1 + w) gain's output non-zero; eps from inputs small enough to show it."""
    m = copy.deepcopy(module).double()
    weight = getattr(m, "weight", None)
    bias = getattr(m, "bias", None)
    shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else (d,)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((4, *shape), generator=gen, dtype=torch.float64) + 2.0
    if isinstance(bias, torch.Tensor):
        bias.zero_()
    offset = 0.0
    if isinstance(weight, torch.Tensor):
        weight.zero_()
        offset = 0.0 if float(m(x).abs().max()) < 1e-9 else 1.0
        weight.fill_(1.0 - offset)
    kind = "layernorm" if torch.allclose(m(x), m(x + 3.0), atol=1e-5) else "rmsnorm"
    small = torch.randn((64, *shape), generator=gen, dtype=torch.float64) * 1e-3
    centred = small - small.mean(-1, keepdim=True) if kind == "layernorm" else small
    y = m(small).double()
    ms = centred.pow(2).mean(-1, keepdim=True)
    keep = y.abs() > 1e-12
    eps = float(((centred / torch.where(keep, y, torch.ones_like(y))).pow(2) - ms)[keep].median())
    return kind, max(eps, 0.0), offset


def _eps_attr(config: Any, eps: float) -> str | None:
    """The config attribute that holds eps (names with 'eps' first), when one does."""
    raw = config.to_dict()
    hits = [k for k, v in raw.items() if isinstance(v, float) and v > 0 and abs(v - eps) <= 2e-3 * v]
    hits.sort(key=lambda k: ("eps" not in k, k))
    return hits[0] if hits else None


def _nice(eps: float) -> float:
    """eps rounded to two significant digits (the probe measures it to about 1e-4 relative)."""
    return float(f"{eps:.1e}") if eps > 0 else 0.0


def _disk_names(model: nn.Module) -> tuple[dict[str, str], set[str], dict[str, tuple[str, ...]],
                                          dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """In-memory tensor name -> its name in the saved checkpoint (transformers may rename on save), the saved
    names, and each stacked (experts, out, in) parameter saved as one tensor per expert and part: the parts' module
    paths with {e} for the expert, in the order they stack (e.g. gate_proj then up_proj into gate_up_proj), and the
    parameters concatenated at load from stored parts (_concatenated), and the stored tensors split at load into
    several parameters (_split)."""
    from safetensors.torch import load_file
    from transformers.utils import logging

    logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        saved: dict[str, torch.Tensor] = {}
        for f in Path(tmp).glob("*.safetensors"):
            saved.update(load_file(f))
    state = model.state_dict()
    mem_to_disk: dict[str, str] = {}
    for disk, t in saved.items():
        if disk in state and torch.equal(state[disk], t):
            mem_to_disk[disk] = disk
            continue
        for mem, s in state.items():
            if mem not in mem_to_disk and s.shape == t.shape and torch.equal(s, t):
                mem_to_disk[mem] = disk
                break
    stacked: dict[str, tuple[str, ...]] = {}
    for mem, s in state.items():
        if mem in mem_to_disk or s.ndim != 3:
            continue
        block = re.match(r"(.*?\.\d+\.)", mem)  # the per-expert tensors sit in the same block, maybe renamed
        stored_block = _stored_prefix(block.group(1), mem_to_disk) if block else ""
        expert0 = {}
        for name, t in saved.items():
            found = re.match(rf"({re.escape(stored_block)}.*?)\.0\.(.+)\.weight$", name)
            if found and name not in mem_to_disk.values():
                expert0[(found.group(1), found.group(2))] = t
        for module in sorted({m for m, _ in expert0}):
            parts = _stacked_parts(s, {p: t for (m, p), t in expert0.items() if m == module})
            if parts and all(torch.equal(s[e], torch.cat([saved[f"{module}.{e}.{p}.weight"] for p in parts]))
                             for e in range(s.shape[0])
                             if all(f"{module}.{e}.{p}.weight" in saved for p in parts)):
                stacked[mem] = tuple(f"{module}.{{e}}.{p}" for p in parts)
                break
    joined = _concatenated(state, saved, mem_to_disk, stacked)
    return mem_to_disk, set(saved), stacked, joined, _split(state, saved, mem_to_disk, stacked, joined)


def _stored_prefix(prefix: str, mem_to_disk: dict[str, str]) -> str:
    """An in-memory name prefix as the checkpoint stores it (Nemotron-H's backbone.layers.1. for model.layers.1.),
    found from a tensor under it whose stored name keeps the rest of its name; the prefix itself where none does.
    Given the map the other way round (stored -> in memory), a stored prefix as named in memory."""
    return next((d[: len(d) - len(m) + len(prefix)] for m, d in mem_to_disk.items()
                 if m.startswith(prefix) and d.endswith(m[len(prefix):])), prefix)


def _explained(saved: Iterable[str], mem_to_disk: dict[str, str], stacked: dict[str, tuple[str, ...]],
               joined: dict[str, tuple[str, ...]], split: dict[str, tuple[str, ...]] | None = None) -> set[str]:
    """The stored tensors that the in-memory parameters account for: saved as they are (or renamed), per expert
    where transformers stacks them, as parts it concatenates, or whole where it splits them."""
    per_expert = [re.compile(re.escape(p).replace(r"\{e\}", r"\d+") + r"\.") for s in stacked.values() for p in s]
    out = set(mem_to_disk.values()) | {p for parts in joined.values() for p in parts} | set(split or ())
    return out | {n for n in saved if any(r.match(n) for r in per_expert)}


def _concatenated(state: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], mem_to_disk: dict[str, str],
                  stacked: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """Parameters that transformers concatenates at load from stored tensors beside them (OLMo-hybrid's conv1d from
    q_conv1d, k_conv1d and v_conv1d): each one's stored parts, in order."""
    claimed = set(mem_to_disk.values())
    found: dict[str, tuple[str, ...]] = {}
    for mem, value in state.items():
        if mem in mem_to_disk or mem in stacked or value.ndim == 0:
            continue
        parent = _stored_prefix(mem.rsplit(".", 2)[0] + ".", mem_to_disk)
        candidates = {n[len(parent):]: t for n, t in saved.items() if n.startswith(parent) and n not in claimed}
        parts = _stacked_parts(value[None], candidates) if len(candidates) <= 12 else ()
        if parts:
            found[mem] = tuple(f"{parent}{p}" for p in parts)
            claimed.update(found[mem])
    return found


def _split(state: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], mem_to_disk: dict[str, str],
           stacked: dict[str, tuple[str, ...]], joined: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """Stored tensors that transformers splits at load into parameters of the same block (Sarvam-MoE's fused
    query_key_value into q_proj, k_proj and v_proj): each one's in-memory parameters, in row order."""
    claimed = _explained(saved, mem_to_disk, stacked, joined)
    disk_to_mem = {d: m for m, d in mem_to_disk.items()}
    free = {m: t for m, t in state.items() if m not in mem_to_disk and m not in stacked and m not in joined
            and t.ndim > 0}
    found: dict[str, tuple[str, ...]] = {}
    for name, tensor in saved.items():
        block = re.match(r"(.*?\.\d+\.)", name)
        if name in claimed or tensor.ndim == 0 or block is None:
            continue
        memory_block = _stored_prefix(block.group(1), disk_to_mem)  # the block's stored prefix, as named in memory
        leaf = name.rsplit(".", 1)[1]
        candidates = {m: t for m, t in free.items() if m.startswith(memory_block)
                      and m.endswith(f".{leaf}") and t.shape[1:] == tensor.shape[1:]}
        parts, row = [], 0
        while row < tensor.shape[0]:
            part = next((m for m, t in candidates.items() if m not in parts and row + t.shape[0] <= tensor.shape[0]
                         and torch.equal(tensor[row:row + t.shape[0]], t)), None)
            if part is None:
                break
            parts.append(part)
            row += candidates[part].shape[0]
        if row == tensor.shape[0] and len(parts) > 1:
            found[name] = tuple(parts)
            free = {m: t for m, t in free.items() if m not in parts}
    return found


def _stacked_parts(stacked: torch.Tensor, candidates: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """The candidate tensors (by name) whose concatenation along the first dimension is the first slice of a
    stacked parameter (expert 0's, or a concatenated parameter given as a stack of one), in order; () when none is."""
    import itertools

    target = stacked[0]
    fitting = {n: t for n, t in candidates.items() if t.ndim == target.ndim and t.shape[1:] == target.shape[1:]}
    for size in (1, 2, 3, 4):
        for names in itertools.permutations(sorted(fitting), size):
            if sum(fitting[n].shape[0] for n in names) == target.shape[0] and torch.equal(
                    torch.cat([fitting[n] for n in names]), target):
                return names
    return ()


def _renames(mem_to_disk: dict[str, str], layers: str, disk_layers: str) -> tuple[tuple[str, str], ...]:
    """On-disk -> in-memory renames (regex, replacement), applied in order, that explain every renamed tensor: the
    block list's own path first where the checkpoint stores it elsewhere (EXAONE's transformer.h for model.layers),
    then each as broad as it can be without renaming any other tensor wrongly (a prefix shared by a whole sub-model,
    else a module, else one tensor); block and expert indices match any index."""
    chain = [(rf"^{re.escape(disk_layers)}\.(\d+)\.", f"{layers}.\\g<1>.")] if disk_layers != layers else []

    def first(disk: str) -> str:
        for pattern, replacement in chain:
            disk = re.sub(pattern, replacement, disk)
        return disk

    pairs = [(first(disk), mem) for mem, disk in mem_to_disk.items()]
    found: dict[str, str] = {}
    for disk, mem in pairs:
        if mem == disk or any(re.sub(p, r, disk) == mem for p, r in found.items()):
            continue
        for pattern, replacement in _rename_candidates(mem.split("."), disk.split(".")):
            if all(re.sub(pattern, replacement, d) == m for d, m in pairs if re.match(pattern, d)):
                found[pattern] = replacement
                break
    return tuple(chain) + tuple(sorted(found.items()))


def _rename_candidates(m: list[str], d: list[str]) -> list[tuple[str, str]]:
    """Renames of one tensor's on-disk name `d` to its in-memory name `m` (both split on dots), broadest first: with
    the common trailing parts dropped (a prefix rename), fewer of them, then the whole name."""
    common = 0
    while common < min(len(m), len(d)) - 1 and m[-1 - common] == d[-1 - common]:
        common += 1
    out = []
    for keep in range(common, -1, -1):
        mm, dd = (m[:-keep], d[:-keep]) if keep else (m, d)
        general = [x for x in mm if x.isdigit()] == [x for x in dd if x.isdigit()]
        pattern = [r"(\d+)" if general and x.isdigit() else re.escape(x) for x in dd]
        index = iter(range(1, len(dd) + 1))
        replacement = [f"\\g<{next(index)}>" if general and x.isdigit() else x for x in mm]
        end, tail = (r"\.", ".") if keep else ("$", "")
        out.append(("^" + r"\.".join(pattern) + end, ".".join(replacement) + tail))
    return out


@dataclass(frozen=True)
class ParamLinear:
    """A linear layer computed by a function call on a parameter: its module path, the stored tensors' leaf
    names, whether the matrix is stored (in, out), and its expert count when it is stacked (3-D)."""

    module: str
    weight: str
    bias: str | None
    conv1d: bool
    experts: int


class _Finder:
    """Reads the residual stream off one trace."""

    def __init__(self, trace: Trace, norms: dict[str, nn.Module], linears: dict[str, nn.Module],
                 embeddings: dict[str, nn.Module], params: dict[Key, tuple[str, nn.Parameter]]) -> None:
        self.trace = trace
        self.norms, self.linears, self.embeddings = norms, linears, embeddings
        self.params = params
        self.param_linears: dict[str, ParamLinear] = {}
        self.first_call: dict[str, int] = {}
        self.problems: list[str] = []
        for node in trace.nodes:
            name = self.linear(node)
            if name is not None:
                self.first_call.setdefault(name, node.index)

    def kind(self, node: Node) -> str:
        """'linear', 'norm', 'embedding' or 'op'."""
        if node.kind == "module":
            return "linear" if node.name in self.linears else "norm" if node.name in self.norms else "embedding"
        return "linear" if self.linear(node) is not None else "op"

    def parameter(self, tensor: Key) -> tuple[str, nn.Parameter, int] | None:
        """The parameter a tensor is a view of (its name, the parameter, and how many transposes lie between)."""
        flips = 0
        while tensor not in self.params:
            node = self.trace.producer.get(tensor)
            if node is None or node.kind != "op" or node.name not in VIEWS or not node.inputs:
                return None
            flips += node.name in FLIPS
            tensor = node.inputs[0]
        name, param = self.params[tensor]
        return name, param, flips

    def linear(self, node: Node) -> str | None:
        """The name of the linear layer a call computes (a Linear module's path, or a parameter's name for a
        matmul by a parameter), else None."""
        if node.kind == "module":
            return node.name if node.name in self.linears else None
        if node.name not in MATMUL or len(node.inputs) < 2:
            return None
        found = self.parameter(node.inputs[1])
        if found is None or found[1].ndim < 2:
            return None
        name, param, flips = found
        if name not in self.param_linears:
            module, leaf = name.rsplit(".", 1)
            bias = self._bias(node, param.ndim)
            stored_in_out = (node.name != "linear") != bool(flips % 2)
            self.param_linears[name] = ParamLinear(module, leaf, bias, stored_in_out,
                                                   int(param.shape[0]) if param.ndim == 3 else 0)
        return name

    def _bias(self, node: Node, ndim: int) -> str | None:
        """The leaf name of the bias a parameter linear adds: F.linear's third argument, or a parameter added to
        its output (stacked experts' `*_bias`)."""
        candidates = list(node.inputs[2:3])
        for out in node.outputs:
            candidates += [t for n in self.trace.readers(out) if n.kind == "op" and n.name in ADD
                           for t in n.inputs if t != out]
        for t in candidates:
            found = self.parameter(t)
            if found is not None and found[1].ndim == ndim - 1:
                return found[0].rsplit(".", 1)[1]
        return None

    def residual(self, start: Key, end: Key) -> tuple[set[Key], list[Node]]:
        """The residual tensors from `start` to `end` (through adds and casts, and through norms only where the
        stream cannot reach `end` without them: Post-LN), and the adds on the way."""
        for through_norms in (False, True):
            stream, steps = {start}, []
            for node in self.trace.nodes:
                if any(t in stream for t in node.inputs) and (
                        (node.kind == "op" and (node.name in ADD | RESIDUAL_PASS or self._scalar_scale(node, stream)))
                        or (through_norms and self.kind(node) == "norm")):
                    stream.update(node.outputs)
                    steps.append(node)
            if end in stream:
                break
        else:
            raise ValueError("the block's output is not its input plus sublayer outputs")
        chain = walk([end], lambda t: [i for n in steps if t in n.outputs for i in n.inputs if i in stream])
        return chain, [n for n in steps if any(t in chain for t in n.outputs)]

    def _scalar_scale(self, node: Node, stream: set[Key]) -> bool:
        """A multiplication of the stream by one number, or by one number per feature, that does not depend on it
        (Gemma 4's per-block scalar; Doge's learned residual weights): a tensor of one value per feature at most
        holds no token's value."""
        if node.name not in SCALE | {"mul_", "__imul__"}:
            return False
        others = [t for t in node.inputs if t not in stream]
        width = next((self.trace.tensors[t].shape[-1] for t in node.inputs if t in stream and t in self.trace.tensors
                      and self.trace.tensors[t].ndim), None)
        return len(others) == len(node.inputs) - 1 and all(
            t in self.trace.tensors and self.trace.tensors[t].numel() in (1, width) for t in others)

    def _constant_scale(self, node: Node) -> bool:
        """A multiplication or division of one tensor by a number (a config multiplier)."""
        return node.name in SCALE and len(node.inputs) == 1

    def forward_to_linears(self, tensor: Key, what: str) -> list[str]:
        """The linears that read `tensor` through ops that move nothing across features (a norm's readers)."""
        found: list[str] = []

        def step(t: Key) -> list[Key]:
            out: list[Key] = []
            for node in self.trace.readers(t):
                kind = self.kind(node)
                if kind == "linear":
                    found.append(self.linear(node))  # type: ignore[arg-type]
                elif kind == "op" and (node.name in PASS or self._constant_scale(node)):
                    out.extend(node.outputs)
                else:
                    self.problems.append(f"{what} is read by {node.name!r}, which is not a linear layer")
            return out

        walk([tensor], step)
        return list(dict.fromkeys(found))

    def back_to_linears(self, tensor: Key, stop: set[Key], what: str,
                        embeddings: list[str] | None = None) -> tuple[list[str], list[str]]:
        """The linears whose outputs make `tensor` (a sublayer's contribution to the residual), and the norms on the
        way (output norms); the embeddings met are added to `embeddings`, or are a problem when it is None. Gates
        (routing weights, sigmoid gates) and integer tensors (routing choices) are not followed."""
        linears: list[str] = []
        norms: list[str] = []

        def step(t: Key) -> list[Key]:
            value = self.trace.tensors.get(t)
            if value is not None and not (value.is_floating_point() or value.is_complex()):
                return []
            if t in stop:
                self.problems.append(f"{what} takes a sublayer output made from the residual stream by something "
                                     "other than linear layers")
                return []
            node = self.trace.producer.get(t)
            if node is None:
                return []
            kind = self.kind(node)
            if kind == "linear":
                linears.append(self.linear(node))  # type: ignore[arg-type]
                return []
            if kind == "norm":
                norms.append(node.name)
            elif kind == "embedding":
                if embeddings is None:
                    self.problems.append(f"{what} comes from embedding {node.name}")
                else:
                    embeddings.append(node.name)
                return []
            elif node.name in NO_VALUE:
                return []
            return [i for i in node.inputs if i not in self.params]

        walk([tensor], step)
        return list(dict.fromkeys(linears)), list(dict.fromkeys(norms))

    def module_nodes(self, path: str) -> list[Node]:
        """The calls of one module."""
        return [n for n in self.trace.nodes if n.kind == "module" and n.name == path]


def _attention_labels(model: nn.Module, blocks: list[nn.Module], readers: list[list[str]], writers: list[list[str]],
                      ids: torch.Tensor) -> dict[str, list[str]]:
    """Per reader, each output channel's part in attention: 'q' (moves the scores of its own token), 'k' (moves the
    scores other tokens give it), 'v' (moves later tokens' attention output, not the scores) or '-' (moves only its
    own token: an MLP). Found from gradients, block by block."""
    from torch.overrides import TorchFunctionMode

    current = [-1]
    scores: dict[int, list[torch.Tensor]] = {}

    class Softmax(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("softmax", "_softmax") and args and isinstance(args[0], torch.Tensor):
                x = args[0]
                if x.ndim >= 3 and x.shape[-1] == x.shape[-2] == ids.shape[1] and current[0] >= 0:
                    scores.setdefault(current[0], []).append(x)
            return func(*args, **(kwargs or {}))

    modules = dict(model.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    handles = [b.register_forward_pre_hook(lambda _m, _a, i=i: current.__setitem__(0, i)) for i, b in enumerate(blocks)]
    for path in {p for r in readers for p in r}:
        handles.append(modules[path].register_forward_hook(lambda _m, _a, out, p=path: outputs.__setitem__(p, out)))
    for path in {p for w in writers for p in w}:
        handles.append(modules[path].register_forward_pre_hook(lambda _m, a, p=path: inputs.__setitem__(p, a[0])))
    try:
        with torch.enable_grad(), Softmax():
            model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    gen = torch.Generator().manual_seed(1)
    labels: dict[str, list[str]] = {}
    for b, paths in enumerate(readers):
        if not paths:
            continue
        outs = [outputs[p] for p in paths]
        s_loss = sum((s[..., 1:, 0] * torch.randn(s[..., 1:, 0].shape, generator=gen)).sum() for s in scores.get(b, []))
        o_loss = sum((inputs[w][..., -1, :] * torch.randn(inputs[w][..., -1, :].shape, generator=gen)).sum()
                     for w in writers[b])
        zero = [torch.zeros_like(o) for o in outs]

        def grads(loss: Any) -> list[torch.Tensor | None]:
            if not torch.is_tensor(loss) or not loss.requires_grad:
                return list(zero)
            live = [o for o in outs if o.requires_grad]
            got = iter(torch.autograd.grad(loss, live, allow_unused=True, retain_graph=True) if live else ())
            return [next(got) if o.requires_grad else None for o in outs]

        gs = grads(s_loss) if scores.get(b) else zero
        go = grads(o_loss) if writers[b] else zero
        for p, o, g1, g2 in zip(paths, outs, gs, go):
            g1 = (torch.zeros_like(o) if g1 is None else g1).abs().reshape(-1, SEQ, o.shape[-1]).sum(0)
            g2 = (torch.zeros_like(o) if g2 is None else g2).abs().reshape(-1, SEQ, o.shape[-1]).sum(0)
            labels[p] = ["q" if g1[1:, j].any() else "k" if g1[0, j].any() else "v" if g2[:-1, j].any() else "-"
                         for j in range(o.shape[-1])]
    return labels


def _groups(labels: list[str], config: Any) -> tuple[tuple[str, ...], tuple[Width, ...], Width] | None:
    """A reader's (groups, widths, repeat) from its channels' labels; None when it mixes attention and MLP."""
    if set(labels) == {"-"}:
        return (), (), 1
    if "-" in labels:
        return None
    runs: list[list[Any]] = []
    for label in labels:
        if runs and runs[-1][0] == label:
            runs[-1][1] += 1
        else:
            runs.append([label, 1])
    period = next(p for p in range(1, len(runs) + 1) if len(runs) % p == 0 and runs == runs[:p] * (len(runs) // p))
    repeat, base = len(runs) // period, runs[:period]
    groups = tuple("v" if label == "v" else "qk" for label, _ in base)
    lengths = [n for _, n in base]
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    kv = int(getattr(config, "num_key_value_heads", 0) or 0)
    head_dim = int(getattr(config, "head_dim", 0) or (config.hidden_size // heads if heads else 0))
    widths: tuple[Width, ...] = ()
    if len(set(lengths)) > 1:
        if head_dim and all(n % head_dim == 0 for n in lengths):
            widths = tuple("num_attention_heads" if n == heads * head_dim else
                           "num_key_value_heads" if kv and n == kv * head_dim else n // head_dim for n in lengths)
        else:
            unit = math.gcd(*lengths)
            widths = tuple(n // unit for n in lengths)
    rep: Width = "num_attention_heads" if repeat > 1 and repeat == heads else repeat
    return groups, widths, rep


# boolean config attributes that say nothing about the architecture
NOT_LAYOUT = frozenset({"use_cache", "return_dict", "output_attentions", "output_hidden_states", "tie_word_embeddings",
                        "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder", "torchscript",
                        "use_return_dict"})


def flags(config: Any) -> dict[str, bool]:
    """The config's boolean attributes that may change the architecture."""
    return {k: v for k, v in sorted(config.to_dict().items())
            if isinstance(v, bool) and k not in NOT_LAYOUT and not k.startswith("_")}


def _bias_switches(model_type: str, layers: int, overrides: dict[str, Any] | None, base: dict[str, bool],
                   config: Any) -> dict[str, str]:
    """Which config flag switches each linear's bias: each flag named like '*bias*' flipped, the model rebuilt
    (on the meta device) and its linears' biases compared."""
    from transformers import AutoModelForCausalLM

    switches: dict[str, str] = {}
    for key, value in flags(config).items():
        if "bias" not in key:
            continue
        try:
            flipped = tiny_config(model_type, layers, {**(overrides or {}), key: not value})
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(flipped, attn_implementation="eager")
        except Exception:  # a flag that the config or model refuses to flip
            continue
        linears = {p: m.bias is not None for p, m in model.named_modules() if is_linear(m)}
        for p, has in base.items():
            if p in linears and linears[p] != has:
                switches.setdefault(p, key)
    return switches


@dataclass
class _Block:
    """What one block's trace shows: each norm's role and readers (in-memory paths), writers, direct readers."""

    prefix: str
    norms: dict[str, tuple[str, list[str]]]
    writers: list[str]
    direct: list[str]
    parallel: bool


def _block(find: _Finder, start: Key, end: Key, prefix: str) -> _Block:
    """Follow one block's residual stream from `start` to `end`: the adds on it, what each add takes (writers,
    through output norms), and what reads it (input norms and their readers, direct readers, the rest: QK-norms)."""
    trace = find.trace
    chain, adds = find.residual(start, end)
    stream = walk(list(chain), lambda t: [o for n in trace.readers(t) if n.kind == "op" and n.name in RESIDUAL_PASS
                                           for o in n.outputs])
    found: dict[str, tuple[str, list[str]]] = {}
    writers: list[str] = []
    for node in adds:
        if find.kind(node) == "norm":
            found[node.name] = ("residual", [])
            continue
        for operand in node.inputs:
            if operand not in chain and operand not in stream:
                linears, output_norms = find.back_to_linears(operand, stream, f"{prefix[:-1]}'s residual add")
                writers += linears
                found.update({n: ("output", []) for n in output_norms})
    direct: list[str] = []
    direct_reads: set[Key] = set()

    def read_directly(t: Key) -> list[Key]:
        out: list[Key] = []
        for node in trace.readers(t):
            name = find.linear(node)
            if name is not None and name.startswith(prefix):  # not the next block's
                direct.append(name)
                direct_reads.add(node.inputs[0])
            elif node.kind == "op" and node.name in PASS - RESIDUAL_PASS:  # token routing to experts
                out.extend(node.outputs)
        return out

    for t in stream:
        for node in trace.readers(t):
            if node.kind == "module" and not node.name.startswith(prefix):
                continue  # the next block's or the final norm
            if find.kind(node) == "norm" and node.name not in found:
                found[node.name] = ("input", find.forward_to_linears(node.outputs[0], node.name))
        walk(read_directly(t), read_directly)
    for path in find.norms:  # called, but neither on nor reading the stream: inside a sublayer (QK-norms)
        if path.startswith(prefix) and path not in found and find.module_nodes(path):
            found[path] = ("qk", [])
    read = {n.inputs[0] for p, (role, _) in found.items() if role == "input" for n in find.module_nodes(p)}
    read |= {t for t in direct_reads if t in stream}
    order = find.first_call.__getitem__
    return _Block(prefix, found, sorted(set(writers), key=order), sorted(set(direct), key=order),
                  parallel=len(set(writers)) > 1 and read == {start})  # attention and MLP read the same residual


def _norm_draft(path: str, module: nn.Module, role: NormRole, readers: tuple[LinDraft, ...] = ()) -> NormDraft:
    """A norm's draft: its role, readers, and whether it holds a gain and a bias."""
    return NormDraft(path, role, readers, has_weight=isinstance(getattr(module, "weight", None), nn.Parameter),
                     has_bias=isinstance(getattr(module, "bias", None), nn.Parameter))


def draft_family(model_type: str, *, layers: int = 2, overrides: dict[str, Any] | None = None,
                 explore: bool = True) -> Draft:
    """Trace a tiny random `model_type` and draft its declaration; the Draft's `problems` say what tracing could
    not express (then the declaration needs a hand edit). `explore`: find the config flags that switch biases."""
    config = tiny_config(model_type, layers, overrides)

    def switches(linears: dict[str, bool]) -> dict[str, str]:
        return _bias_switches(model_type, layers, overrides, linears, config)

    return draft_config(config, switches=switches if explore else None)


def draft_config(config: Any, *, switches: Callable[[dict[str, bool]], dict[str, str]] | None = None,
                 trust_remote_code: bool = False) -> Draft:
    """Trace a tiny random model of `config` (already tiny) and draft its declaration, one layout per kind of block.
    `switches`: the config flag switching each linear's bias, from whether each linear has one (else constants).
    A draft with problems whose checkpoint transformers converts at load beyond what the tracer follows says so
    first: that is then the cause of what went wrong."""
    draft = _draft(config, switches, trust_remote_code)
    if draft.problems and draft.unconverted:
        draft.problems.insert(0, "transformers converts these tensors at load in a way the tracer cannot follow (not "
                                 f"a rename, a stack, a concatenation or a split): {', '.join(draft.unconverted[:4])}")
    return draft


def _unconverted(model: nn.Module, mem_to_disk: dict[str, str], saved: set[str], stacked: dict[str, tuple[str, ...]],
                 joined: dict[str, tuple[str, ...]], split: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """In-memory parameters that no stored tensor explains, where stored tensors are left unexplained too (Ergo's
    router stored transposed, its residual gates stored as a function of their weights)."""
    matched = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in mem_to_disk}
    parts = {p for s in split.values() for p in s}
    lonely = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) not in matched
              and n not in stacked and n not in joined and n not in parts]
    return tuple(lonely) if lonely and set(saved) - _explained(saved, mem_to_disk, stacked, joined, split) else ()


def _draft(config: Any, switches: Callable[[dict[str, bool]], dict[str, str]] | None,
           trust_remote_code: bool) -> Draft:
    """draft_config's trace and draft."""
    from normsurgery.adapt.signature import block_signatures, config_signatures
    from normsurgery.arch.composite import text_view

    model = tiny_model(config, trust_remote_code=trust_remote_code)
    built, config = config, text_view(config)  # a composite config is read as its language model's
    draft = Draft(model_type=str(config.model_type), config=config)
    n_layers = int(config.num_hidden_layers)
    norms, linears, embeddings = _modules(model)
    try:
        draft.layers, blocks = block_list(model, n_layers)
    except ValueError as err:
        draft.problems.append(str(err))
        return draft
    facts: dict[str, tuple[str, float, float] | None] = {}
    for path, module in norms.items():
        try:
            facts[path] = norm_facts(module, int(config.hidden_size))
        except Exception:  # a norm that does not take one hidden vector (a gated or group norm inside a mixer)
            facts[path] = None
    params = dict(model.named_parameters(remove_duplicate=False))
    perturb(model, {f"{p}.weight": f[2] for p, f in facts.items() if f and f"{p}.weight" in params},
            {f"{p}.bias" for p in norms if f"{p}.bias" in params}, {f"{p}.weight" for p in embeddings})
    vocab = min(VOCAB, int(getattr(config, "vocab_size", VOCAB) or VOCAB))
    ids = torch.randint(3, vocab, (1, SEQ), generator=torch.Generator().manual_seed(0))
    atomic = {m: p for group in (norms, linears, embeddings) for p, m in group.items()}
    try:
        trace, ends = record(model, atomic, {b: i for i, b in enumerate(blocks)}, ids, use_cache=False)
    except Exception as err:  # the model's own forward fails on the tiny config
        draft.problems.append(f"the tiny model's forward pass failed ({type(err).__name__}: {err})")
        return draft
    if len(ends) != n_layers:
        draft.problems.append(f"the forward pass ran {len(ends)} of the {n_layers} blocks (blocks are skipped or "
                              "run more than once)")
        return draft
    draft.streamed_by_parent = _by_parent(trace.read_outside, draft.layers)
    find = _Finder(trace, norms, linears, embeddings,
                   {tensor_key(p): (n, p) for n, p in model.named_parameters(remove_duplicate=False)})
    mem_to_disk, saved, stacked, joined, split = _disk_names(model)
    draft.unconverted = _unconverted(model, mem_to_disk, saved, stacked, joined, split)
    split_into = {part: stored for stored, parts in split.items() for part in parts}

    def disk(path: str) -> str:
        weight = f"{path}.weight"
        return mem_to_disk.get(weight, split_into.get(weight, weight))[: -len(".weight")]

    memory_layers = draft.layers
    draft.layers = _disk_layers(memory_layers, mem_to_disk)
    draft.key_renames = _renames(mem_to_disk, memory_layers, draft.layers)

    def on_disk(prefix: str) -> str:  # a block's in-memory prefix -> its prefix in the checkpoint
        return draft.layers + prefix[len(memory_layers):]

    try:
        found = [_block(find, start, end, f"{memory_layers}.{i}.") for i, (start, end) in sorted(ends.items())]
    except ValueError as err:
        draft.problems.append(str(err))
        return draft
    module_readers = [[r for role, rs in b.norms.values() if role == "input" for r in rs if r in linears]
                      for b in found]
    module_writers = [[w for w in b.writers if w in linears] for b in found]
    labels = _attention_labels(model, blocks, module_readers, module_writers, ids)
    bias_flags = switches({p: m.bias is not None for p, m in linears.items()}) if switches else {}

    def lin(path: str, prefix: str) -> tuple[LinDraft, ...]:
        if path in find.param_linears:
            return _param_lin(find.param_linears[path], prefix, on_disk(prefix) if prefix else prefix, mem_to_disk,
                              stacked, draft)
        prefix = on_disk(prefix) if prefix else prefix
        module = linears[path]
        groups, widths, repeat = (), (), 1
        if path in labels:
            shape = _groups(labels[path], config)
            if shape is None:  # a mixer (SSM, convolution, linear attention) with one projection: one path
                draft.notes.append(f"{path} serves attention-like and per-token outputs: one reader path")
            else:
                groups, widths, repeat = shape
        return (LinDraft(disk(path)[len(prefix):], bias=bias_flags.get(path, module.bias is not None),
                         conv1d=type(module).__name__ == "Conv1D", groups=groups, widths=widths, repeat=repeat),)

    def lins(paths: list[str], prefix: str) -> tuple[LinDraft, ...]:
        out: dict[str, LinDraft] = {}
        for x in (x for p in paths for x in lin(p, prefix)):  # the parameters split off one stored tensor: it
            out[x.path] = replace(x, groups=(), widths=(), repeat=1) if x.path in out else x  # reads for them all
        return tuple(out.values())

    layouts = []
    for b in found:
        ordered = sorted(b.norms, key=lambda p: find.module_nodes(p)[0].index)
        concatenated = tuple((m[len(b.prefix):], tuple(p[len(on_disk(b.prefix)):] for p in parts))
                             for m, parts in sorted(joined.items()) if m.startswith(b.prefix))
        layouts.append(LayoutDraft(
            tuple(_norm_draft(disk(p)[len(on_disk(b.prefix)):], norms[p], b.norms[p][0],  # type: ignore[arg-type]
                              lins(b.norms[p][1], b.prefix)) for p in ordered),
            lins(b.writers, b.prefix), lins(b.direct, b.prefix), b.parallel, concatenated=concatenated,
            split=tuple((t[len(on_disk(b.prefix)):], tuple(p[len(b.prefix):] for p in parts))
                        for t, parts in sorted(split.items()) if t.startswith(on_disk(b.prefix)))))
    signatures = block_signatures(blocks)
    kinds: dict[str, LayoutDraft] = {}
    for i, (signature, layout) in enumerate(zip(signatures, layouts)):
        if kinds.setdefault(signature, layout) != layout:
            draft.problems.append(f"block {i} has the modules of an earlier block but another layout (its "
                                  "computation depends on its index)")
    first = layouts[0]
    draft.norms, draft.writers, draft.direct_readers, draft.parallel = (first.norms, first.writers,
                                                                        first.direct_readers, first.parallel)
    draft.concatenated, draft.split = first.concatenated, first.split
    if len(set(layouts)) > 1:
        draft.signatures, draft.layouts = tuple(kinds), tuple(kinds.values())
        index = {sig: k for k, sig in enumerate(draft.signatures)}
        tiny_kinds = [index[sig] for sig in signatures]

        def kinds_of(c: Any) -> list[int]:
            if c is config or c is built:
                return tiny_kinds
            try:
                return [index[sig] for sig in config_signatures(c, trust_remote_code)]
            except KeyError:
                raise ValueError(f"a block of this {draft.model_type} config has modules that no traced block "
                                 "has") from None

        draft.kinds = kinds_of
    draft.post_ln = any(n.role == "residual" for layout in layouts for n in layout.norms)
    residual_norms = {p for b in found for p, (role, _) in b.norms.items() if role != "qk"}
    unprobed = sorted(p for p in residual_norms if facts[p] is None)
    if unprobed:
        draft.problems.append(f"{unprobed[0]} is on the residual stream but could not be probed on one hidden vector")
        return draft
    _shared_facts(draft, {p: facts[p] for p in residual_norms})  # type: ignore[misc]
    on_path = _model_level(draft, find, model, ends, ids, disk, memory_layers)
    draft.problems.extend(dict.fromkeys(find.problems))
    draft.unembed, = lin(_unembedding(model, linears), "")
    if not draft.problems:
        state = dict(model.state_dict(keep_vars=True))
        unread = {mem_to_disk.get(n, n) for n, t in state.items() if id(t) not in trace.read_params}
        _others(draft, saved, unread | {t for t in saved if t.rsplit(".", 1)[0] not in on_path})
        draft.config_keys = _config_keys(draft)
    return draft


def _disk_layers(layers: str, mem_to_disk: dict[str, str]) -> str:
    """The block list's path in the checkpoint (transformers may save a composite model's language model under
    another prefix, e.g. Gemma 3's language_model.model.layers for model.language_model.layers, and a model whose
    hub checkpoints use older names under those, e.g. EXAONE's transformer.h for model.layers): where the stored
    names of a block-0 tensor and its block-1 twin first differ, else where the stored name's first ".0." starts."""
    for mem, disk in mem_to_disk.items():
        if not mem.startswith(f"{layers}.0."):
            continue
        twin = mem_to_disk.get(f"{layers}.1.{mem[len(layers) + 3:]}")
        parts = disk.split(".")
        if twin is not None and len(twin.split(".")) == len(parts):
            at = next((i for i, (a, b) in enumerate(zip(parts, twin.split("."))) if a != b), None)
            if at is not None and parts[at] == "0":
                return ".".join(parts[:at])
        if "0" in parts:
            return ".".join(parts[: parts.index("0")])
    return layers


def _by_parent(read_outside: dict[str, str], layers: str) -> tuple[str, ...]:
    """Regexes of the modules whose parameters an ancestor's code reads (any block's for one found in a block),
    with "@N" where that ancestor is N > 1 levels up (Gemma 4's model reads its language model's embedding). A
    tied parameter held by several modules is streamed with the one under its reader."""
    out = set()
    for path, reader in read_outside.items():
        if reader and not path.startswith(reader + ".") and any(
                p.startswith(reader + ".") for p, r in read_outside.items() if r == reader):
            continue  # a tied alias outside the reader: its twin under the reader is streamed
        common = 0
        parts, above = path.split("."), reader.split(".") if reader else []
        while common < min(len(parts) - 1, len(above)) and parts[common] == above[common]:
            common += 1
        up = len(parts) - common
        inside = re.match(rf"{re.escape(layers)}\.\d+\.(.*)$", path)
        pattern = rf"^{re.escape(layers)}\.\d+\.{re.escape(inside.group(1))}$" if inside else rf"^{re.escape(path)}$"
        out.add(pattern + (f"@{up}" if up > 1 else ""))
    return tuple(sorted(out))


def _param_lin(pl: ParamLinear, prefix: str, disk_prefix: str, mem_to_disk: dict[str, str],
               stacked: dict[str, tuple[str, ...]], draft: Draft) -> tuple[LinDraft, ...]:
    """The drafts of a linear computed from a parameter: one stacked (or 2-D) tensor as saved, or the per-expert
    tensors transformers stacks into it at load (`prefix`: the block's in memory, `disk_prefix`: in the checkpoint)."""
    name = f"{pl.module}.{pl.weight}"
    bias = pl.bias is not None
    if name in mem_to_disk:
        disk_module, leaf = mem_to_disk[name].rsplit(".", 1)
        bias_leaf = pl.bias or "bias"
        return (LinDraft(disk_module[len(disk_prefix):], bias=bias, conv1d=pl.conv1d, names=(leaf, bias_leaf),
                         experts=pl.experts),)
    if name in stacked and not pl.conv1d and not bias:
        return tuple(LinDraft(part[len(disk_prefix):], experts=pl.experts, loaded=name[len(prefix):])
                     for part in stacked[name])
    draft.problems.append(f"{name} is neither saved as it is nor as per-expert tensors that stack into it")
    return ()


def _config_keys(draft: Draft) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The attributes the declaration reads that config.json holds under the class's own key (its attribute_map,
    e.g. GPT-2's n_embd), so that normsurgery reads config.json without transformers."""
    read = {"hidden_size", "num_hidden_layers", "vocab_size", "tie_word_embeddings"}
    read |= {w for n in draft.norms for r in n.readers for w in (*r.widths, r.repeat) if isinstance(w, str)}
    mapping = dict(getattr(type(draft.config), "attribute_map", {}) or {})
    return tuple((a, (mapping[a],)) for a in sorted(read) if a in mapping)


def _shared_facts(draft: Draft, facts: dict[str, tuple[str, float, float]]) -> None:
    """The family's norm kind, eps (and the config attribute holding it) and gain offset, which every norm on the
    residual stream must share."""
    if len({(kind, offset) for kind, _, offset in facts.values()}) > 1:
        draft.problems.append("the norms differ in kind or (1 + w) gain; a family declares one of each")
    if facts:
        kind, eps, draft.gain_offset = next(iter(facts.values()))
        draft.norm_kind = kind  # type: ignore[assignment]
        draft.eps_attr = _eps_attr(draft.config, eps)
        draft.eps = getattr(draft.config, draft.eps_attr) if draft.eps_attr else _nice(eps)


def _unembedding(model: nn.Module, linears: dict[str, nn.Module]) -> str:
    """The path of the output embedding."""
    output = model.get_output_embeddings()
    return next(p for p, m in linears.items() if m is output)


def _model_level(draft: Draft, find: _Finder, model: nn.Module, ends: dict[int, tuple[Key, Key]],
                 ids: torch.Tensor, disk: Callable[[str], str], layers: str) -> set[str]:
    """Embeddings (token, position and its offset, an embedding norm, a sqrt(d) scale), the final norm and what
    reads it; returns the model-level modules (as stored) on the way from the input ids to the blocks and from the
    blocks to the logits (any other model-level module is a side computation: a vision tower, per-block inputs)."""
    trace = find.trace
    first = ends[0][0]
    met: list[str] = []
    linears, before = find.back_to_linears(first, set(), "block 0's input", met)
    on_path = {disk(p) for p in (*linears, *before, *met, _unembedding(model, find.linears))}
    if linears:
        draft.problems.append(f"linear layers between the embeddings and block 0: {', '.join(linears)}")
    token_module = model.get_input_embeddings()
    nodes = [n for n in trace.nodes if find.kind(n) == "embedding" and n.name in met]
    token = [n for n in nodes if find.embeddings[n.name] is token_module]
    if not token:
        draft.problems.append("no embedding reads the input ids")
        return on_path
    draft.token_embedding = disk(token[0].name)
    positions = [n for n in nodes if n is not token[0]]
    if len(positions) > 1:
        draft.problems.append(f"several position embeddings: {', '.join(n.name for n in positions)}")
    if positions:
        draft.position_embedding = disk(positions[0].name)
        table = find.embeddings[positions[0].name].weight.detach()  # position 0's row: an offset shows (OPT's 2)
        first_row = trace.tensors[positions[0].outputs[0]].reshape(-1, table.shape[1])[0]
        draft.position_offset = int((table - first_row).abs().sum(1).argmin())
    if before:
        draft.embedding_norm = _norm_draft(disk(before[0]), find.norms[before[0]], "embedding")
    else:
        rows = token_module.weight.detach()[ids].double()  # rows, not the module's output: some embeddings scale
        h = trace.tensors[first].double() - (trace.tensors[positions[0].outputs[0]].double() if positions else 0)
        scale = float((h * rows).sum() / (rows * rows).sum())
        d = int(draft.config.hidden_size)
        draft.embed_sqrt_d = abs(scale - math.sqrt(d)) < 1e-3 * math.sqrt(d)
        if float((h - scale * rows).abs().max()) > 1e-5 * float(h.abs().max()):
            draft.problems.append("block 0's input holds more than the (scaled) stored embeddings, e.g. position "
                                  "encodings computed rather than stored (sinusoidal), which a draft does not declare: "
                                  "declare the family by hand, `computed_positions` naming the module computing them")
        elif not draft.embed_sqrt_d and abs(scale - 1.0) > 1e-4:
            draft.notes.append(f"embeddings are multiplied by {scale:.4g} (a config multiplier the stock class applies, "
                               "kept by every rewrite)")
    unembed = _unembedding(model, find.linears)
    after_last = walk([ends[max(ends)][1]], lambda t: [o for n in trace.readers(t) if n.kind == "op" and n.name in PASS
                                                        for o in n.outputs])
    finals = [n for n in trace.nodes if find.kind(n) == "norm" and n.inputs and n.inputs[0] in after_last]
    if finals:
        draft.final_norm = _norm_draft(disk(finals[0].name), find.norms[finals[0].name], "final")
        readers = find.forward_to_linears(finals[0].outputs[0], finals[0].name)
        if readers != [unembed]:
            draft.problems.append(f"the final norm is read by {', '.join(readers)}, not only by the unembedding")
    extra = [p for p in find.linears if not p.startswith(f"{layers}.") and p != unembed
             and p in find.first_call]  # a composite model's vision tower does not run on text
    if extra:  # side computations (e.g. Gemma 4's per-block inputs from the embeddings): left alone
        draft.model_others += tuple(t for p in extra for t in (f"{disk(p)}.weight", f"{disk(p)}.bias")
                                    if getattr(find.linears[p], t.rsplit(".", 1)[1], None) is not None)
        draft.notes.append(f"model-level linears off the residual stream, left alone: {', '.join(extra)}")
    return on_path | ({disk(finals[0].name)} if finals else set())


def _others(draft: Draft, saved: set[str], unread: set[str]) -> None:
    """Block tensors that are neither norms nor linears (e.g. activation parameters, a router's score bias), which
    rewrites leave alone, per kind of block, and model-level tensors that the text forward never reads (a
    composite model's vision tower); any other saved tensor the draft does not name is a problem."""
    arch = draft.family().resolve(draft.config)
    unknown = set(saved) - set(arch.roles()) - ({arch.unembed.weight} if arch.tied else set())
    n = arch.num_layers
    kinds = draft.kinds(draft.config) if draft.layouts and draft.kinds else [0] * n
    per_kind: dict[int, tuple[str, ...]] = {}
    for i in range(n):
        prefix = f"{draft.layers}.{i}."
        per_kind.setdefault(kinds[i], tuple(sorted(t[len(prefix):] for t in unknown if t.startswith(prefix))))
    if draft.layouts:
        draft.layouts = tuple(replace(layout, others=per_kind.get(k, ())) for k, layout in enumerate(draft.layouts))
    draft.others = per_kind.get(kinds[0], ())
    rest = sorted(unknown - {f"{draft.layers}.{i}.{o}" for i in range(n) for o in per_kind[kinds[i]]})
    draft.model_others += tuple(t for t in rest if t in unread and not t.startswith(f"{draft.layers}.")
                                and t not in draft.model_others)
    rest = [t for t in rest if t not in draft.model_others]
    if rest:
        draft.problems.append(f"tensors the draft does not place: {', '.join(rest[:6])}")
