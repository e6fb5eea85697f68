"""Reused float32 buffers for widened weights: streaming widens every bf16 weight at every pass, and fresh memory
costs a page fault per page."""

from __future__ import annotations

import torch


class BufferPool:
    """Float32 buffers for widened weights, handed back when their module's forward is over.

    Widening into fresh memory costs a page fault per page (measured: 27 ms against 8.5 ms for a 46 MB weight
    widened into a reused buffer), and every block, and every model of a comparison, asks for the same shapes,
    so one spare buffer per shape serves them all. Spares are kept up to MAX_SPARE_BYTES (block-sized weights,
    used once a block; an embedding-sized one, used once a model, is let go). One pool per process;
    `release_buffers` empties it.
    """

    MAX_SPARE_BYTES = 320 * 2**20
    MAX_BUFFER_BYTES = 256 * 2**20

    def __init__(self) -> None:
        self.free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        self.spare_bytes = 0

    def widen(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`tensor` converted to `dtype` in a pooled buffer."""
        spare = self.free.get((tuple(tensor.shape), dtype))
        if spare:
            out = spare.pop()
            self.spare_bytes -= out.nbytes
        else:
            out = torch.empty(tensor.shape, dtype=dtype)
        return out.copy_(tensor)

    def give_back(self, buffers: list[torch.Tensor]) -> None:
        """Keep the buffers of a finished module as spares, within the caps; empty the list."""
        for buffer in buffers:
            size = buffer.nbytes
            if size <= self.MAX_BUFFER_BYTES and self.spare_bytes + size <= self.MAX_SPARE_BYTES:
                self.free.setdefault((tuple(buffer.shape), buffer.dtype), []).append(buffer)
                self.spare_bytes += size
        buffers.clear()


POOL = BufferPool()


def release_buffers() -> None:
    """Free the spare widening buffers (when the models that use them are done)."""
    POOL.free.clear()
    POOL.spare_bytes = 0
