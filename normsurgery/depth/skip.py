"""Skip blocks of a loaded model in place (each passes its input through): the reference a pruned checkpoint
must equal, and how a block's skip cost is measured."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from normsurgery.arch.spec import Architecture


def _pass_through(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    """A forward hook that replaces a block's output hidden states by its input (any other outputs kept)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden,) + output[1:]
    return hidden


@contextmanager
def skipping(model: torch.nn.Module, arch: Architecture, blocks: list[int] | tuple[int, ...]) -> Iterator[None]:
    """Within the context, the given blocks of `model` pass their input through unchanged."""
    handles = [model.get_submodule(arch.blocks[i].prefix.rstrip(".")).register_forward_hook(_pass_through,
                                                                                               with_kwargs=True)
               for i in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
