"""The exact rewrites as pure tensor functions (DESIGN.md section 5, items 1-4).

Every function takes weights in the layout they are stored in (`conv1d` True: HF Conv1D's (in, out);
False: nn.Linear's (out, in)) and works on them in that layout, a block of stored rows at a time: each
block is widened to float64, transformed, and rounded once to the stored dtype, so that memory stays at
one matrix in its stored dtype plus a cache-sized block, and no strided transpose is ever made. Vectors
(biases) come back in float64 for the caller to cast. The gain multiply of `fold_into_reader` is done in
the stored dtype where that is bit-identical (see there): it is the bulk of a fold.
"""

from __future__ import annotations

from functools import wraps
from typing import Callable, TypeVar

import torch

Tensor = torch.Tensor
BLOCK_ELEMENTS = 1 << 20  # float64 elements per block (8 MiB): cache-sized, yet large enough for fast kernels


def _row_slices(rows: int, cols: int) -> list[slice]:
    """Consecutive slices of `rows` rows, each about BLOCK_ELEMENTS elements of `cols` columns."""
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def _map_rows(weight: Tensor, fn: Callable[[Tensor, slice], Tensor], rows: int | None = None, cols: int | None = None) -> Tensor:
    """A new (rows, cols) matrix in `weight`'s dtype: row block `sl` is fn(weight[sl] in float64, sl), rounded once."""
    rows = weight.shape[0] if rows is None else rows
    out = torch.empty((rows, weight.shape[1] if cols is None else cols), dtype=weight.dtype)
    for sl in _row_slices(rows, weight.shape[1]):
        out[sl] = fn(weight[sl].to(torch.float64), sl)
    return out


def _matvec(weight: Tensor, conv1d: bool, vec: Tensor) -> Tensor:
    """W v in float64, W the (out, in) linear map of a stored weight, read a block of stored rows at a time."""
    v = vec.to(torch.float64)
    slices = _row_slices(weight.shape[0], weight.shape[1])
    if not conv1d:
        return torch.cat([weight[sl].to(torch.float64) @ v for sl in slices])
    total = torch.zeros(weight.shape[1], dtype=torch.float64)  # stored (in, out): W v = v @ stored
    for sl in slices:
        total += v[sl] @ weight[sl].to(torch.float64)
    return total


FLOAT32_EXACT = (torch.float32, torch.bfloat16, torch.float16)
Rewrite = TypeVar("Rewrite", bound=Callable)


def per_expert(fn: Rewrite) -> Rewrite:
    """Let a rewrite of one matrix (and its bias) take the stacked experts of a mixture-of-experts layer too: a weight
    (E, out, in) (or (E, in, out) for `conv1d`) with bias (E, out) is rewritten one expert at a time, each with the
    same other arguments, and the results stacked again."""

    @wraps(fn)
    def wrapper(weight: Tensor, bias: Tensor | None = None, *args, **kwargs):
        if weight.ndim != 3:
            return fn(weight, bias, *args, **kwargs)
        outs = [fn(weight[e], None if bias is None else bias[e], *args, **kwargs) for e in range(weight.shape[0])]
        if isinstance(outs[0], Tensor):
            return torch.stack(outs)
        return tuple(None if part[0] is None else torch.stack(list(part)) for part in zip(*outs))

    return wrapper  # type: ignore[return-value]


def effective_gain(weight: Tensor | None, offset: float, size: int) -> Tensor:
    """The gain a norm multiplies by: w, or (1 + w) for Gemma-style norms; ones when the norm has no weight.

    A plain gain comes back as stored; (1 + w) in float64.
    """
    if weight is None:
        return torch.ones(size, dtype=torch.float64)
    if offset == 0:
        return weight
    return weight.to(torch.float64) + offset


@per_expert
def fold_into_reader(
    weight: Tensor, bias: Tensor | None, gain: Tensor | None, norm_bias: Tensor | None, *, conv1d: bool
) -> tuple[Tensor, Tensor | None]:
    """A reader y = W z + c of a norm output z = g * n + b becomes y = (W diag g) n + (c + W b).

    Returns the new weight (stored layout) and bias; the bias is None only when there was none and
    the norm has no bias to fold.
    """
    new_bias = None if bias is None else bias.to(torch.float64)
    if norm_bias is not None:
        shift = _matvec(weight, conv1d, norm_bias)
        new_bias = shift if new_bias is None else new_bias + shift
    if gain is None:
        return weight, new_bias
    if gain.dtype == weight.dtype and weight.dtype in FLOAT32_EXACT:
        # One correctly rounded product in the stored dtype: the same bits as the exact (float64) product
        # cast back, since torch forms 16-bit products in float32, where they are exact.
        return weight * (gain[:, None] if conv1d else gain[None, :]), new_bias
    g = gain.to(torch.float64)
    if conv1d:
        return _map_rows(weight, lambda rows, sl: rows * g[sl, None]), new_bias
    return _map_rows(weight, lambda rows, sl: rows * g), new_bias


@per_expert
def center_writer(
    weight: Tensor, bias: Tensor | None, *, conv1d: bool, drop_last: bool = False
) -> tuple[Tensor, Tensor | None]:
    """A writer's output projected onto zero mean: W <- P W, c <- P c with P = I - 11^T/d.

    With `drop_last` (CRMS) only the first d-1 output coordinates are kept: on a zero-mean residual the
    last one is minus the sum of the others.
    """
    if conv1d:  # stored (in, out=d): centre each stored row over the residual coordinates
        keep = weight.shape[1] - 1 if drop_last else weight.shape[1]
        w = _map_rows(weight, lambda rows, sl: (rows - rows.mean(dim=1, keepdim=True))[:, :keep], cols=keep)
    else:  # stored (out=d, in): subtract the mean of the stored rows
        total = torch.zeros(weight.shape[1], dtype=torch.float64)
        for sl in _row_slices(weight.shape[0], weight.shape[1]):
            total += weight[sl].to(torch.float64).sum(dim=0)
        mean = total / weight.shape[0]
        w = _map_rows(weight, lambda rows, sl: rows - mean, rows=weight.shape[0] - 1 if drop_last else None)
    if bias is None:
        return w, None
    c = bias.to(torch.float64)
    c = c - c.mean()
    return w, c[:-1] if drop_last else c


def center_rows(
    table: Tensor, *, drop_last: bool = False, layer_norm: tuple[Tensor, Tensor | None, float] | None = None
) -> Tensor:
    """Embedding rows projected onto zero mean: E <- E P, keeping d-1 coordinates with `drop_last` (CRMS).

    `layer_norm` = (gain, bias, eps) first applies an embedding LayerNorm to every row (baking BLOOM's
    word_embeddings_layernorm into the table), in the same float64 pass.
    """
    keep = table.shape[1] - 1 if drop_last else table.shape[1]

    def rows_fn(e: Tensor, sl: slice) -> Tensor:
        if layer_norm is not None:
            gain, bias, eps = layer_norm
            centered = e - e.mean(dim=-1, keepdim=True)
            e = centered / torch.sqrt(centered.pow(2).mean(dim=-1, keepdim=True) + eps) * gain.to(torch.float64)
            e = e if bias is None else e + bias.to(torch.float64)
        return (e - e.mean(dim=-1, keepdim=True))[:, :keep]

    return _map_rows(table, rows_fn, cols=keep)


def compress_reader(weight: Tensor, gain: Tensor | None, *, conv1d: bool) -> Tensor:
    """CRMS reader of a norm with gain g: W' = (W diag g)[:, :d-1] - (W diag g)[:, d-1] 1^T, since
    x_d = -sum(x_1..x_{d-1}) on a zero-mean residual (rounded to the stored dtype). Stacked experts: each one's."""
    if weight.ndim == 3:
        return torch.stack([compress_reader(w, gain, conv1d=conv1d) for w in weight])
    d = weight.shape[0] if conv1d else weight.shape[1]
    g = torch.ones(d, dtype=torch.float64) if gain is None else gain.to(torch.float64)
    if conv1d:  # stored (in=d, out): row j becomes g_j W_j - g_d W_d
        last = weight[-1].to(torch.float64) * g[-1]
        return _map_rows(weight, lambda rows, sl: rows * g[sl, None] - last, rows=d - 1)

    def compress(rows: Tensor, sl: slice) -> Tensor:
        rows = rows * g
        return rows[:, :-1] - rows[:, -1:]

    return _map_rows(weight, compress, cols=d - 1)
