"""Record the dataflow of one forward pass: which op or module made each tensor, and what read it.

Linear, Conv1D, Embedding and norm modules are atomic (their inner ops are not recorded); every other torch call
is an op. A tensor value is keyed by (id, version): an in-place op makes a new value of the same tensor. Every
recorded tensor is kept alive, so that ids are never reused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves


Key = tuple[int, int]  # (id, version) of a tensor value


def key(t: torch.Tensor) -> Key:
    """The key of a tensor's current value."""
    return id(t), t._version


@dataclass
class Node:
    """One recorded call: an op (`kind` "op", `name` the function's name) or an atomic module (`kind` "module",
    `name` its path); `inputs` and `outputs` are tensor keys."""

    kind: str
    name: str
    inputs: tuple[Key, ...]
    outputs: tuple[Key, ...]
    index: int


@dataclass
class Trace:
    """The recorded calls, which call made each tensor, and which calls read it."""

    nodes: list[Node] = field(default_factory=list)
    producer: dict[Key, Node] = field(default_factory=dict)
    consumers: dict[Key, list[Node]] = field(default_factory=dict)
    tensors: dict[Key, torch.Tensor] = field(default_factory=dict)
    alive: list[torch.Tensor] = field(default_factory=list)
    # modules whose parameters were read while the module itself was not running -> the innermost module running
    # then (the one whose code read them: a parent, or a further ancestor)
    read_outside: dict[str, str] = field(default_factory=dict)
    read_params: set[int] = field(default_factory=set)  # ids of the parameters any call read

    def add(self, kind: str, name: str, inputs: list[Key], outputs: list[torch.Tensor]) -> None:
        """Record one call: the keys its inputs had when it started, and its outputs."""
        out_keys = tuple(dict.fromkeys(key(t) for t in outputs))
        for t in outputs:
            self.tensors.setdefault(key(t), t)
            self.alive.append(t)
        node = Node(kind, name, tuple(inputs), tuple(k for k in out_keys if k not in inputs), len(self.nodes))
        self.nodes.append(node)
        for t in node.inputs:
            self.consumers.setdefault(t, []).append(node)
        for t in node.outputs:
            self.producer[t] = node

    def remember(self, tensors: list[torch.Tensor]) -> list[Key]:
        """The keys of tensors about to be read, kept alive."""
        for t in tensors:
            self.tensors.setdefault(key(t), t)
            self.alive.append(t)
        return [key(t) for t in tensors]

    def readers(self, tensor: Key) -> list[Node]:
        """The calls that read a tensor."""
        return self.consumers.get(tensor, [])


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in a nested structure of arguments or outputs."""
    return [x for x in tree_leaves(value) if isinstance(x, torch.Tensor)]


class _Recorder(TorchFunctionMode):
    """Records every torch call made outside an atomic module."""

    def __init__(self, trace: Trace, owners: dict[int, list[tuple[str, nn.Module]]]) -> None:
        super().__init__()
        self.trace = trace
        self.depth = 0
        self.owners = owners  # id of each parameter -> the paths and modules holding it (tied: several)
        self.running: dict[nn.Module, int] = {}
        self.stack: list[str] = []  # the paths of the modules running now, outermost first

    def __torch_function__(self, func, types, args=(), kwargs=None):
        for t in _tensors((args, kwargs or {})):
            self.trace.read_params.add(id(t))
            owners = self.owners.get(id(t), [])
            if owners and not any(self.running.get(m) for _, m in owners):
                reader = self.stack[-1] if self.stack else ""
                for path, _ in owners:
                    self.trace.read_outside.setdefault(path, reader)
        inputs = self.trace.remember(_tensors((args, kwargs or {}))) if self.depth == 0 else []
        out = func(*args, **(kwargs or {}))
        if self.depth == 0:
            outputs = _tensors(out)
            if outputs:
                self.trace.add("op", getattr(func, "__name__", str(func)), inputs, outputs)
        return out


def record(model: nn.Module, atomic: dict[nn.Module, str], blocks: dict[nn.Module, int], *inputs: Any,
           **kwargs: Any) -> tuple[Trace, dict[int, tuple[Key, Key]]]:
    """Run `model` once, recording its dataflow; also each block's (input, output) hidden-state keys."""
    trace = Trace()
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append((path, m))
    recorder = _Recorder(trace, owners)
    starts: dict[int, Key] = {}
    ends: dict[int, tuple[Key, Key]] = {}
    entered: list[list[Key]] = []
    handles = []

    def enter(module: nn.Module, args: tuple, kw: dict) -> None:
        if recorder.depth == 0:
            entered.append(trace.remember(_tensors((args, kw))))
        recorder.depth += 1

    def leave(module: nn.Module, args: tuple, kw: dict, out: Any) -> None:
        recorder.depth -= 1
        if recorder.depth == 0:
            trace.add("module", atomic[module], entered.pop(), _tensors(out))

    def block_in(module: nn.Module, args: tuple, kw: dict) -> None:
        starts[blocks[module]] = trace.remember([args[0] if args else kw["hidden_states"]])[0]

    def block_out(module: nn.Module, args: tuple, kw: dict, out: Any) -> None:
        ends[blocks[module]] = (starts[blocks[module]], trace.remember(_tensors(out)[:1])[0])

    paths = {m: p for p, m in model.named_modules(remove_duplicate=False)}

    def running(module: nn.Module, *_: Any, **__: Any) -> None:
        recorder.running[module] = recorder.running.get(module, 0) + 1
        recorder.stack.append(paths.get(module, ""))

    def done(module: nn.Module, *_: Any, **__: Any) -> None:
        recorder.running[module] -= 1
        recorder.stack.pop()

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(running))
        handles.append(module.register_forward_hook(done))
    for module in atomic:
        handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(module.register_forward_hook(leave, with_kwargs=True))
    for module in blocks:
        handles.append(module.register_forward_pre_hook(block_in, with_kwargs=True))
        handles.append(module.register_forward_hook(block_out, with_kwargs=True))
    try:
        with torch.no_grad(), recorder:
            model(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return trace, ends


def walk(start: Iterator[Key] | list[Key], step) -> set[Key]:
    """The tensor keys reachable from `start` by `step(tensor) -> next tensor ids` (a graph search)."""
    seen: set[Key] = set()
    todo = list(start)
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        todo.extend(step(t))
    return seen
