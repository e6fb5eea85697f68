"""The exact rewrites as pure tensor functions (DESIGN.md section 5, items 1-4).

Every function takes weights in the layout they are stored in (`conv1d` True: HF Conv1D's (in, out);
False: nn.Linear's (out, in)) and computes in float64, rounding once at the end. Functions on whole
matrices return float64 (the caller casts); those that also see vocabulary-sized matrices (readers,
embedding rows) work on blocks of rows and round each block once to the stored dtype, so that memory
stays at one matrix in its stored dtype. The gain multiply of `fold_into_reader` is done in the stored
dtype where that is bit-identical (see there): it is the bulk of a fold.
"""

from __future__ import annotations

from typing import Callable

import torch

Tensor = torch.Tensor
ROW_BLOCK = 4096  # rows per float64 block: 4096 x 8192 x 8 bytes = 256 MiB at most for the widest models


def _by_rows(weight: Tensor, conv1d: bool, fn: Callable[[Tensor], Tensor], out_cols: int) -> Tensor:
    """`fn` on float64 blocks of rows of the (out, in) view, each rounded once to the stored dtype; stored layout."""
    w = weight.t() if conv1d else weight
    out = torch.empty((w.shape[0], out_cols), dtype=weight.dtype)
    for i in range(0, w.shape[0], ROW_BLOCK):
        out[i : i + ROW_BLOCK] = fn(w[i : i + ROW_BLOCK].to(torch.float64))
    return out.t().contiguous() if conv1d else out


def _matvec(weight: Tensor, conv1d: bool, vec: Tensor) -> Tensor:
    """(out, in) view of a stored weight times a vector, in float64, a block of rows at a time."""
    w = weight.t() if conv1d else weight
    v = vec.to(torch.float64)
    return torch.cat([w[i : i + ROW_BLOCK].to(torch.float64) @ v for i in range(0, w.shape[0], ROW_BLOCK)])


def _as_out_in(weight: Tensor, conv1d: bool) -> Tensor:
    """View a stored linear weight as (out, in) in float64."""
    w = weight.to(torch.float64)
    return w.t() if conv1d else w


def _stored(weight_out_in: Tensor, conv1d: bool) -> Tensor:
    """Back from (out, in) to the stored layout."""
    return weight_out_in.t().contiguous() if conv1d else weight_out_in.contiguous()


FLOAT32_EXACT = (torch.float32, torch.bfloat16, torch.float16)


def effective_gain(weight: Tensor | None, offset: float, size: int) -> Tensor:
    """The gain a norm multiplies by: w, or (1 + w) for Gemma-style norms; ones when the norm has no weight.

    A plain gain comes back as stored; (1 + w) in float64.
    """
    if weight is None:
        return torch.ones(size, dtype=torch.float64)
    if offset == 0:
        return weight
    return weight.to(torch.float64) + offset


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
    return _by_rows(weight, conv1d, lambda rows: rows * g, g.shape[0]), new_bias


def center_writer(weight: Tensor, bias: Tensor | None, *, conv1d: bool) -> tuple[Tensor, Tensor | None]:
    """A writer's output projected onto zero mean: W <- P W, c <- P c with P = I - 11^T/d."""
    w = _as_out_in(weight, conv1d)
    w = w - w.mean(dim=0, keepdim=True)
    new_bias = None if bias is None else bias.to(torch.float64) - bias.to(torch.float64).mean()
    return _stored(w, conv1d), new_bias


def center_rows(table: Tensor) -> Tensor:
    """Embedding rows projected onto zero mean: E <- E P (rounded to the table's dtype)."""
    return _by_rows(table, False, lambda e: e - e.mean(dim=-1, keepdim=True), table.shape[1])


def layer_norm_rows(table: Tensor, gain: Tensor, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm applied to every row of a table (to bake an embedding LayerNorm into the embeddings)."""
    e = table.to(torch.float64)
    centered = e - e.mean(dim=-1, keepdim=True)
    normed = centered / torch.sqrt(centered.pow(2).mean(dim=-1, keepdim=True) + eps)
    out = normed * gain.to(torch.float64)
    return out if bias is None else out + bias.to(torch.float64)


def drop_last_output(weight: Tensor, bias: Tensor | None, *, conv1d: bool) -> tuple[Tensor, Tensor | None]:
    """CRMS writer: keep the first d-1 output coordinates of a zero-mean writer (the last is minus their sum)."""
    w = _as_out_in(weight, conv1d)[:-1]
    return _stored(w, conv1d), None if bias is None else bias.to(torch.float64)[:-1]


def compress_reader(weight: Tensor, gain: Tensor | None, *, conv1d: bool) -> Tensor:
    """CRMS reader of a norm with gain g: W' = (W diag g)[:, :d-1] - (W diag g)[:, d-1] 1^T, since
    x_d = -sum(x_1..x_{d-1}) on a zero-mean residual (rounded to the stored dtype)."""
    g = None if gain is None else gain.to(torch.float64)

    def compress(rows: Tensor) -> Tensor:
        if g is not None:
            rows = rows * g
        return rows[:, :-1] - rows[:, -1:]

    in_dim = weight.shape[0] if conv1d else weight.shape[1]
    return _by_rows(weight, conv1d, compress, in_dim - 1)
