"""Where a lazily run model's weights come from: a checkpoint read in place, or a rewrite computed on the fly.

Both are read-only name -> tensor maps. `PlanWeights` is the float32 twin of a rewrite: each tensor is the
rewrite's own step run on the source tensors when the forward asks for it, so verifying a bf16 output needs
no float32 copy on disk and reads the source in place.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from normsurgery.checkpoint.reader import CheckpointReader
from normsurgery.engine.buffers import release_buffers
from normsurgery.rewrite.plan import Step, run_step

Tensor = torch.Tensor
# A rewrite step reading more than this (in float32) frees the spare widening buffers before it runs.
BIG_STEP_BYTES = 256 * 2**20


class WeightMap(Protocol):
    """What the engine reads weights from."""

    def names(self) -> list[str]: ...
    def get(self, name: str) -> Tensor: ...
    def nbytes(self, name: str, dtype: torch.dtype) -> int: ...


class CheckpointWeights:
    """A checkpoint's tensors, each mapped from its file when asked for (see CheckpointReader.get)."""

    def __init__(self, reader: CheckpointReader) -> None:
        self.reader = reader

    def names(self) -> list[str]:
        return self.reader.names()

    def get(self, name: str) -> Tensor:
        return self.reader.get(name)

    def nbytes(self, name: str, dtype: torch.dtype) -> int:
        return math.prod(self.reader.info(name).shape) * dtype.itemsize


class PlanWeights:
    """The output of a rewrite over `reader`, computed tensor by tensor at `dtype` precision, never written.

    `produced` names the step that made each computed output and `shapes` every output tensor's shape (both
    recorded while the rewrite streamed); the other outputs are source tensors copied under `renames`. A
    step's other outputs wait in a small cache until the forward asks for them (a norm's readers follow the
    norm), so each step runs once per forward.
    """

    def __init__(self, reader: CheckpointReader, produced: dict[str, Step], shapes: dict[str, list[int]],
                 renames: dict[str, str], dtype: torch.dtype = torch.float32) -> None:
        self.reader, self.produced, self.shapes, self.dtype = reader, produced, shapes, dtype
        back = {new: old for old, new in renames.items()}
        self._copied = {name: back.get(name, name) for name in shapes if name not in produced}
        self._pending: dict[str, Tensor] = {}

    def names(self) -> list[str]:
        return list(self.shapes)

    def get(self, name: str) -> Tensor:
        if name in self._pending:
            return self._pending.pop(name)
        step = self.produced.get(name)
        if step is None:
            return self.reader.get(self._copied[name])
        if sum(self.reader.info(n).numel for n in step.inputs) * self.dtype.itemsize > BIG_STEP_BYTES:
            # the step holds its inputs and outputs in float32 at once (the unembedding: twice its float32
            # size); the spare widening buffers would stack on top of that, at the verification's peak
            release_buffers()
        outputs = run_step(step, self.reader, lambda _: self.dtype)
        tensor = outputs.pop(name)
        self._pending.update(outputs)
        return tensor

    def nbytes(self, name: str, dtype: torch.dtype) -> int:
        return math.prod(self.shapes[name]) * dtype.itemsize
