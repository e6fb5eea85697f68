"""Skip blocks, or zero sub-layers, of a loaded model in place (a skipped block passes its input through, a zeroed
sub-layer adds nothing to the residual): the reference a pruned checkpoint must equal, and how skip costs are
measured."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from normsurgery.arch.spec import Architecture


def _pass_through(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    """A forward hook that replaces a block's output hidden states by its input (any other outputs kept)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, (tuple, list)):  # GPT-1's blocks return a list
        return type(output)([hidden, *output[1:]])
    return hidden


@contextmanager
def skipping(model: torch.nn.Module, arch: Architecture, blocks: list[int] | tuple[int, ...]) -> Iterator[None]:
    """Within the context, the given blocks of `model` pass their input through unchanged."""
    handles = [model.get_submodule(arch.block_path(i)).register_forward_hook(_pass_through, with_kwargs=True)
               for i in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _zero_output(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    """A forward hook that replaces a module's output by zeros."""
    return torch.zeros_like(output)


@contextmanager
def zeroing(model: torch.nn.Module, arch: Architecture, sublayers: dict[str, tuple[int, ...] | list[int]]) -> Iterator[None]:
    """Within the context, the given sub-layers of `model` ("attention"/"mlp" -> block indices) add nothing to the
    residual: the output of what each adds (its output norm, else its writer) is zeroed. None given: no hooks (on
    any model, with separate sub-layers or not)."""
    from normsurgery.rewrite.sublayers import sublayers as find

    found = find(arch) if any(sublayers.values()) else []
    handles = [model.get_submodule(found[i][kind].contribution).register_forward_hook(_zero_output)
               for kind, blocks in sublayers.items() for i in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
