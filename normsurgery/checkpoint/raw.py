"""Tensors as stored bytes, without torch: what a copy needs (prune --layers starts without importing torch)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Union

from normsurgery.checkpoint.safetensors_header import dtype_code

if TYPE_CHECKING:
    import torch


class RawTensor(NamedTuple):
    """One tensor as stored: its safetensors dtype code, shape and little-endian bytes."""

    code: str
    shape: tuple[int, ...]
    data: memoryview
    origin: tuple[Path, int] | None = None  # the file and offset the bytes were mapped from, for a kernel-side copy

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


AnyTensor = Union["torch.Tensor", RawTensor]


def as_raw(tensor: AnyTensor) -> RawTensor:
    """A contiguous CPU torch tensor (or a RawTensor, returned as it is) as its stored bytes, without a copy."""
    if isinstance(tensor, RawTensor):
        return tensor
    import torch

    return RawTensor(dtype_code(tensor.dtype), tuple(tensor.shape), memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
